"""The metrics runner over a real store from the tiny model: tables, agreement with numpy on the stored
activations, pinned values (a silent change in a metric fails here), idempotence, and Ray tasks giving the same
tables as the in-process run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from metrics_helpers import one_torch_thread  # noqa: F401  (autouse fixture)

from sdfeat.errors import ArgumentError, StoreError
from sdfeat.extract import run_local
from sdfeat.metrics.labels import write_labels
from sdfeat.metrics.position import ProbeSettings
from sdfeat.metrics.results import LEAD_COLUMNS
from sdfeat.metrics.runner import MetricOptions, run_metrics
from sdfeat.spec import parse_spec
from sdfeat.store.query import open_store

BLOCKS = ["down_blocks.1.resnets.0", "up_blocks.1.upsamplers.0"]  # 8×8 and 16×16 at 128 px


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("metrics") / "store"
    spec = parse_spec({"model": "tiny", "source": "synthetic:10", "resolution": 128, "blocks": BLOCKS,
                       "protocol": "paper", "variants": {"crops": "auto"}, "batch_size": 10, "output": str(out)})
    run_local(spec, progress=False)
    return str(out)


def tables(paths: dict[str, str]) -> dict[str, pd.DataFrame]:
    return {m: pd.read_parquet(p) for m, p in paths.items()}


def border_similarity(acts: np.ndarray) -> float:
    """Mean cosine similarity over ordered pairs of distinct border tokens (edges without the corners) of (B, C, m,
    m) maps, pooled over the images: numpy, pair by pair."""
    b, c, m, _ = acts.shape
    border = np.zeros((m, m), dtype=bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    border[[0, 0, -1, -1], [0, -1, 0, -1]] = False
    tokens = acts.astype(np.float64).reshape(b, c, m * m)[:, :, border.ravel()]  # (B, C, k)
    unit = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
    cos = np.einsum("bca,bcd->bad", unit, unit)  # (B, k, k)
    k = cos.shape[1]
    return float((cos.sum() - np.trace(cos, axis1=1, axis2=2).sum()) / (b * k * (k - 1)))


def test_local_run_tables(store_path: str, tmp_path: Path) -> None:
    labels = write_labels(tmp_path / "labels.csv", np.array([[1, 4, 6], [3, 0, 0]]))
    options = MetricOptions(probe=ProbeSettings(epochs=2), chunk_images=3, paper_counts=True)
    first = tables(run_metrics(store_path, local=True, labels=str(labels), options=options))
    for df in first.values():
        assert list(df.columns[:6]) == LEAD_COLUMNS
    pos = first["position"]
    assert len(pos) == len(BLOCKS) * 2 * 4  # paper: accuracy per epoch and scale only
    assert pos["value"].between(0, 1).all()

    features = open_store(store_path)
    full = features.read(BLOCKS[0], timestep=50, seed=42)  # (10, C, 8, 8), all at once
    crop = features.read(BLOCKS[0], timestep=50, seed=42, crop=128 // 8)  # (10, C, 6, 6)
    c = first["corners"]
    c = c[(c.block == BLOCKS[0]) & ~c.paper_counts]
    ratio = c[(c.statistic == "ratio") & (c.group == "border")].value.item()
    assert ratio == pytest.approx(border_similarity(crop) / border_similarity(full[:, :, 1:-1, 1:-1]), rel=1e-6)

    a = first["anomalies"]
    got = a[(a.block == BLOCKS[1]) & (a.statistic == "rel_norm_mean") & (a.variant == "vs_mean")].value.item()
    norms = np.linalg.norm(features.read(BLOCKS[1], timestep=50, seed=42), axis=1)  # (10, 16, 16); labels on a 16-grid
    by_hand = [norms[1, 6:8, 4:6].mean() / norms[1].mean(), norms[3, 0:2, 0:2].mean() / norms[3].mean()]
    assert got == pytest.approx(np.mean(by_hand), rel=1e-5)

    # pinned: the numbers this fixed store gives today (the tiny model's weights are seeded); a change in a metric's
    # definition or arithmetic moves them
    def value(metric: str, block: str, **where: object) -> float:
        t = first[metric]
        keep = t.block == block
        for column, wanted in where.items():
            keep &= t[column] == wanted
        return t[keep].value.item()

    assert value("position", BLOCKS[0], epoch=2, scale=8) == pytest.approx(0.125, abs=1e-3)
    assert value("position", BLOCKS[1], epoch=2, scale=8) == pytest.approx(0.09375, abs=1e-3)
    assert value("corners", BLOCKS[0], statistic="ratio", group="corner", paper_counts=False) == \
        pytest.approx(0.9675986173181385, rel=1e-6)
    assert value("corners", BLOCKS[1], statistic="ratio", group="border", paper_counts=False) == \
        pytest.approx(0.6830781240918086, rel=1e-6)
    assert value("anomalies", BLOCKS[1], statistic="rel_norm_mean", variant="vs_mean") == \
        pytest.approx(0.8862581130755619, rel=1e-5)
    assert value("anomalies", BLOCKS[1], statistic="detection_n_detected") == 0

    again = tables(run_metrics(store_path, local=True, labels=str(labels), options=options))
    for m in first:
        pd.testing.assert_frame_equal(first[m], again[m])


def test_bad_arguments(store_path: str) -> None:
    with pytest.raises(ArgumentError, match="unknown metric"):
        run_metrics(store_path, metrics=["nope"], local=True)
    with pytest.raises(StoreError, match="mid_block"):
        run_metrics(store_path, blocks=["mid_block.resnets.0"], local=True)


@pytest.mark.ray
def test_ray_tasks_match_local(store_path: str, monkeypatch) -> None:
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    options = MetricOptions(probe=ProbeSettings(epochs=1))
    local = tables(run_metrics(store_path, metrics=["position", "corners"], local=True, options=options))
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # own cluster; tasks only (no actors): no deadlock
    try:
        remote = tables(run_metrics(store_path, metrics=["position", "corners"], options=options))
    finally:
        ray.shutdown()
    for m in local:
        pd.testing.assert_frame_equal(local[m], remote[m])
