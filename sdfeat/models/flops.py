"""Forward FLOPs of the VAE encoder and of the U-Net up to a block, counted on the meta device (no weights).

Used to turn measured rates into shares of a device's peak (`benchmarks/bench_gpu.py`) and to scale a U-Net rate
to a job's deepest hooked block (`sdfeat plan`). Counts are torch's `FlopCounterMode` (matmuls and convolutions,
2 FLOPs per multiply-add; normalisations and activations are not counted). SD-1.5 at 512 px: VAE encoder
1,117 GFLOP, full U-Net 803 GFLOP per image.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import torch

from sdfeat.models.families import for_config
from sdfeat.models.hooks import capture


def _count(module: torch.nn.Module, *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(*args, **kwargs)
    return int(counter.get_total_flops())


@lru_cache(maxsize=32)
def _unet_flops(config_json: str, resolution: int, upto: str | None) -> int:
    config = json.loads(config_json)
    family = for_config(config)
    model = family.meta_model(config)
    args, kwargs = family.meta_inputs(config, resolution)
    if upto is None:
        return _count(model, *args, **kwargs)
    with capture(model, [upto]) as hooked:  # the forward stops after `upto`
        return _count(hooked.run, *args, **kwargs)


def unet_flops(config: dict[str, Any], resolution: int, upto: str | None = None) -> int:
    """FLOPs of one image's denoiser forward (its family's `meta_inputs`) at `resolution` px, up to and including block `upto` (None: all)."""
    return _unet_flops(json.dumps(config, sort_keys=True), resolution, upto)


@lru_cache(maxsize=8)
def _vae_encoder_flops(config_json: str, resolution: int) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(json.loads(config_json))
        pixels = torch.empty(1, 3, resolution, resolution)
    return _count(vae.encode, pixels)


def vae_encoder_flops(config: dict[str, Any], resolution: int) -> int:
    """FLOPs of one image's VAE encoding (encoder + quant_conv) at `resolution` px."""
    return _vae_encoder_flops(json.dumps(config, sort_keys=True), resolution)
