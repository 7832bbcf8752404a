"""The report: published reference tables, Figure 2 layout, cross-model figure, summary."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdfeat import report
from sdfeat.errors import ArgumentError, StoreError
from sdfeat.report import (
    ANOMALY_MEAN,
    PROBE,
    PUBLISHED_LABEL,
    RATIO,
    REFERENCE_DIR,
    STORE_LABEL,
    TIDY_SCHEMA,
    figure_2,
    figure_cross_model,
    figure_interventions,
    load_reference,
    load_results,
    select,
    weights_note,
    write_report,
)

# A few blocks in execution order with their `all`-preset index, including the one the paper omits (order 23).
BLOCKS = [
    ("conv_in", 0),
    ("down_blocks.0.resnets.0", 1),
    ("mid_block.attentions.0", 19),
    ("up_blocks.0.resnets.2", 23),
    ("up_blocks.1.upsamplers.0", 31),
    ("conv_out", 45),
]


def _rows(model: str, tables: tuple[str, ...]) -> dict[str, list[dict]]:
    """Rows as the metrics write them, with values known from the block's position i: probe (i+1)/10 * S/64,
    corner 1+0.5i, border 1/(1+i), anomaly mean 1+i, std 0.1. Decoys the report must not plot: an older epoch,
    corner ratios with the paper's counts (Q3), anomaly ratios to the median (Q9)."""
    out: dict[str, list[dict]] = {t: [] for t in tables}
    for i, (block, order) in enumerate(BLOCKS):
        base = {"model": model, "block": block, "order": order}
        if "position" in tables:
            for s in (8, 16, 32, 64):
                for epoch, value in ((1, -5.0), (3, (i + 1) / 10 * s / 64)):
                    out["position"].append({**base, "metric": "position", "statistic": "accuracy", "value": value,
                                            "epoch": epoch, "scale": s})
        if "corners" in tables:
            for paper_counts, bump in ((True, 100.0), (False, 0.0)):
                for group, value in (("corner", 1 + 0.5 * i), ("border", 1 / (1 + i))):
                    out["corners"].append({**base, "metric": "corners", "statistic": "ratio", "group": group,
                                           "variant": "cropped/reprcropped", "value": value + bump,
                                           "paper_counts": paper_counts})
        if "anomalies" in tables:
            for variant, bump in (("vs_median_clean", 50.0), ("vs_mean", 0.0)):
                for statistic, value in (("rel_norm_mean", 1.0 + i), ("rel_norm_std", 0.1)):
                    out["anomalies"].append({**base, "metric": "anomalies", "statistic": statistic,
                                             "variant": variant, "value": value + bump, "labels": "sd15"})
    return out


def _store(root: Path, model: str = "tiny", tables=("position", "corners", "anomalies")) -> Path:
    """A store directory holding only results/<table>.parquet."""
    (root / "results").mkdir(parents=True)
    for name, rows in _rows(model, tables).items():
        pq.write_table(pa.Table.from_pylist(rows), root / "results" / f"{name}.parquet")
    return root


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None
    return [t.get_text() for t in legend.get_texts()]


# ------------------------------------------------------------------------------------------- reference


def test_reference_is_tidy_dotted_and_matches_the_papers_peaks() -> None:
    table = load_reference("sd15")
    assert table.schema.equals(TIDY_SCHEMA)
    blocks = list(dict.fromkeys(table["block"].to_pylist()))
    assert len(blocks) == 45 and blocks[1] == "down_blocks.0.resnets.0" and "[" not in "".join(blocks)
    order = dict(zip(table["block"].to_pylist(), table["order"].to_pylist()))
    assert order["up_blocks.0.resnets.1"] == 22 and order["up_blocks.0.upsamplers.0"] == 24  # resnets.2 omitted
    assert order["conv_out"] == 45
    # PROTOCOL.md: peaks SD-1.5 3.79 at up1.upsampler; SD-Turbo 4.22 at up1.resnets[2]
    for model, block, peak in (("sd15", "up_blocks.1.upsamplers.0", 3.79), ("sdturbo", "up_blocks.1.resnets.2", 4.22)):
        means = select(load_reference(model), ANOMALY_MEAN)
        assert max(means, key=means.get) == block and means[block] == pytest.approx(peak, abs=0.005)


