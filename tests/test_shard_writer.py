"""The direct shard writer (`sdfeat.store.shard_writer`, used by `store.write_unit`): its files are byte-identical to
zarr-python's own for the same arrays and data (codec none and zstd, full and partial last unit, activation, crop
and summary arrays of several shapes and dtypes, local and s3 through a moto server), they read back in zarr and
xarray with the written values, and an extraction through it equals one through zarr-python, file for file."""

from __future__ import annotations

import functools
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

from conftest import small_spec
from sdfeat import store
from sdfeat.planning.layout import ArrayLayout, activation_layout
from sdfeat.store.schema import StoreAttrs
from sdfeat.store import shard_writer
from storecompare import array_paths, assert_same_store
from test_remote_store import BUCKET, s3_env  # noqa: F401  (fixture: a moto S3 server)

N_SAMPLES, UNIT = 10, 4  # units [0, 4), [4, 8), [8, 10): the last one is a partial shard
UNITS = {"full": (0, 4), "partial": (8, 10)}

LAYOUTS = [
    # timesteps x seeds = 2 x 2: the inner-chunk grid (4, 2, 2, 1, 1, 1) is stored in Morton order, not C order
    activation_layout("up_blocks.1.resnets.0", 2, 2, 4, 4, 4, "float16"),
    activation_layout("up_blocks.1.upsamplers.0", 2, 2, 4, 8, 8, "float16"),
    activation_layout("crops/16/conv_in", 2, 2, 3, 6, 6, "float16"),
    ArrayLayout("summaries/mid_block.resnets.1/norms", (2, 2, 4, 4), ("timestep", "seed", "y_4", "x_4"),
                      "float32"),
    ArrayLayout("summaries/mid_block.resnets.1/tokens", (2, 2, 5, 4), ("timestep", "seed", "token_5",
                                                                           "channel_4"), "float16"),
    ArrayLayout("summaries/mid_block.resnets.1/token_yx", (2, 2, 5, 2), ("timestep", "seed", "token_5", "yx"),
                      "int16"),
    ArrayLayout("summaries/mid_block.resnets.1/groups", (2, 2, 3, 3), ("timestep", "seed", "group", "group_b"),
                      "float64"),
    ArrayLayout("summaries/mid_block.resnets.1/group_pairs", (2, 2, 3, 3),
                      ("timestep", "seed", "group", "group_b"), "int64"),
]


def _values(layout: ArrayLayout, rows: int, seed: int) -> np.ndarray:
    """Smooth-ish values that zstd compresses a little; row 1 all zero (a failed image's row)."""
    rng = np.random.default_rng(seed)
    shape = (rows, *layout.sample_shape)
    if np.dtype(layout.dtype).kind == "i":
        values = rng.integers(-1000, 1000, size=shape).astype(layout.dtype)
    else:
        values = (np.cumsum(rng.standard_normal(shape), axis=-1) + rng.standard_normal(shape)).astype(layout.dtype)
    values[1] = 0
    return values


def _template(output: str, codec: str) -> None:
    attrs = StoreAttrs(spec={}, spec_hash="test", protocol="standard", model="tiny", revision=None,
                       n_samples=N_SAMPLES, unit_size=UNIT, blocks=(), crops=(), summary_blocks=(),
                       crop_samples=N_SAMPLES, class_names=None, source_format=None, versions={})
    store.create_template(output, LAYOUTS, N_SAMPLES, UNIT, [f"s{i}" for i in range(N_SAMPLES)], [0] * N_SAMPLES,
                          [50, 200], [0, 1], attrs=attrs, codec=codec)


def _write(output: str, start: int, stop: int, direct: bool) -> dict[str, np.ndarray]:
    data = {a.path: _values(a, stop - start, seed=i + start) for i, a in enumerate(LAYOUTS)}
    group = store.open_features(output, "r+")
    store.write_unit(group, start, stop, data, np.ones(stop - start, bool), workers=2, direct=direct)
    return data


def _files(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, bytes]:
    """Every object under `root` by its relative path."""
    return {path[len(root.rstrip("/")) + 1:]: fs.cat_file(path) for path in fs.find(root)}


