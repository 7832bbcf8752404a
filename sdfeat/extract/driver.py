"""The Ray runtime for `sdfeat extract`: the driver and the extraction actors. The only extraction module that
imports Ray; a work unit itself is `worker.UnitRunner.run`, unchanged.

Driver (`run_on_ray`): holds the output's writer lock (`writer_lock`), joins a Ray cluster (or starts a local
one), checks the weights where the actors will run, writes the store template (`prepare_job`) before any actor
exists (resolving the `job.Job` once; each actor gets it pickled), skips units that already have a done marker
(resume), and keeps every actor busy with one unit in flight
plus one queued. A unit whose actor died (killed, node lost) or which raised is queued again, up to `max_retries`
times; a dead actor is replaced. A unit that still fails is named in a `UnitFailedError` once the other units are
done (they are kept; running again redoes only the missing ones). Unit reports feed the progress bar;
`extract.end_job` (shared with the local runner) names failed units or checks every marker and returns the
summary.

Actors (`ExtractionWorker`): load the model once; write activations straight into the store; only the small unit
report travels back through Ray.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.util.scheduling_strategies
import torch
from ray.exceptions import RayActorError, RayTaskError

from sdfeat.errors import ArgumentError, SdfeatError, storage_error
from sdfeat import process
from sdfeat.extract.job import Job, end_job, pending_units, prepare_job
from sdfeat.extract.simdevice import Simulation
from sdfeat.extract.worker import UnitRunner
from sdfeat.models.registry import ModelRef, require_weights, resolve_model
from sdfeat.planning.checks import check_job
from sdfeat.planning.units import Unit
from sdfeat.progress import UnitProgress
from sdfeat.spec import JobSpec
from sdfeat.store import writer_lock
from sdfeat.store.schema import UnitReport

log = logging.getLogger(__name__)

UNITS_PER_ACTOR = 3          # one being written, one computing, one being read ahead: the actor never waits
GPU_TORCH_THREADS = 2        # a GPU actor's torch CPU threads (its host work runs in the feeder and writer threads)
GPU_ACTOR_CPUS_MAX = 16      # more host threads than this do not feed one GPU any faster
GPU_ACTOR_CPUS_UNSEEN = 8    # a GPU actor's request when no GPU node is up yet (an autoscaler starts them)
MAX_FAILED_STARTS = 3        # actors that die while loading the model, before the job gives up
WAIT_S = 2.0                 # ray.wait timeout; bounds how late the "waiting for resources" warning comes
STARVED_WARN_S = 60.0


class ExtractionWorker:
    """Body of one extraction actor: a `UnitRunner` (model loaded once, store opened once, one pipeline for the
    actor's life: the units Ray hands it in turn are read and decoded ahead while earlier ones compute and write).

    A domain error while loading (missing weights, store of another spec; storage that refuses, as an OSError:
    the driver maps it, see `_domain_error`) is kept and re-raised by `ready()`, so the driver can report it as such
    instead of as an anonymous actor death.
    """

    def __init__(self, job: Job, device: str | None, threads: int | None, tally: Any = None,
                 simulate: Simulation | None = None) -> None:
        self.error: Exception | None = None
        decode_threads = None
        if device == "cuda":  # sized from the CPUs Ray gave this actor on the node it landed on
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            threads, decode_threads = GPU_TORCH_THREADS, gpu_decode_threads(cpus)
        if threads:  # the actor owns its process: torch's thread count is set here, for its life
            torch.set_num_threads(threads)
        try:
            self.runner = UnitRunner(job, device, threads, decode_threads=decode_threads, simulate=simulate)
        except SdfeatError as err:
            self.error = err
            return
        except OSError as err:
            if storage_error(err) is None:
                raise
            self.error = err
            return
        process.hold_freed_memory()  # loaded: from here on batches reuse their memory (`sdfeat.process`)
        if tally is not None:  # progress per batch: fire-and-forget to the driver's tally
            self.runner.on_batch = lambda unit, rows: tally.add.remote(unit, rows)

    def ready(self) -> tuple[str, float]:
        """(the worker's name, its compile warm-up seconds); raises what failed its loading."""
        if self.error is not None:
            raise self.error
        return self.runner.worker, self.runner.compile_seconds

    def run(self, unit: Unit) -> UnitReport:
        return self.runner.run(unit)


class BatchTally:
    """A small actor (no CPU) that the extraction actors tell about each finished batch; the driver drains it while
    it waits for unit reports, so the progress bar moves per batch."""

    def __init__(self) -> None:
        self.rows: Counter[int] = Counter()

    def add(self, unit: int, rows: int) -> None:
        self.rows[unit] += rows

    def take(self) -> dict[int, int]:
        taken = dict(self.rows)
        self.rows.clear()
        return taken


@dataclass(frozen=True)
class ActorLayout:
    count: int
    num_cpus: float       # Ray resource request per actor
    num_gpus: float
    threads: int          # torch intra-op threads per actor (a GPU actor sizes its own from its CPUs)
    device: str           # "cuda" or "cpu"


def gpu_decode_threads(cpus: float) -> int:
    """Decode threads of a GPU actor given `cpus`: all but one for the launching and feeding threads and one for
    the writer (whose shard threads mostly wait on the disk)."""
    return max(1, int(cpus) - 2)


def plan_actors(nodes: list[tuple[float, float]], workers: int | None = None,
                gpus_per_worker: float | None = None) -> ActorLayout:
    """How many actors and what each asks Ray for, given the (CPUs, GPUs) of each alive node.

    GPU clusters: one actor per `gpus_per_worker` GPUs (default 1), asking for the CPUs that come with that many
    GPUs on the GPU node with the fewest per GPU (decode, launch and write threads feed the device; at most
    `GPU_ACTOR_CPUS_MAX`), so an actor fits on every GPU node. CPU-only: one actor per node by default, torch
    threads = cores / actors, and fractional CPU requests that leave one core unclaimed so Ray tasks (file
    listing, metrics) can still be scheduled (1-CPU actors filling every core deadlock them). No request exceeds
    the largest node, or the actor could never be placed.
    """
    if workers is not None and workers < 1:
        raise ArgumentError(f"workers: must be at least 1, got {workers}")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise ArgumentError(f"gpus_per_worker: must be non-negative, got {gpus_per_worker}")
    node_cpus = [c for c, _ in nodes]
    cluster_gpus = sum(g for _, g in nodes)
    cpus = sum(node_cpus)
    largest = max(node_cpus, default=0.0)
    use_gpu = gpus_per_worker > 0 if gpus_per_worker is not None else cluster_gpus > 0
    if use_gpu:
        per_actor = gpus_per_worker or 1.0
        count = workers or max(1, int(cluster_gpus // per_actor))
        shares = [c / g * per_actor for c, g in nodes if g > 0]
        want = min(shares) if shares else GPU_ACTOR_CPUS_UNSEEN
        num_cpus = float(max(1, min(GPU_ACTOR_CPUS_MAX, int(want))))
        return ActorLayout(count, num_cpus, per_actor, GPU_TORCH_THREADS, "cuda")
    count = workers or max(1, sum(1 for c in node_cpus if c > 0))
    threads = max(1, int(min(largest, cpus / count)))
    share = (cpus - 1) / count if cpus > 1 else cpus / (2 * count)
    num_cpus = max(0.01, math.floor(min(threads, share) * 100) / 100)
    return ActorLayout(count, num_cpus, 0.0, threads, "cpu")


def _connect(address: str | None) -> tuple[bool, str]:
    """Reuse an existing connection, or join `address` / RAY_ADDRESS (`auto`: the cluster `ray start` recorded),
    else start a private local instance on 127.0.0.1 (`cluster.connect.init_ray`). Returns (connected by this call, so
    it should disconnect; a description of the cluster)."""
    from sdfeat.cluster.connect import init_ray

    if ray.is_initialized():
        return False, "the Ray cluster this process is connected to"
    return True, init_ray(address or os.environ.get("RAY_ADDRESS"))


def _cluster_layout(workers: int | None, gpus_per_worker: float | None) -> ActorLayout:
    nodes = [(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    return plan_actors(nodes, workers, gpus_per_worker)


@dataclass
class _Slot:
    """One actor position; its actor is replaced when it dies."""

    index: int
    actor: Any
    ready_ref: Any | None       # ObjectRef of actor.ready() until it resolves
    inflight: int = 0
    name: str = ""
    alive: bool = True
    last_activity: float = field(default_factory=time.monotonic)   # ready, or its last unit report


@dataclass
class _Outcome:
    reports: list[UnitReport] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)     # unit -> last error, after all retries
    retries: int = 0
    actor_restarts: int = 0
    compile_seconds: float = 0.0  # the longest compile warm-up of an actor (`compile: true`), before its units


class _Driver:
    def __init__(self, job: Job, layout: ActorLayout, max_retries: int, runtime_env: dict | None,
                 worker_class: type, unit_timeout_s: float | None = None, simulate: Simulation | None = None) -> None:
        self.job = job
        self.simulate = simulate
        self.layout = layout
        self.max_retries = max_retries
        self.unit_timeout_s = unit_timeout_s
        options: dict[str, Any] = {"num_cpus": layout.num_cpus, "num_gpus": layout.num_gpus, "max_restarts": 0,
                                   "max_task_retries": 0, "scheduling_strategy": "SPREAD",
                                   # the units in flight: one written, one computing, one read ahead
                                   "max_concurrency": UNITS_PER_ACTOR}
        if runtime_env:
            options["runtime_env"] = runtime_env
        self.actor_class = ray.remote(worker_class).options(**options)
        self.failed_starts = 0
        self.last_start_error = ""
        self.tally: Any = None
        self._take_ref: Any = None      # a tally read in flight

    def _start(self, index: int) -> _Slot:
        actor = self.actor_class.remote(self.job, self.layout.device, self.layout.threads, self.tally,
                                        self.simulate)
        return _Slot(index, actor, actor.ready.remote())

    def _drain_tally(self, bar: UnitProgress) -> None:
        """Batches reported since the last read move the bar; never waits (one read in flight at a time). Best
        effort: a lost tally (its node died) stops the per-batch progress, never the job; unit reports still move
        the bar."""
        if self.tally is None:
            return
        if self._take_ref is None:
            self._take_ref = self.tally.take.remote()
        ready, _ = ray.wait([self._take_ref], timeout=0)
        if not ready:
            return
        ref, self._take_ref = self._take_ref, None
        try:
            taken = ray.get(ref)
        except ray.exceptions.RayError as err:
            log.info("per-batch progress stopped (%s); the bar moves per unit", _first_line(err))
            self.tally = None
            return
        for unit, rows in taken.items():
            bar.advance(unit, rows)

    def run(self, todo: list[Unit], bar: UnitProgress) -> _Outcome:
        """Dispatch `todo` over the actors until every unit is done or has failed for good."""
        self.out = _Outcome()
        # on the driver's node (soft): it lives as long as the driver, not as long as some worker node
        here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True)
        self.tally = ray.remote(num_cpus=0)(BatchTally).options(scheduling_strategy=here).remote()
        self.queue: deque[Unit] = deque(todo)
        self.attempts: Counter[int] = Counter()
        self.slots = [self._start(i) for i in range(min(self.layout.count, len(todo)))]
        self.tasks: dict[Any, tuple[_Slot, Unit]] = {}     # ObjectRef -> (slot whose actor runs it, unit)
        last_progress = time.monotonic()
        try:
            while self.queue or self.tasks:
                self._dispatch()
                starting = {s.ready_ref: s for s in self.slots if s.alive and s.ready_ref is not None}
                if not self.tasks and not starting:
                    reason = f"no extraction actor could be started ({self.last_start_error})"
                    self.out.failed.update((unit.index, reason) for unit in self.queue)
                    break
                self._kill_hung(self.slots)
                done, _ = ray.wait([*self.tasks, *starting], num_returns=1, timeout=WAIT_S)
                self._drain_tally(bar)
                if not done:
                    if time.monotonic() - last_progress > STARVED_WARN_S and starting and not self.tasks:
                        log.warning("%d actor(s) wait for resources (num_cpus=%s, num_gpus=%s each; cluster: %s)",
                                    len(starting), self.layout.num_cpus, self.layout.num_gpus,
                                    ray.cluster_resources())
                        last_progress = time.monotonic()
                    continue
                last_progress = time.monotonic()
                if done[0] in starting:
                    self._on_ready(starting[done[0]])
                else:
                    self._on_result(done[0], bar)
        finally:
            for slot in self.slots:
                ray.kill(slot.actor, no_restart=True)
        return self.out

    def _dispatch(self) -> None:
        """Give every ready actor work up to its depth: one running unit plus one queued, the second only when
        enough units remain for the actors still loading their model."""
        n_starting = sum(1 for s in self.slots if s.alive and s.ready_ref is not None)
        for slot in self.slots:
            depth = UNITS_PER_ACTOR if len(self.queue) > n_starting else 1
            while slot.alive and slot.ready_ref is None and slot.inflight < depth and self.queue:
                unit = self.queue.popleft()
                self.tasks[slot.actor.run.remote(unit)] = (slot, unit)
                slot.inflight += 1

    def _on_ready(self, slot: _Slot) -> None:
        """An actor finished loading, or died while loading (replaced; a domain error is raised as itself)."""
        try:
            slot.name, compile_seconds = ray.get(slot.ready_ref)
            self.out.compile_seconds = max(self.out.compile_seconds, compile_seconds)
            slot.ready_ref = None
            slot.last_activity = time.monotonic()
            self.failed_starts = 0
        except RayTaskError as err:           # a domain error while loading: the same on every actor
            raise _domain_error(err, self.job.output) or err
        except RayActorError as err:
            self.failed_starts += 1
            self.last_start_error = _first_line(err)
            self._replace(slot, self.last_start_error)

    def _on_result(self, ref: Any, bar: UnitProgress) -> None:
        """A unit's report arrived, or its actor died, or it raised: record it, or queue it again."""
        slot, unit = self.tasks.pop(ref)
        try:
            report = ray.get(ref)
        except RayActorError as err:              # the actor (or its node) died with this unit on it
            self._retry_or_fail(unit, f"actor died ({_first_line(err)})")
            if self.slots[slot.index] is slot:     # not yet replaced
                self._replace(slot, _first_line(err))
            return
        except RayTaskError as err:               # the unit raised; the actor is fine
            refused = _domain_error(err, self.job.output)
            if refused is not None and not isinstance(err.cause, SdfeatError):
                raise refused                     # the storage refuses (full, read-only): so would every retry
            slot.inflight -= 1
            self._retry_or_fail(unit, f"{type(err.cause).__name__}: {err.cause}")
            return
        slot.inflight -= 1
        slot.last_activity = time.monotonic()
        self.out.reports.append(report)
        bar.update(report.unit, report.rows, len(report.failures), report.seconds)

    def _retry_or_fail(self, unit: Unit, reason: str) -> None:
        self.attempts[unit.index] += 1
        if self.attempts[unit.index] > self.max_retries:
            self.out.failed[unit.index] = f"{reason}; gave up after {self.attempts[unit.index]} attempts"
            log.error("unit %d failed after %d attempts: %s", unit.index, self.attempts[unit.index], reason)
        else:
            self.out.retries += 1
            log.warning("unit %d: %s; queued again (retry %d of %d)", unit.index, reason,
                        self.attempts[unit.index], self.max_retries)
            self.queue.append(unit)

    def _replace(self, slot: _Slot, reason: str) -> None:
        """Kill a dead or hung actor and start a new one in its slot (unless too many starts failed in a row)."""
        ray.kill(slot.actor, no_restart=True)
        if self.failed_starts >= MAX_FAILED_STARTS:
            slot.alive = False
            return
        log.warning("actor %d (%s) died: %s; starting a new one", slot.index, slot.name or "starting", reason)
        self.out.actor_restarts += 1
        self.slots[slot.index] = self._start(slot.index)

    def _kill_hung(self, slots: list[_Slot]) -> None:
        """An actor with work that has reported nothing for `unit_timeout_s` is killed; its units then come back
        as an actor death (queued again, bounded retries) and the actor is replaced."""
        if self.unit_timeout_s is None:
            return
        now = time.monotonic()
        for slot in slots:
            if slot.alive and slot.ready_ref is None and slot.inflight and \
                    now - slot.last_activity > self.unit_timeout_s:
                log.warning("actor %d (%s) reported nothing for %.0f s with %d unit(s) in flight; killing it",
                            slot.index, slot.name, now - slot.last_activity, slot.inflight)
                ray.kill(slot.actor, no_restart=True)
                slot.last_activity = now


def _domain_error(err: RayTaskError, output: str) -> SdfeatError | None:
    """What an actor raised, as the local runner's caller sees it: an `SdfeatError` as itself, an OSError that means
    the storage refused (read-only, full, no permission) as the one-line `errors.storage_error` naming the path
    (the file, else the output), as the CLI maps the local runner's; None for anything else."""
    if isinstance(err.cause, SdfeatError):
        return err.cause
    if isinstance(err.cause, OSError):
        return storage_error(err.cause, output)
    return None


def _check_weights_where_actors_run(model: ModelRef, output: str, layout: ActorLayout,
                                    runtime_env: dict | None) -> None:
    """`registry.require_weights` of the model as resolved here (a local directory: the path the actors will load)
    in a Ray task shaped like an actor (so on a node where actors run, with their environment), before the store
    template is written: missing weights refuse the job with nothing written."""
    options: dict[str, Any] = {"num_cpus": layout.num_cpus, "num_gpus": layout.num_gpus, "max_retries": 0}
    if runtime_env:
        options["runtime_env"] = runtime_env
    ref = ray.remote(require_weights).options(**options).remote(model)
    while not ray.wait([ref], timeout=STARVED_WARN_S)[0]:
        log.warning("the weights check waits for resources (num_cpus=%s, num_gpus=%s; cluster: %s)",
                    layout.num_cpus, layout.num_gpus, ray.cluster_resources())
    try:
        ray.get(ref)
    except RayTaskError as err:
        raise _domain_error(err, output) or err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_on_ray(spec: JobSpec, address: str | None = None, workers: int | None = None,
               gpus_per_worker: float | None = None, overwrite: bool = False, progress: bool = True, *,
               max_retries: int = 3, runtime_env: dict | None = None,
               worker_class: type[ExtractionWorker] = ExtractionWorker, unit_timeout_s: float | None = None,
               allow_version_change: bool = False, simulate: Simulation | None = None) -> dict:
    """Extract `spec` on Ray and return the job summary (`extract.end_job`'s, plus a `ray` section).

    address: a Ray address (`HEAD:6379`, `ray://…`, `auto` = the cluster `ray start` recorded here); None =
    RAY_ADDRESS, else a private local instance on 127.0.0.1 (`cluster.connect.init_ray`).
    workers / gpus_per_worker: see `plan_actors`. runtime_env: given to the actors (e.g. env_vars for an S3
    endpoint). worker_class: the actor body; a test seam for fault injection, production uses the default.
    unit_timeout_s: kill an actor that has units in flight but reported nothing for this long (a hung unit);
    None = wait forever. Set it well above one unit's time (it covers the units in flight on an actor).
    simulate: a `simdevice.Simulation` in place of the device stages (benchmarks of the host pipeline).
    Raises UnitFailedError naming the unit(s) that failed `max_retries` + 1 times; finished units are kept.
    """
    check_job(spec)  # before the lock: a spec that cannot run leaves nothing at its output
    with writer_lock.hold(spec.output):  # one writer per store, for the whole job
        return _run_on_ray(spec, address, workers, gpus_per_worker, overwrite, progress, max_retries, runtime_env,
                           worker_class, unit_timeout_s, allow_version_change, simulate)


def _run_on_ray(spec: JobSpec, address: str | None, workers: int | None, gpus_per_worker: float | None,
                overwrite: bool, progress: bool, max_retries: int, runtime_env: dict | None,
                worker_class: type[ExtractionWorker], unit_timeout_s: float | None,
                allow_version_change: bool, simulate: Simulation | None) -> dict:
    quiet = {k: os.environ[k] for k in process.QUIET_LIBRARIES if k in os.environ}  # as the CLI set them
    if quiet:
        runtime_env = {**(runtime_env or {}), "env_vars": {**quiet, **(runtime_env or {}).get("env_vars", {})}}
    connected_here, cluster = _connect(address)
    log.info("Ray: %s", cluster)
    try:
        start = time.perf_counter()
        layout = _cluster_layout(workers, gpus_per_worker)
        if simulate is None:  # a simulated device loads no model
            _check_weights_where_actors_run(resolve_model(spec.model, spec.revision), spec.output, layout,
                                            runtime_env)
        job = prepare_job(spec, overwrite, allow_version_change)  # store template complete before any actor
        todo = pending_units(job)
        log.info("%d of %d units to run on %d actor(s) (%s, %s CPU / %s GPU each, %d threads)", len(todo),
                 len(job.units), min(layout.count, len(todo)), layout.device, layout.num_cpus, layout.num_gpus,
                 layout.threads)
        driver = _Driver(job, layout, max_retries, runtime_env, worker_class, unit_timeout_s, simulate)
        with UnitProgress(job.n_samples, job.n_samples - sum(u.rows for u in todo), enabled=progress,
                          total_units=len(job.units), done_units=len(job.units) - len(todo)) as bar:
            outcome = driver.run(todo, bar) if todo else _Outcome()
        summary = end_job(job, todo, outcome.failed, time.perf_counter() - start, bar.this_run())
        summary["ray"] = {"cluster": cluster, "actors": min(layout.count, len(todo)), "device": layout.device,
                          "num_cpus": layout.num_cpus, "num_gpus": layout.num_gpus, "threads": layout.threads,
                          "units_run": len(outcome.reports), "units_skipped": len(job.units) - len(todo),
                          "retries": outcome.retries, "actor_restarts": outcome.actor_restarts,
                          "compile_seconds": round(outcome.compile_seconds, 2)}
        return summary
    finally:
        if connected_here:
            ray.shutdown()
