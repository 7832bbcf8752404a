"""Read a feature store: blocks, samples, activations as numpy, an xarray view, a summary, and a verification.

    >>> features = open_store("out/demo")  # a FeatureStore
    >>> features.read("up_blocks.1.upsamplers.0", samples=["synthetic#00003"], timestep=50)  # (1, seed, C, y, x)

Only numpy, zarr and xarray: a store can be queried on a machine without torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import zarr

from sdfeat import store
from sdfeat.errors import MissingRowsWarning, RowNotReadyError, StoreError, UnknownBlockError
from sdfeat.store.schema import StoreAttrs
from sdfeat.spec import JobSpec, parse_spec, spec_hash

Samples = None | slice | int | str | Sequence[int] | Sequence[str]


@dataclass
class FeatureStore:
    path: str

    @cached_property
    def attrs(self) -> StoreAttrs:
        return store.read_attrs(self.path)

    @cached_property
    def group(self) -> zarr.Group:
        return store.open_features(self.path)

    @cached_property
    def spec(self) -> JobSpec:
        return parse_spec(self.attrs.spec, origin=f"{self.path} (stored spec)")

    @property
    def blocks(self) -> list[str]:
        return list(self.attrs.blocks)

    @property
    def crops(self) -> list[int]:
        return list(self.attrs.crops)

    @property
    def crop_samples(self) -> int:
        """Crop variants (arrays and summaries) exist for store rows 0..crop_samples-1 (`variants.samples`)."""
        return self.attrs.crop_samples

    @cached_property
    def sample_ids(self) -> list[str]:
        return [str(s) for s in self.group["sample_id"][:]]

    @cached_property
    def labels(self) -> np.ndarray:
        return np.asarray(self.group["label"][:])

    @property
    def ok(self) -> np.ndarray:
        return np.asarray(self.group["ok"][:])

    @property
    def timesteps(self) -> list[int]:
        return [int(t) for t in self.group["timestep"][:]]

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.group["seed"][:]]

    def __len__(self) -> int:
        return self.attrs.n_samples

    def array(self, block: str, crop: int | None = None) -> zarr.Array:
        from sdfeat.models.blocks import canonical_name

        name = canonical_name(block)
        if name not in self.blocks:
            raise UnknownBlockError(f"block '{block}' is not in {self.path}; stored blocks: {', '.join(self.blocks)}")
        if crop is None:
            return self.group[name]
        if crop not in self.crops:
            raise StoreError(f"no crop variant {crop} in {self.path} (stored: {self.crops or 'none'})")
        key = f"crops/{crop}/{name}"
        if key not in self.group:
            raise StoreError(f"block '{name}' has no crop-{crop} variant (its tokens are not {crop} px wide)")
        return self.group[key]

    def shape(self, block: str, crop: int | None = None) -> tuple[int, ...]:
        return tuple(self.array(block, crop).shape)

    @cached_property
    def _row_of(self) -> dict[str, int]:
        return {sid: i for i, sid in enumerate(self.sample_ids)}

    def _rows(self, samples: Samples) -> slice | np.ndarray:
        if samples is None:
            return slice(None)
        if isinstance(samples, slice):
            return samples
        items = [samples] if isinstance(samples, (int, str)) else list(samples)
        rows = []
        for s in items:
            if isinstance(s, str):
                if s not in self._row_of:
                    raise StoreError(f"sample '{s}' is not in {self.path}")
                rows.append(self._row_of[s])
            elif not -len(self) <= int(s) < len(self):
                raise StoreError(f"sample index {s} is out of range for {len(self)} samples")
            else:
                rows.append(int(s) % len(self))
        return np.asarray(rows, dtype=np.int64)

    def _crop_rows(self, rows: slice | np.ndarray) -> slice | np.ndarray:
        """Crop arrays hold the first `crop_samples` rows only: all of them for `None`, an error past them."""
        n = self.crop_samples
        if isinstance(rows, slice) and rows == slice(None):
            return rows
        wanted = np.arange(len(self))[rows] if isinstance(rows, slice) else rows
        if len(wanted) and int(wanted.max()) >= n:
            raise StoreError(f"sample row {int(wanted.max())} has no crop variant in {self.path}: crops cover rows "
                             f"0..{n - 1} only (variants.samples = {n})")
        return rows

    def _axis_index(self, values: list[int], wanted: int | None, what: str) -> slice | int:
        if wanted is None:
            return slice(None)
        if wanted not in values:
            raise StoreError(f"{what} {wanted} is not in {self.path} (stored: {values})")
        return values.index(wanted)

    def row_states(self, rows: slice | np.ndarray | None = None) -> dict[int, str]:
        """{row: state} of the rows (default: all) that hold no activations: 'unfinished (unit U has no done
        marker)' or 'failed (reason in failures.parquet)'. Empty when every row was extracted."""
        rows = slice(None) if rows is None else rows
        index = np.arange(*rows.indices(len(self))) if isinstance(rows, slice) else np.asarray(rows)
        if not len(index):
            return {}
        lo, hi = int(index.min()), int(index.max()) + 1
        bad = index[~np.asarray(self.group["ok"][lo:hi])[index - lo]]  # only the rows asked about, not all
        if not len(bad):
            return {}
        done = store.done_units(self.path)
        unit_of = self.attrs.unit_of
        return {int(r): (f"unfinished (unit {unit_of(r)} has no done marker; run the job again to finish it)"
                         if unit_of(r) not in done else
                         f"failed (its reason is in {store.join(self.path, store.FAILURES)})") for r in bad}

    def read(self, block: str, samples: Samples = None, timestep: int | None = None, seed: int | None = None,
             crop: int | None = None, raw: bool = False, allow_missing: bool = False) -> np.ndarray:
        """Activations (sample, [timestep], [seed], channel, y, x); a given timestep/seed drops its axis.
        float32 unless `raw` (the stored dtype).

        A sample whose unit is unfinished or whose image failed has no activations: `RowNotReadyError` naming it
        and its state, or with `allow_missing` NaN in its place and a `MissingRowsWarning` (also for stores
        written before NaN was the fill value: rows are masked by `ok`, whatever they hold)."""
        arr = self.array(block, crop)
        rows = self._rows(samples)
        missing = self.row_states(rows)
        if missing:
            row, state = next(iter(missing.items()))
            what = f"sample '{self.sample_ids[row]}' (row {row}) of {self.path} is {state}" + \
                (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            if not allow_missing:
                raise RowNotReadyError(what, "pass allow_missing=True (`sdfeat query --allow-missing`) to read it "
                                             "as NaN")
            warnings.warn(MissingRowsWarning(f"{len(missing)} of the requested samples have no activations and "
                                             f"read as NaN: {what}"), stacklevel=2)
        if crop is not None:
            rows = self._crop_rows(rows)
        t = self._axis_index(self.timesteps, timestep, "timestep")
        s = self._axis_index(self.seeds, seed, "seed")
        if isinstance(rows, np.ndarray):
            order = np.argsort(rows)  # zarr wants increasing coordinates; restore the caller's order after
            data = arr.get_orthogonal_selection((rows[order],))[np.argsort(order)]
        else:
            data = arr[rows]
        data = data[:, t][:, :, s] if isinstance(t, slice) else data[:, t][:, s]
        data = data if raw else data.astype(np.float32)
        if missing:
            index = np.arange(len(self))[rows]
            data = data.astype(np.result_type(data.dtype, np.float16), copy=False)
            data[np.isin(index, list(missing))] = np.nan
        return data

    def iter_samples(self, block: str, batch: int | None = None, timestep: int | None = None,
                     seed: int | None = None, crop: int | None = None,
                     allow_missing: bool = False) -> Iterator[tuple[slice, np.ndarray]]:
        """Read a block in row batches (default: one shard) so memory does not grow with the sample count; rows
        without activations as `read` treats them (an error, or NaN with `allow_missing`)."""
        step = batch or self.attrs.unit_size
        total = len(self) if crop is None else self.crop_samples
        for start in range(0, total, step):
            rows = slice(start, min(start + step, total))
            yield rows, self.read(block, rows, timestep, seed, crop, allow_missing=allow_missing)

    def to_xarray(self, crop: int | None = None):  # -> xarray.Dataset
        """Every block as a variable with named dims; `sample` indexed by sample id, `sample_id`, `label`, `ok` as
        coordinates; rows without activations read as NaN (`xarray_view`). Plain
        `xr.open_zarr("<store>/features.zarr")` gives the same for stores of this version."""
        from sdfeat.store.xarray_view import open_dataset

        return open_dataset(self.path, crop, None if crop is None else self.crop_samples)

    def verify(self) -> list[str]:
        """Problems found (empty = sound): missing units, spec hash, counts, NaN/Inf in rows marked ok."""
        problems = []
        if spec_hash(self.spec) != self.attrs.spec_hash:
            problems.append("stored spec does not match its spec hash")
        n_units = self.attrs.units
        done = store.done_units(self.path)
        missing = sorted(set(range(n_units)) - done)
        if missing:
            problems.append(f"{len(missing)} of {n_units} units have no done marker (first: {missing[0]})")
        reports = store.read_markers(self.path, sorted(done & set(range(n_units))))
        ok = self.ok
        if sum(r.ok for r in reports) != int(ok.sum()):
            problems.append(f"unit reports count {sum(r.ok for r in reports)} ok rows, the store {int(ok.sum())}")
        for name in self._all_array_paths():
            arr = self.group[name]
            for unit in range(n_units):
                unit_rows = self.attrs.rows_of(unit)
                rows = slice(unit_rows.start, unit_rows.stop)
                values = np.asarray(arr[rows])  # fewer rows (or none) in an array limited to the first rows
                values = values[ok[rows][: len(values)]]
                if not np.isfinite(values).all():
                    problems.append(f"{name}: NaN or Inf in rows {rows.start}..{rows.stop - 1}")
                    break
        return problems

    def _all_array_paths(self) -> list[str]:
        paths = list(self.blocks)
        for margin in self.crops:
            paths += [f"crops/{margin}/{name}" for name in self.group[f"crops/{margin}"].array_keys()]
        for block in self.attrs.summary_blocks:
            paths += [f"summaries/{block}/{name}" for name in self.group[f"summaries/{block}"].array_keys()]
        return paths

    def info(self) -> dict:
        """Blocks with shapes, samples, completeness, the run writing it (its writer lock), bytes on disk and the
        compression ratio (of the finished units' rows: unwritten rows take no space)."""
        from sdfeat.store.writer_lock import read_holder

        fs, root = store.filesystem(self.path)  # fsspec filesystem of the store
        stored = fs.du(store.join(root, store.FEATURES))
        arrays = [self.group[p] for p in self._all_array_paths()]
        raw = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays)
        n_units = self.attrs.units
        done = store.done_units(self.path) & set(range(n_units))
        finished = np.zeros(len(self), dtype=bool)  # rows of finished units: the only ones written
        for unit in done:
            rows = self.attrs.rows_of(unit)
            finished[rows.start:rows.stop] = True
        written = sum(int(finished[:a.shape[0]].sum()) * int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in arrays)
        return {
            "path": self.path, "model": self.attrs.model, "protocol": self.attrs.protocol,
            "spec_hash": self.attrs.spec_hash, "samples": len(self), "ok": int(self.ok.sum()),
            "timesteps": self.timesteps, "seeds": self.seeds, "crops": self.crops,
            "units_done": len(done), "units": n_units,
            "blocks": [{"name": p, "shape": list(a.shape), "dtype": str(a.dtype)}
                       for p, a in zip(self._all_array_paths(), arrays)],
            "writer": writer.describe() if (writer := read_holder(self.path)) is not None else None,
            "bytes_raw": raw, "bytes_stored": int(stored),
            # raw bytes of the finished rows over the bytes stored; None before any unit finished
            "compression_ratio": round(written / max(1, stored), 3) if done else None,
        }


def open_store(path: str) -> FeatureStore:
    """Open a store for reading; a path without an sdfeat store raises `StoreError` here, not at first use."""
    feature_store = FeatureStore(str(path))
    feature_store.attrs  # read now: StoreError for a path without an sdfeat store
    return feature_store


def unit_progress(path: str) -> tuple[int, int]:
    """(finished units, all units) of the store at `path`, also one whose job is still running or was stopped: a
    finished unit has its done marker and is what a rerun of the job skips."""
    total = store.read_attrs(path).units
    return len(store.done_units(path) & set(range(total))), total


def sample_key(text: str) -> int | str:
    """A sample as a command line names it: an integer is a row index (negative from the end), else a sample id."""
    return int(text) if text.lstrip("-").isdigit() else text
