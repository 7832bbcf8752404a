"""Per-image summaries, computed on the device while extracting (full-ImageNet jobs store these, not tensors).

Per (image, timestep, seed) and block:
- `norms` (H, W) float32: the token-norm map (anomaly metric, detection);
- `tokens` (K, C) float16 and `token_yx` (K, 2) int16 (row, col): K sampled tokens for the position probe; the
  positions are a pure function of (seed, sample_id), independent of batch, device and worker;
- `groups` (3, 3), `groups_diag` (3,), `corner_groups` (4, 3) float64 and `group_pairs` (3, 3) int64: the corner
  metric's cosine-similarity pair sums on the full map's inner (H-2)×(W-2) region (reprcropped) and, with a crop
  activation, the same on the crop map under the `crop_` prefix.
Their names, shapes and dtypes are `layout.summary_layout`'s; this module computes them with torch.
`sdfeat.metrics` turns these into the same numbers as from full tensors (`metrics.runner` reads them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from sdfeat.metrics.corners import device_pair_counts, group_similarity_sums, inner
from sdfeat.metrics.norms import token_norms
from sdfeat.planning.layout import summary_tokens

if TYPE_CHECKING:
    from sdfeat.models.blocks import BlockInfo

GROUP_KEYS = ("groups", "groups_diag", "corner_groups", "group_pairs")


def token_positions(seed: int, sample_id: str, height: int, width: int, k: int) -> np.ndarray:
    """(k, 2) int64 (row, col), distinct, sorted in token order; a pure function of its arguments."""
    digest = hashlib.sha256(f"{seed}\0{sample_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    flat = np.sort(rng.choice(height * width, size=min(k, height * width), replace=False))
    return np.stack([flat // width, flat % width], axis=1)


def sample_positions(seed: int, sample_ids: Sequence[str], block: "BlockInfo", tokens_per_image: int) -> np.ndarray:
    """(B, K, 2) int64: the probe's token positions of each image of a batch in `block` (`token_positions`).
    Computed on the host ahead of the device (`feed.Feeder`), never while the device waits."""
    k = summary_tokens(block, tokens_per_image)
    return np.stack([token_positions(seed, sid, block.height, block.width, k) for sid in sample_ids])


def _group_summaries(acts: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    sums = group_similarity_sums(acts)  # acts (B, C, m, m)
    out = {f"{prefix}{k}": v for k, v in sums.items()}
    out[f"{prefix}group_pairs"] = device_pair_counts(acts.shape[-1], acts.device).expand(len(acts), 3, 3)
    return out


def crop_summaries(crop_acts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The `crop_*` group sums of one-token-crop activations (B, C, H-2, W-2), computed in the crop's own forward
    pass (extraction runs the crop after the full image, so the two halves of `summarize` arrive separately)."""
    return _group_summaries(crop_acts, "crop_")


def summarize(acts: torch.Tensor, positions: torch.Tensor,
              crop_acts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """acts (B, C, H, W) on any device -> {name: (B, *shape)} on that device, dtypes of `layout.summary_layout`.

    positions: (B, K, 2) int64 (row, col) on acts' device, the sampled tokens (`sample_positions`).
    crop_acts: (B, C, H-2, W-2) activations of the one-token crop, or None. Nothing here waits for the device."""
    b, c, h, w = acts.shape
    k = positions.shape[1]
    flat = positions[..., 0] * w + positions[..., 1]  # (B, K) int64
    picked = torch.gather(acts.flatten(2), 2, flat[:, None, :].expand(b, c, k))  # (B, C, K)
    out = {
        "norms": token_norms(acts),
        "tokens": picked.transpose(1, 2).half(),
        "token_yx": positions.short(),
    }
    if min(h, w) >= 4:
        out.update(_group_summaries(inner(acts), ""))
        if crop_acts is not None:
            out.update(crop_summaries(crop_acts))
    return out
