"""Metric 1: the position probe — how well a linear map reads a token's (row, col) from its activation.

`paper` protocol (PROTOCOL.md, reference `run_position_estimation`): every token of an n×n map is a sample with
label (row, col); probe `Linear(C, 2n)` viewed as (n, 2) (output 2k+j = class k of coordinate j); cross-entropy
over both coordinates; Adam lr 1e-3, 5 epochs, batch 512, a fresh `torch.randperm` over all train tokens each
epoch from the global RNG; the first 80 % of images train, the rest test; after every epoch the per-coordinate
accuracy at S in {8, 16, 32, 64}: mean((pred*S)//n == (label*S)//n) over both coordinates.

Seed: the reference seeds once (42) before looping over all blocks, so block k's initial weights and
permutations depend on every earlier block's RNG use. `replay_paper_rng` re-creates that state for a block run
on its own (its own Ray task): it re-seeds and replays the earlier blocks' draws (one `nn.Linear(C, 2n)` init and
one `randperm(n_train_tokens)` per epoch each) without their data. Exact when `prior_blocks` lists every earlier
block of the reference's loop (the paper's 45 positions in its order), the reference ran the same torch CPU RNG,
and the block's train tokens fit `memory_budget_bytes` (loaded whole, so the permutation is the reference's).
Over budget the probe streams (below) and says so (`ProbeResult.exact_permutation = False`).

`standard` protocol adds: features standardised with train-token mean/std, a stratified image-level split by
class label, a per-block seed (`block_seed`), 2-D cell accuracy and mean position error in tokens.

Streaming (bounded memory, used by `standard` and by `paper` over budget): each epoch visits the train images in a
seeded random order, `buffer_images` at a time (read `chunk_images` per call); the buffer's tokens are shuffled and
cut into batches. Memory ≈ buffer_images·n²·C·itemsize, independent of the number of images; the permutation is
a two-level (image-buffer, token) shuffle, not one global permutation.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from sdfeat.metrics.catalog import PROBE_SCALES
from sdfeat.spec import Protocol

log = logging.getLogger(__name__)

ImageReader = Callable[[np.ndarray], np.ndarray]  # image indices (k,) -> activations (k, C, n, n)
Batch = tuple[torch.Tensor, torch.Tensor]  # features (b, C), labels (b, 2) int64 (row, col)


@dataclass(frozen=True)
class ProbeSettings:
    protocol: Protocol = "paper"
    epochs: int = 5
    batch_size: int = 512
    lr: float = 1e-3
    train_fraction: float = 0.8
    scales: tuple[int, ...] = PROBE_SCALES
    seed: int = 42
    memory_budget_bytes: int = 4 * 2**30  # paper: load the block's train tokens whole when they fit
    chunk_images: int = 16  # images per read
    buffer_images: int = 64  # streaming shuffle buffer


@dataclass
class EpochScores:
    epoch: int  # 1-based
    accuracy: dict[int, float]  # per-coordinate accuracy at scale S (the paper's number)
    cell_accuracy: float  # row and column both right
    position_error: float  # mean Euclidean distance (tokens) between predicted and true (row, col)
    # per test image (split order), columns: correct coordinates per scale (0..2 per token, summed), cells right,
    # summed position error, tokens: what the bootstrap (`metrics.bootstrap`) resamples
    per_image: np.ndarray | None = None  # (n_test_images, len(scales) + 3) float64


@dataclass
class ProbeResult:
    n: int
    n_train_images: int
    n_test_images: int
    exact_permutation: bool  # the reference's global permutation (paper, in memory)
    epochs: list[EpochScores] = field(default_factory=list)
    test_images: np.ndarray | None = None  # (n_test,) indices of the test images (the split), per_image's row order


def position_labels(n: int) -> torch.Tensor:
    """(n*n, 2) int64 (row, col) in the token order of `tokens()` (meshgrid 'ij')."""
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return torch.stack([rows, cols], dim=-1).reshape(-1, 2)


def tokens(acts: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(k, C, n, n) activations -> (k*n*n, C) tokens in (image, row, col) order, dtype kept."""
    t = torch.as_tensor(acts)
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def block_seed(seed: int, block: str) -> int:
    """The standard protocol's per-block seed: a stable hash of (seed, block name)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{block}".encode()).digest()[:4], "little")


def paper_split(n_images: int, train_fraction: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Order split: the first int(n_images * fraction) images train (0-399 of 500), the rest test."""
    n_train = int(n_images * train_fraction)
    return np.arange(n_train), np.arange(n_train, n_images)


