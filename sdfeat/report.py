"""Metric tables -> the paper's figures and a Markdown summary.

Input: the tidy tables the metrics write to `<store>/results/{position,corners,anomalies}.parquet` (columns
`model, block, order, metric, statistic, value, epoch, scale, group, variant`), and optionally the published
numbers of Loos & Linhardt (2025) shipped in `sdfeat/data/reference/`, converted by `load_reference` into the
same tidy form so that one plotting path draws both. The `Series` constants below are the exact rows read; they
are listed in docs/INTERNALS.md ("Metric table vocabulary"). A metric that is absent is drawn as "not computed".

Output (`write_report`): per store `figure2_<name>.{png,svg}` (the paper's Figure 2 layout), with several stores
`cross_model.{png,svg}`, and `summary.md`. Matplotlib is used through its Agg canvas only (no pyplot state).
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from sdfeat.blocks import canonical_name
from sdfeat.errors import ArgumentError, SdfeatError, StoreError

log = logging.getLogger(__name__)

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"
REFERENCE_MODELS = ("sd15", "sd21", "sdturbo")
PUBLISHED_LABEL = "published (Loos & Linhardt 2025)"
STORE_LABEL = "this store"
RESULT_TABLES = ("position", "corners", "anomalies")
PROBE_SCALES = (8, 16, 32, 64)
PAPER_PROBE_EPOCHS = 5
# The paper's 45-block list omits up_blocks.0.resnets.2, which is index 23 of the `all` (execution order) list.
PAPER_OMITTED_ORDER = 23
DPI = 150
MAP_BLOCKS = ("up_blocks.1.upsamplers.0", "up_blocks.1.resnets.2", "down_blocks.1.attentions.0")  # Figure-1 maps
MAP_SAMPLES = 2
CORNERS_EXCLUDED = frozenset({"conv_out"})  # the paper plots corners over the first 44 blocks (negative ratios)

TIDY_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("block", pa.string()),  # canonical dotted name
        ("order", pa.int64()),  # index in the `all` preset (execution order)
        ("metric", pa.string()),
        ("statistic", pa.string()),
        ("value", pa.float64()),
        ("epoch", pa.int64()),
        ("scale", pa.int64()),
        ("group", pa.string()),
        ("variant", pa.string()),
        ("paper_counts", pa.bool_()),  # corners: the reference's n-based pair counts (quirk Q3)
        # `sdfeat metrics --bootstrap` (metrics/bootstrap.py): interval, its images, and which (timestep, seed)
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("n_images", pa.int64()),
        ("timestep", pa.int64()),  # null: pooled over the store's timesteps and seeds
        ("seed", pa.int64()),
        ("pooled", pa.bool_()),
    ]
)
REQUIRED_COLUMNS = ("model", "block", "order", "metric", "statistic", "value")


@dataclass(frozen=True)
class Series:
    """The rows of a tidy table that give one number per block."""

    metric: str  # also the results file: results/<metric>.parquet
    statistic: str
    scale: int | None = None
    group: str | None = None


PROBE = {s: Series("position", "accuracy", scale=s) for s in PROBE_SCALES}
RATIO = {g: Series("corners", "ratio", group=g) for g in ("corner", "border")}
ANOMALY_MEAN = Series("anomalies", "rel_norm_mean")
ANOMALY_STD = Series("anomalies", "rel_norm_std")
# Where a table holds several variants of a series, the report plots this one (else the alphabetically first);
# corner rows with paper_counts=True come after the fixed ones. The anomaly ratio to the map mean is the paper's.
PREFERRED_VARIANT = {"position": None, "corners": "cropped/reprcropped", "anomalies": "vs_mean"}


@dataclass(frozen=True)
class Row:
    """One row of Figure 2."""

    ylabel: str
    curves: tuple[tuple[str, Series, str], ...]  # (legend label, series, colour)
    log: bool


FIGURE2_ROWS = (
    Row(
        "probe accuracy",
        tuple((f"S={s}", PROBE[s], c) for s, c in zip(PROBE_SCALES, ("#1b9e77", "#d95f02", "#7570b3", "#e7298a"))),
        log=False,
    ),
    Row(
        "relative similarity\n(cropped / repr-cropped)",
        (("corner", RATIO["corner"], "#d62728"), ("border", RATIO["border"], "#1f77b4")),
        log=True,
    ),
    Row("anomaly relative norm", (("mean ± std", ANOMALY_MEAN, "#9467bd"),), log=True),
)
CROSS_MODEL_ROWS = (
    ("probe accuracy (S=8)", PROBE[8], False),
    ("corner relative\nsimilarity", RATIO["corner"], True),
    ("border relative\nsimilarity", RATIO["border"], True),
    ("anomaly relative\nnorm (mean)", ANOMALY_MEAN, True),
)
INTERVENTION_ROWS = (  # one curve per padding mode (spec `intervention`)
    ("probe accuracy (S=64)", PROBE[64], False),
    ("corner relative\nsimilarity", RATIO["corner"], True),
    ("border relative\nsimilarity", RATIO["border"], True),
    ("anomaly relative\nnorm (mean)", ANOMALY_MEAN, True),
)


# ---------------------------------------------------------------------------------------------- tables


def load_reference(model: str) -> pa.Table:
    """The paper's per-block numbers for `model` (sd15 | sd21 | sdturbo) as a tidy table (TIDY_SCHEMA)."""
    if model not in REFERENCE_MODELS:
        raise ArgumentError(f"reference: no published numbers for '{model}' (choose from {', '.join(REFERENCE_MODELS)})")
    rows: list[dict] = []
    with (REFERENCE_DIR / f"{model}_per_block.csv").open(newline="") as f:
        for record in csv.DictReader(f):
            index = int(record["index"])
            base = {
                "model": model,
                "block": canonical_name(record["block"]),
                "order": index + (index >= PAPER_OMITTED_ORDER),
            }

            def add(series: Series, column: str, **extra: object) -> None:
                rows.append({**base, "metric": series.metric, "statistic": series.statistic, "scale": series.scale,
                             "group": series.group, "variant": PREFERRED_VARIANT[series.metric],
                             "value": float(record[column]), **extra})

            for s in PROBE_SCALES:
                add(PROBE[s], f"probe_acc_{s}", epoch=PAPER_PROBE_EPOCHS)
            for group in ("corner", "border", "other"):
                for variant in ("cropped", "reprcropped"):
                    add(Series("corners", "group_mean", group=group), f"{group}_{variant}",
                        variant=variant, paper_counts=True)
            for group, series in RATIO.items():
                add(series, f"{group}_ratio", paper_counts=True)
            add(ANOMALY_MEAN, "anomaly_rel_norm_mean")
            add(ANOMALY_STD, "anomaly_rel_norm_std")
    return pa.Table.from_pylist(rows, schema=TIDY_SCHEMA)


