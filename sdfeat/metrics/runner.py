"""Run the metrics over a feature store: one task per (metric, block), tidy tables in `<store>/results/`.

Each task opens the store itself and reads its block in chunks of `chunk_images` images (the probe in `paper`
mode loads its block's train tokens whole when they fit `ProbeSettings.memory_budget_bytes`), so memory does not
grow with the number of images; only small tables travel back. With `local=True` the same task functions run
in this process; otherwise each is a Ray task (`num_cpus=1`; `address` passed to `ray.init` when Ray is not yet
initialised). The driver writes `<store>/results/<metric>.parquet` with `results.write_results` (the schema of
`sdfeat.results`, written atomically), so re-running replaces the table with the same rows: idempotent.
`all_blocks`, `block_order`, `execute` and `check_complete` are public for `sdfeat compare`; `Block`,
`corner_sums`, `probe_result`, `ref_size` and `label_rows` for `metrics.bootstrap`.

Blocks stored only as per-image summaries (`summaries/<block>/...`) run from those: probe on the sampled tokens,
corners from the group sums, anomalies from the norm maps.

Paper-mode probe seeding: a block's task replays the RNG draws of the paper's earlier blocks (module docstring
of `position`), with their shapes from `blocks.block_shapes` for the store's model and resolution; where those are
unavailable, the store's own earlier blocks stand in (then the state is the one of a loop over the stored blocks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from sdfeat import store as store_layout
from sdfeat.errors import ArgumentError, SdfeatError, StoreError
from sdfeat.metrics import anomalies, corners, position
from sdfeat.metrics.labels import read_labels, write_labels
from sdfeat.plan import units_for
from sdfeat.query import FeatureStore, open_store
from sdfeat.results import DETECTIONS, METRICS, RESULTS, write_results

log = logging.getLogger(__name__)

DETECT_BLOCK = "up_blocks.1.upsamplers.0"
MIN_CORNER_MAP = 4  # n×n maps from 4×4 up: the (n-2)² inner map has 4 distinct corners (at 4×4 it is all corners)


@dataclass(frozen=True)
class MetricOptions:
    protocol: str | None = None  # None: the store's protocol
    probe: position.ProbeSettings = field(default_factory=position.ProbeSettings)
    paper_counts: bool = False  # also emit the corner means with the reference's n-based counts (Q3)
    chunk_images: int = 16
    timestep: int | None = None  # None: the store's first
    seed: int | None = None
    detect_block: str = DETECT_BLOCK
    detect_k: float = 6.0
    detect_min_ratio: float = 1.5
    match_tolerance: int = 2
    # torch threads per task, locally and in Ray tasks (one CPU each): a probe's Adam steps on (512, C) batches are
    # too small for threads to pay (120 images × 46 blocks here: 433 s with the default threads, 53 s with one)
    task_threads: int = 1
    # Confidence intervals (`metrics.bootstrap`): replicates (0: none), their seed, the probe's repeated splits
    bootstrap: int = 0
    bootstrap_seed: int = 0
    probe_repeats: int = 5
    level: float = 0.95


class Block:
    """One block of an open store: reads full tensors or summaries, ok rows only, in store-row terms."""

    def __init__(self, features: FeatureStore, block: str, opts: MetricOptions) -> None:
        self.features, self.name, self.opts = features, block, opts
        self.t = opts.timestep if opts.timestep is not None else features.timesteps[0]
        self.s = opts.seed if opts.seed is not None else features.seeds[0]
        self.rows = np.flatnonzero(features.ok)  # images that extracted
        self.full = block in features.blocks

    def read(self, rows: np.ndarray, crop: int | None = None) -> np.ndarray:  # (k, C, H, W) stored dtype
        return self.features.read(self.name, samples=rows, timestep=self.t, seed=self.s, crop=crop, raw=True)

    def summary(self, name: str, rows: np.ndarray) -> np.ndarray:  # (k, *shape)
        arr = self.features.group[f"summaries/{self.name}/{name}"]
        return np.asarray(arr.get_orthogonal_selection((rows,)))[:, self.features.timesteps.index(self.t),
                                                                   self.features.seeds.index(self.s)]

    def chunks(self, rows: np.ndarray) -> list[np.ndarray]:
        return [rows[i:i + self.opts.chunk_images] for i in range(0, len(rows), self.opts.chunk_images)]

    def norm_maps(self, rows: np.ndarray) -> np.ndarray:  # (k, H, W) float32
        if not self.full:
            return np.concatenate([self.summary("norms", c) for c in self.chunks(rows)]).astype(np.float32)
        return np.concatenate([anomalies.token_norms(self.read(c)).numpy() for c in self.chunks(rows)])

    def height(self) -> int:
        if self.full:
            return self.features.shape(self.name)[-2]
        return self.features.group[f"summaries/{self.name}/norms"].shape[-2]


def block_order(features: FeatureStore, block: str) -> int:
    """The `order` column of a block: its index in the `all` preset (execution order); blocks outside it after."""
    from sdfeat.blocks import preset_names

    names = preset_names("all")
    return names.index(block) if block in names else len(names) + all_blocks(features).index(block)


def label_rows(features: FeatureStore, block: str, rows: list[dict]) -> list[dict]:
    """The rows with the store's `model` and the block's `block` and `order` columns in front."""
    head = {"model": features.spec.model, "block": block, "order": block_order(features, block)}
    return [{**head, **r} for r in rows]


def _prior_blocks(features: FeatureStore, block: str, n_train_images: int) -> list[tuple[int, int, int]]:
    """(channels, n, n_train_tokens) of the blocks the reference's loop trains before `block`."""
    try:
        from sdfeat.blocks import block_shapes, preset_names
        from sdfeat.configs import unet_config

        names = preset_names("paper")
        if block in names:
            infos = block_shapes(unet_config(features.spec.model), features.spec.resolution, names[:names.index(block)])
            return [(b.channels, b.height, n_train_images * b.height * b.width) for b in infos]
    except SdfeatError as err:
        log.warning("probe: paper block shapes unavailable (%s); replaying the store's earlier blocks", err)
    earlier = features.blocks[:features.blocks.index(block)] if block in features.blocks else []
    shapes = [features.shape(b) for b in earlier]
    return [(s[-3], s[-2], n_train_images * s[-2] * s[-1]) for s in shapes]


