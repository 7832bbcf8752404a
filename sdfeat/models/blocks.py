"""Block names, presets and shapes of any denoiser sdfeat knows, without weights.

A block ("position") is a module the study hooks, named by its PyTorch module path (dotted), e.g.
`down_blocks.0.resnets.1` in a U-Net or `transformer_blocks.3` in a DiT; the paper's bracket form
`down_blocks[0].resnets[1]` is accepted as input. Which positions a denoiser has, its presets and their shapes at a
resolution are its family's (`sdfeat.models.families`: `positions`, `presets`, `shapes`, from the config where it
can say, else a meta-device forward); this module resolves requested names against them. The table is cached per
(config, resolution). Name handling needs neither torch nor diffusers.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache

from sdfeat.errors import SpecError, UnknownBlockError
from sdfeat.models.families import for_config, sd

VAE_FACTOR = 8  # pixels per latent token of every VAE sdfeat knows
_BRACKET = re.compile(r"\[(\d+)\]")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.(\d+|[A-Za-z_]\w*))*$")


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


def check_names(requested: list[str] | str, valid: list[str], field: str, config: dict | None = None) -> None:
    """UnknownBlockError naming `field` and the closest valid names for the first requested name not in `valid`
    (a preset name is resolved for the denoiser `config`, SD's without one)."""
    try:
        names = preset_names(requested, config) if isinstance(requested, str) else \
            [canonical_name(n) for n in requested]
    except UnknownBlockError as err:
        raise UnknownBlockError(f"field '{field}': {err.args[0]}") from None
    for name in names:
        if name not in valid:
            raise UnknownBlockError(f"field '{field}': {_closest(name, valid)}")


def preset_names(preset: str, config: dict | None = None) -> list[str]:
    """A preset's positions in execution order, for the denoiser `config` (its family's presets; without a config,
    SD's: `paper`, the paper's 45 positions, and `all`, 46)."""
    family = sd if config is None else for_config(config)
    presets = family.presets(config)
    if preset not in presets:
        raise UnknownBlockError(f"block preset {preset!r}: unknown for the {family.NAME} family; choose one of "
                                f"{sorted(presets)}")
    return list(presets[preset])


def _config_key(unet_config: dict) -> str:
    return json.dumps({k: v for k, v in dict(unet_config).items() if not k.startswith("_")}, sort_keys=True,
                      default=list)


@lru_cache(maxsize=32)
def _shape_table(config_key: str, resolution: int) -> tuple[tuple[str, int, int, int], ...]:
    """(name, channels, height, width) of every position in execution order, from the config's family."""
    config = json.loads(config_key)
    return tuple((name, *map(int, shape)) for name, shape in for_config(config).shapes(config, resolution).items())


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
    names = preset_names(requested, unet_config) if isinstance(requested, str) else \
        [canonical_name(n) for n in requested]
    unique = list(dict.fromkeys(names))
    return sorted(block_shapes(unet_config, resolution, unique), key=lambda info: info.order)
