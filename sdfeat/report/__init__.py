"""Metric tables -> the paper's figures and a Markdown summary (`sdfeat report`).

Input: the tidy tables `sdfeat metrics` writes to `<store>/results/{position,corners,anomalies}.parquet`, read with
`results.load_results` (their schema, `results.TIDY_SCHEMA`, lives in `sdfeat.metrics.results`; which metrics
there are and what the report draws of each, the `Series` vocabulary of the rows included, in
`sdfeat.metrics.catalog`), and optionally the published numbers of Loos & Linhardt (2025), converted by
`tables.load_reference` into the same tidy form so that one plotting path draws both. A metric that is absent is
drawn as "not computed".

Output (`write_report`): per store `figure2_<name>.{png,svg}` (the paper's Figure 2 layout) and, where the folder
holds activations, `maps_<name>.{png,svg}`; with several stores `cross_model.{png,svg}` (and
`interventions.{png,svg}` when they differ in padding); and `summary.md`. The parts: `tables` (reference,
per-block selection), `figures` (drawing, saving), `stores` (token maps, intervention label), `summary` (Markdown).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from sdfeat.errors import ArgumentError
from sdfeat.metrics.catalog import ANOMALY_MEAN, ANOMALY_STD, PROBE, RATIO
from sdfeat.metrics.results import TIDY_SCHEMA, load_results, partial_note
from sdfeat.report.figures import (PUBLISHED_LABEL, STORE_LABEL, figure_2, figure_cross_model, figure_interventions,
                                   save_figure)
from sdfeat.report.stores import intervention_label, token_maps
from sdfeat.report.summary import model_section, unique_names
from sdfeat.report.tables import REFERENCE_DIR, load_reference, select, select_interval, weights_note

__all__ = [
    "ANOMALY_MEAN", "ANOMALY_STD", "PROBE", "PUBLISHED_LABEL", "RATIO", "REFERENCE_DIR", "STORE_LABEL", "TIDY_SCHEMA",
    "figure_2", "figure_cross_model", "figure_interventions", "intervention_label", "load_reference", "load_results",
    "save_figure", "select", "select_interval", "token_maps", "weights_note", "write_report",
]

log = logging.getLogger(__name__)


def write_report(stores: list[str], out_dir: str, reference: str | None = None,
                 progress: bool = False) -> Path | str:
    """Figures (PNG + SVG) and `summary.md` for one or more stores' metric tables (stores and `out_dir` are paths
    or URLs, read and written through fsspec); returns the summary's path (a URL string for a remote out_dir)."""
    from sdfeat.progress import TaskProgress
    from sdfeat.store.files import filesystem, join

    if not stores:
        raise ArgumentError("stores: give at least one store")
    paths = [str(s) for s in stores]
    tables = [load_results(p) for p in paths]  # every store's tables read before anything is written
    ref_table = load_reference(reference) if reference else None
    out = str(out_dir)
    out_fs, out_root = filesystem(out)
    out_fs.makedirs(out_root, exist_ok=True)
    names = unique_names(paths, tables)
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
    partial = " — PARTIAL (see summary.md)" if partial_note(table) else ""
    save_figure(figure_2(table, ref_table, title=f"{name} — Figure 2 layout{partial}"), out, stem)
    lines = model_section(name, store, table, ref_table, stem)
    maps = token_maps(store)
    if maps is not None:
        save_figure(maps, out, f"maps_{name}")
        lines += [f"![Token maps — {name}](maps_{name}.png)", ""]
    return lines
