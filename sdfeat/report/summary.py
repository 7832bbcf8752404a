"""The Markdown side of the report: one `summary.md` section per store (model, random-weights and partial-store
warnings, its Figure 2, the peak of each registered metric's `MetricDef.peaks` series beside the published one, and
a per-block table of the plotted values: the `MetricDef.columns` of every registered metric), and the file names
the stores go by (`figure2_<name>.png`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from sdfeat.metrics.catalog import ANOMALY_MEAN, METRICS, excluded_blocks
from sdfeat.metrics.results import partial_note
from sdfeat.report.tables import block_axis, detected_none, select, weights_note


def _fmt(value: float | None) -> str:
    return "–" if value is None or np.isnan(value) else f"{value:.3f}"


def _peak(values: Mapping[str, float], exclude=frozenset()) -> tuple[str, float] | None:
    usable = {b: v for b, v in values.items() if b not in exclude and not np.isnan(v)}
    return max(usable.items(), key=lambda kv: kv[1]) if usable else None


def model_section(name: str, store: str | Path, table: pa.Table, reference: pa.Table | None, figure: str) -> list[str]:
    """The summary.md lines of one store (`figure`: the stem of its Figure 2 files)."""
    models = sorted(set(table["model"].to_pylist()))
    model = ", ".join(models)
    lines = [f"## {name}", "", f"Store: `{store}` — model `{model}`", ""]
    for note in sorted({n for n in map(weights_note, models) if n}):
        lines += [f"> ⚠ {note}", ""]
    if partial_note(table):
        lines += [f"> ⚠ Partial: these metrics were measured with `--allow-partial` and leave part of the store out: "
                  f"{partial_note(table)}.", ""]
    lines += [f"![Figure 2 — {name}]({figure}.png)", "", "Peaks:", ""]
    for text, series in (peak for metric in METRICS.values() for peak in metric.peaks):
        exclude = excluded_blocks(series.metric)
        peak = _peak(select(table, series), exclude)
        missing = "detected none (pass --labels to `sdfeat metrics` to measure given anomalies)" \
            if series == ANOMALY_MEAN and detected_none(table) else "not computed"
        line = f"- {text}: " + (f"{peak[1]:.3f} at `{peak[0]}`" if peak else missing)
        published = _peak(select(reference, series), exclude) if reference is not None else None
        if published:
            line += f" (published: {published[1]:.3f} at `{published[0]}`)"
        lines.append(line)
    columns = [column for metric in METRICS.values() for column in metric.columns]
    values = [select(table, series) for _, series in columns]
    lines += ["",
              "| block | " + " | ".join(header for header, _ in columns) + " |",
              "|---|" + "---:|" * len(columns)]
    for block in block_axis(table):
        lines.append(f"| `{block}` | " + " | ".join(_fmt(v.get(block)) for v in values) + " |")
    return lines + [""]


def unique_names(stores: Sequence[str], tables: Sequence[pa.Table]) -> list[str]:
    """A file-name-safe name per store, `<models>-<folder>`, made unique by a suffix."""
    names = []
    for store, table in zip(stores, tables):
        models = sorted(set(table["model"].to_pylist()))
        leaf = store.rstrip("/").rsplit("/", 1)[-1] if "://" in store else Path(store).resolve().name
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{'+'.join(models) or 'store'}-{leaf}")
        names.append(base if base not in names else f"{base}-{len(names)}")
    return names