def _assert_same_files(fs: fsspec.AbstractFileSystem, got: str, want: str, skip: tuple[str, ...] = ()) -> None:
    a, b = _files(fs, got), _files(fs, want)
    for key in skip:
        a.pop(key), b.pop(key)
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key] == b[key], key


def test_every_per_sample_array_of_a_template_is_covered(tmp_path: Path) -> None:
    """Guards the byte comparisons below against passing vacuously through the zarr-python fallback."""
    _template(str(tmp_path), "zstd")
    group = store.open_features(str(tmp_path), "r+")
    for layout in LAYOUTS:
        for name, (start, stop) in UNITS.items():
            values = _values(layout, stop - start, 0)
            jobs = shard_writer.plan_shards(group[layout.path], start, stop, values)
            assert jobs is not None and len(jobs) == 1, (layout.path, name)
            assert jobs[0].key == f"{layout.path}/c/{start // UNIT}" + "/0" * len(layout.sample_shape)
    # not covered: an unsharded array, and rows that are not whole shards
    assert shard_writer.plan_shards(group["ok"], 0, 4, np.ones(4, bool)) is None
    assert shard_writer.plan_shards(group[LAYOUTS[0].path], 0, 2, _values(LAYOUTS[0], 2, 0)) is None


@pytest.mark.parametrize("codec", ["none", "zstd"])
@pytest.mark.parametrize("unit", ["full", "partial"])
def test_local_files_byte_identical_to_zarr(tmp_path: Path, codec: str, unit: str) -> None:
    start, stop = UNITS[unit]
    old, new = str(tmp_path / "zarr"), str(tmp_path / "direct")
    for output in (old, new):
        _template(output, codec)
    _write(old, start, stop, direct=False)
    data = _write(new, start, stop, direct=True)
    _assert_same_files(fsspec.filesystem("file"), new, old)

    group = zarr.open_group(f"{new}/{store.FEATURES}", mode="r")
    for path, values in data.items():
        np.testing.assert_array_equal(group[path][start:stop], values, err_msg=path)
        other = group[path][0 if unit == "partial" else UNIT]  # another unit's row: still the fill value
        np.testing.assert_array_equal(other, np.full_like(other, store.missing_value(other.dtype)), err_msg=path)
    assert group["ok"][start:stop].all() and group["ok"][...].sum() == stop - start


