"""Per-image compute of a job's forward passes by model name: which VAE and U-Net configs a model has, and their
FLOPs (counted by `flops` on the meta device, no weights) for one image of a given side.

`vae_flops` is the VAE encoder's FLOPs; `unet_flops_to` the U-Net's up to the deepest of some hook positions
(extraction stops there). SD-1.5 at 512 px: VAE encoder 1,117 GFLOP, whole U-Net 803 GFLOP, up to
`up_blocks.1.upsamplers.0` 439 GFLOP. `pass_costs` gives both per forward pass of a job; `budget`
turns them into hours with measured FLOP rates.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdfeat.errors import SpecError
from sdfeat.models.blocks import VAE_FACTOR
from sdfeat.models.flops import unet_flops, vae_encoder_flops
from sdfeat.models.families import for_registry_name, sd
from sdfeat.models.registry import RANDOM_PREFIX, TINY_MODELS, shipped_config, unet_config

if TYPE_CHECKING:
    from sdfeat.planning.layout import Layout
    from sdfeat.spec import JobSpec

log = logging.getLogger(__name__)


def vae_config(model: str) -> dict[str, Any]:
    """The VAE's config without weights: a tiny model's, a registry/random model's shipped one (of its family), a
    local directory's; any other model falls back to SD-1.5's (every SD 1.x/2.x VAE has that architecture), with a
    log line."""
    name = model.removeprefix(RANDOM_PREFIX)
    if model in TINY_MODELS:
        return dict(TINY_MODELS[model][2])
    family = for_registry_name(name)
    if family is not None:
        return shipped_config(name, "vae") if family is sd else family.shipped_config(name, "vae")
    local = Path(model) / "vae" / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    log.info("VAE config of %s not available here; counting SD-1.5's VAE architecture", model)
    return shipped_config("sd15", "vae")


def vae_flops(model: str, side: int) -> float:
    """FLOPs of the VAE encoder for one side×side image."""
    if side < VAE_FACTOR:
        raise SpecError(f"image side {side} px: must be at least {VAE_FACTOR} (a crop margin too large?)")
    return float(vae_encoder_flops(vae_config(model), side))


def unet_flops_to(model: str, side: int, upto: str | None = None) -> float:
    """FLOPs of one U-Net forward on a side×side image, stopped after block `upto` (the deepest hooked one; None:
    the whole forward)."""
    if side < VAE_FACTOR:
        raise SpecError(f"image side {side} px: must be at least {VAE_FACTOR} (a crop margin too large?)")
    return float(unet_flops(unet_config(model), side, upto))


@dataclass(frozen=True)
class PassCost:
    margin: int          # 0: the full image
    vae_flops: float     # per image; encoded once per pass (the latent serves every seed and timestep)
    unet_flops: float    # per image, over all seeds × timesteps, up to the pass's deepest block


def pass_costs(spec: JobSpec, layout: Layout) -> list[PassCost]:
    """Per-image FLOPs of each forward pass of a job (one pass per crop margin), in the layout's pass order."""
    repeats = len(spec.seeds) * len(spec.timesteps)
    costs = []
    for p in layout.passes:
        side = spec.resolution - 2 * p.margin
        costs.append(PassCost(p.margin, vae_flops(spec.model, side),
                              repeats * unet_flops_to(spec.model, side, p.names[-1])))  # names: execution order
    return costs
