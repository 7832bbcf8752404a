"""The one place that says which arrays a job stores and which forward passes make them, from the spec and the
model's config alone (no weights, no images). Torch-free: the config comes from `configs`, the block shapes from
`blocks` (from the config for SD-shaped U-Nets; only another layout needs a meta forward, and so torch).

Read by the planner (`plan` sizes units and estimates from `Layout`), the runner (`extract` runs one forward per
`Pass` and writes every `ArrayLayout`), the store template (`store.create_template` creates each `ArrayLayout`),
and, through the store it describes, the query side and the metrics (array paths, dims and the summary names
below). Arrays of one job:

- `<block>` (timestep, seed, channel_C, y_H, x_W): a stored block's activations;
- `crops/<m>/<block>` (timestep, seed, channel_C, y_H-2, x_W-2): the image cropped by `m` px per side, for
  blocks whose tokens are `m` px wide; only the first `variants.samples` rows (first dimension `crop_sample`);
- `summaries/<block>/<name>`: per-image summaries of a summarized block (`summary_layout`; computed by
  `summaries.summarize`), `crop_*` ones limited to the crop rows like crop tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sdfeat.errors import SpecError
from sdfeat.models.blocks import BlockInfo, resolve_blocks
from sdfeat.models.registry import unet_config
from sdfeat.spec import JobSpec
from sdfeat.store.schema import ArrayLayout


def activation_layout(path: str, n_timesteps: int, n_seeds: int, channels: int, height: int, width: int,
                      dtype: str) -> ArrayLayout:
    """A block's activations: one chunk per (sample, timestep, seed); dims named by size so that all blocks
    fit one xarray Dataset."""
    return ArrayLayout(
        path=path,
        sample_shape=(n_timesteps, n_seeds, channels, height, width),
        dims=("timestep", "seed", f"channel_{channels}", f"y_{height}", f"x_{width}"),
        dtype=dtype,
        chunk_sample_shape=(1, 1, channels, height, width),
    )


def summary_tokens(block: BlockInfo, tokens_per_image: int) -> int:
    """K, the tokens sampled per image for the position probe: the spec's, at most the map's size."""
    return min(tokens_per_image, block.height * block.width)


def summary_layout(block: BlockInfo, tokens_per_image: int,
                   with_crop: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (per-(image, timestep, seed) shape, numpy dtype)}; group sums only for maps of at least 4×4."""
    k = summary_tokens(block, tokens_per_image)
    layout: dict[str, tuple[tuple[int, ...], str]] = {
        "norms": ((block.height, block.width), "float32"),
        "tokens": ((k, block.channels), "float16"),
        "token_yx": ((k, 2), "int16"),
    }
    if min(block.height, block.width) >= 4:
        prefixes = ("", "crop_") if with_crop else ("",)
        for p in prefixes:
            layout[f"{p}groups"] = ((3, 3), "float64")
            layout[f"{p}groups_diag"] = ((3,), "float64")
            layout[f"{p}corner_groups"] = ((4, 3), "float64")
            layout[f"{p}group_pairs"] = ((3, 3), "int64")
    return layout


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


def job_layout(spec: JobSpec) -> Layout:
    """The blocks, forward passes and arrays of a job, from the spec (its model's config read from the registry)."""
    return layout_for(spec, unet_config(spec.model))


def layout_for(spec: JobSpec, config: Mapping[str, Any]) -> Layout:
    """The blocks, forward passes and arrays of a job, from the spec and its model's denoiser config (a job's
    `registry.ModelRef.config`)."""
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
