"""What a job will store and how it is cut into work units, computed from the spec and the model's config alone
(no weights, no images decoded). `extract` builds the store template from this; `sdfeat plan` prints it.

A unit is a fixed row range of the store that covers whole shards of every array, so no two workers ever write
the same shard. Its size is bounded by a memory budget because a worker buffers its whole unit before writing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sdfeat.blocks import BlockInfo, resolve_blocks
from sdfeat.errors import SpecError
from sdfeat.models import unet_config
from sdfeat.spec import JobSpec
from sdfeat.store import ArrayLayout, activation_layout

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


@dataclass
class Pass:
    """One U-Net forward per (batch, seed, timestep): on the full image (margin 0) or on the image cropped by
    `margin` px per side. `stored` blocks are written as tensors, `summarized` ones as per-image summaries."""

    margin: int
    stored: list[BlockInfo] = field(default_factory=list)
    summarized: list[BlockInfo] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"crops/{self.margin}/" if self.margin else ""

    @property
    def names(self) -> list[str]:
        """Every block this pass hooks, in execution order."""
        by_name = {b.name: b for b in [*self.stored, *self.summarized]}
        return [b.name for b in sorted(by_name.values(), key=lambda b: b.order)]


@dataclass
class Layout:
    """Every array a job stores, and the forward passes that produce them."""

    blocks: list[BlockInfo]                                   # full-size activations, execution order
    passes: list[Pass] = field(default_factory=list)          # the full image first, then one per crop margin
    arrays: list[ArrayLayout] = field(default_factory=list)
    summary_blocks: list[BlockInfo] = field(default_factory=list)

    def bytes_per_sample(self) -> int:
        """Bytes of one row of every array (a unit's buffer per row; crop arrays limited to the first rows count)."""
        return sum(a.bytes_per_sample() for a in self.arrays)

    def total_bytes(self, n_samples: int) -> int:
        """Bytes of every array over a store of `n_samples` rows (crop arrays over their own rows)."""
        return sum(a.bytes_per_sample() * a.n_rows(n_samples) for a in self.arrays)


def crop_margins(spec: JobSpec, blocks: list[BlockInfo]) -> dict[int, list[BlockInfo]]:
    """Crop margin (px) -> the blocks whose tokens are exactly one margin wide (the paper's corner metric)."""
    sizes = sorted({b.height for b in blocks if b.height >= 3 and spec.resolution % b.height == 0}, reverse=True)
    if spec.variants.crops == "auto":
        margins = [spec.resolution // n for n in sizes]
    else:
        margins = list(spec.variants.crops)
    out: dict[int, list[BlockInfo]] = {}
    for margin in margins:
        matching = [b for b in blocks if b.height * margin == spec.resolution and b.height >= 3]
        if not matching:
            raise SpecError(
                f"field 'variants.crops': margin {margin} px is one token of no requested block at resolution "
                f"{spec.resolution} (token sizes: {sorted({spec.resolution // n for n in sizes})})")
        out[margin] = matching
    return out


def _summary_dims(name: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    """Dimension names of one summary array, consistent across blocks so xarray opens them together."""
    base = name.removeprefix("crop_")
    if base == "norms":
        return (f"y_{shape[0]}", f"x_{shape[1]}")
    if base == "tokens":
        return (f"token_{shape[0]}", f"channel_{shape[1]}")
    if base == "token_yx":
        return (f"token_{shape[0]}", "yx")
    return {"groups": ("group", "group_b"), "group_pairs": ("group", "group_b"), "groups_diag": ("group",),
            "corner_groups": ("corner", "group")}[base]


def job_layout(spec: JobSpec) -> Layout:
    from sdfeat.summaries import summary_layout

    config = unet_config(spec.model)
    blocks = resolve_blocks(config, spec.blocks, spec.resolution)
    summarized = resolve_blocks(config, spec.summaries.blocks, spec.resolution) if spec.summaries else []
    nt, ns = len(spec.timesteps), len(spec.seeds)
    arrays = [activation_layout(b.name, nt, ns, b.channels, b.height, b.width, spec.dtype) for b in blocks]
    # A summarized block gets its crop as summaries too; tensors of crops only for blocks without summaries.
    crop_stored = [b for b in blocks if b not in summarized]
    stored_crops = crop_margins(spec, crop_stored) if spec.variants.crops and crop_stored else {}
    summary_crops = crop_margins(spec, summarized) if spec.variants.crops and summarized else {}
    passes = [Pass(0, blocks, summarized)]
    for margin in sorted(set(stored_crops) | set(summary_crops)):
        passes.append(Pass(margin, stored_crops.get(margin, []), summary_crops.get(margin, [])))
    crop_rows = spec.variants.samples  # crop variants cover only the first N rows (None: all)
    for p in passes[1:]:
        arrays += [replace(activation_layout(f"{p.prefix}{b.name}", nt, ns, b.channels, b.height - 2, b.width - 2,
                                             spec.dtype), rows=crop_rows) for b in p.stored]
    cropped = {b.name for p in passes[1:] for b in p.summarized}
    for b in summarized:
        k = spec.summaries.tokens_per_image
        for name, (shape, dtype) in summary_layout(b, k, with_crop=b.name in cropped).items():
            arrays.append(ArrayLayout(f"summaries/{b.name}/{name}", (nt, ns, *shape),
                                      ("timestep", "seed", *_summary_dims(name, shape)), dtype,
                                      rows=crop_rows if name.startswith("crop_") else None))
    return Layout(blocks=blocks, passes=passes, arrays=arrays, summary_blocks=summarized)


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
        return -(-self.n_samples // self.unit_size)

    @property
    def total_bytes(self) -> int:
        return self.layout.total_bytes(self.n_samples)

    @property
    def hours(self) -> float | None:
        return None if not self.images_per_second else self.n_samples / self.images_per_second / 3600


def estimate_job(spec: JobSpec, images_per_second: float | None = None, samples: int | None = None) -> Estimate:
    """Sizes and time of a job before it runs; `samples` stands in for a source not reachable from here."""
    from sdfeat.sources import plan_samples

    layout = job_layout(spec)
    n = samples if samples is not None else len(plan_samples(spec.source, spec.source_format, spec.limit,
                                                             spec.classes).refs)
    return Estimate(spec, layout, n, unit_size(spec, layout.bytes_per_sample()), images_per_second)


def _human(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.1f} {units[i]}"


def render_estimate(est: Estimate):  # -> rich.table.Table
    """One row per stored block (summary arrays folded into one row per block), the total, and what the
    summaries save against storing those blocks' full tensors."""
    from rich.table import Table

    spec = est.spec
    hours = f"{est.hours:.1f} h at {est.images_per_second:g} img/s" if est.hours is not None else \
        "hours per stage below"
    rows: dict[str, int] = {}
    totals: dict[str, int] = {}
    for a in est.layout.arrays:
        key = "/".join(a.path.split("/")[:2]) if a.path.startswith("summaries/") else a.path
        rows[key] = rows.get(key, 0) + a.bytes_per_sample()
        totals[key] = totals.get(key, 0) + a.bytes_per_sample() * a.n_rows(est.n_samples)
    crops = f" · crops of the first {min(est.n_samples, spec.variants.samples):,}" \
        if len(est.layout.passes) > 1 and spec.variants.samples else ""
    table = Table("array", "per image", "total", title=(
        f"{spec.model} · {spec.protocol} · {est.n_samples:,} images{crops} · {len(spec.timesteps)} timestep(s) × "
        f"{len(spec.seeds)} seed(s) · {est.n_units:,} units of {est.unit_size} · {hours}"))
    for key, per_image in rows.items():
        table.add_row(key, _human(per_image), _human(totals[key]))
    table.add_row("[bold]total", _human(est.layout.bytes_per_sample()), f"[bold]{_human(est.total_bytes)}")
    stored = {b.name for b in est.layout.blocks}
    steps = len(spec.timesteps) * len(spec.seeds) * (2 if spec.dtype == "float16" else 4)
    summarized = est.layout.summary_blocks
    in_full = sum(b.channels * b.height * b.width * steps for b in summarized if b.name not in stored)
    if in_full:
        table.caption = (f"storing the {len(summarized)} summarized blocks as full tensors instead: "
                         f"{_human(in_full * est.n_samples)} more")
    return table
