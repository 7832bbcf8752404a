"""Querying a store: selection semantics, xarray view, info, verify (against values read with zarr directly)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from sdfeat import store
from sdfeat.errors import StoreError, UnknownBlockError
from sdfeat.store.query import open_store


def _raw(output: str, name: str) -> np.ndarray:
    return zarr.open_group(f"{output}/features.zarr", mode="r")[name][:]


def test_read_selections_match_zarr(tiny_store: str) -> None:
    features = open_store(tiny_store)
    raw = _raw(tiny_store, "mid_block.resnets.1").astype(np.float32)  # (12, 2, 1, C, y, x)
    np.testing.assert_array_equal(features.read("mid_block.resnets.1"), raw)
    np.testing.assert_array_equal(features.read("mid_block.resnets[1]", [3, 1]),
                                  raw[[3, 1]])
    np.testing.assert_array_equal(features.read("mid_block.resnets.1", features.sample_ids[7], timestep=200, seed=42),
                                  raw[[7], 1, 0])
    np.testing.assert_array_equal(features.read("mid_block.resnets.1", slice(2, 5), timestep=50), raw[2:5, 0])
    assert features.read("mid_block.resnets.1", [0], raw=True).dtype == np.float16


def test_bracket_names_are_accepted(tiny_store: str) -> None:
    features = open_store(tiny_store)
    np.testing.assert_array_equal(features.read("up_blocks[1].upsamplers[0]", [0]),
                                  features.read("up_blocks.1.upsamplers.0", [0]))


def test_read_errors_name_the_problem(tiny_store: str) -> None:
    features = open_store(tiny_store)
    with pytest.raises(UnknownBlockError, match="stored blocks"):
        features.read("up_blocks.2.resnets.0")
    with pytest.raises(StoreError, match="sample 'nope'"):
        features.read("conv_in", ["nope"])
    with pytest.raises(StoreError, match="timestep 999"):
        features.read("conv_in", [0], timestep=999)
    with pytest.raises(StoreError, match="out of range"):
        features.read("conv_in", [12])
    with pytest.raises(StoreError, match="no feature store"):
        open_store(str(Path(tiny_store).parent / "missing"))


def test_iter_samples_covers_every_row_once(tiny_store: str) -> None:
    features = open_store(tiny_store)
    pieces = list(features.iter_samples("conv_in", batch=5, timestep=50, seed=42))
    assert [r for r, _ in pieces] == [slice(0, 5), slice(5, 10), slice(10, 12)]
    np.testing.assert_array_equal(np.concatenate([v for _, v in pieces]),
                                  features.read("conv_in", timestep=50, seed=42))


def test_xarray_view_has_named_dims_and_coords(tiny_store: str) -> None:
    ds = open_store(tiny_store).to_xarray()
    var = ds["up_blocks.1.upsamplers.0"]
    assert var.dims == ("sample", "timestep", "seed", "channel_64", "y_8", "x_8")
    assert list(ds["timestep"].values) == [50, 200]
    assert "sample_id" in ds.coords and str(ds["sample_id"].values[3]) == "synthetic#00003"
    np.testing.assert_array_equal(var.isel(sample=4).values, _raw(tiny_store, "up_blocks.1.upsamplers.0")[4])


def test_info_counts_bytes(tiny_store: str) -> None:
    info = open_store(tiny_store).info()
    assert info["samples"] == 12 and info["units_done"] == info["units"] == 3
    # independent of info(): 12 samples x 2 timesteps x 1 seed x C·H·W per block (the fixture's, 128 px) x 2 bytes
    tokens = {"conv_in": 32 * 16 * 16, "down_blocks.1.attentions.0": 64 * 8 * 8, "mid_block.resnets.1": 64 * 2 * 2,
              "up_blocks.1.resnets.2": 64 * 4 * 4, "up_blocks.1.upsamplers.0": 64 * 8 * 8}
    expected_raw = 12 * 2 * 1 * sum(tokens.values()) * 2
    assert info["bytes_raw"] == expected_raw
    assert 0.5 < info["compression_ratio"] <= 1.1  # no codec by default: stored ≈ raw (+ metadata)


def test_verify_finds_missing_units_and_nan(tiny_store: str, tmp_path: Path) -> None:
    output = str(tmp_path / "broken")
    shutil.copytree(tiny_store, output)
    Path(store.marker_path(output, 2)).unlink()
    group = store.open_features(output, mode="r+")
    group["conv_in"][0:4] = np.full(group["conv_in"][0:4].shape, np.nan, dtype=np.float16)
    problems = open_store(output).verify()
    assert any("1 of 3 units" in p for p in problems)
    assert any(p.startswith("conv_in: NaN") for p in problems)


def test_queries_need_neither_torch_nor_diffusers(tiny_store: str) -> None:
    import subprocess
    import sys

    code = ("import sys; from sdfeat.store.query import open_store; "
            f"x = open_store({tiny_store!r}).read('up_blocks[1].upsamplers[0]', [0], timestep=50); "
            "print(x.shape, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(1, 1, 64, 8, 8) False False"


def test_unit_progress_counts_done_markers_and_sample_keys_parse(tiny_store: str, tmp_path: Path) -> None:
    from sdfeat.store.query import sample_key, unit_progress

    assert unit_progress(tiny_store) == (3, 3)           # 12 samples in units of 4, all finished
    output = str(tmp_path / "stopped")
    shutil.copytree(tiny_store, output)
    Path(store.marker_path(output, 1)).unlink()
    assert unit_progress(output) == (2, 3)
    assert [sample_key(s) for s in ("3", "-1", "synthetic#00003", "3a")] == [3, -1, "synthetic#00003", "3a"]
