"""The feature store's on-disk layout: a Zarr v3 group plus plain files beside it.

The driver writes the template (every array at its final shape, metadata only) before any worker starts; each
work unit then writes whole shards along `sample` (its own row range) and, last, its done marker. No two
processes ever write the same shard, arrays are never resized, and a unit without a marker is simply redone.

    <output>/features.zarr       arrays: <block> (sample, timestep, seed, channel_C, y_H, x_W), crops/<m>/<block>,
                                 summaries/<block>/<name>; coordinates sample_id, label, ok, timestep, seed
    <output>/manifest.parquet    the sample plan (which file and row every store row came from)
    <output>/progress/unit-<k>.json  a finished unit's report; its existence means "done"
    <output>/failures.parquet    images that could not be used, with the reason

Which arrays a job has (paths, shapes, dims, dtypes) is `layout`'s; this module only reads and writes them.
Works on local paths and fsspec URLs (s3://…). Imports numpy, zarr, pyarrow and yaml (to name a job file given
as a store) only: no torch, no diffusers.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
import zarr
from fsspec.implementations.local import LocalFileSystem

from sdfeat.errors import StoreError
from sdfeat.store import shard_writer

if TYPE_CHECKING:
    from sdfeat.store.schema import ArrayLayout
from sdfeat.store.schema import StoreAttrs, UnitReport

log = logging.getLogger(__name__)

FEATURES = "features.zarr"
MANIFEST = "manifest.parquet"
PROGRESS = "progress"
FAILURES = "failures.parquet"
ATTRS_KEY = "sdfeat"

# Zarr v3 consolidated metadata is not in the spec yet; we rely on it only as an optimisation for opening.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def filesystem(output: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(output)
    return fs, path


def missing_value(dtype: np.dtype | str) -> float | int | bool:
    """What a row that holds no data (a failed image, an unfinished unit) holds in an array of `dtype`: the
    array's fill value, and what a worker writes into the rows of failed images. NaN for floating arrays, so that
    any reader (plain xarray or zarr too) sees a missing row as missing; 0 / False for integer and bool arrays,
    whose rows readers mask by the `ok` coordinate.

    Stores written before NaN was the fill value hold 0 in such rows: `nan_fill(array)` says which kind an
    array is, and sdfeat's readers mask by `ok` either way."""
    kind = np.dtype(dtype).kind
    if kind in "fc":
        return float("nan")
    return False if kind == "b" else 0


def nan_fill(array: zarr.Array) -> bool:
    """Whether `array`'s rows without data read as NaN (a floating array created with NaN as its fill value);
    False for stores written before that (fill 0) and for integer arrays: mask those by `ok`."""
    fill = array.metadata.fill_value
    return np.dtype(array.dtype).kind in "fc" and bool(np.isnan(fill))


def _group_path(group: zarr.Group, path: str) -> tuple[zarr.Group, str]:
    """Create the intermediate groups of `path` ("crops/16/conv_in") and return (parent, leaf name)."""
    *parents, leaf = path.split("/")
    for part in parents:
        group = group.require_group(part)
    return group, leaf


def create_template(output: str, arrays: Sequence[ArrayLayout], n_samples: int, unit_size: int,
                    sample_ids: Sequence[str], labels: Sequence[int], timesteps: Sequence[int],
                    seeds: Sequence[int], attrs: StoreAttrs, codec: str = "none") -> None:
    """Write features.zarr with every array at its final shape (no activation data) and consolidate metadata.

    Shards along `sample` are exactly `unit_size` long for every array, so a unit owns whole shards. An array limited
    to its first rows (`ArrayLayout.rows`) has exactly those rows, same shards, first dimension `crop_sample` (so
    xarray does not take it for the `sample` axis); units past its end do not write it.
    """
    compressors = None if codec == "none" else zarr.codecs.ZstdCodec(level=1)
    # `coordinates` (the CF convention xarray decodes): plain `xr.open_zarr(".../features.zarr")` gives what
    # `FeatureStore.to_xarray()` gives: sample_id, label and ok as coordinates, and an index by sample id (`sample`)
    root = zarr.open_group(join(output, FEATURES), mode="w",
                           attributes={ATTRS_KEY: attrs.to_json(), "coordinates": "sample_id label ok"})
    chunk = (unit_size,)
    sid = root.create_array("sample_id", shape=(n_samples,), chunks=chunk, dtype=str, dimension_names=["sample"])
    sid[:] = np.asarray(sample_ids, dtype=str)
    index = root.create_array("sample", shape=(n_samples,), chunks=chunk, dtype=str, dimension_names=["sample"])
    index[:] = np.asarray(sample_ids, dtype=str)
    lab = root.create_array("label", shape=(n_samples,), chunks=chunk, dtype="int64", dimension_names=["sample"])
    lab[:] = np.asarray(labels, dtype=np.int64)
    root.create_array("ok", shape=(n_samples,), chunks=chunk, dtype="bool", fill_value=False,
                      dimension_names=["sample"])
    root.create_array("timestep", shape=(len(timesteps),), dtype="int64", dimension_names=["timestep"])[:] = timesteps
    root.create_array("seed", shape=(len(seeds),), dtype="int64", dimension_names=["seed"])[:] = seeds
    for layout in arrays:
        parent, name = _group_path(root, layout.path)
        inner = layout.chunk_sample_shape or layout.sample_shape
        parent.create_array(
            name,
            shape=(layout.n_rows(n_samples), *layout.sample_shape),
            chunks=(1, *inner),
            shards=(unit_size, *layout.sample_shape),
            dtype=layout.dtype,
            compressors=compressors,
            fill_value=missing_value(layout.dtype),
            dimension_names=["sample" if layout.rows is None else "crop_sample", *layout.dims],
        )
    zarr.consolidate_metadata(join(output, FEATURES))


