"""Anomaly labels: (image_index, x_col, y_row) of a 2×2 patch's upper-left token on the up_blocks.1 maps.

Reads the paper's CSV (`image_index,x_col,y_row`, shipped under reference/) or its `.npy` (an int array of rows
(image, x, y), `labeler/high_norm_anomalies_<model>.npy`); writes the CSV. Rows come back sorted.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from sdfeat.errors import SourceError, SourceNotFoundError

COLUMNS = ("image_index", "x_col", "y_row")


def _validated(rows: np.ndarray, origin: str) -> np.ndarray:
    if rows.ndim != 2 or rows.shape[1] != 3:
        raise SourceError(f"{origin}: expected rows of (image_index, x_col, y_row), got shape {rows.shape}")
    if len(rows) and rows.min() < 0:
        raise SourceError(f"{origin}: negative image index or coordinate")
    order = np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))
    return rows[order].astype(np.int64)


def read_labels(path: str | Path) -> np.ndarray:
    """(L, 3) int64 rows (image_index, x_col, y_row) from a .csv or .npy file."""
    path = Path(path)
    if not path.exists():
        raise SourceNotFoundError(f"anomaly labels not found: {path}")
    if path.suffix == ".npy":
        return _validated(np.load(path, allow_pickle=False), str(path))
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or tuple(reader.fieldnames[:3]) != COLUMNS:
            raise SourceError(f"{path}: header must be {','.join(COLUMNS)}, got {reader.fieldnames}")
        try:
            rows = [[int(r[c]) for c in COLUMNS] for r in reader]
        except (TypeError, ValueError):
            raise SourceError(f"{path}: every value must be an integer") from None
    return _validated(np.array(rows, dtype=np.int64).reshape(-1, 3), str(path))


def write_labels(path: str | Path, labels: np.ndarray) -> Path | str:
    """Write (L, 3+) rows as the paper's CSV (extra columns, e.g. a peak ratio, are dropped); a URL (s3://…) is
    written through fsspec and returned as given."""
    if "://" in str(path):
        import fsspec

        rows = _validated(np.asarray(labels)[:, :3].astype(np.int64), str(path))
        with fsspec.open(str(path), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            w.writerows(rows.tolist())
        return str(path)
    path = Path(path)
    rows = _validated(np.asarray(labels)[:, :3].astype(np.int64), str(path))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows.tolist())
    return path
