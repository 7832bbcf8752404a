"""Which model a name means, its family and its component configs, without torch or weights.

Names: the registry names of every family (`sd15`, `sd21`, `sdturbo`; `sdxl`, `sdxl-turbo`; `dit-xl-2`: hub ids,
each family's `REGISTRY`), any hub id (`owner/name`), any local diffusers pipeline directory, the tiny offline models
(`tiny`: SD-shaped, built in code from the configs below; `tiny-sdxl`, `tiny-dit`: their families' tiny configs) and
`random:<registry name>` (the full architecture from the shipped configs in `sdfeat/data`, with random weights).
`resolve_model` resolves a name once into a `ModelRef`: its kind and source, the family (`sdfeat.models.families`)
that runs it and its denoiser config; a job carries it down to the loader.

Read by everything that needs a model's shape before (or without) loading it: `extract.job.prepare_job` (the job's
`ModelRef`, and through its config the layout and the store template), `layout.job_layout` (the planner),
`checks` (block names before anything heavy), `costs` (FLOPs), `sdfeat blocks`, the metrics; `models` loads the
weights of a name or a `ModelRef`, after `require_weights` (also run before a job writes anything) said they are
here. Imports json, os and pathlib only (huggingface_hub only to read a hub
model's config or file index from the local cache).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from sdfeat.errors import ModelNotFoundError
from sdfeat.models.families import FAMILIES, dit, for_config, for_registry_name, sd, sdxl

REGISTRY = sd.REGISTRY  # the paper's three models
NAMES = [name for family in FAMILIES.values() for name in family.REGISTRY]  # every registry name, by family
RANDOM_PREFIX = "random:"
DATA_DIR = Path(__file__).parent.parent / "data"

_SD15_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD15_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
# Tiny: SD-1.5's block types and nesting (46 positions), narrow; 2 heads and a narrow VAE keep CPU tests fast.
TINY_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64, 64, 64], "layers_per_block": 2, "down_block_types": _SD15_DOWN,
    "up_block_types": _SD15_UP, "cross_attention_dim": 32, "attention_head_dim": 2, "norm_num_groups": 32,
    "sample_size": 32, "in_channels": 4, "out_channels": 4,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [8, 8, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
    "sample_size": 256, "scaling_factor": 0.18215,
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32,
}


def shipped_config(name: str, component: str) -> dict[str, Any]:
    """The public config of a registry model's component (`unet`, `vae`, `scheduler`, `text_encoder`)."""
    path = DATA_DIR / f"{name}_{component}.json"
    if not path.is_file():
        raise ModelNotFoundError(f"model {name!r}: no shipped {component} config; known: {sorted(REGISTRY)}")
    return json.loads(path.read_text())


def not_available(model: str, source: str, reason: str) -> ModelNotFoundError:
    """The one-line error for a hub model whose files are not here, with the command that fetches them."""
    return ModelNotFoundError(
        f"model {model!r}: weights for {source!r} are not available locally ({reason}); with network access run "
        f"`hf download {source}` (cached under HF_HOME/HF_HUB_CACHE; or set HF_HUB_OFFLINE=0 to let sdfeat "
        f"download it), or pass a local diffusers pipeline directory as the model")


def locate(model: str) -> tuple[str, str]:
    """(kind, source): kind is tiny | random | local | hub; source the hub id, directory or registry name."""
    if model in TINY_MODELS:
        return "tiny", model
    if model.startswith(RANDOM_PREFIX):
        name = model.removeprefix(RANDOM_PREFIX)
        if for_registry_name(name) is None:
            raise ModelNotFoundError(f"model {model!r}: random weights exist for {', '.join(NAMES)} only")
        return "random", name
    family = for_registry_name(model)
    if family is not None:
        return "hub", family.REGISTRY[model]
    if Path(model).is_dir():
        return "local", str(Path(model).resolve())
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return "hub", model
    raise ModelNotFoundError(f"model {model!r}: not a registry name ({', '.join(NAMES)}, "
                             f"{', '.join(TINY_MODELS)}, random:<name>), a hub id owner/name, or an existing local "
                             f"diffusers directory")


def _named_family(model: str, kind: str, source: str) -> ModuleType | None:
    """The family a name says (tiny, registry and `random:` names), None where only the config can say."""
    if kind == "tiny":
        return TINY_MODELS[model][0]
    return for_registry_name(source if kind == "random" else model)


@dataclass(frozen=True)
class ModelRef:
    """A model name resolved once (`resolve_model`): how it is had (`kind`: tiny | random | local | hub; `source`:
    the hub id, directory or registry name), its family and its denoiser's config. A job carries it from planning
    to the loader (`loading.load_model`), so nothing below re-reads the config or asks the family again."""

    name: str
    kind: str
    source: str
    revision: str | None
    family_name: str
    config: dict[str, Any] = field(repr=False)  # the denoiser's config (a U-Net's, a DiT transformer's)

    @property
    def family(self) -> ModuleType:
        return FAMILIES[self.family_name]


