"""What a store holds, as the writer and every reader see it: its per-sample arrays (`ArrayLayout`, made by
`planning.layout` and created by `files.create_template`) and how its rows are cut into units (`units_for`; a
unit owns whole shards, so the count is the store's, not the planner's). No torch, no zarr.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrayLayout:
    """One per-sample array of the store: `path` inside features.zarr and the shape of one sample's slice."""

    path: str                    # "up_blocks.1.upsamplers.0", "crops/16/conv_in", "summaries/conv_in/norms"
    sample_shape: tuple[int, ...]  # e.g. (timestep, seed, channel, y, x)
    dims: tuple[str, ...]          # names of the sample_shape axes
    dtype: str
    chunk_sample_shape: tuple[int, ...] | None = None  # inner chunk of one sample; None = the whole slice
    rows: int | None = None  # only the first `rows` samples (crop variants under `variants.samples`); None = all

    def n_rows(self, n_samples: int) -> int:
        """Rows of this array in a store of `n_samples`: all, or the first `rows` (dimension `crop_sample`)."""
        return n_samples if self.rows is None else min(self.rows, n_samples)

    def bytes_per_sample(self) -> int:
        return int(np.prod(self.sample_shape)) * np.dtype(self.dtype).itemsize


def units_for(n_samples: int, size: int) -> int:
    """How many units of `size` rows a store of `n_samples` rows has (the last one may be short)."""
    return -(-n_samples // size)
