"""The report's figures over the blocks: the paper's Figure 2 for one store, one line per store across models,
one curve per padding intervention, and `save_figure` (PNG + SVG, local or through fsspec).

Each row of a figure draws a `catalog.Series` per block from the values `tables.select` picks, with the bootstrap
interval as a band where the table has one; a series a store lacks is written "not computed". Figure 2 has one row
per registered metric with a `MetricDef.plot` (the paper's three: probe, corners, anomalies); the cross-model and
intervention figures draw each registered metric's `MetricDef.across` / `across_interventions` rows. Matplotlib is
used through its Agg canvas only (no pyplot state).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from sdfeat.metrics.catalog import ANOMALY_MEAN, ANOMALY_STD, METRICS, Plot, Row, excluded_blocks
from sdfeat.report.tables import (block_axis, block_orders, detected_none, model_family, select, select_interval,
                                  weights_note)

PUBLISHED_LABEL = "published (Loos & Linhardt 2025)"
STORE_LABEL = "this store"
DPI = 150


FIGURE2_ROW_HEIGHT = 9.5 / 3  # inches per row of Figure 2


def figure_2_rows() -> list[Plot]:
    """The rows of Figure 2: each registered metric's `MetricDef.plot`, in the registry's order."""
    return [m.plot for m in METRICS.values() if m.plot is not None]


def across_rows(interventions: bool = False) -> list[Row]:
    """The rows of the figures that draw one line per store: each registered metric's `MetricDef.across` (or
    `across_interventions`), in the registry's order."""
    return [row for m in METRICS.values() for row in (m.across_interventions if interventions else m.across)]


def _on_axis(values: Mapping[str, float], blocks: Sequence[str], log_scale: bool, exclude=frozenset()) -> np.ndarray:
    """(len(blocks),) values with NaN where a block has none, is excluded, or (log axis) is not positive."""
    out = np.array([values.get(b, np.nan) if b not in exclude else np.nan for b in blocks], dtype=float)
    if log_scale:
        out[out <= 0] = np.nan
    return out


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


def _random_weights_note(fig: Figure, *tables: pa.Table) -> None:
    """A visible line on figures of `tiny` / `random:*` stores: their numbers are not the paper's."""
    models = sorted({m for t in tables for m in t["model"].to_pylist() if weights_note(m)})
    if models:
        fig.text(0.01, 0.995, f"{', '.join(models)}: random weights, not the paper's results", ha="left",
                 va="top", fontsize=10, color="#b22222", fontweight="bold")  # beside the centred title


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
    over the blocks (a row per registered metric that has a `MetricDef.plot`); `reference` (a tidy table, e.g.
    `load_reference("sd15")`) is drawn dashed underneath."""
    blocks = block_axis(table, *([reference] if reference is not None else []))
    rows = figure_2_rows()
    fig, axes = _new_figure(len(rows), len(blocks), FIGURE2_ROW_HEIGHT * len(rows))
    x = np.arange(len(blocks))
    orders = np.asarray(block_orders(blocks, table, reference))
    sources = [(table, "-", 1.0, label)] + ([(reference, "--", 0.6, PUBLISHED_LABEL)] if reference is not None else [])
    for ax, row in zip(axes, rows):
        _style_axis(ax, row.ylabel, row.log)
        exclude = excluded_blocks(row.curves[0][1].metric)
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
        if not store_drawn and row.curves[0][1] == ANOMALY_MEAN and detected_none(table):
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
                       rows: Sequence[Row] | None = None, title: str = "Across models") -> Figure:
    """One line per store (label -> tidy table) per metric; `reference` = (label, table) drawn dashed grey;
    bootstrap intervals as bands where the tables have them. Stores of one model family share a block axis; stores
    of several families (U-Nets and a DiT: their block names differ) are drawn on the relative-depth axis, a
    block's execution order over its model's positions (0 = the first position, 1 = the last). `rows`: default
    every registered metric's `MetricDef.across`."""
    rows = across_rows() if rows is None else rows
    all_tables = list(tables.values()) + ([reference[1]] if reference else [])
    families = {id(t): model_family(t) for t in all_tables}  # (family, positions), each read once
    relative = len({family for family, _ in families.values()}) > 1
    shared = block_axis(*all_tables)

    def axis(table: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(blocks, x, execution orders) of one line."""
        if not relative:
            return shared, np.arange(len(shared)), np.asarray(block_orders(shared, *all_tables))
        blocks = block_axis(table)
        orders = np.asarray(block_orders(blocks, table))
        return blocks, orders / max(families[id(table)][1] - 1, 1), orders

    fig, axes = _new_figure(len(rows), 20 if relative else len(shared), 11.0)
    lines = [(name, t, "-", f"C{i}") for i, (name, t) in enumerate(tables.items())]
    if reference:
        lines.append((reference[0], reference[1], "--", "0.45"))
    for ax, (ylabel, series, log_scale) in zip(axes, rows):
        _style_axis(ax, ylabel, log_scale)
        exclude = excluded_blocks(series.metric)
        handles = []
        for name, table, linestyle, colour in lines:
            blocks, x, orders = axis(table)
            y = _on_axis(select(table, series), blocks, log_scale, exclude)
            if np.isnan(y).all():  # as in Figure 2: a detection that found nothing is no missing metric
                name += ": detected none" if series == ANOMALY_MEAN and detected_none(table) else ": not computed"
            else:
                _plot(ax, x, y, orders, linestyle=linestyle, color=colour)
                _band(ax, x, select_interval(table, series), blocks, log_scale, exclude, orders, color=colour)
            label = f"{name} ({families[id(table)][0]})" if relative else name
            handles.append(Line2D([], [], color=colour, linestyle=linestyle, label=label))
        _legend(ax, handles)
    if relative:
        axes[-1].set_xlim(-0.02, 1.02)
        axes[-1].set_xlabel("relative depth (block's execution order / its model's positions)", fontsize=9)
    else:
        _block_ticks(axes[-1], shared)
        axes[-1].set_xlabel("block (execution order)", fontsize=9)
    fig.suptitle(title, fontsize=11)
    _random_weights_note(fig, *tables.values())
    return fig


def figure_interventions(tables: Mapping[str, pa.Table]) -> Figure:
    """One curve per intervention (label -> tidy table) in each registered metric's `across_interventions` rows
    (the paper's: probe accuracy at S=64, corner and border relative similarity, anomaly relative norm); bootstrap
    intervals as bands where the tables have them."""
    return figure_cross_model(tables, rows=across_rows(interventions=True), title="Padding interventions")


def save_figure(fig: Figure, out_dir: str | Path, stem: str) -> list[str]:
    """Write `<stem>.png` and `<stem>.svg` into `out_dir` (a path or URL, through fsspec); returns both. The layout,
    which dominates the cost, is computed by the PNG save and then kept for the SVG."""
    from sdfeat.store.files import filesystem, join

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
