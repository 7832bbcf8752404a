"""Whole Zarr v3 shards of one work unit written as bytes, several at once, byte-identical to zarr-python's.

`store.write_unit` hands every array of a unit to `plan_shards`; arrays it covers are written here by
`write_shards` (a thread pool: file writes and numcodecs' zstd release the GIL, so shards of different arrays are
encoded and written in parallel), the rest by zarr-python. zarr-python stays the template writer and the reader:
this module only produces the shard objects zarr-python 3.1 itself would write for the same data, namely

    the inner chunks' encoded bytes, in Morton order of the inner-chunk grid
        (codec none: the raw little-endian values; zstd: numcodecs `Zstd(level, checksum)` of those bytes)
    the shard index: (offset, nbytes) uint64 little-endian per inner chunk, in C order of the inner-chunk grid,
        2**64-1 twice for a chunk that lies past the array's end (a partial last shard)
    crc32c of the index, uint32 little-endian

stored at `<array path>/<the array's chunk key of the shard>` (default encoding: `c/` then `/`-separated
coordinates). Every inner chunk inside the array is written, zeros included, as zarr-python does with
`array.write_empty_chunks` on (which `store.write_unit` uses).

Covered (`plan_shards` returns None otherwise, and `store.write_unit` uses zarr-python for that array): a zarr v3
array with a regular chunk grid whose only array->bytes codec is `sharding_indexed` with the index at the end and
index codecs bytes(little) + crc32c; inner codecs `bytes` (little-endian, or none for 1-byte types) optionally
followed by `zstd`; a shard spanning the whole array on every axis but the first (`sample`); inner chunks that
tile those axes exactly; rows [start, stop) that are whole shards (the last may end at the array's end) and never
cut an inner chunk; values of exactly the array's dtype and shape. Not covered: unsharded arrays (`ok`,
`sample_id`, `label`, coordinates), other codecs (blosc, transpose, …), big-endian data, an index at the start.

Local paths are written under a temporary name in the shard's folder and renamed over the shard (atomic, as
zarr's LocalStore does); other fsspec filesystems (s3://) get one object per shard, which appears whole once its
upload completes.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import fsspec
import google_crc32c
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from numcodecs.zstd import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.storage import FsspecStore, LocalStore

MISSING = 2**64 - 1  # the index's (offset, nbytes) of an absent chunk


def default_workers() -> int:
    """Writer threads when not told: min(4, the CPUs this process may use)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


@dataclass(frozen=True)
class ShardJob:
    """One shard object to write: its key under the store root and the array rows it holds."""

    key: str                           # "up_blocks.1.resnets.0/c/3/0/0/0/0/0"
    values: np.ndarray                 # (rows, *array.shape[1:]) C-contiguous, little-endian; rows <= shard rows
    chunk_shape: tuple[int, ...]       # the inner chunk, e.g. (1, 1, 1, C, H, W)
    chunks_per_shard: tuple[int, ...]  # the inner-chunk grid of a whole shard, e.g. (unit, T, S, 1, 1, 1)
    zstd: Zstd | None                  # None: codec none

    @property
    def nbytes(self) -> int:
        return self.values.nbytes


def _covered_codecs(array: zarr.Array) -> tuple[ShardingCodec, Zstd | None] | None:
    codecs = array.metadata.codecs
    if array.metadata.zarr_format != 3 or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    if sharding.index_location != ShardingCodecIndexLocation.end or len(sharding.index_codecs) != 2:
        return None
    index_bytes, index_crc = sharding.index_codecs
    if not (isinstance(index_bytes, BytesCodec) and index_bytes.endian is not None
            and index_bytes.endian.value == "little" and isinstance(index_crc, Crc32cCodec)):
        return None
    inner = sharding.codecs
    if not inner or not isinstance(inner[0], BytesCodec) or len(inner) > 2:
        return None
    if inner[0].endian is not None and inner[0].endian.value != "little":
        return None
    if len(inner) == 1:
        return sharding, None
    if not isinstance(inner[1], ZstdCodec):
        return None
    return sharding, Zstd(level=inner[1].level, checksum=inner[1].checksum)


