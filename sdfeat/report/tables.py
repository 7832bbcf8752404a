"""The report's numbers: the published reference as a tidy table, and the one value per block it draws.

`load_reference` converts the per-block numbers of Loos & Linhardt (2025) shipped in `sdfeat/data/reference/`
into the tidy form of `results.TIDY_SCHEMA`, so that the figures draw a store and the paper through one path.
`select` / `select_interval` pick, per block, the row of a `catalog.Series` the report plots (the metric's
`MetricDef.preferred_variant`, pooled rows, last epoch). No drawing here (`figures`), no Markdown (`summary`).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa

from sdfeat.errors import ArgumentError
from sdfeat.metrics.catalog import ANOMALY_MEAN, ANOMALY_STD, PROBE, PROBE_SCALES, RATIO, Series, preferred_variant
from sdfeat.metrics.results import TIDY_SCHEMA
from sdfeat.models.blocks import canonical_name

REFERENCE_DIR = Path(__file__).parent.parent / "data" / "reference"
REFERENCE_MODELS = ("sd15", "sd21", "sdturbo")
PAPER_PROBE_EPOCHS = 5
# The paper's 45-block list omits up_blocks.0.resnets.2, which is index 23 of the `all` (execution order) list.
PAPER_OMITTED_ORDER = 23


def load_reference(model: str) -> pa.Table:
    """The paper's per-block numbers for `model` (sd15 | sd21 | sdturbo) as a tidy table (TIDY_SCHEMA)."""
    if model not in REFERENCE_MODELS:
        raise ArgumentError(f"reference: no published numbers for '{model}' "
                            f"(choose from {', '.join(REFERENCE_MODELS)})")
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
                             "group": series.group, "variant": preferred_variant(series.metric),
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


def _best_rows(table: pa.Table, series: Series) -> dict[str, dict]:
    """{block: row} of one series: the preferred variant (`MetricDef.preferred_variant`; else the alphabetically
    first, corner rows with paper_counts=True after the fixed ones), the pooled row where a bootstrap table has
    several (timestep, seed), and the last epoch where there are several."""
    preferred = preferred_variant(series.metric)
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


def _orders(*tables: pa.Table | None) -> dict[str, int]:
    """{block: its `order` column} over the tables (the first table that has a block says)."""
    order: dict[str, int] = {}
    for table in tables:
        if table is not None:
            for block, position in zip(table["block"].to_pylist(), table["order"].to_pylist()):
                order.setdefault(block, position)
    return order


def block_axis(*tables: pa.Table) -> list[str]:
    """The union of the tables' blocks, in execution order (`order` column)."""
    order = _orders(*tables)
    return sorted(order, key=lambda b: (order[b], b))


def block_orders(blocks: list[str], *tables: pa.Table | None) -> list[float]:
    """The execution-order position of each block on an axis (from the tables' `order` column; else its index)."""
    order = _orders(*tables)
    return [float(order.get(b, i)) for i, b in enumerate(blocks)]


def model_family(table: pa.Table) -> tuple[str, int]:
    """(family, positions in its `all` preset) of the table's model (`sdfeat.models.families`); an unknown model
    (a hub id whose config is not here) counts as SD."""
    from sdfeat.errors import SdfeatError
    from sdfeat.models.blocks import preset_names
    from sdfeat.models.families import for_config
    from sdfeat.models.registry import unet_config

    models = table["model"].to_pylist() if "model" in table.column_names else []
    try:
        config = unet_config(models[0]) if models else None
    except SdfeatError:
        config = None
    family = for_config(config).NAME if config is not None else "sd"
    return family, len(preset_names("all", config))


def detected_none(table: pa.Table) -> bool:
    """True when the anomaly detection ran on the store and found nothing (so there were no anomalies to measure)."""
    for row in table.to_pylist():
        if row["metric"] == "anomalies" and row["statistic"] == "detection_n_detected":
            return row["value"] == 0
    return False


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