def test_shard_layout_matches_the_sharding_spec(tmp_path: Path) -> None:
    """Independent of zarr's writer: an uncompressed partial shard is the rows' bytes, then (offset, nbytes) per
    inner chunk in C order of the grid (Morton order of the data), 2**64-1 past the array end, then crc32c."""
    import google_crc32c

    _template(str(tmp_path), "none")
    data = _write(str(tmp_path), *UNITS["partial"], direct=True)
    layout = LAYOUTS[0]  # (10, 2, 2, 4, 4, 4) float16, inner chunk (1, 1, 1, 4, 4, 4), shard (4, 2, 2, 4, 4, 4)
    raw = (tmp_path / store.FEATURES / layout.path / "c" / "2" / "0" / "0" / "0" / "0" / "0").read_bytes()
    chunk = 4 * 4 * 4 * 2
    index = np.frombuffer(raw[-(4 * 2 * 2 * 16 + 4):-4], "<u8").reshape(4, 2, 2, 2)
    assert raw[-4:] == np.uint32(google_crc32c.value(raw[-(4 * 2 * 2 * 16 + 4):-4])).astype("<u4").tobytes()
    assert (index[2:] == 2**64 - 1).all()  # rows 10, 11 lie past the array's end
    assert sorted(index[:2, ..., 0].ravel().tolist()) == [i * chunk for i in range(8)]
    assert (index[:2, ..., 1] == chunk).all()
    values = data[layout.path]  # (2, 2, 2, 4, 4, 4)
    for r in range(2):
        for t in range(2):
            for s in range(2):
                offset = int(index[r, t, s, 0])
                assert raw[offset:offset + chunk] == values[r, t, s].astype("<f2").tobytes()
    assert len(raw) == 8 * chunk + 4 * 2 * 2 * 16 + 4


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_reads_back_in_xarray(tmp_path: Path, codec: str) -> None:
    xr = pytest.importorskip("xarray")
    _template(str(tmp_path), codec)
    written = {}
    for start, stop in UNITS.values():
        written[start] = _write(str(tmp_path), start, stop, direct=True)
    path = store.join(str(tmp_path), store.FEATURES)
    ds = xr.open_zarr(path, consolidated=None)
    crops = xr.open_zarr(path, group="crops/16", consolidated=None)
    summaries = xr.open_zarr(path, group="summaries/mid_block.resnets.1", consolidated=None)
    for start, data in written.items():
        rows = slice(start, start + len(data[LAYOUTS[0].path]))
        for layout in LAYOUTS:
            parent, name = layout.path.rsplit("/", 1) if "/" in layout.path else ("", layout.path)
            view = {"": ds, "crops/16": crops}.get(parent, summaries)
            np.testing.assert_array_equal(view[name].isel(sample=rows).values, data[layout.path], err_msg=layout.path)
    assert ds["up_blocks.1.resnets.0"].dims == ("sample", "timestep", "seed", "channel_4", "y_4", "x_4")


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_s3_objects_byte_identical_to_zarr(s3_env: dict[str, str], codec: str) -> None:  # noqa: F811
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    old, new = f"s3://{BUCKET}/shards-{codec}/zarr", f"s3://{BUCKET}/shards-{codec}/direct"
    for output in (old, new):
        _template(output, codec)
    written = {}
    for start, stop in UNITS.values():
        _write(old, start, stop, direct=False)
        written[start] = _write(new, start, stop, direct=True)
    _assert_same_files(fs, new.removeprefix("s3://"), old.removeprefix("s3://"))
    assert store.shard_writer.ShardTarget.of(store.open_features(new, "r+").store).fs is not None  # really s3
    group = zarr.open_group(f"{new}/{store.FEATURES}", mode="r")
    for start, data in written.items():
        for path, values in data.items():
            np.testing.assert_array_equal(group[path][start:start + len(values)], values, err_msg=path)


def test_extraction_through_the_shard_writer_equals_zarr_python(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny-model job with activations, crops and summaries (zstd, a partial last unit), once through the shard
    writer and once through zarr-python: the same files, byte for byte, and the same values."""
    from sdfeat.extract import run_local

    def job(output: Path):
        return small_spec(str(output), source="synthetic:6", resolution=64, codec="zstd",
                          blocks=["conv_in", "up_blocks.1.resnets.2"], variants={"crops": "auto"},
                          summaries={"blocks": ["mid_block.resnets.1", "up_blocks.1.upsamplers.0"],
                                     "tokens_per_image": 4})

    new, old = tmp_path / "direct", tmp_path / "zarr"
    written: list[str] = []
    real = shard_writer.write_shards

    def spy(target, jobs, workers=None):  # records which arrays went through the shard writer
        written.extend(job.key.split("/c/")[0] for job in jobs)
        real(target, jobs, workers)

    monkeypatch.setattr(shard_writer, "write_shards", spy)
    run_local(job(new), progress=False, device="cpu", threads=1)
    features = zarr.open_group(f"{new}/{store.FEATURES}", mode="r")
    stored = {p for p in array_paths(features) if features[p].shards is not None}
    assert set(written) == stored and len(written) == 2 * len(stored)  # every sharded array, in both units
    monkeypatch.setattr(store, "write_unit", functools.partial(store.write_unit, direct=False))
    run_local(job(old), progress=False, device="cpu", threads=1)

    paths = array_paths(features)
    assert any(p.startswith("crops/") for p in paths) and any(p.startswith("summaries/") for p in paths)
    assert_same_store(new, old)
    # every file but the root's metadata, whose attrs name the output folder
    _assert_same_files(fsspec.filesystem("file"), str(new / store.FEATURES), str(old / store.FEATURES),
                       skip=("zarr.json",))