def _conform(table: pa.Table, path: Path) -> pa.Table:
    """Missing optional columns become nulls; types are cast to TIDY_SCHEMA; block names made dotted."""
    for column in REQUIRED_COLUMNS:
        if column not in table.column_names:
            raise StoreError(f"{path}: metric table lacks column '{column}'")
    columns = {}
    for field in TIDY_SCHEMA:
        column = table[field.name] if field.name in table.column_names else pa.nulls(len(table), field.type)
        try:
            columns[field.name] = column.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise StoreError(f"{path}: column '{field.name}' cannot be read as {field.type}: {err}") from None
    columns["block"] = pa.array([canonical_name(b) for b in columns["block"].to_pylist()], pa.string())
    return pa.table(columns, schema=TIDY_SCHEMA)


def load_results(store: str | Path) -> pa.Table:
    """All metric tables of a store (a path or URL, read through fsspec), concatenated (TIDY_SCHEMA); absent tables
    are skipped, none at all is an error."""
    from sdfeat.store import filesystem, join

    fs, root = filesystem(str(store))
    results = join(str(store), "results")
    tables = {}
    for name in RESULT_TABLES:
        if fs.exists(join(root, "results", f"{name}.parquet")):
            with fs.open(join(root, "results", f"{name}.parquet"), "rb") as f:
                tables[join(results, f"{name}.parquet")] = pq.read_table(f)
    parts = [_conform(table, path) for path, table in tables.items() if table.num_rows]  # a metric with no rows
    if not parts:
        raise StoreError(f"{results}: no metric tables ({', '.join(RESULT_TABLES)}.parquet); "
                         "run `sdfeat metrics` first")
    return pa.concat_tables(parts)


