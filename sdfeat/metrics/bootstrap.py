"""Confidence intervals for every metric row: an image-level bootstrap over small per-image statistics.

`sdfeat metrics STORE --bootstrap B` runs `bootstrap_task` where it would run a metric's own task
(`MetricDef.task` of `metrics.catalog`), in the same way (locally or as Ray tasks). A task reads its block once,
in chunks, and keeps only per-image contributions (never the activations), the metric's parts (`MetricDef.parts`;
the paper's three here):
  corners    per image the pair sums of each group, cropped and repr-cropped (`corners.group_similarity_sums`),
  anomalies  per label its relative norms and its image,
  position   per test image the correct coordinates per scale, cells, summed position error and token count.
A table row is a function of weighted sums of these (`Parts.rows(weights)`): all weights 1 give the point value
(the same number as without the bootstrap, up to summation order), resampled weights give a replicate.

Seed scheme (documented so an independent bootstrap can reproduce it): the population is the store's usable
images (`ok` rows, store order), n of them. Replicate b (0..B-1) draws
    idx = numpy.random.default_rng([seed, b]).integers(0, n, n)
and weighs image i by the number of times it was drawn, `bincount(idx, minlength=n)`. The same draw serves every
block, metric, timestep and seed of the store (so blocks are comparable). The interval is the percentile interval
`numpy.nanpercentile(replicates, [50 - 50·level, 50 + 50·level])` (linear interpolation; level 0.95).

Probe: the probe is trained once per split, so its interval mixes `probe_repeats` R image-level splits: repeat 0
is the metric's own run (its protocol's split), repeats r = 1..R-1 train the standard protocol on the stratified
split seeded `probe.seed + r` (one class where the store has no labels). Replicate b resamples the images of
repeat b mod R, whose test images count. The interval thus holds both the split/training variation and the
test-image sampling; with R = 1 it is the plain test-image bootstrap of one trained probe.

Several timesteps or seeds: one set of rows per (timestep, seed) and, with more than one, a pooled set
(columns timestep/seed null, pooled true): per-image contributions summed over them (the probe: over the
probes trained per (timestep, seed)), resampled with the same image weights. `n_images` is the number of images
a row's value stands on (probe: test images; anomalies: labelled images; corners: images with crops).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from sdfeat.metrics import anomalies, corners, position, tasks
from sdfeat.metrics.catalog import MetricDef
from sdfeat.store.query import FeatureStore, open_store

log = logging.getLogger(__name__)

LEVEL = 0.95
CORNER_KEYS = tasks.CORNER_KEYS
POOLED = (None, None)  # the (timestep, seed) key of the pooled rows


def replicate_weights(n: int, replicate: int, seed: int, stream: int | None = None) -> np.ndarray:
    """(n,) int64 times each image is drawn in replicate `replicate` (module docstring); `stream` gives an
    independent draw for a second store (`compare` of unpaired stores uses streams 0 and 1)."""
    key = [seed, replicate] if stream is None else [seed, replicate, stream]
    return np.bincount(np.random.default_rng(key).integers(0, n, n), minlength=n)


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """replicates (B, R) -> (low (R,), high (R,)) percentile interval; NaN replicates ignored, all-NaN -> NaN."""
    tail = 50.0 * (1.0 - level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row with only NaN replicates
        low, high = np.nanpercentile(np.asarray(replicates, dtype=np.float64), [tail, 100.0 - tail], axis=0)
    return low, high


def _weighted_sum(w: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Σ_i w_i values_i over the first axis; (k,) x (k, ...) -> (...)."""
    return np.tensordot(w.astype(np.float64), values, axes=1)


