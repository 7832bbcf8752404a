"""Run the metrics over a feature store: one task per (metric, block), tidy tables in `<store>/results/`.

The metrics and their tasks are the registry's (`metrics.catalog.METRICS`, in its order): each metric's `task`
(point estimates) or, with `MetricOptions.bootstrap`, `metrics.bootstrap.bootstrap_task` over its `parts` (the
same estimates with image-level intervals). A metric that `needs_labels` runs after the others, on the given
labels or on those detected (`tasks.detect_task`, alongside the first tasks). With `local=True` the tasks run in
this process; otherwise each is a Ray task (`num_cpus=1`; `address` passed to `ray.init` when Ray is not yet
initialised), with `MetricOptions.task_threads` torch threads either way. The driver writes
`<store>/results/<metric>.parquet` (or `<results>/<metric>.parquet`) with `results.write_results` (the schema of
`sdfeat.metrics.results`, written atomically), so re-running replaces the table with the same rows: idempotent.
Where the tables go is checked first (a store that cannot be written fails before any work). `execute` and
`check_complete` are public for `sdfeat compare`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sdfeat import store as store_layout
from sdfeat.errors import StorageError, StoreError, storage_error
from sdfeat.process import torch_threads
from sdfeat.metrics import anomalies
from sdfeat.metrics.bootstrap import bootstrap_task, detection_intervals
from sdfeat.metrics.labels import read_labels, write_labels
from sdfeat.metrics.catalog import METRICS, MetricDef, chosen
from sdfeat.metrics.results import DETECTIONS, RESULTS, write_results
from sdfeat.metrics.tasks import MIN_CORNER_MAP, BlockReader, MetricOptions, all_blocks, detect_task, label_rows
from sdfeat.store.query import FeatureStore, open_store

__all__ = ["METRICS", "MetricOptions", "block_call", "check_complete", "execute", "run_metrics"]

log = logging.getLogger(__name__)

def _threaded(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one task with `threads` torch threads; the process's previous count is restored afterwards."""
    with torch_threads(threads):
        return fn(*args)


def _call_name(fn: Callable[..., Any], args: tuple) -> str:
    """'position up_blocks.1.upsamplers.0' for the progress bar (a bootstrap task: its metric's name)."""
    block = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
    name = args[2].name if fn is bootstrap_task else fn.__name__.removesuffix("_task")
    return f"{name} {block}".strip()


