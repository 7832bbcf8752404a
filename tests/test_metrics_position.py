"""Position probe: planted codes are read perfectly, position-free features give chance, the paper's loop is
reproduced exactly for a block run on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metrics_helpers import one_torch_thread  # noqa: F401  (autouse fixture)

from sdfeat.metrics.position import (ProbeSettings, paper_split, probe_block, probe_rows, stratified_split)


def planted(n_images: int, n: int, channels: int, seed: int = 0) -> np.ndarray:
    """(N, C, n, n): noise plus a one-hot row code in channels 0..n-1 and a column code in n..2n-1."""
    rng = np.random.default_rng(seed)
    acts = rng.normal(scale=0.5, size=(n_images, channels, n, n)).astype(np.float32)
    eye = np.eye(n, dtype=np.float32)
    acts[:, :n] += 20 * eye[:, :, None]  # channel r is high on row r
    acts[:, n:2 * n] += 20 * eye[:, None, :]  # channel n+c is high on column c
    return acts


def reader(acts: np.ndarray):
    return lambda idx: acts[idx]


@pytest.mark.parametrize("protocol", ["paper", "standard"])
def test_planted_codes_give_accuracy_one(protocol: str) -> None:
    acts = planted(60, 8, 24)
    settings = ProbeSettings(protocol=protocol, lr=2e-2, buffer_images=16)
    res = probe_block(reader(acts), 60, 24, 8, settings, class_labels=np.arange(60) % 3)
    last = res.epochs[-1]
    assert last.accuracy == {8: 1.0, 16: 1.0, 32: 1.0, 64: 1.0}
    assert (last.cell_accuracy, last.position_error) == (1.0, 0.0)
    assert res.exact_permutation == (protocol == "paper")


def test_position_free_features_give_chance() -> None:
    # 16×16 maps, constant-in-expectation features: per-coordinate chance is 1/min(S, n) for S dividing n or
    # n dividing S (a constant prediction hits one bin of n/S rows, or one row): 1/8 at S=8, 1/16 at S>=16.
    acts = np.random.default_rng(1).normal(size=(40, 8, 16, 16)).astype(np.float32)
    res = probe_block(reader(acts), 40, 8, 16, ProbeSettings(lr=2e-2))
    acc = res.epochs[-1].accuracy
    assert acc[8] == pytest.approx(1 / 8, abs=0.04)
    for s in (16, 32, 64):
        assert acc[s] == pytest.approx(1 / 16, abs=0.03)
    assert acc[32] == acc[64] == acc[16]  # S >= n is exact per-coordinate accuracy


def reference_loop(blocks: list[np.ndarray], epochs: int = 2) -> list[list[list[float]]]:
    """Transcription of the reference's `run_position_estimation` on CPU: seed once, loop over blocks."""
    torch.manual_seed(42)
    out = []
    for acts in blocks:
        reps = torch.from_numpy(acts)
        _, features, w, h = reps.shape
        classifier = torch.nn.Linear(features, w + h)
        opt = torch.optim.Adam(classifier.parameters(), lr=1e-3)
        x = reps.permute(0, 2, 3, 1).flatten(0, 2)
        labels = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="ij"), dim=-1)
        y = labels.expand(len(reps), -1, -1, -1).flatten(0, 2)
        num_train = int(len(reps) * 0.8)
        xtr, ytr, xte, yte = x[:num_train * w * h], y[:num_train * w * h], x[num_train * w * h:], y[num_train * w * h:]
        per_epoch = []
        for _ in range(epochs):
            idx = torch.randperm(len(xtr))
            for i in range(0, len(xtr), 512):
                classifier.zero_grad()
                loss = torch.nn.functional.cross_entropy(classifier(xtr[idx[i:i + 512]].float()).view(-1, w, 2),
                                                         ytr[idx[i:i + 512]])
                loss.backward()
                opt.step()
            with torch.no_grad():
                pred = classifier(xte.float()).view(len(xte), w, 2).argmax(dim=1)
                per_epoch.append([float((pred * s // w == yte * s // w).float().mean()) for s in (8, 16, 32, 64)])
        out.append(per_epoch)
    return out


def test_block_alone_reproduces_the_reference_loop() -> None:
    first = planted(10, 4, 8, seed=2)
    second = planted(30, 8, 16, seed=3) * 0.1  # weak code: accuracies well below 1, so any RNG slip shows
    expected = reference_loop([first, second])
    settings = ProbeSettings(epochs=2)
    res = probe_block(reader(second), 30, 16, 8, settings, prior_blocks=[(8, 4, 8 * 16)])
    got = [[e.accuracy[s] for s in (8, 16, 32, 64)] for e in res.epochs]
    np.testing.assert_allclose(got, expected[1], atol=1e-6)
    assert max(max(e) for e in got) < 0.9
    alone = probe_block(reader(second), 30, 16, 8, settings)  # without the replay: another state
    assert [[e.accuracy[s] for s in (8, 16, 32, 64)] for e in alone.epochs] != got


def test_streaming_is_deterministic_and_bounded_by_buffer() -> None:
    acts = planted(20, 8, 24)
    reads: list[int] = []

    def counting_reader(idx: np.ndarray) -> np.ndarray:
        reads.append(len(idx))
        return acts[idx]

    settings = ProbeSettings(protocol="standard", chunk_images=3, buffer_images=5, epochs=2)
    a = probe_block(counting_reader, 20, 24, 8, settings, seed=7)
    b = probe_block(reader(acts), 20, 24, 8, settings, seed=7)
    assert max(reads) == 3
    assert [e.accuracy for e in a.epochs] == [e.accuracy for e in b.epochs]


def test_splits() -> None:
    train, test = paper_split(500)
    assert (train[0], train[-1], test[0], test[-1]) == (0, 399, 400, 499)
    labels = np.repeat(np.arange(5), 10)
    train, test = stratified_split(labels, 0.8, seed=0)
    assert np.bincount(labels[train]).tolist() == [8] * 5
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(50))


def test_rows_are_tidy() -> None:
    acts = planted(10, 8, 24)
    res = probe_block(reader(acts), 10, 24, 8, ProbeSettings(protocol="standard", epochs=2))
    rows = probe_rows(res, "standard")
    assert len(rows) == 2 * (4 + 2)
    assert {r["statistic"] for r in rows} == {"accuracy", "cell_accuracy", "position_error"}
    assert len(probe_rows(res, "paper")) == 2 * 4
