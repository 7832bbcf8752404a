"""sdfeat: extract Stable Diffusion U-Net activations into chunked Zarr v3 stores and measure what they encode.

`open_store(path)` is the query entry point; the CLI (`sdfeat --help`) covers extraction, metrics and reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sdfeat.store.query import FeatureStore


def open_store(path: str) -> "FeatureStore":
    """Open a feature store for reading (local path or fsspec URL)."""
    from sdfeat.store.query import open_store as _open

    return _open(path)


__all__ = ["__version__", "open_store"]
