"""Shared fixtures: offline environment, tier markers, and a small extracted store built once per session."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# Tests never touch the network or a user's Ray token, and stay inside the 2 cores they get.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail with TimeoutError instead of hanging (a named pipe opened for reading blocks forever)."""
    def expired(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def small_spec(output: str, **overrides):
    """A fast tiny-model job: 12 generated images, 128 px, a handful of blocks, units of 4."""
    from sdfeat.spec import parse_spec

    data = {
        "model": "tiny", "protocol": "standard", "source": "synthetic:12", "resolution": 128,
        "blocks": ["conv_in", "down_blocks.1.attentions.0", "mid_block.resnets.1", "up_blocks.1.resnets.2",
                   "up_blocks.1.upsamplers.0"],
        "timesteps": [50, 200], "seeds": [42], "batch_size": 4, "unit_size": 4, "output": output,
    }
    data.update(overrides)
    return parse_spec(data)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A finished store of `small_spec` (read-only for tests: copy it before changing anything)."""
    from sdfeat.extract import run_local

    output = str(tmp_path_factory.mktemp("stores") / "tiny")
    run_local(small_spec(output), progress=False, device="cpu")
    return output
