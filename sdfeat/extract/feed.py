"""The host side of a worker's pipeline: units in, batches ready for the device out, running ahead of the device
across unit boundaries.

`Feeder` owns two threads and a decode pool for the life of a worker (`worker.UnitRunner`):
  1. the planning thread takes units in order, asks the latent cache whether it holds the unit's posteriors and,
     if not, hands the unit's images to the decode pool as their bytes are read (`sources.reading.loaders` with
     the worker's `OpenFiles`: a Parquet file stays open and each row group is read once across units); it
     moves on to the next unit at once, held back only by the decode window (`window` images in flight);
  2. the decode pool decodes and centre-crops (`sources.reading.decode_one`; PIL releases the GIL);
  3. the assembling thread takes decoded images in order, copies them into a fresh batch tensor (pinned on a GPU,
     from torch's caching host allocator, which keeps a block until the copies reading it have finished), draws
     `standard`'s noise and the summaries' token positions for the batch, reads a warm unit's posteriors from the
     cache, and puts `HostBatch`es, then the unit's `UnitEnd`, on `ready` (a bounded queue: `depth` batches).
A unit whose source file cannot be read becomes a `UnitError` (the following units go on). Batches are formed as
the worker always formed them (the usable images of a unit in row order, `batch_size` at a time), so the paper's
per-batch noise is unchanged. Every thread adds the CPU seconds it spends per unit to that unit's `cpu` tally.
Imports torch only for the host tensors; never touches a device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from sdfeat.errors import SourceError
from sdfeat.extract.latent_cache import LatentCache, plan_batches
from sdfeat.extract.protocol import standard_noise
from sdfeat.extract.summaries import sample_positions
from sdfeat.models.blocks import BlockInfo
from sdfeat.planning.units import Unit
from sdfeat.sources import DecodedImage, SampleRef
from sdfeat.sources.reading import OpenFiles, decode_one, loaders
from sdfeat.sources.refs import manifest_refs

log = logging.getLogger(__name__)

_END = object()  # end of a queue's stream


class _Closed(Exception):
    """The feeder was closed while a thread waited; the thread ends."""


HOST_NICENESS = 5  # the feeder's threads yield a contended core to the launching thread (and on a CPU, to torch)


def yield_to_the_device() -> None:
    """Lower this thread's scheduling priority (Linux: per thread) so that, when cores are short, the thread that
    keeps the device busy runs first and the host's reading and decoding take the time that is left."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + HOST_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: priorities stay as they are
        pass


@dataclass
class HostBatch:
    """One batch of a unit, on the host, ready for the device."""

    unit: Unit
    rows: list[int]                    # unit-relative rows of its images, ascending
    slot: int                          # how many usable images of the unit come before it (its place in buffers)
    sample_ids: list[str]
    labels: list[int]
    margins: tuple[int, ...]           # the passes it runs: 0, and crop margins below the crop rows
    pixels: torch.Tensor | None        # (B, H, W, 3) uint8; None when the posteriors come from the latent cache
    posteriors: dict[int, tuple[torch.Tensor, str]] = field(default_factory=dict)  # warm: margin -> ((B, 2C, h, w), memory format)
    noise: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (margin, seed) -> (eps, noise) (B, C, h, w) fp32
    positions: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # (seed, block) -> (B, K, 2) int64

    def rows_below(self, limit: int | None) -> int:
        """How many of its images lie below unit-relative row `limit` (None: all): a prefix, rows ascending."""
        return len(self.rows) if limit is None else sum(1 for r in self.rows if r < limit)


@dataclass
class UnitEnd:
    unit: Unit
    failures: list[dict]               # {"sample_id", "reason", "unit"} per image that could not be used
    cold: bool                         # its images were decoded (not a warm latent cache's unit)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of the host threads on it: read, decode, feed
    decode_seconds: float = 0.0        # busy (wall) seconds of the decode pool on it


@dataclass
class UnitError:
    unit: Unit
    error: BaseException


@dataclass
class FeedSettings:
    """What the feeder needs to know of a job (`worker.UnitRunner` fills it from the spec and layout)."""

    resolution: int
    batch_size: int
    protocol: str
    seeds: list[int]
    margins: list[int]                           # every pass's margin, the full image (0) first
    latent_channels: int
    summary_blocks: list[BlockInfo]              # blocks summarised in the full-size pass (token positions)
    tokens_per_image: int
    crop_rows: Callable[[Unit], int | None]      # unit-relative rows below the crop limit (None: every row)
    latent_dtype: str                            # numpy dtype the latent cache keeps posteriors in
    pin: bool                                    # pinned host tensors (a GPU is fed)