def _best_rows(table: pa.Table, series: Series) -> dict[str, dict]:
    """{block: row} of one series: the preferred variant, the pooled row where a bootstrap table has several
    (timestep, seed), and the last epoch where there are several."""
    preferred = PREFERRED_VARIANT[series.metric]
    best: dict[str, tuple[tuple, dict]] = {}
    for row in table.to_pylist():
        if (row["metric"], row["statistic"], row["scale"], row["group"]) != (
            series.metric, series.statistic, series.scale, series.group
        ):
            continue
        variant, epoch = row["variant"], row["epoch"]
        rank = (variant not in (None, preferred), bool(row["paper_counts"]), variant or "", not row.get("pooled"),
                -(epoch if epoch is not None else float("inf")))
        if row["block"] not in best or rank < best[row["block"]][0]:
            best[row["block"]] = (rank, row)
    return {block: row for block, (_, row) in best.items()}


def select(table: pa.Table, series: Series) -> dict[str, float]:
    """{block: value} of one series (the row `_best_rows` picks)."""
    return {block: row["value"] for block, row in _best_rows(table, series).items()}


def select_interval(table: pa.Table, series: Series) -> dict[str, tuple[float, float]]:
    """{block: (ci_low, ci_high)} of the rows `select` reads, where the table has intervals."""
    return {block: (row["ci_low"], row["ci_high"]) for block, row in _best_rows(table, series).items()
            if row.get("ci_low") is not None and row.get("ci_high") is not None}


def block_axis(*tables: pa.Table) -> list[str]:
    """The union of the tables' blocks, in execution order (`order` column)."""
    order: dict[str, int] = {}
    for table in tables:
        for block, position in zip(table["block"].to_pylist(), table["order"].to_pylist()):
            order.setdefault(block, position)
    return sorted(order, key=lambda b: (order[b], b))


def _on_axis(values: Mapping[str, float], blocks: Sequence[str], log_scale: bool, exclude=frozenset()) -> np.ndarray:
    """(len(blocks),) values with NaN where a block has none, is excluded, or (log axis) is not positive."""
    out = np.array([values.get(b, np.nan) if b not in exclude else np.nan for b in blocks], dtype=float)
    if log_scale:
        out[out <= 0] = np.nan
    return out


# --------------------------------------------------------------------------------------------- figures


def _new_figure(n_rows: int, n_blocks: int, height: float) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(max(10.0, 0.24 * n_blocks + 4.5), height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _style_axis(ax: Axes, ylabel: str, log_scale: bool) -> None:
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    if log_scale:
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(0, 1)


def _block_ticks(ax: Axes, blocks: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(blocks)), blocks, rotation=90, fontsize=7)
    ax.set_xlim(-0.5, len(blocks) - 0.5)


def _plot(ax: Axes, x: np.ndarray, y: np.ndarray, orders: np.ndarray | None = None, **style: object) -> None:
    """Markers at the blocks that have a value, joined only where the blocks are neighbours in execution order
    (`orders`): a store with a few blocks is not drawn as if it had the ones between them."""
    have = ~np.isnan(y)
    xs, ys = x[have].astype(float), y[have]
    if orders is not None and len(xs) > 1:
        gap = np.diff(orders[have]) > 1                          # a block left out between two drawn points
        xs = np.insert(xs, np.flatnonzero(gap) + 1, np.nan)      # NaN breaks the line there
        ys = np.insert(ys, np.flatnonzero(gap) + 1, np.nan)
    ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.4, **style)


def _orders(blocks: Sequence[str], *tables: pa.Table | None) -> np.ndarray:
    """(len(blocks),) execution-order position of each block on the axis (from the tables' `order` column)."""
    order: dict[str, int] = {}
    for table in tables:
        if table is not None:
            for block, position in zip(table["block"].to_pylist(), table["order"].to_pylist()):
                order.setdefault(block, position)
    return np.array([order.get(b, i) for i, b in enumerate(blocks)], dtype=float)