def refuse_file(path: str) -> None:
    """A store is a folder: a file given as one is named in one line (a job spec given instead of its store, with
    the store its `output:` names)."""
    fs, root = filesystem(path)
    if not fs.isfile(root):
        return
    hint = ""
    if root.endswith((".yaml", ".yml")):
        try:
            output = yaml.safe_load(fs.cat_file(root)).get("output")
        except (yaml.YAMLError, AttributeError, OSError):
            output = None
        hint = f": a job spec? its store is {output}" if output else ": a job spec? pass the folder its output: names"
    raise StoreError(f"{path} is a file, not a store{hint}")


def check_writable(folder: str) -> None:
    """Write a probe file into `folder` (or, where it does not exist yet, its nearest existing parent, where it would
    be made) and remove it: storage that refuses (read-only, full, forbidden) raises its OSError now, before any work
    whose result would go there. Leaves nothing behind."""
    fs, root = filesystem(folder)
    while not fs.exists(root) and "/" in root.strip("/"):
        root = root.rstrip("/").rsplit("/", 1)[0] or "/"
    probe = join(root, f".sdfeat-write-probe-{uuid.uuid4().hex[:12]}")
    fs.pipe_file(probe, b"")
    fs.rm(probe)


def open_features(output: str, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(join(output, FEATURES), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        refuse_file(output)
        raise StoreError(f"no feature store at {output} (expected {join(output, FEATURES)})") from None
    except ValueError as err:  # metadata that does not parse (a torn write): named, never silently replaced
        reason = " ".join(str(err).split())[:120]
        raise StoreError(f"{join(output, FEATURES)}: unreadable store metadata ({reason}); pass --overwrite to "
                         "start again") from err


def template_complete(output: str) -> bool:
    """Whether `create_template` finished: its last step, the consolidated metadata, is there."""
    return open_features(output).metadata.consolidated_metadata is not None


def read_attrs(output: str) -> StoreAttrs:
    """The store's attrs; StoreError for a Zarr group that is no sdfeat store, or for attrs that lack a required
    field (its cause a ValueError or TypeError, as for metadata that does not parse)."""
    attrs = open_features(output).attrs.asdict()
    if ATTRS_KEY not in attrs:
        raise StoreError(f"{join(output, FEATURES)} is a Zarr group but not an sdfeat store (no '{ATTRS_KEY}' attrs)")
    try:
        return StoreAttrs.from_json(attrs[ATTRS_KEY])
    except (ValueError, TypeError) as err:
        raise StoreError(f"{output}: the store's attributes have {err}") from err


def existing_attrs(output: str) -> StoreAttrs | None:
    """The attrs of the store at `output`, None where there is none; metadata that does not parse is refused
    (replaced only with --overwrite)."""
    try:
        return read_attrs(output)
    except StoreError as err:
        if isinstance(err.__cause__, (ValueError, TypeError)):
            raise
        return None


def write_unit(group: zarr.Group, start: int, stop: int, data: dict[str, np.ndarray], ok: np.ndarray, *,
               workers: int | None = None, direct: bool = True, opened: dict[str, zarr.Array] | None = None) -> float:
    """Write one unit's rows [start, stop) of every array (whole shards), then its `ok` flags. An array given fewer
    rows (one limited to its first rows) gets rows [start, start + len(values)); none when empty.

    Arrays whose layout `shard_writer` covers (every sharded per-sample array of `create_template`) are written as
    shard bytes, `workers` shards at a time (default min(4, cores)); the others, and all of them with
    `direct=False`, by zarr-python. Both give the same bytes. `ok` is written (by zarr) after all the data.
    `opened`: the caller's cache of opened arrays by path, filled here (a worker writes the same arrays unit after
    unit; opening one parses its metadata, ≈1 ms, which for the summaries job's ~400 arrays cost more than the
    writes). Returns the CPU seconds the shard writer's threads spent (0 when it wrote nothing)."""
    target = shard_writer.ShardTarget.of(group.store) if direct else None
    jobs: list[shard_writer.ShardJob] = []
    # Activations are never all-zero, so zarr's scan for empty chunks only costs time (1.5-2.5x slower writes
    # here); the shard writer writes every chunk too. The setting binds when an array is opened.
    with zarr.config.set({"array.write_empty_chunks": True}):
        for path, values in data.items():
            if not len(values):
                continue
            array = opened.get(path) if opened is not None else None
            if array is None:
                array = group[path]
                if opened is not None:
                    opened[path] = array
            planned = None if target is None else shard_writer.plan_shards(array, start, start + len(values), values)
            if planned is None:
                log.debug("%s: layout not covered by the shard writer, written by zarr-python", path)
                array[start:start + len(values)] = values
            else:
                jobs += planned
    cpu = shard_writer.write_shards(target, jobs, workers) if jobs else 0.0
    group["ok"][start:stop] = ok
    return cpu


# -- manifest, markers, failures ----------------------------------------------------------------------------

def write_manifest(output: str, table: pa.Table) -> None:
    fs, root = filesystem(output)
    fs.makedirs(root, exist_ok=True)
    write_parquet(fs, join(root, MANIFEST), table)


def read_manifest(output: str) -> pa.Table:
    fs, root = filesystem(output)
    with fs.open(join(root, MANIFEST), "rb") as f:
        return pq.read_table(f)


def marker_path(output: str, unit: int) -> str:
    return join(output, PROGRESS, f"unit-{unit:06d}.json")


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` to a hidden temporary name beside `path`, then rename it: a reader sees the whole file or none
    (a rename within a local filesystem is atomic; an object store's upload is whole or absent)."""
    folder, name = path.rsplit("/", 1)
    temporary = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        fs.pipe_file(temporary, data)
        fs.mv(temporary, path)
    except BaseException:
        if fs.exists(temporary):
            fs.rm(temporary)
        raise


def write_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace the file at `path` with `data` so that a reader sees the old file or the whole new one, never a
    part: `write_atomic` on a local disk (temporary name, rename), one upload on an object store (a single put
    is whole or absent)."""
    if isinstance(fs, LocalFileSystem):
        write_atomic(fs, path, data)
    else:
        fs.pipe_file(path, data)


def write_parquet(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write `table` as Parquet at `path` with `write_whole` (the bytes made in memory first). The one Parquet
    writer of sdfeat."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    write_whole(fs, path, buffer.getvalue().to_pybytes())


def write_marker(output: str, report: UnitReport) -> None:
    """Written after the unit's data, atomically: a marker that exists and parses says the unit is done."""
    fs, _ = filesystem(output)
    path = marker_path(output, report.unit)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    write_atomic(fs, path, json.dumps(report.to_json()).encode())


def _parse_marker(data: bytes | Exception, unit: int) -> UnitReport | None:
    """The report of a sound marker, else None (a torn, foreign or unreadable file: the unit is redone)."""
    if isinstance(data, Exception):
        return None
    try:
        return UnitReport.from_json(json.loads(data), unit)
    except ValueError:
        return None


# Reports of sound markers already read in this process, per progress folder: {path: (identity, report)}. A marker
# is written once, atomically, and replaced only by a rename (a new inode / ETag / time), so a listing entry whose
# identity matches was verified before and need not be read again; stores are few, so at most _KEEP are kept.
_SOUND: dict[str, dict[str, tuple[tuple, UnitReport]]] = {}
_SOUND_LOCK = threading.Lock()  # the explorer refreshes stores from several threads
_KEEP = 8
# Listing fields that change when an object is replaced (s3, gcs, memory); size alone does not say enough.
_IDENTITY_FIELDS = ("ETag", "LastModified", "etag", "generation", "md5Hash", "mtime", "created")


def _listing(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, tuple[int, tuple | None]]:
    """{path: (unit, identity)} of the marker files in `folder`, from one listing (FileNotFoundError if absent).
    The identity changes whenever the file is replaced (None: the listing cannot tell versions apart)."""
    found: dict[str, tuple[int, tuple | None]] = {}
    if isinstance(fs, LocalFileSystem):  # scandir: fsspec's per-entry info costs more than the listing
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith("unit-") and name.endswith(".json") and name[5:-5].isdigit() \
                        and entry.is_file():
                    st = entry.stat()
                    identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                    found[f"{folder}/{name}"] = (int(name[5:-5]), identity)
        return found
    for info in fs.ls(folder, detail=True):
        name = info["name"].rsplit("/", 1)[-1]
        if name.startswith("unit-") and name.endswith(".json") and name[5:-5].isdigit() \
                and info.get("type", "file") == "file":
            fields = [str(info.get(k)) for k in _IDENTITY_FIELDS if info.get(k) is not None]
            found[info["name"]] = (int(name[5:-5]), (info.get("size"), *fields) if fields else None)
    return found


def _read_all(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, bytes | Exception]:
    """Every path's bytes (or the error reading it): plain reads locally (fsspec's per-file overhead is most of
    the cost there), one concurrent batch on object stores."""
    if not paths:
        return {}
    if not isinstance(fs, LocalFileSystem):
        return fs.cat(paths, on_error="return")
    found: dict[str, bytes | Exception] = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                found[path] = f.read()
        except OSError as error:
            found[path] = error
    return found


def _markers(output: str) -> dict[int, UnitReport]:
    """{unit: report} of every sound marker; a marker that does not parse is logged and counts as not done.

    One listing of the progress folder; only markers not verified before in this process (new or replaced ones)
    are read, so a resumed job, its end (`extract.finalize_job`) and the explorer's refreshes cost a listing, not
    N reads. The first call still reads every marker: a torn marker (written before markers were atomic) looks
    like a sound one in a listing."""
    fs, root = filesystem(output)
    folder = join(root, PROGRESS)
    try:
        listed = _listing(fs, folder)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    key = fs.unstrip_protocol(folder)  # file:///…, s3://…, memory://…
    known = _SOUND.get(key, {})
    unread = [p for p, (_, identity) in listed.items() if identity is None or known.get(p, ((),))[0] != identity]
    found = _read_all(fs, unread)
    sound: dict[str, tuple[tuple, UnitReport]] = {}
    reports: dict[int, UnitReport] = {}
    for path, (unit, identity) in listed.items():
        if path in found:
            report = _parse_marker(found[path], unit)
            if report is None:
                log.warning("%s: done marker does not parse; unit %d will be redone", path, unit)
                continue
        else:
            report = known[path][1]
        reports[unit] = report
        if identity is not None:
            sound[path] = (identity, report)
    with _SOUND_LOCK:
        _SOUND.pop(key, None)
        _SOUND[key] = sound
        while len(_SOUND) > _KEEP:
            del _SOUND[next(iter(_SOUND))]
    return reports


def done_units(output: str) -> set[int]:
    """The units whose done marker is sound (exists and parses as this unit's report)."""
    return set(_markers(output))


def read_markers(output: str, units: Iterable[int]) -> list[UnitReport]:
    """The reports of `units`, which must have sound markers (`done_units`)."""
    reports = _markers(output)
    missing = [u for u in units if u not in reports]
    if missing:
        raise StoreError(f"{output}: unit {missing[0]} has no sound done marker")
    return [reports[u] for u in units]


def clear_markers(output: str) -> None:
    fs, root = filesystem(output)
    folder = join(root, PROGRESS)
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


def write_failures(output: str, failures: Sequence[dict]) -> bool:
    """Write failures.parquet unless it already holds exactly these rows (a finished job rerun writes nothing).
    Returns whether it wrote."""
    fs, root = filesystem(output)
    path = join(root, FAILURES)
    table = pa.table({
        "sample_id": pa.array([f["sample_id"] for f in failures], pa.string()),
        "reason": pa.array([f["reason"] for f in failures], pa.string()),
        "unit": pa.array([f.get("unit", -1) for f in failures], pa.int64()),
    })
    if fs.exists(path):
        try:
            with fs.open(path, "rb") as f:
                if pq.read_table(f).equals(table):
                    return False
        except (pa.ArrowException, OSError):
            pass  # unreadable: rewrite it
    write_parquet(fs, path, table)
    return True


# What sdfeat writes under an output: `--overwrite` removes these and nothing else.
STORE_ENTRIES = (FEATURES, MANIFEST, PROGRESS, FAILURES, "results", "report")


def store_entries(output: str) -> list[str]:
    """The entries of STORE_ENTRIES present under `output` (what `remove_store` would remove)."""
    fs, root = filesystem(output)
    return [name for name in STORE_ENTRIES if fs.exists(join(root, name))]


def remove_store(output: str) -> list[str]:
    """Remove sdfeat's entries under `output` (the store, its markers and failures, results/ and report/); other
    files there are kept. Returns the names removed."""
    fs, root = filesystem(output)
    removed = store_entries(output)
    for name in removed:
        fs.rm(join(root, name), recursive=True)
    return removed


def update_attrs(output: str, changes: dict) -> None:
    """Merge `changes` into the store's sdfeat attrs (and its consolidated metadata)."""
    group = open_features(output, mode="r+")
    group.attrs[ATTRS_KEY] = {**group.attrs.asdict().get(ATTRS_KEY, {}), **changes}
    zarr.consolidate_metadata(join(output, FEATURES))
