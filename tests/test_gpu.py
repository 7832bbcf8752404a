"""On a CUDA device: the same job gives the CPU's store (standard protocol noise is drawn on the CPU, so only
floating-point differences remain), and fp16 compute stays close to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import small_spec
from sdfeat.extract import run_local
from sdfeat.query import open_store

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("compute_dtype, tol", [("float32", 2e-2), ("float16", 6e-2)])
def test_cuda_store_matches_cpu_store(tiny_store: str, tmp_path: Path, compute_dtype: str, tol: float) -> None:
    output = str(tmp_path / f"cuda-{compute_dtype}")
    run_local(small_spec(output, compute_dtype=compute_dtype), progress=False, device="cuda")
    cpu, gpu = open_store(tiny_store), open_store(output)
    assert gpu.ok.all()
    for block in cpu.blocks:
        a, b = cpu.read(block), gpu.read(block)
        scale = np.abs(a).max() + 1e-6
        assert np.abs(a - b).max() / scale < tol, block


def test_the_launching_thread_never_waits_for_the_device(tmp_path: Path) -> None:
    """Every batch of a job with crops, several timesteps and seeds, summaries, a failed image and a latent cache
    (cold, then warm) launches without a synchronising CUDA call: torch's sync debug mode raises on any (`.item()`,
    `.cpu()`, a pageable copy, `torch.cuda.synchronize`) in the thread that runs the device stages."""
    import threading

    import torch

    from sdfeat import forward

    errors: list[BaseException] = []
    run = forward.Forward.run

    def strict(self, batch, work):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return run(self, batch, work)
        except RuntimeError as err:  # recorded, then re-raised: the unit fails and the test says why
            errors.append(err)
            raise
        finally:
            torch.cuda.set_sync_debug_mode("default")

    forward.Forward.run = strict
    try:
        for name in ("cold", "warm"):
            spec = small_spec(str(tmp_path / name), timesteps=[50, 200], seeds=[1, 2], batch_size=3,
                              variants={"crops": "auto"}, summaries={"blocks": "paper", "tokens_per_image": 4},
                              latent_cache=str(tmp_path / "cache"))
            run_local(spec, progress=False, device="cuda")
    finally:
        forward.Forward.run = run
    assert errors == [], errors[0]
    assert threading.active_count() >= 1
