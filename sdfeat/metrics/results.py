"""The metric result schema: what `sdfeat metrics` writes to `<store>/results/` and how it is read back.

A results table is tidy, one row per number: the lead columns `LEAD_COLUMNS` (model, block, order, metric,
statistic, value), then the columns a metric adds. `TIDY_SCHEMA` types the lead columns and every column the
metrics share (epoch, scale, group, variant, paper_counts, labels, and the bootstrap's ci_low, ci_high, n_images,
timestep, seed, pooled); a column outside it is kept as written. The label-free anomaly detections go to
`<store>/results/anomalies_detected.parquet` (`DETECTIONS_SCHEMA`).

The metrics runner writes with `write_results` (columns in schema order, cast to the schema's types once,
atomically through `store.write_parquet`), to `<store>/results/` or a folder of the user's (`sdfeat metrics
--results DIR`); the report, `sdfeat compare` and the explorer read with `read_results` / `load_results` (a store or
such a folder: `results_folder`), which check every file against the schema (a missing or mistyped column is a
one-line StoreError naming the file and column). A table measured over part of a store (`--allow-partial`) says so
in its Parquet metadata (`partial_note`). Which tables there are says the metric registry (`catalog.METRICS`:
one table per metric, in its order). Torch-free: pyarrow and the store's fsspec helpers only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sdfeat import store
from sdfeat.errors import StoreError
from sdfeat.metrics.catalog import METRICS
from sdfeat.models.blocks import canonical_name

RESULTS = "results"  # the folder under a store
DETECTIONS = "anomalies_detected"  # results/anomalies_detected.parquet (+ .csv in the paper's label format)

LEAD_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("block", pa.string()),  # canonical dotted name
        ("order", pa.int64()),  # index in the `all` preset (execution order)
        ("metric", pa.string()),
        ("statistic", pa.string()),
        ("value", pa.float64()),
    ]
)
LEAD_COLUMNS: list[str] = LEAD_SCHEMA.names
TIDY_SCHEMA = pa.schema(
    [
        *LEAD_SCHEMA,
        ("epoch", pa.int64()),  # position: the probe's epoch
        ("scale", pa.int64()),  # position: the grid size S (or the map size n for cell accuracy and error)
        ("group", pa.string()),  # corners: corner | border | other, or a pair "corner|border"
        ("variant", pa.string()),
        ("paper_counts", pa.bool_()),  # corners: the reference's n-based pair counts (quirk Q3)
        ("labels", pa.string()),  # anomalies: where the labels came from (given | detected)
        # `sdfeat metrics --bootstrap` (metrics/bootstrap.py): interval, its images, and which (timestep, seed)
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("n_images", pa.int64()),
        ("timestep", pa.int64()),  # null: pooled over the store's timesteps and seeds
        ("seed", pa.int64()),
        ("pooled", pa.bool_()),
    ]
)
DETECTIONS_SCHEMA = pa.schema(
    [
        ("sample", pa.int64()),  # store row
        ("sample_id", pa.string()),
        ("x", pa.int64()),  # token column of the unpooled detection map
        ("y", pa.int64()),  # token row
        ("peak_ratio", pa.float64()),
    ]
)


def _schema(name: str) -> tuple[pa.Schema, list[str]]:
    """(schema, columns every file must have) of the table `name`."""
    return (DETECTIONS_SCHEMA, DETECTIONS_SCHEMA.names) if name == DETECTIONS else (TIDY_SCHEMA, LEAD_COLUMNS)


PARTIAL_KEY = b"sdfeat:partial"  # Parquet metadata: what a table measured over part of a store left out


def results_folder(path: str | Path) -> str:
    """The folder of `path`'s tables: `<store>/results` for a store (also before any table is written), or `path`
    itself when it holds tables and no results/ folder (`sdfeat metrics --results DIR`)."""
    text = str(path)
    fs, root = store.filesystem(text)
    if not fs.exists(store.join(root, RESULTS)) and \
            any(fs.exists(store.join(root, f"{name}.parquet")) for name in (*METRICS, DETECTIONS)):
        return text
    return store.join(text, RESULTS)


def results_path(store_path: str | Path, name: str) -> str:
    """`<store>/results/<name>.parquet` (a path or URL, as the store was given; see `results_folder`)."""
    return store.join(results_folder(store_path), f"{name}.parquet")


def results_table(rows: Sequence[dict], name: str = "") -> pa.Table:
    """Rows -> the table `write_results` writes: the required columns, then the schema's other columns that the
    rows have, in schema order and of the schema's types; then any other column, as pyarrow infers it."""
    schema, required = _schema(name)
    keys = dict.fromkeys(key for row in rows for key in row)
    fields = [f for f in schema if f.name in required or f.name in keys]
    columns = {}
    for f in fields:
        try:
            columns[f.name] = pa.array([row.get(f.name) for row in rows], f.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as err:
            raise StoreError(f"results/{name}.parquet: column '{f.name}' is not {f.type} ({err})") from None
    extra = [k for k in keys if k not in schema.names]
    for key in extra:
        columns[key] = pa.array([row.get(key) for row in rows])
    return pa.table(columns, schema=pa.schema([*fields, *((k, columns[k].type) for k in extra)]))


def write_results(store_path: str | Path, name: str, rows: Sequence[dict], folder: str | None = None,
                  partial: str | None = None) -> str:
    """Write `<store>/results/<name>.parquet` (or `<folder>/<name>.parquet`), atomically: readers see the old table
    or the new one; returns its path. `partial`: what the table leaves out of the store (`partial_note`). Rerunning
    with the same rows writes the same table."""
    path = store.join(folder or store.join(str(store_path), RESULTS), f"{name}.parquet")
    filesystem, target = store.filesystem(path)
    filesystem.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    table = results_table(rows, name)
    if partial:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), PARTIAL_KEY: partial.encode()})
    store.write_parquet(filesystem, target, table)
    return path


