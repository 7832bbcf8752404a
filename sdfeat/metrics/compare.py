"""`sdfeat compare STORE_A STORE_B`: per block and metric the difference B − A with a bootstrap interval.

Both stores' per-image statistics are read by the bootstrap's collectors (`metrics.bootstrap.collect`, the same
reads as `sdfeat metrics --bootstrap`), one task per (metric, block) through the metrics runner's executor (Ray
tasks, or in-process with `local=True`); only the small result rows travel back.

Pairing: when both stores hold the same usable sample ids (the same images under two paddings, seeds or
timesteps), the difference is *paired*: replicate b draws one resample of A's images (`replicate_weights(n, b,
seed)`, the seed scheme of `metrics.bootstrap`) and applies the same image weights to B, so what the images
share cancels. Otherwise the stores are resampled *independently* (streams 0 and 1 of the same scheme). A row is
flagged when its interval excludes zero.

Compared series: each metric's rows its registry entry selects (`MetricDef.compared`, named by
`MetricDef.series_name`): position accuracy at every scale (and, under the standard protocol, cell accuracy and
position error) at the last epoch; the corner, border and other relative similarity (cropped / repr-cropped, fixed
counts); the anomaly relative norm (mean, both references). With several timesteps or seeds the pooled values are
compared; `MetricOptions.timestep`/`seed` pick one (it must be in both stores).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from sdfeat.errors import StoreError
from sdfeat.metrics import runner, tasks
from sdfeat.metrics.bootstrap import collect, percentile_interval, replicate_weights
from sdfeat.metrics.labels import read_labels
from sdfeat.metrics.catalog import METRICS, MetricDef, chosen
from sdfeat.store.query import open_store

log = logging.getLogger(__name__)

DEFAULT_REPLICATES = 1000
COLUMNS = ("block", "metric", "series", "a", "b", "difference", "ci_low", "ci_high", "excludes_zero", "n_a", "n_b",
           "pairing")
Labels = tuple[np.ndarray, str] | None  # anomaly labels of one store and where they come from


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("metric", "statistic", "group", "variant", "scale", "epoch", "paper_counts"))


def compare_task(path_a: str, path_b: str, block: str, metric: MetricDef, opts: tasks.MetricOptions,
                 labels_a: Labels = None, labels_b: Labels = None) -> list[dict]:
    """Difference rows (B − A) of one metric at one block; [] where the metric does not apply to the block."""
    a = collect(path_a, block, metric, opts, *(labels_a or ()))
    b = collect(path_b, block, metric, opts, *(labels_b or ()))
    if not a.parts or not b.parts:
        return []
    part_a, part_b = a.summary(), b.summary()
    n_a, n_b = len(a.sample_ids), len(b.sample_ids)
    paired = len(set(a.sample_ids)) == n_a and sorted(a.sample_ids) == sorted(b.sample_ids)
    if paired:
        where = {sid: i for i, sid in enumerate(a.sample_ids)}
        a_of_b = np.array([where[sid] for sid in b.sample_ids], dtype=np.int64)  # B's images in A's order
    rows_a = part_a.rows(np.ones(n_a, dtype=np.int64), 0)
    rows_b = part_b.rows(np.ones(n_b, dtype=np.int64), 0)
    in_b = {_key(r): j for j, r in enumerate(rows_b)}
    last_epoch = max((r["epoch"] for r in rows_a if r.get("epoch") is not None), default=None)
    pairs = [(i, in_b[_key(r)]) for i, r in enumerate(rows_a) if _key(r) in in_b and metric.compared(r, last_epoch)]
    diffs = np.empty((opts.bootstrap, len(pairs)))
    for rep in range(opts.bootstrap):
        if paired:
            w_a = replicate_weights(n_a, rep, opts.bootstrap_seed)
            w_b = w_a[a_of_b]
        else:
            w_a = replicate_weights(n_a, rep, opts.bootstrap_seed, stream=0)
            w_b = replicate_weights(n_b, rep, opts.bootstrap_seed, stream=1)
        va, vb = part_a.rows(w_a, rep), part_b.rows(w_b, rep)
        diffs[rep] = [vb[j]["value"] - va[i]["value"] for i, j in pairs]
    low, high = percentile_interval(diffs, opts.level)
    out = []
    for (i, j), lo, hi in zip(pairs, low, high):
        ra, rb = rows_a[i], rows_b[j]
        out.append({"block": block, "order": tasks.block_order(a.features, block), "metric": metric.name,
                    "series": metric.series_name(ra), "a": ra["value"], "b": rb["value"],
                    "difference": rb["value"] - ra["value"], "ci_low": float(lo), "ci_high": float(hi),
                    "excludes_zero": bool(lo > 0 or hi < 0), "n_a": part_a.n_images(), "n_b": part_b.n_images(),
                    "pairing": "paired" if paired else "independent"})
    return out


def _labels(paths: Sequence[str], labels: str | None, opts: tasks.MetricOptions, local: bool,
            address: str | None) -> list[Labels]:
    """Each store's anomaly labels: the given file for both, else each store's own detections (none where the
    store lacks the detection block)."""
    if labels:
        given = read_labels(labels)
        return [(given, "given")] * len(paths)
    found: list[Labels] = [None] * len(paths)
    detect = [i for i, p in enumerate(paths) if opts.detect_block in tasks.all_blocks(open_store(p))]
    for i, detected in zip(detect, runner.execute([(tasks.detect_task, (paths[i], opts)) for i in detect],
                                                  local, address, opts.task_threads)):
        found[i] = (detected[:, :3].astype(np.int64), "detected") if len(detected) else None
    return found


def compare_stores(path_a: str, path_b: str, metrics: Sequence[str] | None = None,
                   blocks: Sequence[str] | None = None, local: bool = False, address: str | None = None,
                   labels: str | None = None, options: tasks.MetricOptions | None = None) -> list[dict]:
    """Difference rows (columns COLUMNS + order) for every metric (names in `catalog.METRICS`; default: all) and
    block both stores hold, in block order."""
    opts = options or tasks.MetricOptions()
    if not opts.bootstrap:
        opts = replace(opts, bootstrap=DEFAULT_REPLICATES)
    wanted = chosen(metrics)
    stores = [open_store(p) for p in (path_a, path_b)]
    for features in stores:
        runner.check_complete(features, allow_partial=False)  # unfinished units: refused, as by `sdfeat metrics`
    held = [tasks.all_blocks(features) for features in stores]
    names = list(blocks) if blocks else [blk for blk in held[0] if blk in held[1]]
    for path, have in zip((path_a, path_b), held):
        missing = [n for n in names if n not in have]
        if missing:
            raise StoreError(f"block '{missing[0]}' is not in {path}")
    if not names:
        raise StoreError(f"{path_a} and {path_b} have no block in common")
    label_a, label_b = _labels([path_a, path_b], labels, opts, local, address) \
        if any(m.needs_labels for m in wanted) else (None, None)
    calls = []
    for metric in wanted:
        if not metric.needs_labels:
            calls += [(compare_task, (path_a, path_b, n, metric, opts)) for n in names]
        elif label_a is None or label_b is None:
            log.warning("compare: no anomaly labels for one of the stores (none given, none detected); skipped")
        else:
            calls += [(compare_task, (path_a, path_b, n, metric, opts, label_a, label_b)) for n in names]
    rows = [r for found in runner.execute(calls, local, address, opts.task_threads) for r in found]
    order = list(METRICS)
    return sorted(rows, key=lambda r: (r["order"], order.index(r["metric"])))


HEADER = ["block", "metric", "series", "A", "B", "B-A", "ci_low", "ci_high", "*", "n_a", "n_b"]  # `table_rows`


def _number(value: float, signed: bool = False) -> str:
    """4 significant digits, differences with their sign; NaN (a metric without a value) as `nan`."""
    if math.isnan(value):
        return "nan"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def table_rows(rows: Sequence[dict]) -> list[list[str]]:
    """The rows as the table's cells (columns `HEADER`); `*` marks an interval that excludes zero."""
    return [[r["block"], r["metric"], r["series"], _number(r["a"]), _number(r["b"]), _number(r["difference"], True),
             _number(r["ci_low"], True), _number(r["ci_high"], True), "*" if r["excludes_zero"] else "",
             str(r["n_a"]), str(r["n_b"])] for r in rows]