@dataclass
class CornerParts:
    """Per-image group pair sums of one block: index (k,) population positions of the images with crops;
    sums[f"{variant}/{key}"] (k, ...) for variant in cropped/reprcropped and key in CORNER_KEYS."""

    m: int
    index: np.ndarray
    sums: dict[str, np.ndarray]
    paper_counts: bool

    def rows(self, w: np.ndarray, replicate: int = 0) -> list[dict]:
        wk = w[self.index]
        totals = {v: corners.GroupTotals(self.m, int(wk.sum()), *(_weighted_sum(wk, self.sums[f"{v}/{k}"])
                                                                 for k in CORNER_KEYS))
                  for v in corners.VARIANTS}
        rows = corners.corner_rows(totals["cropped"], totals["reprcropped"])
        if self.paper_counts:
            rows += [r for r in corners.corner_rows(totals["cropped"], totals["reprcropped"], paper_counts=True)
                     if r["statistic"] in ("group_mean", "ratio") and "|" not in r["group"]]
        return rows

    def n_images(self) -> int:
        return len(self.index)

    @staticmethod
    def pool(parts: Sequence["CornerParts"]) -> "CornerParts":
        first = parts[0]
        return CornerParts(first.m, first.index, {k: sum(p.sums[k] for p in parts) for k in first.sums},
                           first.paper_counts)


@dataclass
class AnomalyParts:
    """Per label (L,): its image's population position and its two relative norms."""

    index: np.ndarray
    vs_mean: np.ndarray
    vs_median: np.ndarray
    source: str

    def rows(self, w: np.ndarray, replicate: int = 0) -> list[dict]:
        times = w[self.index]  # a label counts as often as its image was drawn
        rows = anomalies.anomaly_rows(np.repeat(self.vs_mean, times), np.repeat(self.vs_median, times))
        for r in rows:
            r["labels"] = self.source
        return rows

    def n_images(self) -> int:
        return len(np.unique(self.index))

    @staticmethod
    def pool(parts: Sequence["AnomalyParts"]) -> "AnomalyParts":
        return AnomalyParts(*(np.concatenate([getattr(p, a) for p in parts]) for a in ("index", "vs_mean",
                                                                                         "vs_median")),
                            parts[0].source)


@dataclass
class ProbeParts:
    """Per repeat r (one image-level split): index[r] (n_test,) population positions of its test images and
    per_image[r] (E, n_test, S + 3) their test counts per epoch (`position.EpochScores.per_image`)."""

    n: int
    protocol: str
    variant: str
    scales: tuple[int, ...]
    index: list[np.ndarray]
    per_image: list[np.ndarray]

    def rows(self, w: np.ndarray, replicate: int = 0) -> list[dict]:
        r = replicate % len(self.per_image)
        sums = np.tensordot(w[self.index[r]].astype(np.float64), self.per_image[r], axes=([0], [1]))  # (E, S + 3)
        n_scales = len(self.scales)
        with np.errstate(invalid="ignore", divide="ignore"):
            tokens = sums[:, -1]
            acc = sums[:, :n_scales] / (2 * tokens[:, None])
            cells, error = sums[:, n_scales] / tokens, sums[:, n_scales + 1] / tokens
        epochs = [position.EpochScores(e + 1, dict(zip(self.scales, map(float, acc[e]))), float(cells[e]),
                                       float(error[e])) for e in range(len(sums))]
        rows = position.probe_rows(position.ProbeResult(self.n, 0, 0, False, epochs), self.protocol)
        for r in rows:
            r["variant"] = self.variant
        return rows

    def n_images(self) -> int:
        return len(self.index[0])

    @staticmethod
    def pool(parts: Sequence["ProbeParts"]) -> "ProbeParts":
        """Summed over (timestep, seed): the splits depend on the labels and seeds only, so they coincide."""
        return replace(parts[0], per_image=[sum(found) for found in zip(*(p.per_image for p in parts))])


class Parts(Protocol):
    """What a metric's `parts` function returns: its per-image statistics of one block at one (timestep, seed)."""

    def rows(self, w: np.ndarray, replicate: int = 0) -> list[dict]:
        """The metric's rows with image i weighted w[i] (all ones: the point estimate)."""

    def n_images(self) -> int:
        """The number of images the rows stand on."""

    @staticmethod
    def pool(parts: Sequence[Any]) -> Any:
        """The parts of several (timestep, seed) pooled into one."""