def _random_weights_note(fig: Figure, *tables: pa.Table) -> None:
    """A visible line on figures of `tiny` / `random:*` stores: their numbers are not the paper's."""
    models = sorted({m for t in tables for m in t["model"].to_pylist() if weights_note(m)})
    if models:
        fig.text(0.01, 0.995, f"{', '.join(models)}: random weights, not the paper's results", ha="left",
                 va="top", fontsize=10, color="#b22222", fontweight="bold")  # beside the centred title


def _detected_none(table: pa.Table) -> bool:
    """True when the anomaly detection ran on the store and found nothing (so there were no anomalies to measure)."""
    for row in table.to_pylist():
        if row["metric"] == "anomalies" and row["statistic"] == "detection_n_detected":
            return row["value"] == 0
    return False


def _band(ax: Axes, x: np.ndarray, intervals: Mapping[str, tuple[float, float]], blocks: Sequence[str],
          log_scale: bool, exclude=frozenset(), orders: np.ndarray | None = None, **style: object) -> None:
    """The bootstrap interval as a band around a curve (nothing where the table has no intervals), broken where
    the curve is: at blocks without an interval and between blocks that are not neighbours in execution order; a
    lone block gets a bar."""
    if not intervals:
        return
    low = _on_axis({b: v[0] for b, v in intervals.items()}, blocks, log_scale, exclude)
    high = _on_axis({b: v[1] for b, v in intervals.items()}, blocks, log_scale, exclude)
    have = np.flatnonzero(~np.isnan(low) & ~np.isnan(high))
    breaks = np.diff(have) > 1
    if orders is not None and len(have):
        breaks |= np.diff(orders[have]) > 1
    for run in np.split(have, np.flatnonzero(breaks) + 1) if len(have) else []:
        if len(run) == 1:
            ax.plot(x[run].repeat(2), [low[run[0]], high[run[0]]], alpha=0.35, linewidth=4, **style)
        else:
            ax.fill_between(x[run], low[run], high[run], alpha=0.25, linewidth=0, **style)


def _legend(ax: Axes, handles: list[Line2D]) -> None:
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False)


def _not_computed(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=12, color="0.4")


def figure_2(table: pa.Table, reference: pa.Table | None = None, title: str = "", label: str = STORE_LABEL) -> Figure:
    """The paper's Figure 2 for one model: probe accuracy, corner/border relative similarity, anomaly relative norm
    over the blocks; `reference` (a tidy table, e.g. `load_reference("sd15")`) is drawn dashed underneath."""
    blocks = block_axis(table, *([reference] if reference is not None else []))
    fig, axes = _new_figure(3, len(blocks), 9.5)
    x = np.arange(len(blocks))
    orders = _orders(blocks, table, reference)
    sources = [(table, "-", 1.0, label)] + ([(reference, "--", 0.6, PUBLISHED_LABEL)] if reference is not None else [])
    for ax, row in zip(axes, FIGURE2_ROWS):
        _style_axis(ax, row.ylabel, row.log)
        exclude = CORNERS_EXCLUDED if row.curves[0][1].metric == "corners" else frozenset()
        store_drawn = False
        for src_table, linestyle, alpha, src_label in sources:
            for curve_label, series, colour in row.curves:
                y = _on_axis(select(src_table, series), blocks, row.log, exclude)
                if np.isnan(y).all():
                    continue
                store_drawn |= src_table is table
                if src_table is reference and len(row.curves) == 1:
                    colour = "0.45"
                _plot(ax, x, y, orders, linestyle=linestyle, color=colour, alpha=alpha)
                _band(ax, x, select_interval(src_table, series), blocks, row.log, exclude, orders, color=colour)
                if series == ANOMALY_MEAN:
                    std = _on_axis(select(src_table, ANOMALY_STD), blocks, False, exclude)
                    have = ~np.isnan(y) & ~np.isnan(std)
                    low = np.maximum(y - std, 0.25 * np.nanmin(y))  # a log axis cannot show <= 0
                    ax.fill_between(x[have], low[have], (y + std)[have], color=colour, alpha=0.15, linewidth=0)
        if not store_drawn and row.curves[0][1] == ANOMALY_MEAN and _detected_none(table):
            _not_computed(ax, "detection ran and found no anomalies; pass --labels to `sdfeat metrics`")
        elif not store_drawn:
            _not_computed(ax, "not computed" if reference is None else f"not computed ({label})")
        handles = [Line2D([], [], color=c, label=lab) for lab, _, c in row.curves]
        handles += [Line2D([], [], color="0.2", linestyle=ls, alpha=a, label=src) for _, ls, a, src in sources]
        _legend(ax, handles)
    _block_ticks(axes[-1], blocks)
    axes[-1].set_xlabel("block (execution order)", fontsize=9)
    fig.suptitle(title or "Figure 2 layout", fontsize=11)
    _random_weights_note(fig, table)
    return fig