def position_task(store_path: str, block: str, opts: MetricOptions) -> list[dict]:
    if opts.bootstrap:
        from sdfeat.metrics.bootstrap import bootstrap_task

        return bootstrap_task(store_path, block, "position", opts)
    features = open_store(store_path)
    b = Block(features, block, opts)
    rows = position.probe_rows(probe_result(features, b, opts), opts.protocol or features.spec.protocol)
    for r in rows:
        r["variant"] = "tokens" if b.full else "summary_tokens"
    return label_rows(features, block, rows)


def probe_result(features: FeatureStore, b: Block, opts: MetricOptions, repeat: int = 0) -> position.ProbeResult:
    """The probe on one block. `repeat` > 0: the standard protocol on another image-level split (seed + repeat),
    one of the bootstrap's repeated splits."""
    block = b.name
    protocol = opts.protocol or features.spec.protocol
    settings = replace(opts.probe, protocol=protocol, chunk_images=opts.chunk_images)
    classes = features.labels[b.rows] if (features.labels[b.rows] >= 0).all() else None
    if repeat:
        protocol = "standard"
        settings = replace(settings, protocol=protocol, seed=settings.seed + repeat)
        classes = classes if classes is not None else np.zeros(len(b.rows), dtype=np.int64)  # one class: random
    n_train = int(len(b.rows) * settings.train_fraction)
    prior = _prior_blocks(features, block, n_train) if protocol == "paper" else ()
    seed = position.block_seed(settings.seed, block)
    if b.full:
        channels, n, width = features.shape(block)[-3:]
        if n != width:
            raise StoreError(f"position probe needs square maps; block '{block}' is {n}x{width}")
        return position.probe_block(lambda idx: b.read(b.rows[idx]), len(b.rows), channels, n, settings,
                                    classes, prior, seed)
    feats = np.concatenate([b.summary("tokens", c) for c in b.chunks(b.rows)])
    yx = np.concatenate([b.summary("token_yx", c) for c in b.chunks(b.rows)])
    return position.probe_tokens(feats, yx, b.height(), settings, classes, prior, seed)


def corners_task(store_path: str, block: str, opts: MetricOptions) -> list[dict]:
    if opts.bootstrap:
        from sdfeat.metrics.bootstrap import bootstrap_task

        return bootstrap_task(store_path, block, "corners", opts)
    features = open_store(store_path)
    b = Block(features, block, opts)
    n = b.height()
    if n < MIN_CORNER_MAP:
        return []
    found = corner_sums(features, b)
    if found is None:
        return []
    rows, chunks = found
    cropped, reprcropped = corners.GroupTotals.empty(n - 2), corners.GroupTotals.empty(n - 2)
    for repr_sums, crop_sums in chunks:
        reprcropped.add(repr_sums)
        cropped.add(crop_sums)
    table = corners.corner_rows(cropped, reprcropped)
    if opts.paper_counts:
        table += [r for r in corners.corner_rows(cropped, reprcropped, paper_counts=True)
                  if r["statistic"] in ("group_mean", "ratio") and "|" not in r["group"]]
    for r in table:
        r["n_images"] = len(rows)
    return label_rows(features, block, table)