def resolve_model(model: str, revision: str | None = None) -> ModelRef:
    """`model` resolved once: kind, source, family and denoiser config (`ModelNotFoundError` in one line where
    the name means no model or a hub model's config is not in the cache)."""
    kind, source = locate(model)
    config = _denoiser_config(model, kind, source)
    named = _named_family(model, kind, source)
    family = named if named is not None else for_config(config)
    return ModelRef(model, kind, source, revision, family.NAME, config)


WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")


def downloads_allowed() -> bool:
    """Whether the user opted in to hub downloads (HF_HUB_OFFLINE=0); otherwise weights must be here already."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("0", "false", "no")


def require_weights(model: str | ModelRef, revision: str | None = None) -> None:
    """Refuse in one line (`ModelNotFoundError`) a model whose U-Net or VAE weights are not here: a local directory
    without them, a hub model not in the Hugging Face cache (unless downloads are allowed). Reads the cache's
    file index only: no hub request, no torch. `tiny` and `random:` models need no weights. A `ModelRef` is
    checked where it was resolved to (its directory, its revision)."""
    if isinstance(model, ModelRef):
        model, kind, source, revision = model.name, model.kind, model.source, model.revision
    else:
        kind, source = locate(model)
    if kind in ("tiny", "random") or (kind == "hub" and downloads_allowed()):
        return
    family = for_registry_name(model)
    denoiser = family.DENOISER if family is not None else _denoiser_folder(model, kind, source)
    for component in (denoiser, "vae"):
        if kind == "local":
            if not any((Path(source) / component / name).is_file() for name in WEIGHT_FILES):
                raise ModelNotFoundError(f"model {model!r}: {Path(source) / component} has no safetensors weights "
                                         f"({WEIGHT_FILES[0]}); is it a diffusers pipeline directory?")
            continue
        from huggingface_hub import try_to_load_from_cache

        if not any(isinstance(try_to_load_from_cache(source, f"{component}/{name}", revision=revision), str)
                   for name in WEIGHT_FILES):
            raise not_available(model, source, f"no {component} weights in the Hugging Face cache")


# The offline tiny models: name -> (family, denoiser config, VAE config).
TINY_MODELS: dict[str, tuple[ModuleType, dict[str, Any], dict[str, Any]]] = {
    "tiny": (sd, TINY_UNET_CONFIG, TINY_VAE_CONFIG),
    "tiny-sdxl": (sdxl, sdxl.TINY_UNET_CONFIG, sdxl.TINY_VAE_CONFIG),
    "tiny-dit": (dit, dit.TINY_TRANSFORMER_CONFIG, dit.TINY_VAE_CONFIG),
}


def _denoiser_folder(model: str, kind: str, source: str) -> str:
    """The subfolder of a local or hub pipeline that holds its denoiser: `unet`, or `transformer` (a DiT)."""
    if kind == "local":
        return "transformer" if (Path(source) / "transformer" / "config.json").is_file() else "unet"
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, "transformer/config.json")
    return "transformer" if isinstance(found, str) else "unet"


def unet_config(model: str) -> dict[str, Any]:
    """The denoiser's config (a U-Net's, a DiT's transformer's) without loading weights: shipped JSON, the tiny
    configs, a local directory's or the HF cache's."""
    return _denoiser_config(model, *locate(model))


def _denoiser_config(model: str, kind: str, source: str) -> dict[str, Any]:
    if kind == "tiny":
        return json.loads(json.dumps(TINY_MODELS[model][1]))
    family = _named_family(model, kind, source)
    if family is sd:
        return shipped_config(model.removeprefix(RANDOM_PREFIX), "unet")
    if family is not None:
        return family.shipped_config(model.removeprefix(RANDOM_PREFIX), family.DENOISER)
    folder = _denoiser_folder(model, kind, source)
    if kind == "local":
        path = Path(source) / folder / "config.json"
        if not path.is_file():
            raise ModelNotFoundError(f"model {model!r}: {path} is missing (not a diffusers pipeline directory)")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        return json.loads(Path(hf_hub_download(source, "config.json", subfolder=folder,
                                               local_files_only=True)).read_text())
    except (OSError, HFValidationError) as err:
        raise not_available(model, source, type(err).__name__) from None


def local_unet_config(model: str) -> dict[str, Any] | None:
    """The U-Net config where it is a file here (tiny's, a registry or `random:` model's shipped one, a local
    pipeline directory's); None for a hub id (its config comes through huggingface_hub later), a name no model
    has, or a local config that does not parse (the model loader reports those)."""
    try:
        kind, _ = locate(model)
        if kind == "hub" and for_registry_name(model) is None:
            return None
        return unet_config(model)
    except (ModelNotFoundError, ValueError):
        return None