def test_reference_values_equal_the_shipped_csv() -> None:
    with (REFERENCE_DIR / "sd21_per_block.csv").open() as f:
        record = list(csv.DictReader(f))[30]
    table = load_reference("sd21")
    block = record["block"].replace("[", ".").replace("]", "")
    assert select(table, PROBE[16])[block] == float(record["probe_acc_16"])
    assert select(table, RATIO["border"])[block] == float(record["border_ratio"])


@pytest.mark.parametrize(("model", "n_labels"), [("sd15", 196), ("sd21", 93), ("sdturbo", 457)])
def test_reference_csvs_are_shipped(model: str, n_labels: int) -> None:
    """Row counts from PROTOCOL.md: 45 blocks, 5 probe epochs per block, the hand-labelled anomalies."""
    for kind, rows in (("per_block", 45), ("probe_by_epoch", 45 * 5), ("anomaly_labels", n_labels)):
        with (REFERENCE_DIR / f"{model}_{kind}.csv").open() as f:
            assert len(list(csv.DictReader(f))) == rows


def test_unknown_reference_names_the_argument() -> None:
    with pytest.raises(ArgumentError, match="reference: no published numbers for 'sd3'"):
        load_reference("sd3")


# ------------------------------------------------------------------------------------------- tables


def test_select_takes_the_preferred_variant_and_the_last_epoch(tmp_path) -> None:
    table = load_results(_store(tmp_path / "s"))
    assert table.schema.equals(TIDY_SCHEMA)
    assert select(table, PROBE[64]) == pytest.approx({b: (i + 1) / 10 for i, (b, _) in enumerate(BLOCKS)})
    assert select(table, RATIO["corner"])["conv_in"] == 1.0  # fixed counts, not the paper's (+100)
    assert select(table, ANOMALY_MEAN)["conv_in"] == 1.0  # the ratio to the map mean, not to the median (+50)


def test_results_missing_or_malformed_are_store_errors(tmp_path) -> None:
    with pytest.raises(StoreError, match="no metric tables"):
        load_results(tmp_path)
    (tmp_path / "results").mkdir()
    pq.write_table(pa.table({"model": ["m"], "block": ["conv_in"], "metric": ["x"]}),
                   tmp_path / "results" / "anomalies.parquet")
    with pytest.raises(StoreError, match=r"anomalies.parquet: metric table lacks column 'order'"):
        load_results(tmp_path)


def test_an_empty_metric_table_reads_as_not_computed(tmp_path) -> None:
    store = _store(tmp_path / "s", tables=("position",))
    pq.write_table(pa.table({}), store / "results" / "corners.parquet")  # what older runners wrote for no rows
    table = load_results(store)
    assert select(table, RATIO["corner"]) == {} and len(select(table, PROBE[8])) == len(BLOCKS)


def test_the_report_reads_the_rows_the_anomaly_metric_writes(tmp_path) -> None:
    from sdfeat.metrics.anomalies import anomaly_rows
    from sdfeat.metrics.results import write_results

    rows = [{"model": "tiny", "block": "conv_in", "order": 0, **r}
            for r in anomaly_rows(np.array([2.0, 4.0]), np.array([9.0, 9.0]))]
    write_results(str(tmp_path), "anomalies", rows)
    table = load_results(tmp_path)
    assert select(table, ANOMALY_MEAN) == {"conv_in": 3.0}
    assert select(table, report.ANOMALY_STD) == {"conv_in": 1.0}  # population std of (2, 4)


# ------------------------------------------------------------------------------------------- figures


