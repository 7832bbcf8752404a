"""The paper's metric tasks: what a (metric, block) pair reads from a feature store and the tidy rows it returns.

A task opens the store itself and reads its block in chunks of `MetricOptions.chunk_images` images (the probe in
`paper` mode loads its block's train tokens whole when they fit `ProbeSettings.memory_budget_bytes`), so memory
does not grow with the number of images, and only small row lists travel back. The metric registry
(`metrics.catalog`) names the tasks; `metrics.runner` runs them here or as Ray tasks and writes the tables,
`metrics.bootstrap` reuses `BlockReader`, `probe_result`, `corner_sums` and `ref_size` for its intervals, and
`sdfeat compare` uses `block_order`, `all_blocks` and `detect_task`. A metric of its own module reads its blocks
with `BlockReader` and labels its rows with `label_rows` too.

Blocks stored only as per-image summaries (`summaries/<block>/...`) run from those: probe on the sampled tokens,
corners from the group sums, anomalies from the norm maps.

Paper-mode probe seeding: a block's task replays the RNG draws of the paper's earlier blocks (module docstring
of `position`), with their shapes from `blocks.block_shapes` for the store's model and resolution; where those are
unavailable, the store's own earlier blocks stand in (then the state is the one of a loop over the stored blocks).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from sdfeat.errors import SdfeatError, StoreError
from sdfeat.metrics import anomalies, corners, position
from sdfeat.metrics.norms import token_norms
from sdfeat.store.query import FeatureStore, open_store

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
    # too small for more threads to pay
    task_threads: int = 1
    # Confidence intervals (`metrics.bootstrap`): replicates (0: none), their seed, the probe's repeated splits
    bootstrap: int = 0
    bootstrap_seed: int = 0
    probe_repeats: int = 5
    level: float = 0.95


class BlockReader:
    """Reads one block of an open store at one (timestep, seed): full tensors or summaries, ok rows only, in
    store-row terms."""

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
        return np.concatenate([token_norms(torch.from_numpy(self.read(c))).numpy() for c in self.chunks(rows)])

    def height(self) -> int:
        if self.full:
            return self.features.shape(self.name)[-2]
        return self.features.group[f"summaries/{self.name}/norms"].shape[-2]


def block_order(features: FeatureStore, block: str) -> int:
    """The `order` column of a block: its index in the `all` preset (execution order); blocks outside it after."""
    from sdfeat.models.blocks import preset_names
    from sdfeat.models.registry import unet_config

    try:
        names = preset_names("all", unet_config(features.spec.model))  # the model's family's positions
    except SdfeatError:  # a hub model whose config is not here: SD's
        names = preset_names("all")
    return names.index(block) if block in names else len(names) + all_blocks(features).index(block)


def label_rows(features: FeatureStore, block: str, rows: list[dict]) -> list[dict]:
    """The rows with the store's `model` and the block's `block` and `order` columns in front."""
    head = {"model": features.spec.model, "block": block, "order": block_order(features, block)}
    return [{**head, **r} for r in rows]


def _prior_blocks(features: FeatureStore, block: str, n_train_images: int) -> list[tuple[int, int, int]]:
    """(channels, n, n_train_tokens) of the blocks the reference's loop trains before `block`."""
    try:
        from sdfeat.models.blocks import block_shapes, preset_names
        from sdfeat.models.registry import unet_config

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
    features = open_store(store_path)
    b = BlockReader(features, block, opts)
    rows = position.probe_rows(probe_result(features, b, opts), opts.protocol or features.spec.protocol)
    for r in rows:
        r["variant"] = "tokens" if b.full else "summary_tokens"
    return label_rows(features, block, rows)


def probe_result(features: FeatureStore, b: BlockReader, opts: MetricOptions, repeat: int = 0) -> position.ProbeResult:
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
    features = open_store(store_path)
    b = BlockReader(features, block, opts)
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


def corner_sums(features: FeatureStore, b: BlockReader) -> tuple[np.ndarray, Iterator[tuple[dict, dict]]] | None:
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
        return BlockReader(features, opts.detect_block, opts).height()
    return features.spec.resolution // 16


def anomaly_task(store_path: str, block: str, opts: MetricOptions, labels: np.ndarray, source: str) -> list[dict]:
    features = open_store(store_path)
    b = BlockReader(features, block, opts)
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
    b = BlockReader(features, opts.detect_block, opts)
    pooled = np.concatenate([anomalies.pooled_ratios(b.norm_maps(c)) for c in b.chunks(b.rows)])
    threshold = anomalies.robust_threshold(pooled, opts.detect_k, opts.detect_min_ratio)
    found = anomalies.detect(pooled, threshold)
    found[:, 0] = b.rows[found[:, 0].astype(np.int64)]
    return found


def all_blocks(features: FeatureStore) -> list[str]:
    """The blocks a metric can run on: those stored in full, then those stored only as summaries."""
    summary_blocks = list(features.group["summaries"].group_keys()) if "summaries" in features.group else []
    return features.blocks + [s for s in summary_blocks if s not in features.blocks]