@dataclass
class _Planned:
    unit: Unit
    refs: list[SampleRef]
    decoded: queue.Queue = field(default_factory=queue.Queue)  # Future[DecodedImage] in ref order, error, _END
    warm: tuple[list, list[dict]] | None = None                # (cache batches, failure rows) of a warm unit


class Feeder:
    """Reads, decodes and assembles batches of the units given to `put`, in order, ahead of the device."""

    def __init__(self, settings: FeedSettings, manifest: pa.Table, threads: int, cache: LatentCache | None,
                 depth: int = 2) -> None:
        self.settings = settings
        self.manifest = manifest
        self.cache = cache
        self.ready: queue.Queue = queue.Queue(maxsize=depth)  # HostBatch | UnitEnd | UnitError
        self._units: queue.Queue = queue.Queue()
        self._planned: queue.Queue = queue.Queue(maxsize=4)
        self._window = threading.BoundedSemaphore(max(settings.batch_size, 4 * threads))
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdfeat-decode",
                                        initializer=yield_to_the_device)
        self._files = OpenFiles()
        self._cpu: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._decode_wall: dict[int, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._plan_loop, daemon=True, name="sdfeat-read"),
                         threading.Thread(target=self._assemble_loop, daemon=True, name="sdfeat-feed")]
        for thread in self._threads:
            thread.start()

    def put(self, unit: Unit) -> None:
        self._units.put(unit)

    def close(self) -> None:
        """Stop both threads (also while they wait on a full queue) and the decode pool."""
        self._stop.set()
        self._units.put(_END)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def join(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds each) for the threads `close` stopped."""
        for thread in self._threads:
            thread.join(timeout)

    def _put(self, target: queue.Queue, item: object) -> None:
        """Put `item` on a bounded queue, waiting while it is full unless the feeder is closed (then raise)."""
        while True:
            try:
                target.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._stop.is_set():
                    raise _Closed from None

    def _acquire_window(self) -> None:
        while not self._window.acquire(timeout=0.1):
            if self._stop.is_set():
                raise _Closed

    def _add_cpu(self, unit: Unit, stage: str, seconds: float) -> None:
        with self._lock:
            self._cpu[unit.index][stage] += seconds

    # -- 1. planning and reading ---------------------------------------------------------------------------------

    def _plan_loop(self) -> None:
        yield_to_the_device()
        try:
            while (unit := self._units.get()) is not _END and not self._stop.is_set():
                self._plan(unit)
        except _Closed:
            pass
        finally:
            self._files.close()
            with contextlib.suppress(queue.Full):  # full: the assembler is busy and sees the stop itself
                self._planned.put_nowait(_END)

    def _plan(self, unit: Unit) -> None:
        start = time.thread_time()
        refs = manifest_refs(self.manifest.slice(unit.start, unit.rows))
        planned = _Planned(unit, refs)
        try:
            planned.warm = self._warm(unit, refs)
        except OSError as err:  # the cache cannot be listed: the unit fails and is retried
            planned.decoded.put(err)
        self._put(self._planned, planned)  # the assembler starts on it while its images are still read
        try:
            if planned.warm is None and planned.decoded.empty():
                for index, load in loaders(refs, self._files):
                    self._add_cpu(unit, "read", time.thread_time() - start)
                    self._acquire_window()
                    start = time.thread_time()
                    planned.decoded.put(self._pool.submit(self._decode, unit, index, load))
        except (SourceError, OSError) as err:  # a file readable when planned cannot be read now
            planned.decoded.put(err)
        finally:
            planned.decoded.put(_END)
            self._add_cpu(unit, "read", time.thread_time() - start)

    def _decode(self, unit: Unit, index: int, load: Callable) -> DecodedImage:
        start, wall = time.thread_time(), time.perf_counter()
        try:
            return decode_one(index, load, self.settings.resolution)
        finally:
            self._add_cpu(unit, "decode", time.thread_time() - start)
            with self._lock:
                self._decode_wall[unit.index] += time.perf_counter() - wall

    def _warm(self, unit: Unit, refs: list[SampleRef]) -> tuple[list, list[dict]] | None:
        """(the unit's VAE batches, its failure rows) when the latent cache holds every posterior the unit would
        compute — the same batches as a cold run forms, at every margin it encodes — else None."""
        if self.cache is None:
            return None
        ids = [r.sample_id for r in refs]
        known = self.cache.failures(ids)
        failed = {i for i, sid in enumerate(ids) if sid in known}
        batches = plan_batches(len(ids), failed, self.settings.batch_size, self.settings.margins,
                               self.settings.crop_rows(unit))
        if not self.cache.has_all([([ids[r] for r in b.rows], m) for b in batches for m in b.margins]):
            return None
        return batches, [{"sample_id": ids[i], "reason": known[ids[i]], "unit": unit.index} for i in sorted(failed)]

    # -- 3. assembling -------------------------------------------------------------------------------------------

    def _assemble_loop(self) -> None:
        yield_to_the_device()
        try:
            while (planned := self._planned.get()) is not _END and not self._stop.is_set():
                self._assemble(planned)
        except _Closed:
            pass

    def _assemble(self, planned: _Planned) -> None:
        start = time.thread_time()
        try:
            end = self._assemble_warm(planned) if planned.warm is not None else self._assemble_cold(planned)
        except _Closed:
            raise
        except Exception as err:  # handed to the unit's caller; the following units go on
            end = UnitError(planned.unit, err)
        self._add_cpu(planned.unit, "feed", time.thread_time() - start)
        with self._lock:
            cpu = self._cpu.pop(planned.unit.index, {})
            decode_wall = self._decode_wall.pop(planned.unit.index, 0.0)
        if isinstance(end, UnitEnd):
            end.cpu = {k: round(v, 4) for k, v in cpu.items()}
            end.decode_seconds = decode_wall
        self._put(self.ready, end)

    def _emit(self, batch: HostBatch) -> None:
        """Draw the batch's noise and token positions, then hand it on (waits while `ready` is full)."""
        s = self.settings
        if s.protocol == "standard":
            for margin in batch.margins:
                side = (s.resolution - 2 * margin) // 8
                for seed in s.seeds:
                    batch.noise[(margin, seed)] = standard_noise(seed, batch.sample_ids, (s.latent_channels, side, side),
                                                                 pin=s.pin)
        for seed in s.seeds:
            by_shape: dict[tuple[int, int], torch.Tensor] = {}
            for block in s.summary_blocks:
                key = (block.height, block.width)
                if key not in by_shape:
                    yx = torch.from_numpy(sample_positions(seed, batch.sample_ids, block, s.tokens_per_image))
                    by_shape[key] = yx.pin_memory() if s.pin else yx
                batch.positions[(seed, block.name)] = by_shape[key]
        self._put(self.ready, batch)

    def _margins(self, unit: Unit, first_row: int) -> tuple[int, ...]:
        crop_rows = self.settings.crop_rows(unit)
        return tuple(m for m in self.settings.margins if m == 0 or crop_rows is None or first_row < crop_rows)

    def _assemble_cold(self, planned: _Planned) -> UnitEnd | UnitError:
        s, unit, refs = self.settings, planned.unit, planned.refs
        failures: list[dict] = []
        error: BaseException | None = None
        rows: list[int] = []
        slot = 0
        pixels = torch.empty((s.batch_size, s.resolution, s.resolution, 3), dtype=torch.uint8, pin_memory=s.pin)
        while (item := planned.decoded.get()) is not _END:
            if isinstance(item, BaseException):
                error = item
                continue
            decoded: DecodedImage = item.result()
            self._window.release()
            if error is not None:  # drain what was in flight before the error
                continue
            if decoded.pixels is None:
                failures.append({"sample_id": refs[decoded.index].sample_id, "reason": decoded.error,
                                 "unit": unit.index})
                continue
            pixels.numpy()[len(rows)] = decoded.pixels  # (H, W, 3) uint8 into the batch
            rows.append(decoded.index)
            if len(rows) == s.batch_size:
                self._emit(self._cold_batch(unit, refs, rows, slot, pixels))
                slot += len(rows)
                rows = []
                pixels = torch.empty_like(pixels, pin_memory=s.pin)
        if error is not None:
            return UnitError(unit, error)
        if rows:
            self._emit(self._cold_batch(unit, refs, rows, slot, pixels[: len(rows)]))
        return UnitEnd(unit, failures, cold=True)

    def _cold_batch(self, unit: Unit, refs: list[SampleRef], rows: list[int], slot: int,
                    pixels: torch.Tensor) -> HostBatch:
        return HostBatch(unit, rows, slot, [refs[r].sample_id for r in rows], [refs[r].label for r in rows],
                         self._margins(unit, rows[0]), pixels)

    def _assemble_warm(self, planned: _Planned) -> UnitEnd:
        unit, refs = planned.unit, planned.refs
        batches, failures = planned.warm
        slot = 0
        for b in batches:
            ids = [refs[r].sample_id for r in b.rows]
            batch = HostBatch(unit, b.rows, slot, ids, [refs[r].label for r in b.rows], b.margins, None)
            for margin in b.margins:
                values, memory_format = self.cache.load(ids, margin, self.settings.latent_dtype)  # (B, 2C, h, w)
                tensor = torch.from_numpy(values)
                batch.posteriors[margin] = (tensor.pin_memory() if self.settings.pin else tensor, memory_format)
            self._emit(batch)
            slot += len(b.rows)
        return UnitEnd(unit, failures, cold=False)

