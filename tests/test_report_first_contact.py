"""The report as a new user reads it: a sparse store is drawn as points joined only between neighbouring blocks,
an anomaly detection that found nothing says so (and suggests --labels), figures of random-weight models say they
are not the paper's; and `metrics` + `report` read and write an s3:// store (moto) like a local one."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from test_remote_store import BUCKET, s3_env  # noqa: F401  (fixture)
from raycluster import job_spec
from sdfeat.report import figure_2


def _table(model: str, rows: list[dict]) -> pa.Table:
    from sdfeat.report import TIDY_SCHEMA

    full = [{f.name: None for f in TIDY_SCHEMA} | {"model": model} | r for r in rows]
    return pa.Table.from_pylist(full, schema=TIDY_SCHEMA)


def _anomaly(block: str, order: int, value: float) -> dict:
    return {"block": block, "order": order, "metric": "anomalies", "statistic": "rel_norm_mean", "value": value,
            "variant": "vs_mean"}


def test_sparse_blocks_are_points_joined_only_between_neighbours() -> None:
    table = _table("sd15", [_anomaly("conv_in", 0, 2.0), _anomaly("down_blocks.1.attentions.0", 5, 3.0),
                            _anomaly("down_blocks.1.attentions.1", 6, 4.0)])
    fig = figure_2(table)
    line = next(l for l in fig.axes[2].get_lines() if l.get_linestyle() == "-")
    x, y = line.get_data()
    assert np.isnan(x[1]) and list(np.asarray(x)[[0, 2, 3]]) == [0, 1, 2]   # broken between order 0 and 5 only
    assert line.get_marker() == "o"
    assert fig.axes[2].get_xlabel() == "block (execution order)"
    assert not [t for t in fig.texts if "random weights" in t.get_text()]   # real weights: no note


def test_detection_that_found_nothing_says_so_and_random_weights_are_marked() -> None:
    table = _table("tiny", [{"block": "up_blocks.1.upsamplers.0", "order": 30, "metric": "anomalies",
                             "statistic": "detection_n_detected", "value": 0.0, "variant": "detection"},
                            {"block": "conv_in", "order": 0, "metric": "position", "statistic": "accuracy",
                             "scale": 8, "value": 0.5}])
    fig = figure_2(table)
    texts = [t.get_text() for t in fig.axes[2].texts]
    assert texts == ["detection ran and found no anomalies; pass --labels to `sdfeat metrics`"]
    assert [t.get_text() for t in fig.axes[1].texts] == ["not computed"]
    assert "tiny: random weights, not the paper's results" in [t.get_text() for t in fig.texts]


def test_metrics_and_report_on_an_s3_store(s3_env) -> None:  # noqa: F811
    import fsspec

    from sdfeat.extract import run_local
    from sdfeat.metrics.runner import run_metrics
    from sdfeat.report import write_report

    store = f"s3://{BUCKET}/first-contact/store"
    run_local(job_spec(store, source="synthetic:8", blocks=["up_blocks.1.upsamplers.0"]), progress=False,
              device="cpu")
    written = run_metrics(store, metrics=["position", "anomalies"], local=True)
    assert written["position"] == f"{store}/results/position.parquet"  # the URL, usable as given
    results = fsspec.filesystem("s3", skip_instance_cache=True).ls(f"{BUCKET}/first-contact/store/results")
    assert f"{BUCKET}/first-contact/store/results/anomalies_detected.csv" in results
    summary = write_report([store], f"s3://{BUCKET}/first-contact/report")
    assert summary == f"s3://{BUCKET}/first-contact/report/summary.md"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/first-contact/report"))
    assert names == ["figure2_tiny-store.png", "figure2_tiny-store.svg", "maps_tiny-store.png",
                     "maps_tiny-store.svg", "summary.md"]
    text = fs.cat(f"{BUCKET}/first-contact/report/summary.md").decode()
    assert f"Store: `{store}`" in text and "best probe accuracy at S=8: " in text