def figure_cross_model(tables: Mapping[str, pa.Table], reference: tuple[str, pa.Table] | None = None,
                       rows: Sequence[tuple[str, Series, bool]] = CROSS_MODEL_ROWS,
                       title: str = "Across models") -> Figure:
    """One line per store (label -> tidy table) per metric; `reference` = (label, table) drawn dashed grey;
    bootstrap intervals as bands where the tables have them."""
    all_tables = list(tables.values()) + ([reference[1]] if reference else [])
    blocks = block_axis(*all_tables)
    fig, axes = _new_figure(len(rows), len(blocks), 11.0)
    x = np.arange(len(blocks))
    orders = _orders(blocks, *all_tables)
    colours = [f"C{i}" for i in range(len(tables))]
    lines = [(name, t, "-", c) for (name, t), c in zip(tables.items(), colours)]
    if reference:
        lines.append((reference[0], reference[1], "--", "0.45"))
    for ax, (ylabel, series, log_scale) in zip(axes, rows):
        _style_axis(ax, ylabel, log_scale)
        exclude = CORNERS_EXCLUDED if series.metric == "corners" else frozenset()
        handles = []
        for name, table, linestyle, colour in lines:
            y = _on_axis(select(table, series), blocks, log_scale, exclude)
            if np.isnan(y).all():
                name = f"{name}: not computed"
            else:
                _plot(ax, x, y, orders, linestyle=linestyle, color=colour)
                _band(ax, x, select_interval(table, series), blocks, log_scale, exclude, orders, color=colour)
            handles.append(Line2D([], [], color=colour, linestyle=linestyle, label=name))
        _legend(ax, handles)
    _block_ticks(axes[-1], blocks)
    axes[-1].set_xlabel("block (execution order)", fontsize=9)
    fig.suptitle(title, fontsize=11)
    _random_weights_note(fig, *tables.values())
    return fig


def _has_features(store: str | Path) -> bool:
    from sdfeat.store import FEATURES, filesystem, join

    fs, root = filesystem(str(store))
    return fs.exists(join(root, FEATURES))


def intervention_label(store: str | Path) -> str | None:
    """`padding reflect (unet)` from a store's spec, `padding zeros (as released)` without an intervention; None
    where the folder holds no feature store (only results)."""
    if not _has_features(store):
        return None
    from sdfeat.store import read_attrs

    try:
        found = read_attrs(str(store))["spec"].get("intervention")
    except StoreError:
        return None
    return f"padding {found['padding']} ({found['scope']})" if found else "padding zeros (as released)"


def figure_interventions(tables: Mapping[str, pa.Table]) -> Figure:
    """One curve per intervention (label -> tidy table): probe accuracy at S=64, corner and border relative
    similarity, anomaly relative norm; bootstrap intervals as bands where the tables have them."""
    return figure_cross_model(tables, rows=INTERVENTION_ROWS, title="Padding interventions")


def save_figure(fig: Figure, out_dir: str | Path, stem: str) -> list[str]:
    """Write `<stem>.png` and `<stem>.svg` into `out_dir` (a path or URL, through fsspec); returns both. The layout,
    which dominates the cost, is computed by the PNG save and then kept for the SVG."""
    import io

    from sdfeat.store import filesystem, join

    fs, root = filesystem(str(out_dir))
    written = []
    for suffix, options in (("png", {"dpi": DPI}), ("svg", {})):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=suffix, **options)
        if suffix == "png":
            fig.set_layout_engine("none")
        with fs.open(join(root, f"{stem}.{suffix}"), "wb") as f:
            f.write(buffer.getvalue())
        written.append(join(str(out_dir), f"{stem}.{suffix}"))
    return written


