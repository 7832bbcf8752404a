"""`run_local`: a job in this process (no Ray), start to end: checks, the writer lock, `job.prepare_job` (the
`job.Job`, resolved once), one `worker.UnitRunner` of that job over every pending unit, `job.end_job`.
"""

from __future__ import annotations

import time

from sdfeat import process
from sdfeat.extract.job import Job, end_job, pending_units, prepare_job
from sdfeat.extract.simdevice import Simulation
from sdfeat.extract.worker import UnitRunner
from sdfeat.models.registry import require_weights
from sdfeat.planning.checks import check_job
from sdfeat.spec import JobSpec
from sdfeat.store import writer_lock
from sdfeat.store.schema import UnitFailure


def run_local(spec: JobSpec, overwrite: bool = False, progress: bool = True, device: str | None = None,
              threads: int | None = None, allow_version_change: bool = False,
              simulate: Simulation | None = None) -> dict:
    """Prepare, run every pending unit in this process, finalize. A failing unit is named; others are kept.
    `threads`: torch's thread count while the job runs (None: as it is); the previous count is restored.
    `simulate`: a `simdevice.Simulation` in place of the device stages (benchmarks of the host pipeline; no
    weights are needed then). The spec and the weights are checked before anything is written; the output's
    writer lock is held throughout (a job refused under it leaves no folder: `writer_lock.hold`)."""
    check_job(spec)
    with writer_lock.hold(spec.output), process.torch_threads(threads):  # refused here: nothing left at output
        if simulate is None:
            require_weights(spec.model, spec.revision)
        job = prepare_job(spec, overwrite, allow_version_change)
        return _run_units(job, progress, device, threads, simulate)


def _run_units(job: Job, progress: bool, device: str | None, threads: int | None,
               simulate: Simulation | None) -> dict:
    from sdfeat.progress import UnitProgress

    todo = pending_units(job)
    failed: dict[int, str] = {}
    start = time.perf_counter()
    runner = UnitRunner(job, device, threads, simulate=simulate) if todo else None
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    held = runner is not None and process.hold_freed_memory()  # batches reuse their memory (no page faults)
    try:
        with UnitProgress(job.n_samples, job.n_samples - sum(u.rows for u in todo), enabled=progress,
                          total_units=len(job.units), done_units=len(job.units) - len(todo)) as bar:
            if runner is not None:
                runner.on_batch = bar.advance
            for report in runner.run_many(todo) if runner is not None else ():
                if isinstance(report, UnitFailure):
                    failed[report.unit] = report.error
                else:
                    bar.update(report.unit, report.rows, len(report.failures), report.seconds)
    finally:
        if runner is not None:
            runner.close()
        if held:
            process.release_freed_memory()
    summary = end_job(job, todo, failed, time.perf_counter() - start, bar.this_run())
    summary["load_seconds"] = round(load_seconds, 2)  # the model's load and, with `compile: true`, its compiling
    summary["compile_seconds"] = round(runner.compile_seconds, 2) if runner is not None else 0.0
    return summary
