"""A worker's units end to end, as one continuous pipeline: `UnitRunner` holds a loaded model and the open store and
runs the units given to it, in order, with the host never letting the device wait.

    submit(unit) ─▶ feed.Feeder ──HostBatch──▶ launching thread ──UnitWork──▶ writer thread ─▶ Future[report]
                    read, decode, stage          forward.Forward (device)       wait the fence, spread rows,
                    (runs ahead across units)    one fence per unit             shards, latent cache, marker

1. `feed.Feeder` reads and decodes ahead of the device across unit boundaries (a source file stays open, each row
   group is read once), draws noise and token positions, and reads a warm unit's posteriors from the latent cache.
2. The launching thread runs `forward.Forward` per batch into the unit's host buffers (pinned on a GPU; two sets
   there, so one unit is written while the next is computed) and, after a unit's last batch, records its fence.
   It never synchronises with the device.
3. The writer thread waits on the fence, spreads the unit's compacted rows to their store rows (a failed image's
   row gets `store.missing_value`), writes the unit's whole shards, adds new posteriors to the latent cache, and
   writes the done marker, last. The unit's report resolves its future.

A runner is given its `job.Job`, resolved once by `job.prepare_job` (or `job.open_job`): the spec, the layout, the
store's attrs. `extract.run_local` runs a runner in this process, the Ray actors (`driver.py`) one per actor; a
`simdevice.SimulatedDevice` can stand in for the device stages (benchmarks, tests). Constructing a runner changes
nothing process-wide (torch's thread count is the process owner's: `process.torch_threads`). Never imports Ray.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

import numpy as np
import torch

from sdfeat import store
from sdfeat.errors import SourceError, StoreError
from sdfeat.extract.feed import Feeder, FeedSettings, HostBatch, UnitError
from sdfeat.extract.forward import Forward, UnitWork, prompts_for
from sdfeat.extract.job import Job
from sdfeat.extract.latent_cache import LatentCache, cache_key
from sdfeat.extract.simdevice import SimulatedDevice, Simulation
from sdfeat.extract.stages import StageClock
from sdfeat.models.loading import LoadedModel, load_model
from sdfeat.planning.units import Unit
from sdfeat.spec import JobSpec
from sdfeat.store.schema import UnitFailure, UnitReport

log = logging.getLogger(__name__)

_STOP = object()
SECOND_SET_MAX_BYTES = 256 * 2**20  # on a CPU, a second unit buffer set only up to this size


def _padding(spec: JobSpec) -> dict[str, str]:
    """`load_model`'s padding arguments for the spec's intervention (none: the model as released)."""
    if spec.intervention is None:
        return {}
    return {"padding": spec.intervention.padding, "padding_scope": spec.intervention.scope}


def _numpy_dtype(dtype: torch.dtype) -> str:
    """The dtype the latent cache keeps a compute dtype in (numpy has no bfloat16: float32 holds it exactly)."""
    return "float32" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")


def spread_rows(values: np.ndarray, rows: list[int]) -> None:
    """values[:k] hold unit rows `rows[:k]` (ascending; those below len(values)) in order: move each to its row,
    back to front (a row only moves down the buffer, never over one still to move), and give every other row the
    missing value. Nothing moves when no image failed."""
    usable = [r for r in rows if r < len(values)]
    for j in range(len(usable) - 1, -1, -1):
        if usable[j] != j:
            values[usable[j]] = values[j]
    missing = sorted(set(range(len(values))) - set(usable))
    if missing:
        values[missing] = store.missing_value(values.dtype)


class UnitRunner:
    """Holds the loaded model and the open store of `job`; runs the units submitted to it. One per process or actor.

    `threads` sizes torch's share and, unless `decode_threads` is given, the image decoding (default: torch's
    thread count); constructing a runner changes nothing process-wide. `simulate`: a `simdevice.SimulatedDevice`
    in place of the device stages (no model is loaded)."""

    def __init__(self, job: Job, device: str | None = None, threads: int | None = None, *,
                 decode_threads: int | None = None, simulate: Simulation | None = None) -> None:
        spec = self.spec = job.spec
        self.job = job
        self.output = job.output
        self.device = torch.device("cpu" if simulate else device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes per job: let cuDNN pick the fastest kernels
        self.decode_threads = decode_threads or max(1, min(8, (threads or torch.get_num_threads())))
        self.layout = job.layout
        names = job.attrs.class_names
        self.class_names: list[str] | None = None if names is None else list(names)
        self.manifest = store.read_manifest(self.output)  # one row per store row; read once per worker
        self.group = store.open_features(self.output, mode="r+")
        self._opened: dict = {}  # the store's arrays, opened once by the writer (`store.write_unit`)
        self.unit_size = job.units[0].rows  # the largest unit (only the last may be shorter)
        # Arrays limited to the store's first rows (crop variants under `variants.samples`): path -> row count.
        self._row_limits = {a.path: a.rows for a in self.layout.arrays if a.rows is not None}
        self.model: LoadedModel | None = None
        if simulate is None:
            # With a latent cache the VAE loads only when a unit misses the cache; every prompt of the job (each
            # class's, with `{class_name}`) is embedded before the U-Net loads, so the text encoder never sits
            # beside the weights (peak RSS).
            labels = range(len(self.class_names or ())) if "{class_name}" in spec.prompt else [0]
            self.model = load_model(job.model, self.device, self._compute_dtype(),
                                    fp16_rounded_weights=spec.protocol == "paper", compiled=spec.compile,
                                    lazy_vae=spec.latent_cache is not None,
                                    prompts=prompts_for(spec.prompt, self.class_names, labels),
                                    shapes=len(self.layout.passes), **_padding(spec))
        self.cache: LatentCache | None = self._open_cache(simulate) if spec.latent_cache is not None else None
        self.forward: Forward | SimulatedDevice
        if simulate is not None:
            self.forward = SimulatedDevice(simulate, job.latent_channels,
                                           _numpy_dtype(self._compute_dtype()), self.cache is not None)
        else:
            self.forward = Forward(self.model, spec, self.layout, self.device, self._unit_rows,
                                   self.cache is not None, self.class_names)
        # A compiled model compiles every graph here, so compile time is reported apart from throughput.
        self.compile_seconds = self.forward.warm_up() if spec.compile and self.device.type == "cuda" else 0.0
        # Host buffers for whole units, reused: fresh ones would page-fault on every first write. Two sets (one unit
        # computed while the previous one is written) on a GPU, and on a CPU where a set is small; one otherwise
        # (the CPU's peak memory: a large unit is written while the device, here the CPU itself, waits).
        unit_bytes = self.unit_size * self.layout.bytes_per_sample()
        sets = 2 if self.device.type == "cuda" or simulate is not None or unit_bytes <= SECOND_SET_MAX_BYTES else 1
        self._buffers: queue.Queue[dict[str, torch.Tensor]] = queue.Queue()
        for _ in range(sets):
            self._buffers.put({a.path: torch.zeros((self.unit_size, *a.sample_shape), dtype=getattr(torch, a.dtype),
                                                   pin_memory=self.forward.pinned)
                               for a in self.layout.arrays})
        self.worker = f"{socket.gethostname()}:{'simulated' if simulate else self.device}"
        self.on_batch: Callable[[int, int], None] | None = None  # progress per batch (unit index, rows)
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._feeder: Feeder | None = None
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self._to_write: queue.Queue = queue.Queue()

    # -- setup ---------------------------------------------------------------------------------------------------

    def _compute_dtype(self) -> torch.dtype:
        if self.spec.compute_dtype == "auto":
            return torch.float16 if self.device.type == "cuda" else torch.float32
        return getattr(torch, self.spec.compute_dtype)

    def _open_cache(self, simulate: Simulation | None) -> LatentCache:
        """The latent cache's folder for this runner's VAE weights, pixel scaling and numerics."""
        import diffusers
        import PIL

        spec = self.spec
        vae_padding = spec.intervention.padding if spec.intervention and spec.intervention.scope == "unet+vae" \
            else "zeros"
        digest = SimulatedDevice.vae_digest if simulate is not None else self.model.vae_weights_digest()
        key = cache_key(digest, spec.protocol, spec.resolution,
                        str(self._compute_dtype()).removeprefix("torch."), self.device.type,
                        spec.compile and self.device.type == "cuda", vae_padding,
                        {"torch": torch.__version__, "diffusers": diffusers.__version__, "pillow": PIL.__version__})
        return LatentCache(spec.latent_cache, key, spec.source)

    def _unit_rows(self, path: str, unit: Unit) -> int:
        """Rows of `unit` that array `path` holds: all, or for a limited array those below its limit (a prefix)."""
        limit = self._row_limits.get(path)
        return unit.rows if limit is None else max(0, min(unit.stop, limit) - unit.start)

    def _crop_rows(self, unit: Unit) -> int | None:
        """Unit-relative rows that run the crop passes (those below the crop limit); None: every row."""
        return min((self._unit_rows(path, unit) for path in self._row_limits), default=None)

    def _start(self) -> None:
        """The pipeline's threads, started with the first unit."""
        spec = self.spec
        settings = FeedSettings(
            resolution=spec.resolution, batch_size=spec.batch_size, protocol=spec.protocol, seeds=list(spec.seeds),
            margins=[p.margin for p in self.layout.passes], latent_channels=self.job.latent_channels,
            summary_blocks=list(self.layout.passes[0].summarized),
            tokens_per_image=spec.summaries.tokens_per_image if spec.summaries else 0,
            crop_rows=self._crop_rows, latent_dtype=_numpy_dtype(self._compute_dtype()), pin=self.forward.pinned)
        self._feeder = Feeder(settings, self.manifest, self.decode_threads, self.cache)
        self._process_cpu = time.process_time()
        self._closing.clear()
        self._threads = [threading.Thread(target=self._launch_loop, args=(self._feeder,), daemon=True,
                                          name="sdfeat-launch"),
                         threading.Thread(target=self._write_loop, daemon=True, name="sdfeat-write")]
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float = 120.0) -> None:
        """Stop the pipeline's threads and wait for them: the batch on the device and the units already computed
        are finished, the rest abandoned (their futures never resolve). Waiting matters: a thread still inside
        torch when the interpreter exits (Ctrl-C) aborts the process."""
        if self._feeder is None:
            return
        self._closing.set()
        self._feeder.close()
        launch, write = self._threads
        launch.join(timeout)
        self._to_write.put(_STOP)
        write.join(timeout)
        self._feeder.join(timeout)
        self._feeder = None

    # -- the caller's side ---------------------------------------------------------------------------------------

    def submit(self, unit: Unit) -> Future:
        """Queue `unit` behind those submitted before; its future gives the unit report once the marker is
        written, or raises what failed it (a `SourceError` for a source that cannot be read)."""
        future: Future = Future()
        with self._lock:
            if self._feeder is None:
                self._start()
            if unit.index in self._futures:
                raise StoreError(f"unit {unit.index} is already running in this worker")
            self._futures[unit.index] = future
            self._feeder.put(unit)
        return future

    def run(self, unit: Unit) -> UnitReport:
        """Extract one unit, write its shards, then its done marker; returns the unit report. Safe to call from
        several threads at once (a Ray actor keeps units in flight this way): units run in the order submitted."""
        return self.submit(unit).result()

    def run_many(self, units: Iterable[Unit]) -> Iterator[UnitReport | UnitFailure]:
        """Reports of `units` in order, all submitted at once so reading and decoding run ahead. A unit whose
        source cannot be read yields a `UnitFailure` (its reason) and the others go on."""
        futures = [(unit, self.submit(unit)) for unit in units]
        for unit, future in futures:
            try:
                yield future.result()
            except SourceError as err:
                log.error("unit %d failed: %s", unit.index, err)
                yield UnitFailure(unit.index, str(err))

    def _resolve(self, unit: Unit, report: UnitReport | None, error: BaseException | None) -> None:
        with self._lock:
            future = self._futures.pop(unit.index)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(report)

    # -- 2. launching ------------------------------------------------------------------------------------------

    def _next(self, source: queue.Queue) -> object:
        """The next item of `source`, or `_STOP` once the runner is closing."""
        while not self._closing.is_set():
            try:
                return source.get(timeout=0.1)
            except queue.Empty:
                continue
        return _STOP

    def _launch_loop(self, feeder: Feeder) -> None:
        try:
            self._launch_units(feeder)
        except BaseException as err:  # a defect here must not leave callers waiting forever
            log.exception("the launching thread stopped")
            with self._lock:
                futures, self._futures = self._futures, {}
            for future in futures.values():
                future.set_exception(err)

    def _launch_units(self, feeder: Feeder) -> None:
        work: UnitWork | None = None
        while True:
            waited = time.perf_counter()
            item = self._next(feeder.ready)
            if item is _STOP:
                return
            stall = time.perf_counter() - waited
            if work is None:
                buffers = self._next(self._buffers)
                if buffers is _STOP:
                    return
                work = UnitWork(item.unit, buffers, StageClock(self.device))
            work.clock.add("stall", stall)
            start = time.thread_time()
            if isinstance(item, HostBatch):
                self._launch(item, work)
                work.launch_cpu += time.thread_time() - start
                continue
            if isinstance(item, UnitError):
                work.error = item.error
            else:
                work.end = item
            work.fence = self.forward.fence()
            work.launch_cpu += time.thread_time() - start
            self._to_write.put(work)
            work = None

    def _launch(self, batch: HostBatch, work: UnitWork) -> None:
        if work.error is not None:  # an earlier batch of the unit failed: the unit fails as a whole
            return
        try:
            self.forward.run(batch, work)
        except Exception as err:  # the unit fails (its caller retries it); the next units go on
            log.debug("unit %d: batch failed", batch.unit.index, exc_info=True)
            work.error = err
            return
        work.rows.extend(batch.rows)
        if self.on_batch is not None:
            self.on_batch(batch.unit.index, len(batch.rows))

    # -- 3. writing --------------------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while (work := self._to_write.get()) is not _STOP:
            try:
                if work.fence is not None:
                    work.fence.synchronize()  # the unit's copies to the host have landed
                if work.error is not None:
                    raise work.error
                report = self._commit(work)
            except BaseException as err:  # the unit's caller gets it; the worker goes on
                self._resolve(work.unit, None, err)
            else:
                self._resolve(work.unit, report, None)
            finally:
                self._buffers.put(work.buffers)

    def _commit(self, work: UnitWork) -> UnitReport:
        start = time.thread_time()
        unit, clock, end = work.unit, work.clock, work.end
        wall = clock.wall()  # the unit's compute; its write may overlap the next unit's compute
        with clock.stage("write"):
            data = {}
            for path, buffer in work.buffers.items():
                values = buffer[: self._unit_rows(path, unit)].numpy()
                spread_rows(values, work.rows)
                data[path] = values
            ok = np.zeros(unit.rows, dtype=bool)
            ok[work.rows] = True
            shard_cpu = store.write_unit(self.group, unit.start, unit.stop, data, ok,
                                         workers=self.spec.write_workers, opened=self._opened) or 0.0
            if end.cold:
                self._store_latents(work, end.failures)
        clock.add("decode", end.decode_seconds)
        now = time.process_time()  # this process's CPU (every thread) since the previous unit was written
        cpu = {**end.cpu, "launch": round(work.launch_cpu, 4),
               "write": round(time.thread_time() - start + shard_cpu, 4), "process": round(now - self._process_cpu, 4)}
        self._process_cpu = now
        report = UnitReport(unit=unit.index, rows=unit.rows, ok=int(ok.sum()), failures=tuple(end.failures),
                            seconds=clock.seconds(), wall=round(wall, 4), cpu=cpu, worker=self.worker,
                            finished=round(time.time(), 3))
        store.write_marker(self.output, report)
        return report

    def _store_latents(self, work: UnitWork, failures: list[dict]) -> None:
        """Write the cold unit's posteriors and failures to the latent cache (failures first, then each batch
        array and its marker)."""
        if self.cache is None:
            return
        for failure in failures:
            self.cache.put_failure(failure["sample_id"], failure["reason"])
        for sample_ids, margin, values, memory_format in work.latents:
            host = values.numpy() if isinstance(values, torch.Tensor) else values  # (B, 2C, h, w)
            self.cache.put(sample_ids, margin, host, memory_format)

