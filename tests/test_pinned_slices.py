"""Pinned activations of the tiny model, per protocol (diffusers' `expected_slice` practice).

The values were recorded once from this job (2 generated images, 64 px, t = 50, seed 42, fp32 store, 1 thread).
Any change to loading, preprocessing, noise, scheduling or hooking that moves the numbers fails here, even when
two code paths still agree with each other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdfeat.extract import run_local
from sdfeat.spec import parse_spec
from sdfeat.store.query import open_store

# protocol -> block -> (first four values of channel 0 row 0, last four values of the last channel's last row)
PINNED = {
    "paper": {
        "down_blocks.1.attentions.0": ([-0.21609, 0.07242, -0.01131, 0.05242], [-0.72383, 0.18796, 0.18681, -0.47099]),
        "up_blocks.1.upsamplers.0": ([-0.01961, -0.08901, 0.02832, 0.17993], [-0.23757, 0.04220, 0.06398, 0.08523]),
    },
    "standard": {
        "down_blocks.1.attentions.0": ([-0.10927, -0.10877, -0.50232, 0.40833], [-0.65289, -0.78073, 0.85315, 0.54840]),
        "up_blocks.1.upsamplers.0": ([0.06588, -0.16099, -0.15986, 0.03252], [-0.26918, 0.25390, 0.26421, -0.03605]),
    },
}


@pytest.mark.parametrize("protocol", sorted(PINNED))
def test_tiny_model_activations_are_pinned(protocol: str, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    spec = parse_spec({"model": "tiny", "protocol": protocol, "source": "synthetic:2", "resolution": 64,
                       "blocks": sorted(PINNED[protocol]), "timesteps": [50], "seeds": [42], "batch_size": 2,
                       "dtype": "float32", "output": str(tmp_path / protocol)})
    try:
        run_local(spec, progress=False, threads=1)
    finally:
        torch.set_num_threads(threads)
    features = open_store(str(tmp_path / protocol))
    for block, (head, tail) in PINNED[protocol].items():
        x = features.read(block, [1], timestep=50, seed=42)[0]  # (C, H, W)
        np.testing.assert_allclose(x[0, 0, :4], head, atol=2e-4, err_msg=block)
        np.testing.assert_allclose(x[-1, -1, -4:], tail, atol=2e-4, err_msg=block)