CORNER_KEYS = ("groups", "groups_diag", "corner_groups")


def corner_sums(features: FeatureStore, b: Block) -> tuple[np.ndarray, Iterator[tuple[dict, dict]]] | None:
    """The rows the corner metric uses (those with crops: `variants.samples`) and, chunk by chunk, the group
    similarity sums of (reprcropped, cropped), from the full tensors or the stored summaries; None when the block
    has no crop variant. Shared by the point estimate and the bootstrap."""
    margin = features.spec.resolution // b.height()
    rows = b.rows[b.rows < features.crop_samples]
    if b.full and (margin not in features.crops or f"crops/{margin}/{b.name}" not in features.group):
        log.info("corners: block %s has no crop-%d variant; skipped", b.name, margin)
        return None
    if not b.full and f"summaries/{b.name}/crop_groups" not in features.group:
        return None

    def chunks() -> Iterator[tuple[dict, dict]]:
        for c in b.chunks(rows):
            if b.full:
                yield (corners.group_similarity_sums(corners.inner(torch.from_numpy(b.read(c)))),
                       corners.group_similarity_sums(torch.from_numpy(b.read(c, crop=margin))))
            else:
                yield ({k: b.summary(k, c) for k in CORNER_KEYS}, {k: b.summary("crop_" + k, c) for k in CORNER_KEYS})

    return rows, chunks()


def ref_size(features: FeatureStore, opts: MetricOptions) -> int:
    """The labels' map size: the detection block's height (32 at 512 px), else resolution // 16."""
    if opts.detect_block in all_blocks(features):
        return Block(features, opts.detect_block, opts).height()
    return features.spec.resolution // 16


def anomaly_task(store_path: str, block: str, labels: np.ndarray, source: str, opts: MetricOptions) -> list[dict]:
    if opts.bootstrap:
        from sdfeat.metrics.bootstrap import bootstrap_task

        return bootstrap_task(store_path, block, "anomalies", opts, labels, source)
    features = open_store(store_path)
    b = Block(features, block, opts)
    images = np.unique(labels[:, 0])
    local = labels.copy()
    local[:, 0] = np.searchsorted(images, labels[:, 0])
    vs_mean, vs_median = anomalies.relative_norms(b.norm_maps(images), local, ref_size(features, opts))
    rows = anomalies.anomaly_rows(vs_mean, vs_median)
    for r in rows:
        r["labels"] = source
    return label_rows(features, block, rows)


def detect_task(store_path: str, opts: MetricOptions) -> np.ndarray:
    """(M, 4) detections (store row, x, y, peak ratio) on the detection block, label-free."""
    features = open_store(store_path)
    b = Block(features, opts.detect_block, opts)
    pooled = np.concatenate([anomalies.pooled_ratios(b.norm_maps(c)) for c in b.chunks(b.rows)])
    threshold = anomalies.robust_threshold(pooled, opts.detect_k, opts.detect_min_ratio)
    found = anomalies.detect(pooled, threshold)
    found[:, 0] = b.rows[found[:, 0].astype(np.int64)]
    return found


def all_blocks(features: FeatureStore) -> list[str]:
    """The blocks a metric can run on: those stored in full, then those stored only as summaries."""
    summary_blocks = list(features.group["summaries"].group_keys()) if "summaries" in features.group else []
    return features.blocks + [s for s in summary_blocks if s not in features.blocks]