def _input_images(fs, rows: Sequence[int]) -> list[np.ndarray | None]:
    """The decoded, cropped input images of store rows (as the job saw them), or None where the source is out of
    reach from here."""
    from sdfeat.sources import SampleRef, read_images
    from sdfeat.store import read_manifest

    try:
        manifest = read_manifest(fs.path)
        refs = [SampleRef(**manifest.slice(r, 1).to_pylist()[0]) for r in rows]
        return [d.pixels for d in read_images(refs, int(fs.spec.resolution))]
    except (SdfeatError, OSError, TypeError, KeyError) as err:
        log.info("token maps: input images unavailable (%s)", err)
        return [None] * len(rows)


def token_maps(store: str | Path, n_samples: int = MAP_SAMPLES, blocks: Sequence[str] = MAP_BLOCKS) -> Figure | None:
    """Figure-1 maps of the first `n_samples` usable images at the `blocks` the store holds in full (else its first
    two), first timestep and seed, each beside its input image; None for a store without full activations."""
    if not _has_features(store):
        return None
    from sdfeat.maps import figure_1
    from sdfeat.query import open_store

    fs = open_store(str(store))
    chosen = [b for b in blocks if b in fs.blocks] or fs.blocks[:2]
    rows = [int(r) for r in np.flatnonzero(fs.ok)[:n_samples]]
    if not chosen or not rows:
        return None
    panels = [(f"{fs.sample_ids[r]} · {b}", fs.read(b, [r], timestep=fs.timesteps[0], seed=fs.seeds[0])[0])
              for r in rows for b in chosen]  # each (C, H, W)
    images = _input_images(fs, rows)
    fig = figure_1(panels, title=f"token maps (timestep {fs.timesteps[0]}, seed {fs.seeds[0]})",
                   images=[images[i] for i in range(len(rows)) for _ in chosen])
    if weights_note(fs.spec.model):
        fig.text(0.01, 0.995, f"{fs.spec.model}: random weights, not the paper's results", va="top", fontsize=9,
                 color="#b22222", fontweight="bold")
    return fig


# --------------------------------------------------------------------------------------------- summary


def weights_note(model: str) -> str | None:
    """A warning when the numbers cannot be the paper's: models.py's `tiny` and `random:<name>` models."""
    if model == "tiny":
        why = "the tiny test model (a few channels, random weights)"
    elif model.startswith("random:"):
        why = f"random weights in the {model.removeprefix('random:')} architecture"
    else:
        return None
    return (f"**These numbers are not the paper's.** This store was extracted with {why}; they only show that the "
            "pipeline runs. Real results need the real Stable Diffusion weights.")


def _fmt(value: float | None) -> str:
    return "–" if value is None or np.isnan(value) else f"{value:.3f}"


def _peak(values: Mapping[str, float], exclude=frozenset()) -> tuple[str, float] | None:
    usable = {b: v for b, v in values.items() if b not in exclude and not np.isnan(v)}
    return max(usable.items(), key=lambda kv: kv[1]) if usable else None


PEAKS = (
    ("largest anomaly relative norm", ANOMALY_MEAN),
    ("largest corner relative similarity", RATIO["corner"]),
    ("largest border relative similarity", RATIO["border"]),
    ("best probe accuracy at S=8", PROBE[8]),
    ("best probe accuracy at S=64", PROBE[64]),
)