def partial_note(table: pa.Table) -> str | None:
    """What a table measured over part of a store leaves out (`sdfeat metrics --allow-partial`), or None."""
    note = (table.schema.metadata or {}).get(PARTIAL_KEY)
    return note.decode() if note else None


def _widens(found: pa.DataType, wanted: pa.DataType) -> bool:
    """Whether a column of type `found` reads losslessly as `wanted` (a narrower int, a float32, a large string)."""
    if pa.types.is_int64(wanted):
        return pa.types.is_integer(found)
    if pa.types.is_float64(wanted):
        return pa.types.is_floating(found) or pa.types.is_integer(found)
    if pa.types.is_string(wanted):
        return pa.types.is_large_string(found)
    return False


def conform(table: pa.Table, name: str, where: str) -> pa.Table:
    """`table` checked against the schema of `name`: required columns present, every schema column of its type
    (all-null and losslessly widening columns are cast), absent optional columns as nulls, in schema order; other
    columns follow as they are. `where` names the file in errors."""
    schema, required = _schema(name)
    if table.num_rows == 0 and table.num_columns == 0:  # an empty table written without columns
        return schema.empty_table()
    for column in required:
        if column not in table.column_names:
            kind = "detections" if name == DETECTIONS else "metric"
            raise StoreError(f"{where}: {kind} table lacks column '{column}'; run `sdfeat metrics` again")
    columns = {}
    for f in schema:
        if f.name not in table.column_names:
            columns[f.name] = pa.nulls(table.num_rows, f.type)
            continue
        column = table[f.name]
        if column.type != f.type and not (pa.types.is_null(column.type) or _widens(column.type, f.type)):
            raise StoreError(f"{where}: column '{f.name}' is {column.type}, expected {f.type}; run `sdfeat metrics` "
                             "again")
        columns[f.name] = column.cast(f.type)
    if name != DETECTIONS:
        columns["block"] = pa.array([canonical_name(b) for b in columns["block"].to_pylist()], pa.string())
    extra = [c for c in table.column_names if c not in schema.names]
    out = pa.table(columns, schema=schema)
    for c in extra:
        out = out.append_column(table.schema.field(c), table[c])
    return out


def read_results(store_path: str | Path, name: str) -> pa.Table | None:
    """`<store>/results/<name>.parquet` (see `results_folder`) checked against its schema (`conform`), its partial
    note kept; None when the file is absent."""
    where = results_path(store_path, name)
    filesystem, path = store.filesystem(where)
    if not filesystem.exists(path):
        return None
    try:
        with filesystem.open(path, "rb") as f:
            table = pq.read_table(f)
    except (pa.ArrowInvalid, OSError) as err:
        raise StoreError(f"{where}: not a readable Parquet file ({' '.join(str(err).split())[:120]})") from None
    note = partial_note(table)
    table = conform(table, name, where)
    return table.replace_schema_metadata({PARTIAL_KEY: note.encode()}) if note else table


def load_results(store_path: str | Path) -> pa.Table:
    """All metric tables of a store (a path or URL; or a folder of tables, `results_folder`), concatenated
    (`TIDY_SCHEMA` columns), with the partial notes of its tables; absent or empty tables are skipped, none at all is
    a StoreError."""
    store.refuse_file(str(store_path))
    tables = [read_results(str(store_path), name) for name in METRICS]
    parts = [t for t in tables if t is not None and t.num_rows]
    if not parts:
        raise StoreError(f"{results_folder(store_path)}: no metric tables ({', '.join(METRICS)}.parquet); "
                         "run `sdfeat metrics` first")
    notes = list(dict.fromkeys(n for n in map(partial_note, parts) if n))
    table = pa.concat_tables([t.select(TIDY_SCHEMA.names).replace_schema_metadata(None) for t in parts])
    return table.replace_schema_metadata({PARTIAL_KEY: "; ".join(notes).encode()}) if notes else table
