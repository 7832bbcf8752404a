"""The DiT family: DiT-XL/2 (`facebook/DiT-XL-2-256`), a class-conditional ImageNet transformer on SD-VAE latents,
as a self-contained model family (see `sdfeat.models.families`).

Blocks. The latent (B, 4, h, w) is cut into p x p patches (p = 2) and embedded with fixed 2-D sin-cos position
embeddings added (`pos_embed`, a `PatchEmbed`); 28 `BasicTransformerBlock`s of width 1152 (adaLN-Zero: timestep and
class modulate every block; no cross-attention) follow; the final layer (`norm_out`, `proj_out_1` modulation,
`proj_out_2`) predicts p*p*8 values per token (noise and learned variance), unpatchified outside any module. The
positions, by module path, in execution order (hook-firing order), are

    pos_embed, transformer_blocks.i.attn1, transformer_blocks.i.ff, transformer_blocks.i (i = 0..27), proj_out_2

`transformer_blocks.i` is the residual stream after block i; `attn1` and `ff` are the self-attention and MLP
outputs *before* adaLN-Zero's gate and the residual add. Every output is (B, N, D) tokens in row-major patch order
(token k at grid row k // w, column k % w; `PatchEmbed` flattens (h, w)); `as_map` reshapes it to (D, h/p, w/p), so
every store reader, metric, report and the explorer work unchanged. `proj_out_2`'s map has p*p*8 = 32 channels
(the prediction, patch-major: channel (py * p + px) * 8 + c), the analogue of a U-Net's `conv_out`.

Presets. `all` (86 positions) and `blocks` (`pos_embed`, the 28 block outputs, `proj_out_2`: the residual stream,
the natural layer list of a transformer). The paper's `paper` preset has no meaning here: it lists SD-1.5's U-Net
modules, none of which a DiT has; `blocks` is the analogue of "every block output". The padding interventions do not
apply to the patch embedding (a stride-p convolution with kernel p and no padding), nor anywhere else: the DiT has no
zero-padded convolution, which is what makes it the control for the paper's padding explanation.

Conditioning (the job spec's `conditioning`, keys in `CONDITIONING_SPEC`). `class_labels` is `"null"` (default: the null
class, id 1000 = `num_embeds_ada_norm`, the class-dropout token used for classifier-free guidance: the paper's empty
prompt's analogue) or `"label"` (each image's own ImageNet label 0..999; an image without one is refused). Prompts
are not used (every prompt must be empty). At resolutions other than 256 px the position embedding is recomputed for
the larger grid by diffusers (grid scaled to the 16 x 16 base), so positions stay comparable across resolutions.

Protocols. `standard` only (`PROTOCOLS`): `paper` reproduces sdhelper 1.0.0 on the paper's three SD models and
reproduces nothing for a DiT. The paper's t = 50 on SD's scaled-linear schedule (alpha-bar 0.952) is t = 65 on
DiT's linear schedule by equal alpha-bar (equal signal-to-noise ratio); t = 50 itself is alpha-bar 0.970 there.

The VAE is an SD VAE (`sdfeat.models.families.vae_precision`: the precision rule, and when DiT shares SD-1.x's cached
latents).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdfeat.errors import ArgumentError, ModelNotFoundError
from sdfeat.models.families.loading import (created_in, fired_shapes, not_available, prepare, require_local,
                                            scheduler_from_config)
from sdfeat.models.families.vae_precision import vae_dtype
from sdfeat.models.vae_encoder import encoder_only

NAME = "dit"
DENOISER = "transformer"  # the pipeline's subfolder holding the denoiser
REGISTRY: dict[str, str] = {"dit-xl-2": "facebook/DiT-XL-2-256"}
NATIVE_RESOLUTION = {"dit-xl-2": 256}
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
VAE_FACTOR = 8
NUM_CLASSES = 1000  # ImageNet; the null class is the next id
CLASS_LABELS = ("null", "label")
# What a job spec's conditioning settings may say for DiT (key -> meaning; every key optional).
CONDITIONING_SPEC: dict[str, str] = {
    "class_labels": "'null' (default): every image conditioned on the null class 1000, the paper's empty-prompt "
                    "analogue; 'label': on its own ImageNet label 0..999 (an image without one is refused)",
}
SETTINGS = tuple(CONDITIONING_SPEC)
TAKES_PROMPT = False  # class-conditional
PADDING_INTERVENTIONS = False  # no zero-padded convolution: the patch embedding has kernel = stride = p
# `paper` reproduces sdhelper 1.0.0's handling of SD-1.5/2.1/SD-Turbo (PROTOCOL.md); it is not defined for DiT.
PROTOCOLS = ("standard",)
_CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")  # the hub config says Transformer2DModel

# Tiny: DiT's block types (adaLN-Zero, patch 2, learned sigma: 8 output channels, 1000 classes + null), 3 blocks of
# width 16.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 3,
    "sample_size": 8, "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "attention_bias": True,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [8, 8, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
    "sample_size": 64, "scaling_factor": 0.18215,
}


# ---------------------------------------------------------------- config side (no torch)

def shipped_config(name: str, component: str) -> dict[str, Any]:
    """The public config of `name`'s component (`transformer`, `vae`, `scheduler`)."""
    if name not in REGISTRY:
        raise ArgumentError(f"name {name!r}: not a DiT model; known: {', '.join(sorted(REGISTRY))}")
    path = DATA_DIR / f"{name}_{component}.json"
    if not path.is_file():
        raise ModelNotFoundError(f"model {name!r}: no shipped {component} config ({path.name})")
    return json.loads(path.read_text())


