"""The SD family: the paper's U-Nets, SD-1.x and SD-2.x (SD-1.5, SD-2.1, SD-Turbo, and `tiny`), as a model family
(see `sdfeat.models.families`). Its loading, prompt embedding and the `paper` protocol are `models.loading`'s and
`extract.protocol`'s: the family that sdfeat was first built around.

Blocks. A position is `conv_in`, `conv_out`, or `down_blocks.i|up_blocks.i|mid_block` . `resnets.j|attentions.j|
downsamplers.0|upsamplers.0`, named by its PyTorch module path. Presets: `all` (the 46 positions of SD-1.x/2.x) and
`paper` (the paper's 45: `all` without `up_blocks.0.resnets.2`, an omission of sdhelper's block list).

Shapes of the SD block layout are computed from the config (`_config_shapes`, no torch: `sdfeat blocks`, planning
and the store template stay torch-free); any other layout's come from `meta_shapes` (a U-Net on the meta device and
one meta forward, the hooks' firing order being the execution order). Tests pin the two against each other.
Conditioning: the prompt's CLIP hidden states, `encoder_hidden_states` (B, 77, D). Protocols: `paper` and
`standard`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from sdfeat.models.families.loading import fired_shapes
from sdfeat.spec import PROTOCOLS as ALL_PROTOCOLS

NAME = "sd"
DENOISER = "unet"  # the pipeline's subfolder holding the denoiser
REGISTRY = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "stabilityai/stable-diffusion-2-1",
            "sdturbo": "stabilityai/sd-turbo"}
PROTOCOLS = ALL_PROTOCOLS  # `paper` is defined for this family alone
SETTINGS: tuple[str, ...] = ()  # no `conditioning` keys: the prompt is the conditioning
TAKES_PROMPT = True
PADDING_INTERVENTIONS = True  # its convolutions pad with zeros: the padding study applies
VAE_FACTOR = 8  # pixels per latent token in every SD VAE
_POSITION = re.compile(r"^(conv_in|conv_out|(down_blocks\.\d+|up_blocks\.\d+|mid_block)"
                       r"\.(resnets|attentions|downsamplers|upsamplers)\.\d+)$")


def owns(denoiser_config: Mapping[str, Any]) -> bool:
    """True for a U-Net (down blocks) without SDXL's added conditioning: the SD-1.x/2.x kind."""
    return (denoiser_config.get("_class_name", "UNet2DConditionModel") == "UNet2DConditionModel"
            and "down_block_types" in denoiser_config and denoiser_config.get("addition_embed_type") is None)


def _sd_positions() -> list[str]:
    """All 46 positions of an SD-1.x/2.x U-Net (layers_per_block=2), in execution order."""
    names = ["conv_in"]
    for i in range(4):
        for j in range(2):
            names.append(f"down_blocks.{i}.resnets.{j}")
            if i < 3:
                names.append(f"down_blocks.{i}.attentions.{j}")
        if i < 3:
            names.append(f"down_blocks.{i}.downsamplers.0")
    names += ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    for i in range(4):
        for j in range(3):
            names.append(f"up_blocks.{i}.resnets.{j}")
            if i > 0:
                names.append(f"up_blocks.{i}.attentions.{j}")
        if i < 3:
            names.append(f"up_blocks.{i}.upsamplers.0")
    return names + ["conv_out"]


_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has attentions
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def config_positions(unet_config: Mapping[str, Any]) -> list[str] | None:
    """Every position of a U-Net config in execution order, from the config alone (no torch): for the SD block
    types (CrossAttn/plain down and up blocks, the cross-attention mid block); None for any other layout, whose
    names only the meta forward knows. Lets a job refuse a misspelt block before anything heavy is imported."""
    down, up = unet_config.get("down_block_types"), unet_config.get("up_block_types")
    layers = unet_config.get("layers_per_block", 2)
    mid = unet_config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if (not isinstance(down, list) or not isinstance(up, list) or not isinstance(layers, int)
            or any(t not in _DOWN_TYPES for t in down) or any(t not in _UP_TYPES for t in up)
            or mid != "UNetMidBlock2DCrossAttn"):
        return None
    names = ["conv_in"]
    for i, kind in enumerate(down):
        for j in range(layers):
            names.append(f"down_blocks.{i}.resnets.{j}")
            names += [f"down_blocks.{i}.attentions.{j}"] if _DOWN_TYPES[kind] else []
        if i < len(down) - 1:
            names.append(f"down_blocks.{i}.downsamplers.0")
    names += ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    for i, kind in enumerate(up):
        for j in range(layers + 1):
            names.append(f"up_blocks.{i}.resnets.{j}")
            names += [f"up_blocks.{i}.attentions.{j}"] if _UP_TYPES[kind] else []
        if i < len(up) - 1:
            names.append(f"up_blocks.{i}.upsamplers.0")
    return names + ["conv_out"]


