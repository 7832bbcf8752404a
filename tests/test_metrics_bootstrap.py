"""Bootstrap intervals: the documented seed scheme, agreement with an independent numpy bootstrap, 1/sqrt(n)
shrinkage, and on real tiny-model stores: containment, per-(timestep, seed) and pooled rows, the same point values
as without the bootstrap, determinism, `compare` (paired and independent), the report's bands and the padding
figure."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from conftest import small_spec
from metrics_helpers import one_torch_thread  # noqa: F401  (autouse fixture)

from sdfeat import report
from sdfeat.metrics.bootstrap import AnomalyParts, Collected, CornerParts, interval_rows, replicate_weights
from sdfeat.metrics.corners import VARIANTS
from sdfeat.metrics.labels import write_labels
from sdfeat.metrics.position import ProbeSettings
from sdfeat.metrics.runner import MetricOptions, run_metrics

BLOCKS = ["conv_in", "down_blocks.1.attentions.0", "up_blocks.1.upsamplers.0"]
KEY = ["block", "metric", "statistic", "epoch", "scale", "group", "variant", "paper_counts"]


def _collected(parts, n: int) -> Collected:
    return Collected(features=None, block="b", sample_ids=[f"s{i}" for i in range(n)], parts={(50, 42): parts})


def _independent(n: int, replicates: int, seed: int, statistic) -> tuple[float, float]:
    """A plain bootstrap: draw image indices with the documented generator, evaluate, 2.5/97.5 percentiles."""
    values = [statistic(np.random.default_rng([seed, b]).integers(0, n, n)) for b in range(replicates)]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def test_replicate_weights_follow_the_documented_scheme() -> None:
    w = replicate_weights(7, 3, 11)
    assert w.tolist() == np.bincount(np.random.default_rng([11, 3]).integers(0, 7, 7), minlength=7).tolist()
    assert w.sum() == 7
    assert not np.array_equal(replicate_weights(50, 0, 11), replicate_weights(50, 1, 11))
    assert not np.array_equal(replicate_weights(50, 0, 11, stream=0), replicate_weights(50, 0, 11, stream=1))
    np.testing.assert_array_equal(replicate_weights(50, 4, 2), replicate_weights(50, 4, 2))


def test_corner_ratio_equals_an_independent_bootstrap() -> None:
    rng = np.random.default_rng(5)
    n, m = 9, 6
    shapes = {"groups": (3, 3), "groups_diag": (3,), "corner_groups": (4, 3)}
    sums = {f"{v}/{k}": rng.uniform(0.5, 2.0, (n, *shape)) for v in VARIANTS for k, shape in shapes.items()}
    rows = interval_rows(_collected(CornerParts(m, np.arange(n), sums, False), n), 300, seed=7)
    got = next(r for r in rows if r["statistic"] == "ratio" and r["group"] == "border")
    cropped, repr_ = sums["cropped/groups"][:, 1, 1], sums["reprcropped/groups"][:, 1, 1]
    low, high = _independent(n, 300, 7, lambda idx: cropped[idx].sum() / repr_[idx].sum())  # pair counts cancel
    assert got["value"] == pytest.approx(cropped.sum() / repr_.sum(), rel=1e-12)
    assert got["ci_low"] == pytest.approx(low, rel=1e-12) and got["ci_high"] == pytest.approx(high, rel=1e-12)
    assert got["ci_low"] < got["value"] < got["ci_high"] and got["n_images"] == n


def test_anomaly_mean_equals_an_independent_bootstrap() -> None:
    """Labels cluster in images (0, 2 or 3 per image): the image, not the label, is resampled."""
    index = np.array([0, 0, 1, 3, 4, 4, 4, 7])
    vs_mean = np.array([3.0, 2.5, 4.0, 1.5, 2.0, 2.2, 5.0, 3.3])
    rows = interval_rows(_collected(AnomalyParts(index, vs_mean, vs_mean / 2, "given"), 8), 400, seed=3)
    got = next(r for r in rows if r["statistic"] == "rel_norm_mean" and r["variant"] == "vs_mean")

    def mean_of_drawn_images(idx: np.ndarray) -> float:
        drawn = np.concatenate([vs_mean[index == i] for i in idx])
        return float(drawn.mean()) if len(drawn) else float("nan")

    values = [mean_of_drawn_images(np.random.default_rng([3, b]).integers(0, 8, 8)) for b in range(400)]
    low, high = np.nanpercentile(values, [2.5, 97.5])
    assert got["value"] == pytest.approx(vs_mean.mean())
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((low, high), rel=1e-12)
    assert got["n_images"] == 5


def test_width_shrinks_as_one_over_sqrt_n() -> None:
    """One label per image, relative norms ~ N(2, 0.5²): the 95 % width is ≈ 2·1.96·0.5/√n."""
    widths = {}
    for n in (50, 200):
        values = np.random.default_rng(n).normal(2.0, 0.5, n)
        rows = interval_rows(_collected(AnomalyParts(np.arange(n), values, values, "given"), n), 1000, seed=0)
        got = next(r for r in rows if r["statistic"] == "rel_norm_mean" and r["variant"] == "vs_mean")
        widths[n] = got["ci_high"] - got["ci_low"]
        assert widths[n] == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(n), rel=0.2)
    assert widths[50] / widths[200] == pytest.approx(2.0, rel=0.2)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """Tiny-model stores with crops: zeros (two timesteps), reflect (same images), and one of other images."""
    from sdfeat.extract import run_local

    root = tmp_path_factory.mktemp("bootstrap")
    made = {}
    for name, extra in (("zeros", {"timesteps": [50, 200]}),
                        ("reflect", {"timesteps": [50, 200], "intervention": {"padding": "reflect"}}),
                        ("other", {"source": "synthetic:8", "timesteps": [50]})):
        made[name] = str(root / name)
        run_local(small_spec(made[name], blocks=BLOCKS, variants={"crops": "auto"}, unit_size=12, batch_size=6,
                             **extra), progress=False, device="cpu")
    # on the 8×8 up_blocks.1.upsamplers.0 maps (128 px), two in image 3
    made["labels"] = str(write_labels(root / "labels.csv", np.array([[1, 4, 6], [3, 0, 0], [3, 2, 2], [7, 6, 4],
                                                                      [10, 2, 6]])))
    return made


def _options(bootstrap: int) -> MetricOptions:
    return MetricOptions(probe=ProbeSettings(epochs=2), chunk_images=5, bootstrap=bootstrap, probe_repeats=2)


def _tables(store: str, labels: str, bootstrap: int) -> dict[str, pd.DataFrame]:
    paths = run_metrics(store, local=True, labels=labels, options=_options(bootstrap))
    return {m: pd.read_parquet(p) for m, p in paths.items()}


def test_store_intervals(stores: dict[str, str]) -> None:
    plain = _tables(stores["zeros"], stores["labels"], 0)
    boot = _tables(stores["zeros"], stores["labels"], 120)
    detections = boot["anomalies"][boot["anomalies"].statistic.str.startswith("detection_")]
    assert set(detections.statistic) == {f"detection_{k}" for k in ("precision", "recall", "n_detected",
                                                                    "n_labels", "matched")}
    counted = detections[detections.value.notna()]
    assert len(counted) >= 3 and counted.ci_low.notna().all() and (counted.n_images == 12).all()
    assert (counted.ci_low <= counted.value).all() and (counted.value <= counted.ci_high).all()
    for metric, df in boot.items():
        rows = df[~df.statistic.str.startswith("detection_")]  # detections: one timestep (above)
        assert len(rows) and rows.ci_low.notna().all() and (rows.n_images > 0).all(), metric
        valued = rows[rows.value.notna()]
        assert len(valued) == len(rows) or metric == "position", metric  # position_error of an empty split
        assert (valued.ci_low <= valued.value + 1e-12).all() and (valued.value <= valued.ci_high + 1e-12).all()
        combos = {(None if pd.isna(t) else int(t), None if pd.isna(s) else int(s), bool(p))
                  for t, s, p in zip(rows.timestep, rows.seed, rows.pooled)}
        assert combos == {(50, 42, False), (200, 42, False), (None, None, True)}, metric
        # the first (timestep, seed) holds the same numbers as the run without intervals
        first = rows[(rows.timestep == 50) & (rows.seed == 42)]
        base = plain[metric][~plain[metric].statistic.str.startswith("detection_")]
        keys = [k for k in KEY if k in base.columns]
        merged = base.merge(first, on=keys, suffixes=("", "_boot"))
        assert len(merged) == len(base) == len(first)
        np.testing.assert_allclose(merged.value_boot, merged.value, rtol=1e-9, equal_nan=True)
    pos = boot["position"]
    at = {k: pos[(pos.statistic == "accuracy") & (pos.epoch == 2) & (pos.scale == 8) & sel].set_index("block").value
          for k, sel in (("t50", pos.timestep == 50), ("t200", pos.timestep == 200), ("pooled", pos.pooled))}
    # same test images at both timesteps: the pooled accuracy is their mean
    np.testing.assert_allclose(at["pooled"], (at["t50"] + at["t200"]) / 2, rtol=1e-12)
    again = _tables(stores["zeros"], stores["labels"], 120)
    for metric in boot:
        pd.testing.assert_frame_equal(boot[metric], again[metric])


def test_compare_paired_and_independent(stores: dict[str, str]) -> None:
    from sdfeat.metrics.compare import HEADER, compare_stores, table_rows

    opts = MetricOptions(probe=ProbeSettings(epochs=1), bootstrap=200, probe_repeats=1, timestep=50)
    rows = compare_stores(stores["zeros"], stores["reflect"], metrics=["corners", "anomalies"], local=True,
                          labels=stores["labels"], options=opts)
    assert rows and {r["pairing"] for r in rows} == {"paired"}
    plain = {name: _tables(stores[name], stores["labels"], 0) for name in ("zeros", "reflect")}
    for r in rows:
        assert r["ci_low"] <= r["difference"] <= r["ci_high"]
        assert r["excludes_zero"] == (r["ci_low"] > 0 or r["ci_high"] < 0)
    ratio = {name: plain[name]["corners"].set_index(["block", "statistic", "group"]).value for name in plain}
    conv_in = next(r for r in rows if r["block"] == "conv_in" and r["series"] == "ratio corner")
    key = ("conv_in", "ratio", "corner")
    assert conv_in["difference"] == pytest.approx(ratio["reflect"][key] - ratio["zeros"][key], rel=1e-9)
    cells = table_rows(rows)
    assert HEADER[:6] == ["block", "metric", "series", "A", "B", "B-A"] and len(cells) == len(rows)
    assert all(len(line) == len(HEADER) and not any(c.startswith("+nan") for c in line) for line in cells)
    assert cells[rows.index(conv_in)][5] == f"{conv_in['difference']:+.4g}"
    other = compare_stores(stores["zeros"], stores["other"], metrics=["corners"], blocks=["conv_in"], local=True,
                           options=opts)
    assert {r["pairing"] for r in other} == {"independent"} and {(r["n_a"], r["n_b"]) for r in other} == {(12, 8)}


def test_compare_cli_plain_and_json(stores: dict[str, str]) -> None:
    from typer.testing import CliRunner

    from sdfeat.cli.app import app

    args = ["compare", stores["zeros"], stores["reflect"], "--local", "--metric", "corners", "--block", "conv_in",
            "--bootstrap", "50", "--timestep", "50"]
    plain = CliRunner().invoke(app, args)
    assert plain.exit_code == 0, plain.output
    assert "┃" not in plain.output  # piped: a plain table, tab-separated
    header = next(line for line in plain.output.splitlines() if not line.startswith("#"))
    assert header.split("\t")[:6] == ["block", "metric", "series", "A", "B", "B-A"]
    found = CliRunner().invoke(app, [*args, "--json"])
    rows = json.loads(found.stdout)
    assert {r["series"] for r in rows} == {"ratio corner", "ratio border", "ratio other"}
    missing = CliRunner().invoke(app, ["compare", stores["zeros"], stores["other"], "--local", "--block", "mid_block"])
    assert missing.exit_code == 2


def test_report_bands_and_padding_figure(stores: dict[str, str], tmp_path, monkeypatch) -> None:
    for name in ("zeros", "reflect"):
        run_metrics(stores[name], local=True, labels=stores["labels"], metrics=["corners", "anomalies"],
                    options=_options(60))
    tables = {name: report.load_results(stores[name]) for name in ("zeros", "reflect")}
    fig = report.figure_interventions(tables)
    corner_axis = fig.axes[1]
    bars = [line for line in corner_axis.lines if line.get_linewidth() == 4]  # a lone block's interval
    assert len(corner_axis.collections) + len(bars) == 2 * 3  # 3 blocks, not neighbours: a bar each, per store
    assert report.select_interval(tables["zeros"], report.RATIO["corner"])  # from the pooled rows
    saved: dict[str, list[str]] = {}

    def keep(fig, out, stem):
        legend = fig.axes[1].get_legend()  # the corner ratios (the maps figures have none)
        saved[stem] = [t.get_text() for t in legend.get_texts()] if legend else []

    monkeypatch.setattr(report, "save_figure", keep)
    summary = report.write_report([stores["zeros"], stores["reflect"]], str(tmp_path / "report"))
    assert saved["interventions"] == ["padding zeros (as released)", "padding reflect (unet)"]
    assert "![Padding interventions](interventions.png)" in summary.read_text()


@pytest.mark.ray
def test_ray_tasks_give_the_local_intervals(stores: dict[str, str]) -> None:
    import ray

    opts = replace(_options(80), timestep=50)
    metrics = ["corners", "position"]
    local = {m: pd.read_parquet(p) for m, p in run_metrics(stores["zeros"], metrics, local=True, options=opts).items()}
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # own cluster; tasks only (no actors)
    try:
        remote = {m: pd.read_parquet(p) for m, p in run_metrics(stores["zeros"], metrics, options=opts).items()}
    finally:
        ray.shutdown()
    for m in metrics:
        pd.testing.assert_frame_equal(local[m], remote[m])


def test_summary_store_gives_the_full_store_intervals(stores: dict[str, str], tmp_path) -> None:
    """Full-ImageNet mode: per-image summaries carry the same per-image contributions as the full tensors."""
    from sdfeat.extract import run_local

    output = str(tmp_path / "summary")
    run_local(small_spec(output, blocks=[], summaries={"blocks": BLOCKS, "tokens_per_image": 8}, timesteps=[50],
                         variants={"crops": "auto"}), progress=False, device="cpu")
    opts = replace(_options(100), timestep=50)
    got = {}
    for name, path in (("full", stores["zeros"]), ("summary", output)):
        paths = run_metrics(path, metrics=["corners", "anomalies", "position"], labels=stores["labels"], local=True,
                            options=opts)
        got[name] = {m: pd.read_parquet(p) for m, p in paths.items()}
    for metric in ("corners", "anomalies"):
        full, summary = (got[k][metric].query("~statistic.str.startswith('detection_')", engine="python")
                         for k in ("full", "summary"))
        keys = [k for k in KEY if k in full.columns]
        merged = full.merge(summary, on=keys, suffixes=("", "_s"))
        assert len(merged) == len(full) > 0
        for column in ("value", "ci_low", "ci_high"):  # the full store holds fp16, summaries come from fp32
            np.testing.assert_allclose(merged[column + "_s"], merged[column], rtol=3e-3, equal_nan=True)
    probe = got["summary"]["position"]
    assert (probe.variant == "summary_tokens").all() and probe.ci_low.notna().all()
    assert (probe.ci_low <= probe.value + 1e-12).all() and (probe.value <= probe.ci_high + 1e-12).all()