def _threaded(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run one task with `threads` torch threads; the process's previous count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(previous)


def _call_name(fn: Callable[..., Any], args: tuple) -> str:
    """'position up_blocks.1.upsamplers.0' for the progress bar."""
    block = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
    return f"{fn.__name__.removesuffix('_task')} {block}".strip()


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
            from sdfeat.rayconnect import init_ray

            log.info("Ray: %s", init_ray(address))
        task = ray.remote(num_cpus=1)(_threaded)
        refs = [task.remote(threads, fn, *args) for fn, args in calls]
        names = {ref: _call_name(fn, args) for ref, (fn, args) in zip(refs, calls)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.step(names[done[0]])
        return ray.get(refs)


def _say_corner_skips(features: FeatureStore, names: list[str], opts: MetricOptions) -> None:
    """Name, at the default log level, the blocks the corner metric cannot measure and what would enable it."""
    no_variant, too_small = [], []
    for name in names:
        b = Block(features, name, opts)
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


def check_complete(features: FeatureStore, allow_partial: bool) -> None:
    """Refuse an unfinished store unless `allow_partial`; say which units and failed images are left out."""
    size = int(features.attrs["unit_size"])
    n_units = units_for(len(features), size)
    unfinished = sorted(set(range(n_units)) - store_layout.done_units(features.path))
    shown = ", ".join(map(str, unfinished[:10])) + (" …" if len(unfinished) > 10 else "")
    if unfinished and not allow_partial:
        raise StoreError(f"{features.path} is incomplete: {len(unfinished)} of {n_units} units have no done marker "
                         f"(units {shown}); finish the job (run it again), or pass --allow-partial to measure the "
                         "finished units only")
    if unfinished:
        log.warning("metrics on a partial store: skipped %d of %d units (%s; %d images)", len(unfinished), n_units,
                    shown, sum(min(len(features), (u + 1) * size) - u * size for u in unfinished))
    failed = int((~features.ok).sum()) - sum(min(len(features), (u + 1) * size) - u * size for u in unfinished)
    if failed > 0:
        log.warning("metrics: %d failed image(s) left out (see %s)", failed,
                    store_layout.join(features.path, store_layout.FAILURES))


def run_metrics(store_path: str, metrics: Sequence[str] = METRICS, blocks: Sequence[str] | None = None,
                local: bool = False, address: str | None = None, labels: str | None = None,
                options: MetricOptions | None = None, allow_partial: bool = False,
                progress: bool = False) -> dict[str, str]:
    """Compute `metrics` for `blocks` (default: every stored block), write the tables; returns {metric: path}.

    A store with unfinished units is refused (StoreError) unless `allow_partial`; then the metrics use the
    finished, extracted rows and a warning names what was skipped. Failed images are always left out (logged).

    labels: anomaly labels (.csv / .npy, store-row image indices); without them the anomaly metric uses the
    detected anomalies. Detections go to results/anomalies_detected.parquet (+ .csv in the paper's format)."""
    opts = options or MetricOptions()
    features = open_store(store_path)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ArgumentError(f"metrics: unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    check_complete(features, allow_partial)
    names = list(blocks) if blocks else all_blocks(features)
    missing = [n for n in names if n not in all_blocks(features)]
    if missing:
        raise StoreError(f"block '{missing[0]}' is not in {features.path}")
    if "corners" in metrics:
        _say_corner_skips(features, names, opts)
    calls: list[tuple[Callable[..., Any], tuple]] = []
    tags: list[str] = []
    for metric, task in (("position", position_task), ("corners", corners_task)):
        if metric in metrics:
            calls += [(task, (features.path, n, opts)) for n in names]
            tags += [metric] * len(names)
    detecting = "anomalies" in metrics and opts.detect_block in all_blocks(features)
    if detecting:
        calls.append((detect_task, (features.path, opts)))
        tags.append("detect")
    results = execute(calls, local, address, opts.task_threads, progress)
    tables: dict[str, list[dict]] = {m: [] for m in metrics}
    detected = None
    for tag, result in zip(tags, results):
        if tag == "detect":
            detected = result
        else:
            tables[tag] += result
    if "anomalies" in metrics:
        given = read_labels(labels) if labels else None
        use, source = (given, "given") if given is not None else (detected, "detected")
        if use is not None and len(use):
            runs = execute([(anomaly_task, (features.path, n, use[:, :3].astype(np.int64), source, opts))
                             for n in names], local, address, opts.task_threads, progress)
            tables["anomalies"] += [r for rows in runs for r in rows]
        if detected is not None:
            tables["anomalies"] += _detection_rows(features, opts, detected, given)
            write_results(features.path, DETECTIONS, [{"sample": int(d[0]), "sample_id": features.sample_ids[int(d[0])],
                                               "x": int(d[1]), "y": int(d[2]), "peak_ratio": float(d[3])}
                                              for d in detected])
            write_labels(store_layout.join(features.path, RESULTS, f"{DETECTIONS}.csv"), detected)
    return {m: write_results(features.path, m, tables[m]) for m in metrics}


def _detection_rows(features: FeatureStore, opts: MetricOptions, detected: np.ndarray,
                    given: np.ndarray | None) -> list[dict]:
    stats = {"n_detected": float(len(detected))}
    if given is not None:
        stats = anomalies.match(detected, given, opts.match_tolerance)
    rows = [{"metric": "anomalies", "statistic": f"detection_{k}", "value": v, "variant": "detection"}
            for k, v in stats.items()]
    if opts.bootstrap:
        from sdfeat.metrics.bootstrap import detection_intervals

        intervals = detection_intervals(features, opts, detected, given)
        for r in rows:
            r.update(intervals[r["statistic"]])
    return label_rows(features, opts.detect_block, rows)