def execute(calls: list[tuple[Callable[..., Any], tuple]], local: bool, address: str | None,
            threads: int = 1, progress: bool = False) -> list[Any]:
    """Run the task calls here or as Ray tasks; `progress`: a bar on stderr (a terminal only) over the tasks."""
    from sdfeat.progress import TaskProgress

    with TaskProgress("metrics", len(calls), enabled=progress) as bar:
        if local:
            results = []
            for fn, args in calls:
                results.append(_threaded(threads, fn, *args))
                bar.step(_call_name(fn, args))
            return results
        import ray

        if not ray.is_initialized():
            from sdfeat.cluster.connect import init_ray

            log.info("Ray: %s", init_ray(address))
        task = ray.remote(num_cpus=1)(_threaded)
        refs = [task.remote(threads, fn, *args) for fn, args in calls]
        names = {ref: _call_name(fn, args) for ref, (fn, args) in zip(refs, calls)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.step(names[done[0]])
        return ray.get(refs)


def say_corner_skips(features: FeatureStore, names: list[str], opts: MetricOptions) -> None:
    """Name, at the default log level, the blocks the corner metric cannot measure and what would enable it (the
    corner metric's `check`)."""
    no_variant, too_small = [], []
    for name in names:
        b = BlockReader(features, name, opts)
        n = b.height()
        if n < MIN_CORNER_MAP:
            too_small.append(f"{name} ({n}×{n})")
        elif b.full and f"crops/{features.spec.resolution // n}/{name}" not in features.group or \
                not b.full and f"summaries/{name}/crop_groups" not in features.group:
            no_variant.append(name)
    if no_variant:
        shown = ", ".join(no_variant[:5]) + (" …" if len(no_variant) > 5 else "")
        log.warning("corners: skipped %d block(s) without crop variants (%s); add `variants: {crops: auto}` to the "
                    "job spec and extract again to measure them", len(no_variant), shown)
    if too_small:
        log.warning("corners: skipped %s: corners need maps of at least %d×%d tokens", ", ".join(too_small),
                    MIN_CORNER_MAP, MIN_CORNER_MAP)


def check_complete(features: FeatureStore, allow_partial: bool) -> str | None:
    """Refuse an unfinished store unless `allow_partial`; say which units and failed images are left out. Returns
    what a partial measurement leaves out (the tables' `results.partial_note`), None for a finished store."""
    n_units = features.attrs.units
    unfinished = sorted(set(range(n_units)) - store_layout.done_units(features.path))
    shown = ", ".join(map(str, unfinished[:10])) + (" …" if len(unfinished) > 10 else "")
    if unfinished and not allow_partial:
        raise StoreError(f"{features.path} is incomplete: {len(unfinished)} of {n_units} units have no done marker "
                         f"(units {shown}); finish the job (run it again), or pass --allow-partial to measure the "
                         "finished units only")
    skipped_rows = sum(len(features.attrs.rows_of(u)) for u in unfinished)
    if unfinished:
        log.warning("metrics on a partial store: skipped %d of %d units (%s; %d images)", len(unfinished), n_units,
                    shown, skipped_rows)
    failed = int((~features.ok).sum()) - skipped_rows
    if failed > 0:
        log.warning("metrics: %d failed image(s) left out (see %s)", failed,
                    store_layout.join(features.path, store_layout.FAILURES))
    if not unfinished:
        return None
    return (f"{len(unfinished)} of {n_units} units were unfinished (units {shown}): {skipped_rows} of "
            f"{len(features)} images left out")


def block_call(metric: MetricDef, store_path: str, block: str, opts: MetricOptions,
               *inputs: Any) -> tuple[Callable[..., Any], tuple]:
    """The call of one (metric, block) task: the metric's own task, or `bootstrap_task` with `opts.bootstrap`."""
    if opts.bootstrap:
        return bootstrap_task, (store_path, block, metric, opts, *inputs)
    return metric.task, (store_path, block, opts, *inputs)


def run_metrics(store_path: str, metrics: Sequence[str] | None = None, blocks: Sequence[str] | None = None,
                local: bool = False, address: str | None = None, labels: str | None = None,
                options: MetricOptions | None = None, allow_partial: bool = False,
                progress: bool = False, results: str | None = None) -> dict[str, str]:
    """Compute `metrics` (names in `catalog.METRICS`; default: all) for `blocks` (default: every stored block),
    write the tables to `<store>/results` (or the folder `results`, checked writable before any work); returns
    {metric: path}.

    A store with unfinished units is refused (StoreError) unless `allow_partial`; then the metrics use the
    finished, extracted rows and a warning names what was skipped. Failed images are always left out (logged).

    labels: anomaly labels (.csv / .npy, store-row image indices); without them the anomaly metric uses the
    detected anomalies. Detections go to results/anomalies_detected.parquet (+ .csv in the paper's format)."""
    opts = options or MetricOptions()
    features = open_store(store_path)
    wanted = chosen(metrics)
    partial = check_complete(features, allow_partial)
    folder = results or store_layout.join(features.path, RESULTS)
    _check_writable(folder, results is None)
    names = list(blocks) if blocks else all_blocks(features)
    missing = [n for n in names if n not in all_blocks(features)]
    if missing:
        raise StoreError(f"block '{missing[0]}' is not in {features.path}")
    ordered = [m for m in METRICS.values() if m in wanted]  # the tasks in the registry's order
    for metric in ordered:
        if metric.check is not None:
            metric.check(features, names, opts)
    calls: list[tuple[Callable[..., Any], tuple]] = []
    tags: list[str] = []
    for metric in ordered:
        if not metric.needs_labels:
            calls += [block_call(metric, features.path, n, opts) for n in names]
            tags += [metric.name] * len(names)
    labelled = [m for m in ordered if m.needs_labels]
    detecting = bool(labelled) and opts.detect_block in all_blocks(features)
    if detecting:
        calls.append((detect_task, (features.path, opts)))
        tags.append("detect")
    results = execute(calls, local, address, opts.task_threads, progress)
    tables: dict[str, list[dict]] = {m.name: [] for m in wanted}
    detected = None
    for tag, result in zip(tags, results):
        if tag == "detect":
            detected = result
        else:
            tables[tag] += result
    if labelled:
        given = read_labels(labels) if labels else None
        use, source = (given, "given") if given is not None else (detected, "detected")
        if use is not None and len(use):
            found = use[:, :3].astype(np.int64)
            for metric in labelled:
                runs = execute([block_call(metric, features.path, n, opts, found, source) for n in names],
                               local, address, opts.task_threads, progress)
                tables[metric.name] += [r for rows in runs for r in rows]
        if detected is not None:
            for metric in labelled:
                tables[metric.name] += _detection_rows(features, metric.name, opts, detected, given)
            write_results(features.path, DETECTIONS, [{"sample": int(d[0]), "sample_id": features.sample_ids[int(d[0])],
                                                       "x": int(d[1]), "y": int(d[2]), "peak_ratio": float(d[3])}
                                                      for d in detected], folder, partial)
            write_labels(store_layout.join(folder, f"{DETECTIONS}.csv"), detected)
    return {m.name: write_results(features.path, m.name, tables[m.name], folder, partial) for m in wanted}


def _check_writable(folder: str, in_store: bool) -> None:
    """The tables' folder takes writes, or one line naming it (and, for the store's own, the way around it)."""
    try:
        store_layout.check_writable(folder)
    except OSError as err:
        refused = storage_error(err, folder)
        if refused is None:
            raise
        raise StorageError(f"{refused}: the metric tables cannot be written there"
                           + ("; pass results=DIR (`sdfeat metrics --results DIR`) to write them elsewhere"
                              if in_store else "")) from None


def _detection_rows(features: FeatureStore, metric: str, opts: MetricOptions, detected: np.ndarray,
                    given: np.ndarray | None) -> list[dict]:
    """The detection's rows of `metric`'s table: counts (and, against given labels, precision and recall)."""
    stats = {"n_detected": float(len(detected))}
    if given is not None:
        stats = anomalies.match(detected, given, opts.match_tolerance)
    rows = [{"metric": metric, "statistic": f"detection_{k}", "value": v, "variant": "detection"}
            for k, v in stats.items()]
    if opts.bootstrap:
        intervals = detection_intervals(features, opts, detected, given)
        for r in rows:
            r.update(intervals[r["statistic"]])
    return label_rows(features, opts.detect_block, rows)
