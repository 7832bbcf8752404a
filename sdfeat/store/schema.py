"""What a store holds, as the writer and every reader see it: its per-sample arrays (`ArrayLayout`, made by
`planning.layout` and created by `files.create_template`), how its rows are cut into units (`units_for`; a
unit owns whole shards, so the count is the store's, not the planner's), its attrs (`StoreAttrs`, written by
`extract.prepare_job`) and a finished unit's report (`UnitReport`, its done marker; `UnitFailure` when its source
could not be read). The JSON forms are `files`'; no torch, no zarr.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sdfeat.errors import StoreError
from sdfeat.spec import JobSpec, spec_hash


@dataclass(frozen=True)
class ArrayLayout:
    """One per-sample array of the store: `path` inside features.zarr and the shape of one sample's slice."""

    path: str                    # "up_blocks.1.upsamplers.0", "crops/16/conv_in", "summaries/conv_in/norms"
    sample_shape: tuple[int, ...]  # e.g. (timestep, seed, channel, y, x)
    dims: tuple[str, ...]          # names of the sample_shape axes
    dtype: str
    chunk_sample_shape: tuple[int, ...] | None = None  # inner chunk of one sample; None = the whole slice
    rows: int | None = None  # only the first `rows` samples (crop variants under `variants.samples`); None = all

    def n_rows(self, n_samples: int) -> int:
        """Rows of this array in a store of `n_samples`: all, or the first `rows` (dimension `crop_sample`)."""
        return n_samples if self.rows is None else min(self.rows, n_samples)

    def bytes_per_sample(self) -> int:
        return int(np.prod(self.sample_shape)) * np.dtype(self.dtype).itemsize


def units_for(n_samples: int, size: int) -> int:
    """How many units of `size` rows a store of `n_samples` rows has (the last one may be short)."""
    return -(-n_samples // size)


def _need(d: dict, key: str) -> object:
    """`d[key]`, or a ValueError naming the missing field (`files.read_attrs` names the store)."""
    if key not in d:
        raise ValueError(f"no '{key}' field")
    return d[key]


@dataclass(frozen=True)
class StoreAttrs:
    """The store's `sdfeat` attrs (features.zarr/zarr.json), as `extract.prepare_job` writes them and every reader
    reads them. `to_json` gives the stored dict (same keys, order and values); `from_json` also reads stores of
    older sdfeat versions (a missing `crops`, `summary_blocks`, `crop_samples`, `class_names`, `source_format`,
    `versions` takes its default)."""

    spec: dict                        # the job spec as JSON
    spec_hash: str
    protocol: str
    model: str
    revision: str | None
    n_samples: int
    unit_size: int
    blocks: tuple[str, ...]           # blocks stored in full
    crops: tuple[int, ...]            # margins with stored crop tensors
    summary_blocks: tuple[str, ...]
    crop_samples: int                 # crop variants cover store rows 0..crop_samples-1
    class_names: tuple[str, ...] | None
    source_format: str | None
    versions: dict[str, str]          # sdfeat, torch, diffusers, zarr at the store's start
    version_changes: tuple[dict, ...] = ()  # resumes under other versions (from / to / units_done)

    def to_json(self) -> dict:
        d = {"spec": self.spec, "spec_hash": self.spec_hash, "protocol": self.protocol, "model": self.model,
             "revision": self.revision, "n_samples": self.n_samples, "unit_size": self.unit_size,
             "blocks": list(self.blocks), "crops": list(self.crops), "summary_blocks": list(self.summary_blocks),
             "crop_samples": self.crop_samples,
             "class_names": None if self.class_names is None else list(self.class_names),
             "source_format": self.source_format, "versions": self.versions}
        if self.version_changes:
            d["version_changes"] = list(self.version_changes)
        return d

    @classmethod
    def from_json(cls, d: dict) -> StoreAttrs:
        """The attrs of a store written by this or an older sdfeat; ValueError naming a required field it lacks."""
        if not d.get("spec_hash"):
            raise ValueError("no spec hash")
        n = int(_need(d, "n_samples"))
        names = d.get("class_names")
        return cls(spec=_need(d, "spec"), spec_hash=d["spec_hash"], protocol=_need(d, "protocol"),
                   model=_need(d, "model"), revision=d.get("revision"), n_samples=n,
                   unit_size=int(_need(d, "unit_size")), blocks=tuple(_need(d, "blocks")),
                   crops=tuple(d.get("crops", ())), summary_blocks=tuple(d.get("summary_blocks", ())),
                   crop_samples=int(d.get("crop_samples", n)),
                   class_names=None if names is None else tuple(names), source_format=d.get("source_format"),
                   versions=dict(d.get("versions") or {}), version_changes=tuple(d.get("version_changes", ())))

    @property
    def units(self) -> int:
        """How many units the store's rows are cut into."""
        return units_for(self.n_samples, self.unit_size)

    def rows_of(self, unit: int) -> range:
        """The store rows of `unit`: unit k covers rows k*unit_size .. min((k+1)*unit_size, n_samples) - 1."""
        start = unit * self.unit_size
        return range(start, min(start + self.unit_size, self.n_samples))

    def unit_of(self, row: int) -> int:
        """The unit that holds store row `row`."""
        return row // self.unit_size

    def require_spec(self, spec: JobSpec, output: str) -> None:
        """Refuse a store made by another spec (its `spec_hash` differs): resuming it would mix two jobs. The one
        place the hash is compared (prepare, open and submit a job)."""
        digest = spec_hash(spec)
        if self.spec_hash != digest:
            raise StoreError(f"{output} holds a store of another spec (hash {self.spec_hash}, this spec {digest}); "
                             "choose another output or pass --overwrite")


@dataclass(frozen=True)
class UnitReport:
    """A finished unit's report: its done marker (`progress/unit-<k>.json`, written by `worker.UnitRunner` after the
    unit's data) and what a runner hands back. `seconds`: busy seconds per stage (`stages.STAGES`); `wall`: the
    unit's compute wall time; `cpu`: CPU seconds per host stage; `worker`: host:device; `finished`: epoch seconds.
    Markers of older sdfeat versions may lack the timings: empty / 0 / None then."""

    unit: int
    rows: int
    ok: int                            # usable images
    failures: tuple[dict, ...]         # {"sample_id", "reason", "unit"} per image that could not be used
    seconds: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    worker: str | None = None
    finished: float | None = None

    def to_json(self) -> dict:
        return {"unit": self.unit, "rows": self.rows, "ok": self.ok, "failures": list(self.failures),
                "seconds": self.seconds, "wall": self.wall, "cpu": self.cpu, "worker": self.worker,
                "finished": self.finished}

    @classmethod
    def from_json(cls, d: object, unit: int) -> UnitReport | None:
        """The report of unit `unit`'s marker, or None when `d` is not one (a torn or foreign file)."""
        sound = (isinstance(d, dict) and d.get("unit") == unit and isinstance(d.get("rows"), int)
                 and isinstance(d.get("ok"), int) and isinstance(d.get("failures"), list))
        if not sound:
            return None
        return cls(unit=unit, rows=d["rows"], ok=d["ok"], failures=tuple(d["failures"]),
                   seconds=d.get("seconds", {}), wall=d.get("wall", 0.0), cpu=d.get("cpu", {}),
                   worker=d.get("worker"), finished=d.get("finished"))


@dataclass(frozen=True)
class UnitFailure:
    """A unit whose source could not be read (`worker.UnitRunner.run_many`): no marker, the reason."""

    unit: int
    error: str
