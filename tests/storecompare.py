"""Compare two feature stores array by array (shared by the extraction, Ray and S3 tests; needs no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr


def array_paths(group: zarr.Group) -> list[str]:
    return sorted(path for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array))


def assert_same_store(actual: str | Path, expected: str | Path, same_spec: bool = True) -> None:
    """Every array of the two `features.zarr` groups equal, value for value (same names, shapes, dtypes);
    `same_spec`: also made by the same spec (hash)."""
    got = zarr.open_group(f"{actual}/features.zarr", mode="r")
    want = zarr.open_group(f"{expected}/features.zarr", mode="r")
    assert array_paths(got) == array_paths(want)
    for path in array_paths(want):
        a, b = got[path][...], want[path][...]
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(a, b, err_msg=path)
    if same_spec:
        assert got.attrs["sdfeat"]["spec_hash"] == want.attrs["sdfeat"]["spec_hash"]
