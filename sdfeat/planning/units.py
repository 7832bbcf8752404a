"""How a job is cut into work units, and what it will cost, computed from the spec and the model's config alone
(no weights, no images decoded). What it stores is `layout.job_layout`'s; `sdfeat plan` prints the estimate.

A unit is a fixed row range of the store that covers whole shards of every array, so no two workers ever write
the same shard. Its size is bounded by a memory budget because a worker buffers its whole unit before writing.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdfeat.errors import SpecError
from sdfeat.planning.layout import Layout, job_layout
from sdfeat.spec import JobSpec
from sdfeat.store.schema import units_for

UNIT_BUFFER_BYTES = 512 * 2**20   # a worker buffers one unit of activations in host memory before writing it
MAX_UNIT_SIZE = 64


@dataclass(frozen=True)
class Unit:
    index: int
    start: int   # first store row (inclusive)
    stop: int    # last store row (exclusive)

    @property
    def rows(self) -> int:
        return self.stop - self.start


def unit_size(spec: JobSpec, bytes_per_sample: int) -> int:
    """Rows per unit: the spec's, else as many whole batches as fit the buffer budget (at most 64, at least one
    batch). Under `protocol: paper` a unit must hold whole batches, since the paper's noise depends on them."""
    batch = spec.batch_size
    if spec.unit_size is not None:
        if spec.protocol == "paper" and spec.unit_size % batch:
            raise SpecError(f"field 'unit_size': {spec.unit_size} is not a multiple of batch_size {batch}; "
                            "protocol 'paper' draws one noise field per batch, so units must hold whole batches")
        return spec.unit_size
    fits = max(1, min(MAX_UNIT_SIZE, UNIT_BUFFER_BYTES // max(1, bytes_per_sample)))
    return max(batch, fits // batch * batch)


def plan_units(n_samples: int, size: int) -> list[Unit]:
    """The units of a store of `n_samples` rows, `size` rows each (`units_for` of them)."""
    return [Unit(i, start, min(start + size, n_samples)) for i, start in enumerate(range(0, n_samples, size))]


@dataclass
class Estimate:
    spec: JobSpec
    layout: Layout
    n_samples: int
    unit_size: int
    images_per_second: float | None

    @property
    def n_units(self) -> int:
        return units_for(self.n_samples, self.unit_size)

    @property
    def total_bytes(self) -> int:
        return self.layout.total_bytes(self.n_samples)

    @property
    def hours(self) -> float | None:
        return None if not self.images_per_second else self.n_samples / self.images_per_second / 3600

    def as_dict(self) -> dict:
        """`sdfeat plan --json`: the job's sizes, per array and in total (bytes)."""
        return {"model": self.spec.model, "protocol": self.spec.protocol, "n_samples": self.n_samples,
                "units": self.n_units, "unit_size": self.unit_size, "bytes_per_image": self.layout.bytes_per_sample(),
                "total_bytes": self.total_bytes, "hours": self.hours,
                "arrays": [{"path": a.path, "bytes_per_image": a.bytes_per_sample(),
                            "total_bytes": a.bytes_per_sample() * a.n_rows(self.n_samples)}
                           for a in self.layout.arrays]}


def estimate_job(spec: JobSpec, images_per_second: float | None = None, samples: int | None = None) -> Estimate:
    """Sizes and time of a job before it runs; `samples` stands in for a source not reachable from here."""
    from sdfeat.sources import plan_samples

    layout = job_layout(spec)
    n = samples if samples is not None else len(plan_samples(spec.source, spec.source_format, spec.limit,
                                                             spec.classes).refs)
    return Estimate(spec, layout, n, unit_size(spec, layout.bytes_per_sample()), images_per_second)