_PRESETS: dict[str, list[str]] = {"all": _sd_positions()}
_PRESETS["paper"] = [n for n in _PRESETS["all"] if n != "up_blocks.0.resnets.2"]  # the paper omits this one


def positions(config: Mapping[str, Any]) -> list[str]:
    """Every hookable position of the U-Net, by module path, in execution order."""
    names = config_positions(config)
    return names if names is not None else list(meta_shapes(config, VAE_FACTOR * 16))


def presets(config: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    """`all` and `paper` (the same lists for every SD-1.x/2.x U-Net)."""
    return {name: list(names) for name, names in _PRESETS.items()}


def shapes(config: Mapping[str, Any], resolution: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of every position at `resolution` pixels, in execution order: from the config, else
    `meta_shapes`."""
    return _config_shapes(config, resolution) or meta_shapes(config, resolution)


def _config_shapes(config: Mapping[str, Any], resolution: int) -> dict[str, tuple[int, int, int]] | None:
    """The shape table of an SD-laid-out U-Net (`config_positions`) computed from its config, as diffusers' forward
    gives it: channels from `block_out_channels` (reversed on the way up) and `out_channels`; sides halved by each
    stride-2, padding-1 downsampler (rounding up: 31 -> 16) and restored by each upsampler (to the skip's size).
    None where the config has anything else (the meta forward knows it); tests pin both against each other."""
    names = config_positions(config)
    channels, out = config.get("block_out_channels"), config.get("out_channels", 4)
    kernels = (config.get("conv_in_kernel", 3), config.get("conv_out_kernel", 3))
    if (names is None or not isinstance(channels, list) or len(channels) != len(config["down_block_types"])
            or len(channels) != len(config["up_block_types"]) or not all(isinstance(c, int) for c in channels)
            or not isinstance(out, int) or config.get("downsample_padding", 1) != 1
            or not all(isinstance(k, int) and k % 2 for k in kernels)
            or config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn"
            or config.get("class_embed_type") is not None or config.get("addition_embed_type") is not None):
        return None
    sides = [resolution // VAE_FACTOR]  # sides[level]: the latent side inside down block `level`
    for _ in channels[1:]:
        sides.append((sides[-1] - 1) // 2 + 1)

    def shape(name: str) -> tuple[int, int]:
        """(channels, side) of one position."""
        parts = name.split(".")
        if name in ("conv_in", "conv_out"):
            return (channels[0] if name == "conv_in" else out), sides[0]
        if parts[0] == "mid_block":
            return channels[-1], sides[-1]
        i, kind = int(parts[1]), parts[2]
        if parts[0] == "down_blocks":
            return channels[i], (sides[i + 1] if kind == "downsamplers" else sides[i])
        level = len(channels) - 1 - i  # up block i works at down block `level`'s side, its upsampler at the next
        return channels[level], (sides[level - 1] if kind == "upsamplers" else sides[level])

    return {n: (c, s, s) for n, c, s in ((n, *shape(n)) for n in names)}


# ---------------------------------------------------------------- torch side

def meta_inputs(config: Mapping[str, Any], resolution: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) of one image's U-Net forward on the meta device (shapes, FLOP counts): a latent, timestep 50
    and a 77-token context of the config's cross-attention width."""
    import torch

    side = resolution // VAE_FACTOR
    with torch.device("meta"):
        sample = torch.empty(1, config.get("in_channels", 4), side, side)  # (1, 4, h, w)
        context = torch.empty(1, 77, config["cross_attention_dim"])  # (1, 77, D)
    return (sample, torch.tensor(50)), {"encoder_hidden_states": context}


def meta_model(config: Mapping[str, Any]) -> Any:
    """The U-Net built on the meta device (no memory, no weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def meta_shapes(config: Mapping[str, Any], resolution: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) per position from a U-Net built on the meta device and one meta forward with hooks on every
    position; the dict is in hook-firing (execution) order."""
    unet = meta_model(config)
    names = [name for name, _ in unet.named_modules() if _POSITION.match(name)]
    return fired_shapes(unet, names, meta_inputs(config, resolution), lambda name, out: as_map(name, out, (0, 0)))


def as_map(name: str, output: Any, latent_hw: tuple[int, int]) -> Any:
    """A hooked output as a (B, C, H, W) map: a tuple or list gives its element 0 (resnets of the down blocks and
    attention blocks return tuples), a tensor is itself; a U-Net's outputs are maps already (`latent_hw` unused)."""
    import torch

    value = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"block {name!r}: returned {type(value).__name__}, expected a tensor or a tuple of tensors")
    return value


def call(denoiser: Any, latents: Any, timestep: Any, conditioning: Mapping[str, Any]) -> Any:
    """One U-Net forward on `latents` (B, 4, h, w) at `timestep` (a tensor), without autograd; a caller's hook may
    end it early by raising."""
    import torch

    with torch.inference_mode():
        return denoiser(latents, timestep, encoder_hidden_states=conditioning["encoder_hidden_states"],
                        return_dict=False)[0]