def _model_section(name: str, store: str | Path, table: pa.Table, reference: pa.Table | None, figure: str) -> list[str]:
    models = sorted(set(table["model"].to_pylist()))
    model = ", ".join(models)
    lines = [f"## {name}", "", f"Store: `{store}` — model `{model}`", ""]
    for note in sorted({n for n in map(weights_note, models) if n}):
        lines += [f"> ⚠ {note}", ""]
    lines += [f"![Figure 2 — {name}]({figure}.png)", "", "Peaks:", ""]
    for text, series in PEAKS:
        exclude = CORNERS_EXCLUDED if series.metric == "corners" else frozenset()
        peak = _peak(select(table, series), exclude)
        missing = "detected none (pass --labels to `sdfeat metrics` to measure given anomalies)" \
            if series == ANOMALY_MEAN and _detected_none(table) else "not computed"
        line = f"- {text}: " + (f"{peak[1]:.3f} at `{peak[0]}`" if peak else missing)
        published = _peak(select(reference, series), exclude) if reference is not None else None
        if published:
            line += f" (published: {published[1]:.3f} at `{published[0]}`)"
        lines.append(line)
    columns = [*(PROBE[s] for s in PROBE_SCALES), RATIO["corner"], RATIO["border"], ANOMALY_MEAN, ANOMALY_STD]
    values = [select(table, s) for s in columns]
    lines += ["",
              "| block | probe S=8 | S=16 | S=32 | S=64 | corner ratio | border ratio | anomaly mean | anomaly std |",
              "|---|" + "---:|" * len(columns)]
    for block in block_axis(table):
        lines.append(f"| `{block}` | " + " | ".join(_fmt(v.get(block)) for v in values) + " |")
    return lines + [""]


def _unique_names(stores: Sequence[str], tables: Sequence[pa.Table]) -> list[str]:
    names = []
    for store, table in zip(stores, tables):
        models = sorted(set(table["model"].to_pylist()))
        leaf = store.rstrip("/").rsplit("/", 1)[-1] if "://" in store else Path(store).resolve().name
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{'+'.join(models) or 'store'}-{leaf}")
        names.append(base if base not in names else f"{base}-{len(names)}")
    return names


def write_report(stores: list[str], out_dir: str, reference: str | None = None,
                 progress: bool = False) -> Path | str:
    """Figures (PNG + SVG) and `summary.md` for one or more stores' metric tables (stores and `out_dir` are paths
    or URLs, read and written through fsspec); returns the summary's path (a URL string for a remote out_dir)."""
    from sdfeat.store import filesystem, join

    if not stores:
        raise ArgumentError("stores: give at least one store")
    out = str(out_dir)
    out_fs, out_root = filesystem(out)
    out_fs.makedirs(out_root, exist_ok=True)
    paths = [str(s) for s in stores]
    tables = [load_results(p) for p in paths]
    ref_table = load_reference(reference) if reference else None
    names = _unique_names(paths, tables)
    lines = ["# sdfeat report", ""]
    if reference:
        lines += [f"Dashed curves: {PUBLISHED_LABEL}, model `{reference}` (read from the authors' released data).", ""]
    if len(tables) > 1:
        fig = figure_cross_model(dict(zip(names, tables)),
                                 (f"{PUBLISHED_LABEL}: {reference}", ref_table) if ref_table is not None else None)
        save_figure(fig, out, "cross_model")
        lines += ["![Across models](cross_model.png)", ""]
    interventions = [intervention_label(p) for p in paths]
    if len(tables) > 1 and len({i for i in interventions if i}) > 1:
        legend = [i or n for i, n in zip(interventions, names)]
        legend = legend if len(set(legend)) == len(legend) else [f"{i} · {n}" for i, n in zip(legend, names)]
        save_figure(figure_interventions(dict(zip(legend, tables))), out, "interventions")
        lines += ["![Padding interventions](interventions.png)", ""]
    from sdfeat.progress import TaskProgress

    with TaskProgress("report", len(names), enabled=progress) as bar:
        for name, store, table in zip(names, paths, tables):
            lines += _store_figures(name, store, table, ref_table, out)
            bar.step(name)
    with out_fs.open(join(out_root, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    summary = join(out, "summary.md") if "://" in out else Path(out) / "summary.md"
    log.info("report written to %s", summary)
    return summary


def _store_figures(name: str, store: str, table: pa.Table, ref_table: pa.Table | None, out: str) -> list[str]:
    """Figure 2 and the token maps of one store; its summary.md section."""
    stem = f"figure2_{name}"
    save_figure(figure_2(table, ref_table, title=f"{name} — Figure 2 layout"), out, stem)
    lines = _model_section(name, store, table, ref_table, stem)
    maps = token_maps(store)
    if maps is not None:
        save_figure(maps, out, f"maps_{name}")
        lines += [f"![Token maps — {name}](maps_{name}.png)", ""]
    return lines
