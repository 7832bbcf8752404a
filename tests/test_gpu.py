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