@dataclass
class Collected:
    """One block's per-image statistics of one metric for every (timestep, seed) measured."""

    features: FeatureStore
    block: str
    sample_ids: list[str]  # the population: usable images in store order
    parts: dict[tuple[int | None, int | None], Parts]

    def with_pooled(self) -> dict[tuple[int | None, int | None], Parts]:
        """The parts, and the pooled parts where there are several (timestep, seed)."""
        if len(self.parts) < 2:
            return dict(self.parts)
        values = list(self.parts.values())
        return {**self.parts, POOLED: type(values[0]).pool(values)}

    def summary(self) -> Parts:
        """The pooled parts, or the only ones."""
        return self.with_pooled()[POOLED if len(self.parts) > 1 else next(iter(self.parts))]


def corner_parts(features: FeatureStore, b: tasks.BlockReader, opts: tasks.MetricOptions) -> CornerParts | None:
    """The corner metric's parts: None for maps under `tasks.MIN_CORNER_MAP` or without a crop variant."""
    n = b.height()
    if n < tasks.MIN_CORNER_MAP:
        return None
    chunked = tasks.corner_sums(features, b)
    if chunked is None:
        return None
    rows, chunks = chunked
    found: dict[str, list[np.ndarray]] = {f"{v}/{k}": [] for v in corners.VARIANTS for k in CORNER_KEYS}
    for repr_sums, crop_sums in chunks:
        for variant, sums in (("reprcropped", repr_sums), ("cropped", crop_sums)):
            for k in CORNER_KEYS:
                found[f"{variant}/{k}"].append(np.asarray(sums[k], dtype=np.float64))
    sums = {k: np.concatenate(v) for k, v in found.items()}
    return CornerParts(n - 2, np.searchsorted(b.rows, rows), sums, opts.paper_counts)


def anomaly_parts(features: FeatureStore, b: tasks.BlockReader, opts: tasks.MetricOptions, labels: np.ndarray,
                  source: str) -> AnomalyParts:
    """The anomaly metric's parts of labels (L, >= 3: store row, x, y); labels on images that did not extract are
    left out."""
    labels = np.asarray(labels)[:, :3].astype(np.int64)
    index = np.searchsorted(b.rows, labels[:, 0])
    usable = (index < len(b.rows)) & (b.rows[np.minimum(index, len(b.rows) - 1)] == labels[:, 0])
    if not usable.all():
        log.warning("anomalies: %d labels sit on images that did not extract; left out of the bootstrap",
                    int((~usable).sum()))
        labels, index = labels[usable], index[usable]
    images = np.unique(labels[:, 0])
    local = labels.copy()
    local[:, 0] = np.searchsorted(images, labels[:, 0])
    vs_mean, vs_median = anomalies.relative_norms(b.norm_maps(images), local, tasks.ref_size(features, opts))
    return AnomalyParts(index, vs_mean, vs_median, source)


def probe_parts(features: FeatureStore, b: tasks.BlockReader, opts: tasks.MetricOptions) -> ProbeParts:
    """The position probe's parts: `probe_repeats` trained probes' per-test-image counts."""
    results = [tasks.probe_result(features, b, opts, r) for r in range(max(1, opts.probe_repeats))]
    return ProbeParts(results[0].n, opts.protocol or features.spec.protocol, "tokens" if b.full else "summary_tokens",
                      tuple(opts.probe.scales), [np.asarray(r.test_images) for r in results],
                      [np.stack([e.per_image for e in r.epochs]) for r in results])


def collect(store_path: str, block: str, metric: MetricDef, opts: tasks.MetricOptions, *inputs: Any) -> Collected:
    """Per-image statistics of `metric` at `block` for every (timestep, seed) of the store, or the one `opts`
    names; no parts where the metric does not apply to the block (corners on small maps or without crops).
    `inputs`: the metric's extra task arguments (the anomalies: labels and their source)."""
    features = open_store(store_path)
    timesteps = [opts.timestep] if opts.timestep is not None else features.timesteps
    seeds = [opts.seed] if opts.seed is not None else features.seeds
    parts: dict[tuple[int | None, int | None], Parts] = {}
    for t in timesteps:
        for s in seeds:
            b = tasks.BlockReader(features, block, replace(opts, timestep=t, seed=s))
            part = metric.parts(features, b, opts, *inputs)
            if part is None:
                return Collected(features, block, [features.sample_ids[r] for r in b.rows], {})
            parts[(t, s)] = part
    return Collected(features, block, [features.sample_ids[r] for r in b.rows], parts)


