"""Block names, presets and shapes of SD-shaped U-Nets, without weights.

A block ("position") is a direct child of a U-Net stage that the paper hooks: `conv_in`, `conv_out`, and
`down_blocks.i|up_blocks.i|mid_block` . `resnets.j|attentions.j|downsamplers.j|upsamplers.j`. Its canonical name is
the PyTorch module path (dotted); the paper's bracket form `down_blocks[0].resnets[0]` is accepted as input.

Shapes of the SD block layout (every SD 1.x/2.x U-Net, and `tiny`) are computed from the config (`_config_shapes`,
no torch: `sdfeat blocks`, planning and the store template stay torch-free); any other layout's come from a U-Net
built from its config on the meta device (no memory, no weights) and one meta forward with `hooks.capture` on every
position, the hooks' firing order being the execution order. Tests pin the two against each other. The table is
cached per (config, resolution). Name handling needs neither torch nor diffusers.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache

from sdfeat.errors import SpecError, UnknownBlockError

VAE_FACTOR = 8  # pixels per latent token in every SD VAE
_BRACKET = re.compile(r"\[(\d+)\]")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.(\d+|[A-Za-z_]\w*))*$")
_POSITION = re.compile(r"^(conv_in|conv_out|(down_blocks\.\d+|up_blocks\.\d+|mid_block)"
                       r"\.(resnets|attentions|downsamplers|upsamplers)\.\d+)$")


@dataclass(frozen=True)
class BlockInfo:
    name: str  # canonical dotted name
    paper_name: str  # bracket form
    channels: int
    height: int  # tokens along y at the given resolution
    width: int
    order: int  # position in execution order (index into the `all` list)


def canonical_name(name: str) -> str:
    """`down_blocks[0].resnets[1]` or `down_blocks.0.resnets.1` -> `down_blocks.0.resnets.1` (syntax check only)."""
    dotted = _BRACKET.sub(r".\1", name.strip())
    if not _DOTTED.match(dotted):
        raise UnknownBlockError(f"block {name!r}: not a module path like 'down_blocks.0.resnets.0' or "
                                f"'down_blocks[0].resnets[0]'")
    return dotted


def paper_name(name: str) -> str:
    """`down_blocks.0.resnets.1` -> `down_blocks[0].resnets[1]` (the paper's and sdhelper's notation)."""
    return re.sub(r"\.(\d+)", r"[\1]", canonical_name(name))


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


def config_positions(unet_config: dict) -> list[str] | None:
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


def check_names(requested: list[str] | str, valid: list[str], field: str) -> None:
    """UnknownBlockError naming `field` and the closest valid names for the first requested name not in `valid`."""
    names = preset_names(requested) if isinstance(requested, str) else [canonical_name(n) for n in requested]
    for name in names:
        if name not in valid:
            raise UnknownBlockError(f"field '{field}': {_closest(name, valid)}")


_PRESETS: dict[str, list[str]] = {"all": _sd_positions()}
_PRESETS["paper"] = [n for n in _PRESETS["all"] if n != "up_blocks.0.resnets.2"]  # the paper omits this one


def preset_names(preset: str) -> list[str]:
    """`paper` (45 positions, the paper's order) or `all` (46), both in execution order, for SD-shaped U-Nets."""
    if preset not in _PRESETS:
        raise UnknownBlockError(f"block preset {preset!r}: unknown; choose one of {sorted(_PRESETS)}")
    return list(_PRESETS[preset])


def _config_key(unet_config: dict) -> str:
    return json.dumps({k: v for k, v in dict(unet_config).items() if not k.startswith("_")}, sort_keys=True,
                      default=list)


@lru_cache(maxsize=32)
def _shape_table(config_key: str, resolution: int) -> tuple[tuple[str, int, int, int], ...]:
    """(name, channels, height, width) of every position in execution order: from the config for the SD block
    layout (`_config_shapes`, no torch), else from a meta forward."""
    config = json.loads(config_key)
    return _config_shapes(config, resolution) or _meta_shapes(config, resolution)


def _config_shapes(config: dict, resolution: int) -> tuple[tuple[str, int, int, int], ...] | None:
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

    return tuple((n, c, s, s) for n, c, s in ((n, *shape(n)) for n in names))


def _meta_shapes(config: dict, resolution: int) -> tuple[tuple[str, int, int, int], ...]:
    """The shape table from a U-Net built on the meta device and one meta forward with hooks on every position."""
    import torch  # here, not at the top: names, presets and SD shapes are used where torch is not
    from diffusers import UNet2DConditionModel

    from sdfeat.models.hooks import capture

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    names = [n for n, _ in unet.named_modules() if _POSITION.match(n)]
    fired: list[str] = []
    for name in names:  # records execution order; capture's hooks record outputs
        unet.get_submodule(name).register_forward_hook(lambda _m, _i, _o, name=name: fired.append(name))
    side = resolution // VAE_FACTOR
    sample = torch.empty(1, unet.config.in_channels, side, side, device="meta")  # (1, 4, h, w)
    context = torch.empty(1, 77, unet.config.cross_attention_dim, device="meta")  # (1, 77, D)
    with capture(unet, names, early_exit=False) as cap:
        outputs = cap.run(sample, torch.tensor(50), encoder_hidden_states=context)
    return tuple((n, *outputs[n].shape[1:]) for n in fired)


def _table(unet_config: dict, resolution: int) -> tuple[tuple[str, int, int, int], ...]:
    if resolution <= 0 or resolution % VAE_FACTOR:
        raise SpecError(f"resolution {resolution}: must be a positive multiple of {VAE_FACTOR} pixels")
    return _shape_table(_config_key(unet_config), resolution)


def _closest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.0)
    return f"block {name!r}: unknown; closest valid names: {', '.join(close)} (see `sdfeat blocks`)"


def block_shapes(unet_config: dict, resolution: int, names: list[str]) -> list[BlockInfo]:
    """BlockInfo for each of `names` (in the given order) at `resolution` pixels; unknown -> UnknownBlockError."""
    table = _table(unet_config, resolution)
    index = {row[0]: order for order, row in enumerate(table)}
    infos = []
    for raw in names:
        name = canonical_name(raw)
        if name not in index:
            raise UnknownBlockError(_closest(name, list(index)))
        _, channels, height, width = table[index[name]]
        infos.append(BlockInfo(name, paper_name(name), channels, height, width, index[name]))
    return infos


def resolve_blocks(unet_config: dict, requested: list[str] | str, resolution: int) -> list[BlockInfo]:
    """A preset name or a list of names (either notation) -> unique BlockInfos in execution order."""
    names = preset_names(requested) if isinstance(requested, str) else [canonical_name(n) for n in requested]
    unique = list(dict.fromkeys(names))
    return sorted(block_shapes(unet_config, resolution, unique), key=lambda info: info.order)
