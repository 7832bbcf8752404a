"""On a CUDA device: the same job gives the CPU's store (standard protocol noise is drawn on the CPU, so only
floating-point differences remain), and fp16 compute stays close to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import small_spec
from sdfeat.extract import run_local
from sdfeat.store.query import open_store

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
    """Every batch of a job with crops, several timesteps and seeds, summaries and a latent cache (cold, then
    warm) launches without a synchronising CUDA call: torch's sync debug mode warns on any (`.item()`, `.cpu()`,
    a pageable copy, `torch.cuda.synchronize`), and no warning comes from the thread that launches the device
    stages (the writer's wait on a unit's fence is the one expected, in its own thread)."""
    import threading
    import warnings

    import torch

    seen: list[tuple[str, str]] = []
    show = warnings.showwarning

    def record(message, *args, **kwargs) -> None:
        seen.append((threading.current_thread().name, str(message)))

    torch.cuda.set_sync_debug_mode("warn")
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            for name in ("cold", "warm"):
                spec = small_spec(str(tmp_path / name), timesteps=[50, 200], seeds=[1, 2], batch_size=3,
                                  variants={"crops": "auto"}, summaries={"blocks": "paper", "tokens_per_image": 4},
                                  latent_cache=str(tmp_path / "cache"))
                run_local(spec, progress=False, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = show
    launching = [message for thread, message in seen if thread == "sdfeat-launch" and "synchroniz" in message]
    assert launching == []