def plan_shards(array: zarr.Array, start: int, stop: int, values: np.ndarray) -> list[ShardJob] | None:
    """The shard objects that hold rows [start, stop) of `array` (values: (stop - start, *array.shape[1:])),
    or None when this layout is not covered (see the module docstring) and zarr-python must write it."""
    found = _covered_codecs(array)
    grid = array.metadata.chunk_grid
    if found is None or not isinstance(grid, RegularChunkGrid):
        return None
    sharding, zstd = found
    shape, shard, chunk = tuple(array.shape), tuple(grid.chunk_shape), tuple(sharding.chunk_shape)
    n = shape[0]
    native = array.metadata.data_type.to_native_dtype()
    if (values.shape != (stop - start, *shape[1:]) or values.dtype.newbyteorder("=") != native.newbyteorder("=")
            or shard[1:] != shape[1:] or any(s % c for s, c in zip(shape[1:], chunk[1:], strict=True))):
        return None
    if not 0 <= start < stop <= n or start % shard[0] or (stop % shard[0] and stop != n) or (stop - start) % chunk[0]:
        return None
    values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))  # a view when already so
    chunks_per_shard = tuple(s // c for s, c in zip(shard, chunk, strict=True))
    jobs = []
    for row in range(start, stop, shard[0]):
        coords = (row // shard[0],) + (0,) * (len(shape) - 1)
        jobs.append(ShardJob(f"{array.path}/{array.metadata.encode_chunk_key(coords)}",
                             values[row - start: min(row + shard[0], stop) - start], chunk, chunks_per_shard, zstd))
    return jobs


@lru_cache(maxsize=64)
def morton_order(grid: tuple[int, ...]) -> np.ndarray:
    """(n, ndim) coordinates of `grid` in zarr's (compressed) Morton order: coordinate bits interleaved from the
    lowest, axes in order, an axis dropping out once its bits are used up; sorted by that code."""
    coords = np.stack(np.meshgrid(*[np.arange(g, dtype=np.int64) for g in grid], indexing="ij"),
                      axis=-1).reshape(-1, len(grid))  # (n, ndim) in C order
    bits = [(g - 1).bit_length() for g in grid]
    code = np.zeros(len(coords), dtype=np.int64)
    out_bit = 0
    for bit in range(max(bits, default=0)):
        for axis, width in enumerate(bits):
            if bit < width:
                code |= ((coords[:, axis] >> bit) & 1) << out_bit
                out_bit += 1
    order = coords[np.argsort(code, kind="stable")]
    order.flags.writeable = False
    return order


def _index_tail(index: np.ndarray) -> bytes:
    index_bytes = index.tobytes()
    return index_bytes + np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()


def encode_shard(job: ShardJob) -> Iterator[memoryview | bytes]:
    """The shard object's bytes, in order, as pieces (views of `job.values` for codec none): chunks, then index."""
    index = np.full((*job.chunks_per_shard, 2), MISSING, dtype="<u8")  # C order of the inner-chunk grid
    rows = job.values.shape[0]
    if job.zstd is None and all(n == 1 for n in job.chunks_per_shard[1:]):
        # chunks stacked along rows only: Morton order is row order and the chunks are consecutive in `values`,
        # so the data is `values` itself, written at once (the summaries' ~400 small arrays per unit: per-chunk
        # Python work cost more than their bytes)
        count = -(-rows // job.chunk_shape[0])
        nbytes = job.values.nbytes // count if count else 0
        index[:count, ..., 0] = (np.arange(count, dtype="<u8") * nbytes).reshape(-1, *([1] * (index.ndim - 2)))
        index[:count, ..., 1] = nbytes
        if rows:
            yield memoryview(np.ascontiguousarray(job.values).reshape(-1).view(np.uint8))
        yield _index_tail(index)
        return
    offset = 0
    for coords in morton_order(job.chunks_per_shard):
        first = int(coords[0]) * job.chunk_shape[0]
        if first >= rows:  # past the array's end: absent from the shard
            continue
        chunk = job.values[tuple(slice(int(c) * s, (int(c) + 1) * s) for c, s in zip(coords, job.chunk_shape))]
        piece: memoryview | bytes = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
        if job.zstd is not None:
            piece = job.zstd.encode(piece)
        index[tuple(coords)] = (offset, len(piece))
        offset += len(piece)
        yield piece
    yield _index_tail(index)


def shard_bytes(job: ShardJob) -> bytes:
    """The whole shard object as one bytes (tests, small shards)."""
    return b"".join(bytes(p) for p in encode_shard(job))


class ShardTarget:
    """Where shard objects go: a local folder (temporary name, then rename) or an fsspec filesystem (s3)."""

    def __init__(self, root: str, fs: fsspec.AbstractFileSystem | None = None) -> None:
        self.root = root.rstrip("/")
        self.fs = fs  # None: local files

    @classmethod
    def of(cls, store: zarr.abc.store.Store) -> ShardTarget | None:
        """The target behind a zarr store, or None for a store this module cannot write (memory, zip, …)."""
        if isinstance(store, LocalStore):
            return cls(str(store.root))
        if isinstance(store, FsspecStore):
            fs = _sync_filesystem(store.fs)
            if isinstance(fs, LocalFileSystem):
                return cls(store.path)
            return cls(store.path, fs)
        return None

    def write(self, job: ShardJob) -> None:
        path = f"{self.root}/{job.key}"
        if self.fs is not None:
            with self.fs.open(path, "wb") as f:
                for piece in encode_shard(job):
                    f.write(piece)
            return
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(f"{final.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(partial, "wb") as f:
                for piece in encode_shard(job):
                    f.write(piece)
            os.replace(partial, final)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def _sync_filesystem(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """A synchronous twin of the asynchronous filesystem zarr's FsspecStore holds (same options)."""
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

    if isinstance(fs, AsyncFileSystemWrapper):
        return fs.sync_fs
    if not getattr(fs, "asynchronous", False):
        return fs
    config = json.loads(fs.to_json())
    config["asynchronous"] = False
    return fsspec.AbstractFileSystem.from_json(json.dumps(config))


def _write_timed(target: ShardTarget, job: ShardJob) -> float:
    """Write one shard; returns the CPU seconds this thread spent on it."""
    start = time.thread_time()
    target.write(job)
    return time.thread_time() - start


def write_shards(target: ShardTarget, jobs: Sequence[ShardJob], workers: int | None = None) -> float:
    """Write every job's shard, `workers` at a time (default `default_workers()`), largest first; returns once all
    are written (the CPU seconds the writing threads spent) and raises the first error after the others have
    finished."""
    workers = default_workers() if workers is None else workers
    ordered = sorted(jobs, key=lambda j: -j.nbytes)
    if workers <= 1 or len(ordered) <= 1:
        return sum(_write_timed(target, job) for job in ordered)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdfeat-shard") as pool:
        futures = [pool.submit(_write_timed, target, job) for job in ordered]
        try:
            return sum(future.result() for future in futures)
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the shards not started yet are not written
            raise