def test_figure_2_layout_with_published_overlay(tmp_path) -> None:
    table = load_results(_store(tmp_path / "s"))
    fig = figure_2(table, load_reference("sd15"))
    axes = fig.axes
    assert len(axes) == 3
    assert [ax.get_yscale() for ax in axes] == ["linear", "log", "log"]
    assert axes[0].get_ylim() == (0.0, 1.0)
    labels = [t.get_text() for t in axes[2].get_xticklabels()]
    assert len(labels) == 46 and labels[0] == "conv_in" and labels[-1] == "conv_out"
    assert labels.index("up_blocks.0.resnets.1") + 1 == labels.index("up_blocks.0.resnets.2")
    assert labels.index("up_blocks.0.resnets.2") + 1 == labels.index("up_blocks.0.upsamplers.0")
    for ax in axes:
        legend = _legend_texts(ax)
        assert STORE_LABEL in legend and PUBLISHED_LABEL in legend
        assert not any("not computed" in t for t in _texts(ax))
    assert {"S=8", "S=64"} <= set(_legend_texts(axes[0])) and {"corner", "border"} <= set(_legend_texts(axes[1]))
    # the store's anomaly curve is drawn at the block positions with its values (solid, before the dashed one)
    curves = [[line for line in ax.get_lines() if line.get_linestyle() != ":"] for ax in axes]  # ":" = line at 1
    assert [line.get_linestyle() for line in curves[2]] == ["-", "--"]
    x, y = curves[2][0].get_data()
    drawn = {labels[int(i)]: v for i, v in zip(x, y) if not np.isnan(i)}  # NaN x: the line breaks at a gap
    assert drawn == pytest.approx({b: 1.0 + i for i, (b, _) in enumerate(BLOCKS)})
    # the corner row leaves conv_out out (the paper's 44 blocks)
    assert all(labels.index("conv_out") not in line.get_xdata() for line in curves[1])
    assert np.isfinite(curves[1][2].get_xdata()).sum() == 44  # the published corner curve (broken at the omitted block)
    assert [line.get_linestyle() for line in curves[0]] == ["-"] * 4 + ["--"] * 4


def test_figure_2_says_not_computed_for_a_missing_metric(tmp_path) -> None:
    table = load_results(_store(tmp_path / "s", tables=("position", "corners")))
    fig = figure_2(table)
    assert _texts(fig.axes[2]) == ["not computed"]
    assert _texts(fig.axes[0]) == [] and _texts(fig.axes[1]) == []
    with_reference = figure_2(table, load_reference("sd21"))
    assert _texts(with_reference.axes[2]) == [f"not computed ({STORE_LABEL})"]


def test_figure_2_of_the_published_numbers_alone() -> None:
    fig = figure_2(load_reference("sdturbo"), label=PUBLISHED_LABEL)
    labels = [t.get_text() for t in fig.axes[2].get_xticklabels()]
    assert len(labels) == 45 and "up_blocks.0.resnets.2" not in labels
    assert all(PUBLISHED_LABEL in _legend_texts(ax) for ax in fig.axes)


# ------------------------------------------------------------------------------------------- report


def test_weights_note() -> None:
    assert weights_note("sd15") is None and weights_note("stabilityai/sd-turbo") is None
    assert "random weights in the sd21 architecture" in weights_note("random:sd21")
    assert "not the paper's" in weights_note("tiny")


def test_write_report_one_store_against_the_published_numbers(tmp_path) -> None:
    summary = write_report([str(_store(tmp_path / "tiny-store"))], str(tmp_path / "report"), reference="sd15")
    assert summary == tmp_path / "report" / "summary.md"
    assert sorted(p.name for p in summary.parent.iterdir()) == [
        "figure2_tiny-tiny-store.png", "figure2_tiny-tiny-store.svg", "summary.md"]
    with Image.open(summary.parent / "figure2_tiny-tiny-store.png") as img:
        assert img.format == "PNG" and img.width > 1000
    text = summary.read_text()
    assert "not the paper's" in text and PUBLISHED_LABEL in text
    assert "![Figure 2 — tiny-tiny-store](figure2_tiny-tiny-store.png)" in text
    # anomaly mean 1 + i peaks at the last block; the published peak (PROTOCOL.md: 3.79) is quoted beside it
    assert "largest anomaly relative norm: 6.000 at `conv_out` (published: 3.787 at `up_blocks.1.upsamplers.0`)" in text
    # corner ratio 1 + 0.5 i peaks at the last block the paper plots corners for (conv_out left out)
    assert "largest corner relative similarity: 3.000 at `up_blocks.1.upsamplers.0`" in text