def owns(denoiser_config: Mapping[str, Any]) -> bool:
    """True for a DiT: a patched transformer with adaLN-Zero class conditioning."""
    return (denoiser_config.get("_class_name", "DiTTransformer2DModel") in _CLASS_NAMES
            and denoiser_config.get("norm_type", "ada_norm_zero") == "ada_norm_zero"
            and denoiser_config.get("patch_size") is not None)


def _layers(config: Mapping[str, Any]) -> int:
    layers = config.get("num_layers", 28)
    if not isinstance(layers, int) or layers <= 0:
        raise ArgumentError(f"denoiser config 'num_layers': expected a positive integer, got {layers!r}")
    return layers


def positions(config: Mapping[str, Any]) -> list[str]:
    """Every hookable position, by module path, in execution order (see the module docstring)."""
    names = ["pos_embed"]
    for i in range(_layers(config)):
        names += [f"transformer_blocks.{i}.attn1", f"transformer_blocks.{i}.ff", f"transformer_blocks.{i}"]
    return names + ["proj_out_2"]


def config_positions(config: Mapping[str, Any]) -> list[str]:
    """`positions`: a DiT's come from its config alone (no torch)."""
    return positions(config)


def presets(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """`all` and `blocks` (no `paper`: see the module docstring)."""
    blocks = ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(_layers(config))] + ["proj_out_2"]
    return {"all": positions(config), "blocks": blocks}


def _grid(config: Mapping[str, Any], resolution: int) -> int:
    """Tokens along each side at `resolution` pixels."""
    patch = config.get("patch_size", 2)
    step = VAE_FACTOR * patch
    if not isinstance(resolution, int) or resolution <= 0 or resolution % step:
        raise ArgumentError(f"resolution {resolution!r}: must be a positive multiple of {step} pixels "
                            f"(VAE factor {VAE_FACTOR} x patch {patch})")
    return resolution // step