def interval_rows(collected: Collected, replicates: int, seed: int, level: float = LEVEL) -> list[dict]:
    """Rows of every (timestep, seed) (+ pooled) with `ci_low`, `ci_high`, `n_images` added."""
    parts = collected.with_pooled()
    n = len(collected.sample_ids)
    point = {key: p.rows(np.ones(n, dtype=np.int64), 0) for key, p in parts.items()}
    values = {key: np.empty((replicates, len(rows))) for key, rows in point.items()}
    for rep in range(replicates):
        w = replicate_weights(n, rep, seed)
        for key, p in parts.items():
            values[key][rep] = [r["value"] for r in p.rows(w, rep)]
    out: list[dict] = []
    for key, rows in point.items():
        low, high = percentile_interval(values[key], level)
        for row, lo, hi in zip(rows, low, high):
            row.update(ci_low=float(lo), ci_high=float(hi), n_images=parts[key].n_images(), timestep=key[0],
                       seed=key[1], pooled=key == POOLED)
            out.append(row)
    return out


def bootstrap_task(store_path: str, block: str, metric: MetricDef, opts: tasks.MetricOptions,
                   *inputs: Any) -> list[dict]:
    """The metric's task with intervals (what `metrics.runner` runs instead of the metric's own when
    `opts.bootstrap` > 0)."""
    collected = collect(store_path, block, metric, opts, *inputs)
    if not collected.parts:
        return []
    rows = interval_rows(collected, opts.bootstrap, opts.bootstrap_seed, opts.level)
    return tasks.label_rows(collected.features, block, rows)


def detection_intervals(features: FeatureStore, opts: tasks.MetricOptions, detected: np.ndarray,
                        given: np.ndarray | None) -> dict[str, dict]:
    """Intervals of the detection rows (`detection_<stat>` -> the columns to add): per usable image its detections,
    labels and matches (`anomalies.match` never matches across images, so per-image matching is exact), resampled
    like every other row. Labels on images that did not extract are left out."""
    population = np.flatnonzero(features.ok)
    n = len(population)
    at = {int(r): i for i, r in enumerate(population)}
    per_image = np.zeros((n, 3))  # detections, labels, matched
    found = [int(s) for s in detected[:, 0]] if len(detected) else []
    for sample in found:
        if sample in at:
            per_image[at[sample], 0] += 1
    if given is not None:
        for sample in np.unique(given[:, 0]):
            if int(sample) in at:
                mine = detected[detected[:, 0] == sample] if len(detected) else detected
                stats = anomalies.match(mine, given[given[:, 0] == sample], opts.match_tolerance)
                per_image[at[int(sample)], 1:] = stats["n_labels"], stats["matched"]

    def statistics(w: np.ndarray) -> dict[str, float]:
        d, lab, hit = _weighted_sum(w, per_image)
        if given is None:
            return {"n_detected": d}
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"precision": hit / d if d else np.nan, "recall": hit / lab if lab else np.nan,
                    "n_detected": d, "n_labels": lab, "matched": hit}

    names = list(statistics(np.ones(n, dtype=np.int64)))
    values = np.array([[statistics(replicate_weights(n, rep, opts.bootstrap_seed))[k] for k in names]
                       for rep in range(opts.bootstrap)]).reshape(opts.bootstrap, len(names))
    low, high = percentile_interval(values, opts.level)
    timestep = opts.timestep if opts.timestep is not None else features.timesteps[0]
    seed = opts.seed if opts.seed is not None else features.seeds[0]
    return {f"detection_{k}": {"ci_low": float(lo), "ci_high": float(hi), "n_images": n, "timestep": timestep,
                               "seed": seed, "pooled": False} for k, lo, hi in zip(names, low, high)}