def stratified_split(labels: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image-level split keeping each class's share: per class a seeded shuffle, the first fraction trains."""
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut = int(len(members) * train_fraction)
        train.append(members[:cut])
        test.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def replay_paper_rng(prior_blocks: Sequence[tuple[int, int, int]], epochs: int) -> None:
    """Advance torch's global RNG as the reference's loop does for the blocks before this one.

    prior_blocks: (channels, n, n_train_tokens) per earlier block, in the reference's order."""
    for channels, n, n_train_tokens in prior_blocks:
        torch.nn.Linear(channels, 2 * n)
        for _ in range(epochs):
            torch.randperm(n_train_tokens)


class _Scores:
    """Accumulates test predictions over chunks; batches hold whole images of `tokens_per_image` tokens."""

    def __init__(self, n: int, scales: Sequence[int], tokens_per_image: int) -> None:
        self.n, self.scales, self.tokens_per_image = n, tuple(scales), tokens_per_image
        self.correct = dict.fromkeys(self.scales, 0)
        self.cells = 0
        self.error = 0.0
        self.count = 0
        self.per_image: list[np.ndarray] = []  # (k, len(scales) + 3) per batch

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:  # logits (b, n, 2), labels (b, 2)
        pred = logits.argmax(dim=1)  # (b, 2)
        hits = [((pred * s) // self.n == (labels * s) // self.n).sum(dim=1) for s in self.scales]  # each (b,)
        for s, h in zip(self.scales, hits):
            self.correct[s] += int(h.sum())
        cells = (pred == labels).all(dim=1)  # (b,)
        error = (pred - labels).double().norm(dim=1)  # (b,)
        self.cells += int(cells.sum())
        self.error += float(error.sum())
        self.count += len(labels)
        per_token = torch.stack([*(h.double() for h in hits), cells.double(), error, torch.ones_like(error)],
                                dim=1)  # (b, S + 3)
        self.per_image.append(per_token.view(-1, self.tokens_per_image, per_token.shape[1]).sum(1).numpy())

    def result(self, epoch: int) -> EpochScores:
        total = max(self.count, 1)
        per_image = np.concatenate(self.per_image) if self.per_image else np.zeros((0, len(self.scales) + 3))
        return EpochScores(epoch, {s: c / (2 * total) for s, c in self.correct.items()},
                           self.cells / total, self.error / total, per_image)


def _fit(channels: int, n: int, settings: ProbeSettings, train_epoch: Callable[[int], Iterator[Batch]],
         test_batches: Callable[[], Iterator[Batch]], tokens_per_image: int) -> list[EpochScores]:
    """Build the probe (from the current global RNG), train, score after each epoch."""
    probe = torch.nn.Linear(channels, 2 * n)
    opt = torch.optim.Adam(probe.parameters(), lr=settings.lr)
    history = []
    for epoch in range(settings.epochs):
        probe.train()
        for x, y in train_epoch(epoch):
            probe.zero_grad()
            loss = F.cross_entropy(probe(x.float()).view(-1, n, 2), y)
            loss.backward()
            opt.step()
        probe.eval()
        scores = _Scores(n, settings.scales, tokens_per_image)
        with torch.no_grad():
            for x, y in test_batches():
                scores.add(probe(x.float()).view(-1, n, 2), y)
        history.append(scores.result(epoch + 1))
    return history


def _in_memory_epoch(x: torch.Tensor, y: torch.Tensor, batch_size: int,
                     transform: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[int], Iterator[Batch]]:
    """The reference's loop: one randperm over all train tokens per epoch from the global RNG."""

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            yield transform(x[idx].float()), y[idx]

    return epoch_batches


class _Standardiser:
    """Train-token mean/std (float64 sums), applied per batch; identity when not fitted."""

    def __init__(self) -> None:
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def fit(self, chunks: Iterator[torch.Tensor]) -> None:  # chunks (b, C)
        total, sq, count = None, None, 0
        for c in chunks:
            c = c.double()
            total = c.sum(0) if total is None else total + c.sum(0)
            sq = (c * c).sum(0) if sq is None else sq + (c * c).sum(0)
            count += len(c)
        mean = total / count
        self.mean = mean.float()
        self.std = (sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mean is None else (x - self.mean) / self.std


def _image_chunks(read: ImageReader, images: np.ndarray, chunk: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(images), chunk):
        yield tokens(read(images[i:i + chunk]))


def probe_block(read: ImageReader, n_images: int, channels: int, n: int, settings: ProbeSettings,
                class_labels: np.ndarray | None = None, prior_blocks: Sequence[tuple[int, int, int]] = (),
                seed: int | None = None) -> ProbeResult:
    """Train and score the probe on one block, reading images through `read` (bounded memory).

    seed: the standard protocol's per-block seed (default `settings.seed`); paper mode seeds `settings.seed`
    and replays `prior_blocks` (see module docstring)."""
    if settings.protocol == "paper" or class_labels is None:
        train_idx, test_idx = paper_split(n_images, settings.train_fraction)
    else:
        train_idx, test_idx = stratified_split(class_labels, settings.train_fraction, settings.seed)
    grid = position_labels(n)  # (n*n, 2)
    standardise = _Standardiser()
    if settings.protocol == "standard":
        standardise.fit(_image_chunks(read, train_idx, settings.chunk_images))

    def test_batches() -> Iterator[Batch]:
        for x in _image_chunks(read, test_idx, settings.chunk_images):
            yield standardise(x.float()), grid.repeat(len(x) // len(grid), 1)

    train_bytes = len(train_idx) * n * n * channels * 2  # the store's fp16
    in_memory = settings.protocol == "paper" and train_bytes <= settings.memory_budget_bytes
    if settings.protocol == "paper" and not in_memory:
        log.warning("probe: %d train bytes exceed the %d budget; streaming (permutation not the reference's)",
                    train_bytes, settings.memory_budget_bytes)
    with torch.random.fork_rng(devices=[]):
        if settings.protocol == "paper":
            torch.manual_seed(settings.seed)
            replay_paper_rng(prior_blocks, settings.epochs)
        else:
            torch.manual_seed(settings.seed if seed is None else seed)
        if in_memory:
            x_train = torch.cat(list(_image_chunks(read, train_idx, settings.chunk_images)))  # (N, C)
            y_train = grid.repeat(len(train_idx), 1)
            train_epoch = _in_memory_epoch(x_train, y_train, settings.batch_size, standardise)
        else:
            train_epoch = _streamed_epoch(read, train_idx, grid, settings, standardise,
                                          settings.seed if seed is None else seed)
        history = _fit(channels, n, settings, train_epoch, test_batches, n * n)
    return ProbeResult(n, len(train_idx), len(test_idx), in_memory, history, test_idx)


def _streamed_epoch(read: ImageReader, train_idx: np.ndarray, grid: torch.Tensor, settings: ProbeSettings,
                    transform: Callable[[torch.Tensor], torch.Tensor], seed: int) -> Callable[[int], Iterator[Batch]]:
    def epoch_batches(epoch: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        for start in range(0, len(order), settings.buffer_images):
            group = np.sort(order[start:start + settings.buffer_images])  # sorted: sequential reads
            x = torch.cat(list(_image_chunks(read, group, settings.chunk_images)))
            y = grid.repeat(len(group), 1)
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), settings.batch_size):
                idx = perm[i:i + settings.batch_size]
                yield transform(x[idx].float()), y[idx]

    return epoch_batches


def probe_tokens(features: np.ndarray, positions: np.ndarray, n: int, settings: ProbeSettings,
                 class_labels: np.ndarray | None = None, prior_blocks: Sequence[tuple[int, int, int]] = (),
                 seed: int | None = None) -> ProbeResult:
    """The probe on sampled tokens (per-image summaries): features (N_img, K, C), positions (N_img, K, 2) (row, col).

    Same split, training and scores as `probe_block`, over K tokens per image instead of n². An estimate of the
    full-token probe (fewer samples), held in memory."""
    feats = torch.as_tensor(features)
    pos = torch.as_tensor(positions).long()
    n_img, k, channels = feats.shape
    if settings.protocol == "paper" or class_labels is None:
        train_idx, test_idx = paper_split(n_img, settings.train_fraction)
    else:
        train_idx, test_idx = stratified_split(class_labels, settings.train_fraction, settings.seed)
    x_train, y_train = feats[train_idx].reshape(-1, channels), pos[train_idx].reshape(-1, 2)
    x_test, y_test = feats[test_idx].reshape(-1, channels), pos[test_idx].reshape(-1, 2)
    standardise = _Standardiser()
    if settings.protocol == "standard":
        standardise.fit(iter([x_train]))

    def test_batches() -> Iterator[Batch]:  # whole images, about 65536 tokens a batch
        step = max(1, 65536 // k) * k
        for i in range(0, len(x_test), step):
            yield standardise(x_test[i:i + step].float()), y_test[i:i + step]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed if settings.protocol == "paper" or seed is None else seed)
        if settings.protocol == "paper":
            replay_paper_rng(prior_blocks, settings.epochs)
        history = _fit(channels, n, settings, _in_memory_epoch(x_train, y_train, settings.batch_size, standardise),
                       test_batches, k)
    return ProbeResult(n, len(train_idx), len(test_idx), settings.protocol == "paper", history, test_idx)


def probe_rows(result: ProbeResult, protocol: str) -> list[dict]:
    """Tidy rows (without model/block/order): accuracy per epoch and scale; standard adds cell accuracy and error."""
    rows: list[dict] = []
    for ep in result.epochs:
        for s, acc in ep.accuracy.items():
            rows.append({"metric": "position", "statistic": "accuracy", "value": acc, "epoch": ep.epoch, "scale": s})
        if protocol == "standard":
            rows.append({"metric": "position", "statistic": "cell_accuracy", "value": ep.cell_accuracy,
                         "epoch": ep.epoch, "scale": result.n})
            rows.append({"metric": "position", "statistic": "position_error", "value": ep.position_error,
                         "epoch": ep.epoch, "scale": result.n})
    return rows