def shapes(config: Mapping[str, Any], resolution: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of every position at `resolution` pixels, from the config: width heads * head_dim on the token
    grid, `proj_out_2` p*p*out_channels (`meta_shapes` gives the same from a meta forward; tests pin both)."""
    side = _grid(config, resolution)
    width = config.get("num_attention_heads", 16) * config.get("attention_head_dim", 72)
    patch = config.get("patch_size", 2)
    out = config.get("out_channels") or config.get("in_channels", 4)
    table = {name: (width, side, side) for name in positions(config)}
    table["proj_out_2"] = (patch * patch * out, side, side)
    return table


# ---------------------------------------------------------------- torch side

def meta_inputs(config: Mapping[str, Any], resolution: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) of one image's forward on the meta device: a latent, timestep 50, the null class."""
    import torch

    side = _grid(config, resolution) * config.get("patch_size", 2)
    with torch.device("meta"):
        sample = torch.empty(1, config.get("in_channels", 4), side, side)  # (1, 4, h, w)
        timestep, label = torch.empty(1, dtype=torch.int64), torch.empty(1, dtype=torch.int64)  # (1,), (1,)
    return (sample,), {"timestep": timestep, "class_labels": label}


def meta_model(config: Mapping[str, Any]) -> Any:
    """The transformer built on the meta device (no memory, no weights)."""
    import torch
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        return DiTTransformer2DModel.from_config(_model_config(config))


def meta_shapes(config: Mapping[str, Any], resolution: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of every position from a transformer built on the meta device (no weights) and one meta forward
    with a hook on each position; the dict is in hook-firing order."""
    side = _grid(config, resolution) * config.get("patch_size", 2)
    return fired_shapes(meta_model(config), positions(config), meta_inputs(config, resolution),
                        lambda name, out: as_map(name, out, (side, side)))


def _model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config for `DiTTransformer2DModel` (the hub's says `Transformer2DModel`, with keys the DiT class lacks)."""
    from diffusers import DiTTransformer2DModel

    accepted = set(DiTTransformer2DModel.extract_init_dict(dict(config))[0])
    return {k: v for k, v in config.items() if k in accepted}


@dataclass
class Components:
    """One DiT ready for extraction: the transformer, the VAE encoder (in `vae_dtype`), the pipeline's scheduler
    (the noise for `standard` comes from a DDIM scheduler made from its config). No text encoder."""

    name: str
    denoiser: Any  # DiTTransformer2DModel, eval, no grad, on device in dtype
    vae: Any  # AutoencoderKL without its decoder
    scheduler: Any
    vae_config: dict[str, Any]
    device: Any
    dtype: Any


def _build(name: str, config: Mapping[str, Any], vae_config: Mapping[str, Any], scheduler: Mapping[str, Any],
           seed: int, dtype: Any = None) -> Components:
    """Modules on the CPU with weights created in `dtype` (default float32), the VAE in `vae_dtype`; seeds
    `seed` (transformer) and +1 (VAE)."""
    import torch
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    device, dtype = torch.device("cpu"), dtype or torch.float32
    vae_in = vae_dtype(vae_config, dtype)
    with created_in(dtype, seed):
        model = DiTTransformer2DModel.from_config(_model_config(config))
    with created_in(vae_in, seed + 1):
        vae = encoder_only(AutoencoderKL.from_config(dict(vae_config)))
    return Components(name, prepare(model, device, dtype), prepare(vae, device, vae_in),
                      scheduler_from_config(scheduler), dict(vae_config), device, dtype)


def tiny_components(seed: int = 0) -> Components:
    """An offline tiny DiT (3 adaLN-Zero blocks of width 16, 1000 classes + null) with a tiny SD-style VAE and
    DiT-XL/2's scheduler, float32 on the CPU; the same `seed` gives the same weights."""
    return _build("tiny-dit", TINY_TRANSFORMER_CONFIG, TINY_VAE_CONFIG, shipped_config("dit-xl-2", "scheduler"),
                  seed)


def random_components(name: str, seed: int = 0, *, dtype: Any = None) -> Components:
    """The full architecture of `name` (a REGISTRY name) from the shipped configs, deterministic random weights,
    on the CPU in `dtype` (default float32). DiT-XL/2 has 675 M parameters, 750 M in diffusers' layout: every
    block holds its own copy of the timestep and class embedders."""
    return _build(f"random:{name}", shipped_config(name, "transformer"), shipped_config(name, "vae"),
                  shipped_config(name, "scheduler"), seed, dtype)


_FILES = ("*.json", "*.safetensors")  # what `hf download` needs to fetch for sdfeat


def load_pretrained(source: str, revision: str | None, device: Any, dtype: Any) -> Components:
    """A DiT pipeline from the hub (a REGISTRY name or hub id, through the HF cache) or a local diffusers
    directory: transformer in `dtype`, VAE encoder in `vae_dtype`, safetensors only (a checkpoint with pickled
    weights only is refused)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel
    from huggingface_hub.errors import HFValidationError

    name, source = source, REGISTRY.get(source, source)
    device = torch.device(device)
    require_local(source, revision, "transformer", "DiT", list(REGISTRY), _FILES)
    try:
        config = dict(DiTTransformer2DModel.load_config(source, subfolder="transformer", revision=revision))
        vae_config = dict(AutoencoderKL.load_config(source, subfolder="vae", revision=revision))
        scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler", revision=revision)
    except (OSError, HFValidationError) as err:
        raise not_available(source, "DiT", type(err).__name__, _FILES) from None
    if not owns(config):
        raise ModelNotFoundError(f"model {name!r}: its transformer is not an adaLN-Zero DiT")
    vae_in = vae_dtype(vae_config, dtype)
    common = {"revision": revision, "use_safetensors": True}
    try:
        model = DiTTransformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype, **common)
        vae = encoder_only(AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_in, **common))
    except (OSError, HFValidationError) as err:
        raise not_available(source, "DiT", type(err).__name__, _FILES) from None
    return Components(name, prepare(model, device, dtype), prepare(vae, device, vae_in),
                      scheduler_from_config(scheduler_config), vae_config, device, dtype)


def _class_ids(labels: Sequence[int], settings: Mapping[str, Any], null_class: int = NUM_CLASSES) -> list[int]:
    """The class id per image: the null class, or each image's own label (settings `class_labels`)."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ArgumentError(f"field 'conditioning.{unknown[0]}': unknown for DiT; known: {', '.join(SETTINGS)}")
    mode = settings.get("class_labels", "null")
    if mode not in CLASS_LABELS:
        raise ArgumentError(f"field 'conditioning.class_labels': {mode!r}; choose one of {', '.join(CLASS_LABELS)}")
    if mode == "null":
        return [null_class] * len(labels)
    for k, label in enumerate(labels):
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < null_class:
            raise ArgumentError(f"labels[{k}] = {label!r}: field 'conditioning.class_labels: label' needs an "
                                f"ImageNet label 0..{null_class - 1} for every image")
    return list(labels)


def conditioning(components: Components, labels: Sequence[int], prompts: Sequence[str], resolution: int,
                 settings: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer's keyword inputs besides latents and timestep: `class_labels` (B,) int64 on the device."""
    import torch

    if len(labels) != len(prompts):
        raise ArgumentError(f"prompts: {len(prompts)} prompts for {len(labels)} labels")
    if any(prompts):
        raise ArgumentError("prompts: DiT is class-conditional and takes no prompt; field 'conditioning.class_labels' "
                            "chooses the image's label or the null class")
    _grid(components.denoiser.config, resolution)
    ids = _class_ids(labels, settings, components.denoiser.config.num_embeds_ada_norm)
    return {"class_labels": torch.tensor(ids, dtype=torch.int64, device=components.device)}  # (B,)


def call(denoiser: Any, latents: Any, timestep: Any, conditioning: Mapping[str, Any]) -> Any:
    """One forward on `latents` (B, 4, h, w) at `timestep` (a tensor, (1,) or (B,): expanded to (B,) as DiTPipeline
    does), without autograd; returns the prediction (B, 8, h, w). A caller's hook may end it early by raising."""
    import torch

    with torch.inference_mode():
        steps = timestep.reshape(-1).expand(latents.shape[0])  # (B,)
        return denoiser(latents, timestep=steps, class_labels=conditioning["class_labels"], return_dict=False)[0]


def as_map(name: str, output: Any, latent_hw: tuple[int, int]) -> Any:
    """Tokens (B, N, D) of a hooked output (a tuple gives its element 0) as a (B, D, h, w) map on the token grid
    of a latent of `latent_hw` (h/p x w/p, p inferred from N: N = h*w/p^2); token k lands at (k // w, k % w)."""
    import torch

    value = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(value, torch.Tensor) or value.ndim != 3:
        raise TypeError(f"block {name!r}: expected (B, N, D) tokens, got {type(value).__name__}"
                        f"{tuple(getattr(value, 'shape', ()))}")
    batch, tokens, width = value.shape
    height, breadth = latent_hw
    patch = math.isqrt(height * breadth // tokens) if tokens else 0
    if patch == 0 or (height // patch) * (breadth // patch) != tokens or height % patch or breadth % patch:
        raise ArgumentError(f"latent_hw {tuple(latent_hw)}: {tokens} tokens of block {name!r} tile no p x p grid "
                            f"of it")
    return value.transpose(1, 2).reshape(batch, width, height // patch, breadth // patch)  # (B, D, h, w)
