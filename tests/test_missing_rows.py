"""Rows without activations (an unfinished unit, a failed image) read as NaN in every reader: plain
`xr.open_zarr`, `FeatureStore.to_xarray`, `FeatureStore.read(allow_missing=True)` (with a Python warning). Stores
written before NaN was the fill value (rows of 0) still open, and sdfeat's readers mask their rows by `ok`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from conftest import small_spec
from sdfeat import store
from sdfeat.errors import MissingRowsWarning, RowNotReadyError
from sdfeat.extract import prepare_job, run_local
from sdfeat.store.query import open_store


def test_missing_value_is_nan_for_floats_and_zero_for_the_rest() -> None:
    assert np.isnan(store.missing_value("float16")) and np.isnan(store.missing_value(np.float32))
    assert store.missing_value("int16") == 0 and store.missing_value("int64") == 0
    assert store.missing_value("bool") is False


def test_a_store_without_finished_units_reads_nan_everywhere(tmp_path: Path) -> None:
    """Only the template is written: every activation row is the fill value, which plain xarray shows as NaN;
    the integer summaries hold 0 (their readers mask by ok)."""
    out = str(tmp_path / "t")
    spec = small_spec(out, summaries={"blocks": ["mid_block.resnets.1"], "tokens_per_image": 2})
    prepare_job(spec)
    ds = xr.open_zarr(f"{out}/features.zarr")
    for name in spec.blocks:
        assert ds[name].isnull().all(), name
    assert not ds["ok"].any() and ds["label"].dtype == np.int64
    group = zarr.open_group(f"{out}/features.zarr")
    assert np.isnan(group["summaries/mid_block.resnets.1/norms"][:]).all()
    assert (group["summaries/mid_block.resnets.1/token_yx"][:] == 0).all()
    assert store.nan_fill(group["conv_in"]) and not store.nan_fill(group["summaries/mid_block.resnets.1/token_yx"])

    features = open_store(out)
    with pytest.raises(RowNotReadyError, match=r"row 0\).*unfinished.*allow_missing=True"):
        features.read("conv_in", [0])
    with pytest.warns(MissingRowsWarning, match="2 of the requested samples have no activations"):
        values = features.read("conv_in", [0, 5], timestep=50, allow_missing=True)
    assert values.shape == (2, 1, 32, 16, 16) and np.isnan(values).all()
    assert features.info()["compression_ratio"] is None   # nothing written: no ratio to give


@pytest.fixture
def old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store as written before NaN was the fill value (fill 0), then with row 2 failed and unit 1 (rows 4..7)
    unfinished: marker removed, ok false, its shards left as written (a unit killed after its data)."""
    out = str(tmp_path / "old")
    with monkeypatch.context() as m:
        for module in (store, store.files):  # the template's fill value and the worker's failed rows
            m.setattr(module, "missing_value", lambda dtype: 0)
        run_local(small_spec(out, timesteps=[50]), progress=False, device="cpu")
    (Path(out) / "progress" / "unit-000001.json").unlink()
    ok = zarr.open_group(f"{out}/features.zarr", mode="r+")["ok"]
    flags = np.asarray(ok[:])
    flags[[2, 4, 5, 6, 7]] = False
    ok[:] = flags
    return out


def test_old_stores_open_and_readers_mask_their_rows_by_ok(old_store: str) -> None:
    group = zarr.open_group(f"{old_store}/features.zarr")
    assert not store.nan_fill(group["conv_in"])
    assert np.isfinite(group["conv_in"][4]).all()                   # data there, but not confirmed by ok
    features = open_store(old_store)
    ds = features.to_xarray()
    block = ds["up_blocks.1.upsamplers.0"]
    bad = [2, 4, 5, 6, 7]
    for row in range(12):
        assert bool(block[row].isnull().all()) == (row in bad), row
        assert bool(block[row].isnull().any()) == (row in bad), row
    picked = block.sel(sample=features.sample_ids[3]).values        # one row: its axis dropped
    np.testing.assert_array_equal(picked, group["up_blocks.1.upsamplers.0"][3])
    assert np.isnan(block.isel(sample=[5, 0, 2]).values[[0, 2]]).all()
    assert float(block.astype(np.float64).mean()) == pytest.approx(float(np.mean(
        group["up_blocks.1.upsamplers.0"][[r for r in range(12) if r not in bad]].astype(np.float64))), rel=1e-4)
    with pytest.warns(MissingRowsWarning):
        values = features.read("conv_in", slice(0, 8), allow_missing=True)
    assert [bool(np.isnan(v).all()) for v in values] == [r in bad for r in range(8)]


def test_iter_samples_reads_missing_rows_as_nan_when_asked(old_store: str) -> None:
    features = open_store(old_store)
    with pytest.raises(RowNotReadyError):
        list(features.iter_samples("conv_in"))
    with pytest.warns(MissingRowsWarning):
        batches = list(features.iter_samples("conv_in", allow_missing=True))
    assert [rows.start for rows, _ in batches] == [0, 4, 8]
    assert np.isnan(batches[1][1]).all() and not np.isnan(batches[2][1]).any()


def test_a_complete_store_opens_as_plain_xarray_does(tiny_store: str, tmp_path: Path) -> None:
    copy = tmp_path / "s"
    shutil.copytree(tiny_store, copy)
    assert open_store(str(copy)).to_xarray().identical(xr.open_zarr(f"{copy}/features.zarr"))


def test_failed_rows_hold_nan_in_the_written_data(tmp_path: Path) -> None:
    from imagegen import default_image, write_parquet_shards

    src = tmp_path / "src"
    write_parquet_shards(src, n_files=1, rows_per_file=4, image_fn=lambda i: b"not an image" if i == 1 else
                         default_image(i))
    out = str(tmp_path / "out")
    run_local(small_spec(out, source=str(src), summaries={"blocks": ["mid_block.resnets.1"], "tokens_per_image": 2}),
              progress=False, device="cpu")
    ds = xr.open_zarr(f"{out}/features.zarr")
    assert ds["conv_in"][1].isnull().all() and not ds["conv_in"][0].isnull().any()
    group = zarr.open_group(f"{out}/features.zarr")
    assert np.isnan(group["summaries/mid_block.resnets.1/norms"][1]).all()
    assert (group["summaries/mid_block.resnets.1/token_yx"][1] == 0).all()