def test_write_report_two_stores_one_partial(tmp_path, monkeypatch) -> None:
    saved: dict[str, int] = {}  # stem -> number of axes; rendering is tested above and costs seconds
    monkeypatch.setattr(report, "save_figure", lambda fig, out, stem: saved.setdefault(stem, len(fig.axes)))
    tiny = _store(tmp_path / "tiny-store")
    partial = _store(tmp_path / "sd15-store", model="sd15", tables=("position", "anomalies"))
    summary = write_report([str(tiny), str(partial)], str(tmp_path / "report"))
    assert saved == {"cross_model": 4, "figure2_tiny-tiny-store": 3, "figure2_sd15-sd15-store": 3}
    text = summary.read_text()
    tiny_part, sd15_part = text.split("## sd15-sd15-store")
    assert "not the paper's" in tiny_part and "not the paper's" not in sd15_part
    assert "![Across models](cross_model.png)" in text
    assert "largest corner relative similarity: not computed" in sd15_part
    assert "| `up_blocks.1.upsamplers.0` | 0.062 | 0.125 | 0.250 | 0.500 | – | – | 5.000 | 0.100 |" in sd15_part


def test_cross_model_figure_has_one_line_per_store_and_metric(tmp_path) -> None:
    tables = {"a": load_results(_store(tmp_path / "a")),
              "b": load_results(_store(tmp_path / "b", tables=("position",)))}
    fig = figure_cross_model(tables, ("published sd21", load_reference("sd21")))
    assert len(fig.axes) == 4
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "log", "log", "log"]
    assert _legend_texts(fig.axes[0]) == ["a", "b", "published sd21"]
    assert _legend_texts(fig.axes[3]) == ["a", "b: not computed", "published sd21"]
    none_found = _store(tmp_path / "c", tables=("position",))        # detection ran and found nothing
    pq.write_table(pa.Table.from_pylist([{"model": "tiny", "block": "up_blocks.1.upsamplers.0", "order": 26,
                                          "metric": "anomalies", "statistic": "detection_n_detected", "value": 0.0,
                                          "variant": "detection"}]), none_found / "results" / "anomalies.parquet")
    fig = figure_interventions({"zeros": tables["a"], "c": load_results(none_found)})
    assert _legend_texts(fig.axes[3]) == ["zeros", "c: detected none"]


def test_write_report_without_stores_is_an_error(tmp_path) -> None:
    with pytest.raises(ArgumentError, match="stores: give at least one store"):
        write_report([], str(tmp_path))


def test_token_maps_of_an_extracted_store(tiny_store: str, tmp_path, monkeypatch) -> None:
    """The lead's session store (tiny model, 12 images, 5 blocks): maps at the 3 stored MAP_BLOCKS, 2 images."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    fig = report.token_maps(store)
    # (2 images x 3 blocks) rows x (input image, norm + colour bar, similarity + colour bar)
    assert len(fig.axes) == (2 * 3) * (1 + 2 * 2)
    assert any(ax.images and ax.images[0].get_array().ndim == 3 for ax in fig.axes)   # an RGB input image
    assert any(t.get_text() == "tiny: random weights, not the paper's results" for t in fig.texts)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert any("up_blocks.1.upsamplers.0" in t and "similarity to token" in t for t in titles)
    assert not any("mid_block" in t for t in titles)  # stored, but not a map block
    (store / "results").mkdir(exist_ok=True)
    for name, rows in _rows("tiny", ("anomalies",)).items():
        pq.write_table(pa.Table.from_pylist(rows), store / "results" / f"{name}.parquet")
    saved: list[str] = []  # rendering files is tested above and costs seconds
    monkeypatch.setattr(report, "save_figure", lambda fig, out, stem: saved.append(stem))
    summary = write_report([str(store)], str(tmp_path / "report"))
    assert saved == ["figure2_tiny-store", "maps_tiny-store"]
    assert "![Token maps — tiny-store](maps_tiny-store.png)" in summary.read_text()
    assert report.token_maps(tmp_path / "report") is None  # no features.zarr
