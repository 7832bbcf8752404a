"""The result schema (`sdfeat.metrics.results`) and the one Parquet writer (`store.write_parquet`): tables round-trip with
the schema's columns and types, a file with a missing or mistyped column is a one-line StoreError naming the file
and the column, and a write that fails midway leaves the old file (or none), locally and on S3 (moto)."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_remote_store import BUCKET, s3_env  # noqa: F401  (fixture)
from sdfeat import store
from sdfeat.errors import StoreError
from sdfeat.metrics.catalog import excluded_blocks
from sdfeat.metrics.results import DETECTIONS, DETECTIONS_SCHEMA, LEAD_COLUMNS, TIDY_SCHEMA, load_results, read_results, results_path, write_results

ROWS = [  # as the metrics write them: some columns only on some rows, one all-null column, one column of its own
    {"model": "tiny", "block": "conv_in", "order": 0, "metric": "position", "statistic": "accuracy", "value": 0.5,
     "epoch": 2, "scale": 8, "timestep": None, "extra_note": "a"},
    {"model": "tiny", "block": "conv_in", "order": 0, "metric": "position", "statistic": "accuracy", "value": 1,
     "epoch": 3, "scale": 64, "timestep": None, "extra_note": None, "ci_low": 0.25, "ci_high": 0.75},
]


def test_round_trip_has_the_schemas_columns_in_order_and_types(tmp_path: Path) -> None:
    path = write_results(tmp_path, "position", ROWS)
    assert path == f"{tmp_path}/results/position.parquet"
    written = pq.read_table(path)
    # on disk: lead columns first, then the schema's other columns the rows have (schema order), then the rest
    assert written.column_names == [*LEAD_COLUMNS, "epoch", "scale", "ci_low", "ci_high", "timestep", "extra_note"]
    assert written.schema.field("timestep").type == pa.int64()  # all null, still typed
    assert written.schema.field("value").type == pa.float64()  # the int 1 cast once, on write
    table = read_results(tmp_path, "position")
    assert table.column_names == [*TIDY_SCHEMA.names, "extra_note"]
    assert table.select(TIDY_SCHEMA.names).schema.equals(TIDY_SCHEMA)
    rows = table.to_pylist()
    assert [r["value"] for r in rows] == [0.5, 1.0] and [r["scale"] for r in rows] == [8, 64]
    assert rows[0]["ci_low"] is None and rows[1]["ci_low"] == 0.25 and rows[0]["group"] is None
    assert [r["extra_note"] for r in rows] == ["a", None]
    assert load_results(tmp_path).schema.equals(TIDY_SCHEMA)  # the report's view: schema columns only


def test_no_rows_writes_the_lead_columns_and_reads_as_no_table(tmp_path: Path) -> None:
    write_results(tmp_path, "corners", [])
    assert pq.read_table(results_path(tmp_path, "corners")).schema.names == LEAD_COLUMNS
    assert read_results(tmp_path, "corners").num_rows == 0
    assert read_results(tmp_path, "anomalies") is None
    with pytest.raises(StoreError, match="no metric tables"):
        load_results(tmp_path)


def test_detections_round_trip(tmp_path: Path) -> None:
    rows = [{"sample": 3, "sample_id": "img-3", "x": 4, "y": 6, "peak_ratio": 9.5}]
    write_results(tmp_path, DETECTIONS, rows)
    table = read_results(tmp_path, DETECTIONS)
    assert table.schema.equals(DETECTIONS_SCHEMA) and table.to_pylist() == rows


@pytest.mark.parametrize(("column", "values", "message"), [
    ("value", pa.array(["high"]), r"column 'value' is string, expected double"),
    ("order", pa.array([0.5]), r"column 'order' is double, expected int64"),
    ("statistic", None, r"metric table lacks column 'statistic'"),
])
def test_a_mistyped_or_missing_column_names_the_file_and_column(tmp_path: Path, column: str, values, message) -> None:
    table = pa.Table.from_pylist(ROWS[:1])
    table = table.drop_columns([column]) if values is None else table.set_column(
        table.column_names.index(column), column, values)
    (tmp_path / "results").mkdir()
    pq.write_table(table, tmp_path / "results" / "position.parquet")
    with pytest.raises(StoreError, match=message) as caught:
        read_results(tmp_path, "position")
    assert str(caught.value).startswith(f"{tmp_path}/results/position.parquet: ") and "\n" not in str(caught.value)


def test_narrower_and_null_columns_are_read_as_the_schema_types(tmp_path: Path) -> None:
    table = pa.Table.from_pylist(ROWS[:1]).drop_columns(["order", "scale"])
    table = table.append_column("order", pa.array([0], pa.int32())).append_column("scale", pa.nulls(1))
    (tmp_path / "results").mkdir()
    pq.write_table(table, tmp_path / "results" / "position.parquet")
    read = read_results(tmp_path, "position")
    assert read.schema.field("order").type == pa.int64() and read["order"].to_pylist() == [0]
    assert read.schema.field("scale").type == pa.int64() and read["scale"].to_pylist() == [None]


def test_corners_leave_out_conv_out_and_the_others_nothing() -> None:
    assert excluded_blocks("corners") == {"conv_out"}
    assert excluded_blocks("position") == excluded_blocks("anomalies") == frozenset()


# ------------------------------------------------------------------------------------ the atomic writer


def _torn_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """pq.write_table writes a few bytes of Parquet, then fails (a full disk, a killed process)."""
    def torn(table, where, **kwargs):
        where.write(b"PAR1 half a footer")
        raise OSError("no space left on device")

    monkeypatch.setattr(pq, "write_table", torn)


OLD = pa.table({"sample_id": ["a"], "reason": ["old"], "unit": pa.array([0], pa.int64())})


def _files(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))


def test_a_failed_local_write_keeps_the_old_file_and_leaves_nothing_else(tmp_path: Path, monkeypatch) -> None:
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "failures.parquet")
    store.write_parquet(fs, path, OLD)
    before = Path(path).read_bytes()
    _torn_write(monkeypatch)
    with pytest.raises(OSError, match="no space"):
        store.write_failures(str(tmp_path), [{"sample_id": "b", "reason": "new", "unit": 1}])
    with pytest.raises(OSError, match="no space"):
        store.write_manifest(str(tmp_path / "fresh"), OLD)  # no old file: none after either
    with pytest.raises(OSError, match="no space"):
        write_results(tmp_path / "fresh", "corners", [])
    monkeypatch.undo()
    assert Path(path).read_bytes() == before
    assert _files(fs, str(tmp_path)) == ["failures.parquet", "fresh"]
    assert _files(fs, str(tmp_path / "fresh")) == ["results"] and _files(fs, str(tmp_path / "fresh/results")) == []


def test_a_failed_rename_removes_the_temporary_file(tmp_path: Path, monkeypatch) -> None:
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "manifest.parquet")

    def broken_mv(*args, **kwargs):
        raise OSError("rename refused")

    monkeypatch.setattr(fs, "mv", broken_mv)
    with pytest.raises(OSError, match="rename refused"):
        store.write_parquet(fs, path, OLD)
    assert _files(fs, str(tmp_path)) == []


def test_s3_writes_are_whole_or_absent(s3_env, monkeypatch) -> None:  # noqa: F811  (fixture)
    url = f"s3://{BUCKET}/atomic/store"
    written = write_results(url, "position", ROWS)
    assert written == f"{url}/results/position.parquet"
    assert read_results(url, "position")["value"].to_pylist() == [0.5, 1.0]
    store.write_manifest(url, OLD)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    before = fs.cat(f"{BUCKET}/atomic/store/manifest.parquet")
    _torn_write(monkeypatch)
    with pytest.raises(OSError, match="no space"):
        store.write_manifest(url, pa.table({"sample_id": ["new"]}))
    with pytest.raises(OSError, match="no space"):
        write_results(url, "anomalies", ROWS)
    monkeypatch.undo()
    fs.invalidate_cache()
    assert fs.cat(f"{BUCKET}/atomic/store/manifest.parquet") == before
    assert store.read_manifest(url).equals(OLD)
    assert _files(fs, f"{BUCKET}/atomic/store") == ["manifest.parquet", "results"]
    assert _files(fs, f"{BUCKET}/atomic/store/results") == ["position.parquet"]
