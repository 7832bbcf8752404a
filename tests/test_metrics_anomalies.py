"""Anomaly relative norms, label-free detection and label import."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sdfeat

from sdfeat.errors import SourceError, SourceNotFoundError
from sdfeat.metrics.anomalies import detect, label_patch, match, pooled_ratios, relative_norms, robust_threshold
from sdfeat.metrics.labels import read_labels, write_labels
from sdfeat.metrics.norms import token_norms

REFERENCE = str(Path(sdfeat.__file__).parent / "data" / "reference" / "sd15_anomaly_labels.csv")  # shipped data


def clean_maps(n_images: int, size: int = 32, channels: int = 16, seed: int = 0) -> np.ndarray:
    """(N, C, size, size) activations whose token norms are all close to 4."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_images, channels, size, size)).astype(np.float32)


def test_relative_norm_by_hand() -> None:
    norms = np.ones((2, 8, 8), dtype=np.float32)
    norms[1, 2:4, 4:6] = 10.0  # a 2×2 patch at row 2, col 4 of image 1
    labels = np.array([[1, 16, 8]])  # on a 32-grid: x=16 -> col 4 at scale 8/32, y=8 -> row 2; side int(0.5) -> 1
    vs_mean, vs_median = relative_norms(norms, labels, ref_size=32)
    assert vs_mean[0] == pytest.approx(10.0 / ((60 + 4 * 10) / 64))
    assert vs_median[0] == pytest.approx(10.0)  # the patch's one token over the clean median 1
    # at ref size 8 the patch is 2×2: mean 10 over mean (60 + 40) / 64
    vs_mean, _ = relative_norms(norms, np.array([[1, 4, 2]]), ref_size=8)
    assert vs_mean[0] == pytest.approx(10.0 / (100 / 64))


def test_label_patch_scaling() -> None:
    assert label_patch(x=8, y=30, height=64) == (slice(60, 64), slice(16, 20))  # scale 2, side 4
    assert label_patch(x=8, y=30, height=8) == (slice(7, 8), slice(2, 3))  # scale 1/4, side max(1, 0)
    assert label_patch(x=9, y=31, height=16) == (slice(15, 16), slice(4, 5))  # int(15.5), int(4.5), side 1


def test_planted_patch_detected_and_clean_maps_not() -> None:
    acts = clean_maps(12)
    acts[5, :, 6:8, 10:12] *= 5.0  # image 5, rows 6-7, cols 10-11 -> label (5, x=10, y=6)
    norms = token_norms(acts)
    pooled = pooled_ratios(norms)
    t = robust_threshold(pooled)
    found = detect(pooled, t)
    assert found[:, :3].tolist() == [[5, 10, 6]]
    expected_peak = norms[5, 6:8, 10:12].mean() / np.median(norms[5])
    assert found[0, 3] == pytest.approx(expected_peak, rel=1e-5)
    assert found[0, 3] > 4
    clean = pooled_ratios(token_norms(clean_maps(12, seed=1)))
    assert len(detect(clean, robust_threshold(clean))) == 0


def test_two_adjacent_cells_are_one_anomaly_at_the_peak() -> None:
    acts = clean_maps(4)
    acts[2, :, 4:6, 4:6] *= 4.0
    acts[2, :, 4:6, 6:8] *= 6.0
    pooled = pooled_ratios(token_norms(acts))
    assert detect(pooled, robust_threshold(pooled))[:, :3].tolist() == [[2, 6, 4]]


def test_precision_recall() -> None:
    detected = np.array([[0, 4, 4, 5.0], [1, 10, 10, 3.0], [2, 0, 0, 2.0]])
    labels = np.array([[0, 4, 6], [1, 20, 20], [3, 0, 0]])  # first within 2 tokens, the others missed
    r = match(detected, labels)
    assert (r["precision"], r["recall"], r["matched"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3), 1.0)


def test_label_csv_round_trip(tmp_path) -> None:
    labels = read_labels(REFERENCE)
    assert labels.shape == (196, 3)  # PROTOCOL.md: 196 labels for SD-1.5
    assert labels[0].tolist() == [0, 8, 30]
    back = read_labels(write_labels(tmp_path / "l.csv", labels))
    np.testing.assert_array_equal(back, labels)
    np.save(tmp_path / "l.npy", labels[::-1])  # the paper's .npy layout, any order
    np.testing.assert_array_equal(read_labels(tmp_path / "l.npy"), labels)


def test_label_errors(tmp_path) -> None:
    with pytest.raises(SourceNotFoundError, match="missing.csv"):
        read_labels(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("img,x,y\n0,1,2\n")
    with pytest.raises(SourceError, match="header"):
        read_labels(bad)
    bad.write_text("image_index,x_col,y_row\n0,one,2\n")
    with pytest.raises(SourceError, match="integer"):
        read_labels(bad)
