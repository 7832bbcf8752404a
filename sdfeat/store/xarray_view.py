"""The xarray view of a store (`FeatureStore.to_xarray`): what plain `xr.open_zarr("<store>/features.zarr")` gives,
with the rows that hold no activations masked lazily.

A store written by this version reads NaN in such rows by itself: its floating arrays have NaN as fill value (an
unfinished unit's rows were never written) and workers write NaN into the rows of failed images
(`store.missing_value`). Two kinds of rows need the `ok` coordinate all the same: those of stores written before
NaN was the fill value (they hold 0) and those of a unit killed between writing its data and its `ok` flags. So
every activation variable of a store with rows not `ok` is wrapped here: each read returns NaN in those rows,
reading only what was asked for (no eager load of the store). A store whose rows are all `ok` is returned as plain
xarray opens it. Numpy, zarr and xarray only.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from sdfeat import store

ROW_DIMS = ("sample", "crop_sample")  # the first dimension of every per-row array


class _OkRows(BackendArray):
    """One variable read lazily, NaN in its rows whose `ok` is false. Outer indexing, as zarr reads."""

    def __init__(self, variable: xr.Variable, ok: np.ndarray) -> None:
        self.variable, self.ok = variable, ok  # ok: (rows,) bool, the variable's first dimension
        self.shape, self.dtype = variable.shape, variable.dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._read)

    def _read(self, key: tuple) -> np.ndarray:
        values = np.array(self.variable[key].values)  # a writable copy of just the selection
        missing = ~self.ok[key[0]]                     # () for one row (its axis dropped), else (k,)
        if np.ndim(missing) == 0:
            return np.full_like(values, np.nan) if missing else values
        values[missing] = np.nan
        return values


def open_dataset(path: str, crop: int | None = None, crop_samples: int | None = None) -> xr.Dataset:
    """Every block of the store at `path` (or of its crop variant `crop`, whose arrays hold the first
    `crop_samples` rows) with named dims; `sample` indexed by sample id, `sample_id`, `label`, `ok` as coordinates;
    rows without activations NaN."""
    features = store.join(path, store.FEATURES)
    ds = xr.open_zarr(features, group=None if crop is None else f"crops/{crop}", consolidated=None)
    if crop is None:  # stores written before the coordinates were recorded are completed here
        ds = ds.set_coords([c for c in ("sample_id", "label", "ok") if c in ds.data_vars])
        if "sample" not in ds.indexes:
            ds = ds.assign_coords(sample=ds["sample_id"].values)
        ok = np.asarray(ds["ok"].values, dtype=bool)
    else:
        ok = np.asarray(xr.open_zarr(features, consolidated=None)["ok"].values, dtype=bool)[:crop_samples]
    if ok.all():
        return ds
    for name, var in ds.data_vars.items():
        if var.dims and var.dims[0] in ROW_DIMS and np.dtype(var.dtype).kind == "f":
            masked = indexing.LazilyIndexedArray(_OkRows(var.variable, ok[: var.shape[0]]))
            ds[name] = xr.Variable(var.dims, masked, var.attrs, var.encoding)
    return ds
