"""Token norms: the L2 norm of every token's channel vector, in float32 (as the reference computes it). The one
definition that the extraction summaries (`summaries.summarize`, torch on the device), the anomaly metric
(`metrics.tasks.BlockReader.norm_maps`), the maps (`maps.norm_map`, `maps.cosine_to`) and the explorer all use.

A torch tensor is reduced with torch on its own device (the summaries' stored bytes come from this path); a numpy
array with numpy, so the maps and `sdfeat show` never import torch. The two agreed bit for bit on every shape tried
larger than 1×1 token (at 1×1 they differ in the last bits: torch sums a contiguous channel axis in another order).
Imports numpy only; torch is neither imported nor needed here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, overload

import numpy as np

if TYPE_CHECKING:
    import torch


@overload
def token_norms(acts: np.ndarray) -> np.ndarray: ...
@overload
def token_norms(acts: torch.Tensor) -> torch.Tensor: ...


def token_norms(acts):
    """(..., C, H, W) -> (..., H, W) float32: the L2 norm over channels of every token, batched or not.

    numpy in, numpy out (computed in float32); a torch tensor in, a float32 tensor on its device out."""
    if not isinstance(acts, np.ndarray):
        return acts.float().norm(dim=-3)  # torch: the summaries and the anomaly metric
    acts = acts.astype(np.float32, copy=False)
    *lead, c, h, w = acts.shape
    flat = acts.reshape(*lead, c, h * w)  # (..., C, T)
    return np.sqrt(np.einsum("...ct,...ct->...t", flat, flat)).reshape(*lead, h, w)
