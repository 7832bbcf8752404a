"""Per-image compute of a job's forward passes, from the model's configs on the meta device (no weights).

`vae_flops` is the VAE encoder's FLOPs for one image of a given side; `unet_flops_to` the U-Net's FLOPs up to the
deepest of some hook positions (extraction stops there), for one image at a given pixel side. Both are counted by
`torch.utils.flop_counter.FlopCounterMode` on a meta-device model built from the config, so they cost no memory
and take well under a second per model and size. SD-1.5 at 512 px: VAE encoder 1,117 GFLOP, whole U-Net 803
GFLOP, up to `up_blocks.1.upsamplers.0` 439 GFLOP. `budget` turns these into hours with measured FLOP rates.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from sdfeat.blocks import VAE_FACTOR, canonical_name
from sdfeat.errors import SpecError

log = logging.getLogger(__name__)


def vae_config(model: str) -> dict[str, Any]:
    """The VAE's config without weights: tiny's, a registry/random model's shipped one, a local directory's; any
    other model falls back to SD-1.5's (every SD 1.x/2.x VAE has that architecture), with a log line."""
    from sdfeat.models import REGISTRY, RANDOM_PREFIX, TINY_VAE_CONFIG, shipped_config

    name = model.removeprefix(RANDOM_PREFIX)
    if model == "tiny":
        return dict(TINY_VAE_CONFIG)
    if name in REGISTRY:
        return shipped_config(name, "vae")
    local = Path(model) / "vae" / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    log.info("VAE config of %s not available here; counting SD-1.5's VAE architecture", model)
    return shipped_config("sd15", "vae")


def _key(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=list)


@lru_cache(maxsize=64)
def _vae_flops(config_key: str, side: int) -> float:
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(json.loads(config_key))
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        vae.encode(torch.empty(1, 3, side, side, device="meta"))  # (1, 3, side, side) pixels
    return float(counter.get_total_flops())


@lru_cache(maxsize=64)
def _unet_cumulative(config_key: str, latent_side: int) -> tuple[tuple[str, float], ...]:
    """(position, FLOPs of the forward up to and including it) in execution order, then ("total", whole forward)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from sdfeat.blocks import _POSITION

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(config_key))
    counter = FlopCounterMode(display=False)
    marks: list[tuple[str, float]] = []
    for name, module in unet.named_modules():
        if _POSITION.match(name):
            module.register_forward_hook(lambda _m, _i, _o, name=name: marks.append((name, counter.get_total_flops())))
    sample = torch.empty(1, unet.config.in_channels, latent_side, latent_side, device="meta")  # (1, 4, h, w)
    context = torch.empty(1, 77, unet.config.cross_attention_dim, device="meta")  # (1, 77, D)
    with counter, torch.inference_mode():
        unet(sample, torch.tensor(50), encoder_hidden_states=context)
    return (*((n, float(f)) for n, f in marks), ("total", float(counter.get_total_flops())))


def _latent_side(side: int) -> int:
    """The VAE's latent side for a side×side image (its three stride-2 convolutions floor odd sizes)."""
    if side < VAE_FACTOR:
        raise SpecError(f"image side {side} px: must be at least {VAE_FACTOR} (a crop margin too large?)")
    return side // VAE_FACTOR


def vae_flops(model: str, side: int) -> float:
    """FLOPs of the VAE encoder for one side×side image."""
    _latent_side(side)
    return _vae_flops(_key(vae_config(model)), side)


def unet_flops_to(model: str, side: int, blocks: list[str] | None = None) -> float:
    """FLOPs of one U-Net forward on a side×side image, stopped after the deepest of `blocks` (None: whole)."""
    from sdfeat.models import unet_config

    table = dict(_unet_cumulative(_key(unet_config(model)), _latent_side(side)))
    if not blocks:
        return table["total"]
    names = [canonical_name(b) for b in blocks]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SpecError(f"block {unknown[0]!r}: not a hook position of {model}'s U-Net")
    return max(table[n] for n in names)
