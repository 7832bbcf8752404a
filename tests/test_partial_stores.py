"""Partial stores and silent results: reading an unfinished or failed sample says so (error by default, NaN by
flag), `metrics` refuses an incomplete store unless `--allow-partial` and names what it skipped, the corner metric
says at the default level why a block was skipped, and 4×4 maps get their corners measured."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import small_spec
from sdfeat import store
from sdfeat.errors import MissingRowsWarning, StoreError
from sdfeat.store.query import open_store

SDFEAT = [sys.executable, "-m", "sdfeat.cli"]


def _sdfeat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SDFEAT, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def partial(tiny_store: str, tmp_path: Path) -> str:
    """tiny_store (12 rows, units of 4) with unit 1 unfinished and row 2 a failed image."""
    copy = tmp_path / "partial"
    shutil.copytree(tiny_store, copy)
    (copy / "progress" / "unit-000001.json").unlink()
    ok = zarr.open_group(str(copy / store.FEATURES), mode="r+")["ok"]
    values = np.asarray(ok[:])
    values[4:8] = False
    values[2] = False
    ok[:] = values
    return str(copy)


def test_read_names_an_unfinished_or_failed_sample(partial: str) -> None:
    features = open_store(partial)
    with pytest.raises(StoreError, match=r"sample 'synthetic#00005' \(row 5\).*unfinished \(unit 1"):
        features.read("conv_in", [5])
    with pytest.raises(StoreError, match=r"row 2\).*failed.*failures.parquet"):
        features.read("conv_in", [0, 2], timestep=50)
    with pytest.warns(MissingRowsWarning, match="2 of the requested samples have no activations"):
        values = features.read("conv_in", [0, 2, 5], timestep=50, allow_missing=True)
    assert np.isnan(values[1:]).all() and np.isfinite(values[0]).all()
    np.testing.assert_array_equal(values[0], open_store(partial).read("conv_in", [0], timestep=50)[0])


def test_cli_query_and_show_refuse_a_missing_sample(partial: str, tmp_path: Path) -> None:
    result = _sdfeat("query", partial, "--block", "conv_in", "--sample", "5")
    assert result.returncode == 2 and "unfinished" in result.stderr and "--allow-missing" in result.stderr
    result = _sdfeat("query", partial, "--block", "conv_in", "--sample", "5", "--sample", "0", "--allow-missing")
    assert result.returncode == 0, result.stderr
    assert "1 NaN rows skipped" in result.stdout and "mean nan" not in result.stdout
    assert result.stderr.startswith("warning: 1 of the requested samples have no activations") and \
        len(result.stderr.strip().splitlines()) == 1, result.stderr      # a Python warning, shown as one line
    result = _sdfeat("show", partial, "--block", "conv_in", "--sample", "2", "-o", str(tmp_path / "m.png"))
    assert result.returncode == 2 and "failed" in result.stderr and not (tmp_path / "m.png").exists()
    assert "allow" not in result.stderr and "choose another" in result.stderr   # no option `show` lacks


def test_metrics_refuse_a_partial_store_unless_asked(partial: str) -> None:
    result = _sdfeat("metrics", partial, "--local", "--metric", "anomalies", "--block", "conv_in")
    assert result.returncode == 2 and "incomplete" in result.stderr and "--allow-partial" in result.stderr
    result = _sdfeat("metrics", partial, "--local", "--metric", "anomalies", "--block", "conv_in",
                     "--allow-partial")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 of 3 units (1; 4 images)" in result.stderr
    assert "1 failed image(s) left out" in result.stderr
    report = _sdfeat("report", partial, "-o", f"{partial}/report")
    assert report.returncode == 0, report.stderr
    summary = (Path(partial) / "report" / "summary.md").read_text()
    assert "Partial: these metrics were measured with `--allow-partial`" in summary
    assert "1 of 3 units were unfinished (units 1): 4 of 12 images left out" in summary


def test_corners_skip_is_said_with_the_spec_key(tiny_store: str, tmp_path: Path) -> None:
    copy = tmp_path / "s"
    shutil.copytree(tiny_store, copy)
    result = _sdfeat("metrics", str(copy), "--local", "--metric", "corners", "--block", "up_blocks.1.resnets.2")
    assert result.returncode == 0, result.stderr
    assert "corners: skipped 1 block(s) without crop variants (up_blocks.1.resnets.2)" in result.stderr
    assert "variants: {crops: auto}" in result.stderr


def test_corners_of_a_4x4_map_are_measured(tmp_path: Path) -> None:
    """At 4×4 the inner 2×2 map is all corners: the corner group mean is the mean cosine over its 12 ordered
    pairs, computed here directly from the stored tensors."""
    from sdfeat.extract import run_local
    from sdfeat.metrics.tasks import MetricOptions, corners_task

    out = str(tmp_path / "c")
    run_local(small_spec(out, source="synthetic:4", blocks=["down_blocks.2.attentions.0"], timesteps=[50],
                         variants={"crops": "auto"}), progress=False, device="cpu")
    features = open_store(out)
    assert features.shape("down_blocks.2.attentions.0")[-1] == 4
    rows = corners_task(out, "down_blocks.2.attentions.0", MetricOptions())
    got = {(r["statistic"], r["group"], r["variant"]): r["value"] for r in rows}

    def corner_mean(maps: np.ndarray) -> float:  # (B, C, 2, 2)
        u = maps.reshape(len(maps), maps.shape[1], 4).astype(np.float64)
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        cos = np.einsum("bca,bcd->bad", u, u)
        return float((cos.sum() - np.trace(cos, axis1=1, axis2=2).sum()) / (12 * len(maps)))

    full = features.read("down_blocks.2.attentions.0", timestep=50, seed=42)[:, :, 1:3, 1:3]
    crop = features.read("down_blocks.2.attentions.0", timestep=50, seed=42, crop=features.crops[0])
    assert got[("group_mean", "corner", "reprcropped")] == pytest.approx(corner_mean(full), rel=1e-5)
    assert got[("group_mean", "corner", "cropped")] == pytest.approx(corner_mean(crop), rel=1e-5)
    assert got[("ratio", "corner", "cropped/reprcropped")] == pytest.approx(corner_mean(crop) / corner_mean(full),
                                                                             rel=1e-5)


def test_plain_xarray_gives_what_to_xarray_gives(tiny_store: str) -> None:
    import xarray as xr

    features = open_store(tiny_store)
    ds = xr.open_zarr(f"{tiny_store}/features.zarr")
    assert {"sample_id", "label", "ok"} <= set(ds.coords) and not {"sample_id", "label", "ok"} & set(ds.data_vars)
    assert list(ds.indexes["sample"]) == features.sample_ids
    picked = ds["mid_block.resnets.1"].sel(sample=features.sample_ids[3], timestep=200, seed=42).values
    np.testing.assert_array_equal(picked, features.read("mid_block.resnets.1", [3], timestep=200, seed=42, raw=True)[0])
    assert features.to_xarray().identical(ds)
