"""The SDXL family: SDXL base 1.0 and SDXL-Turbo (same U-Net architecture; Turbo is SDXL 1.0 fine-tuned by
adversarial diffusion distillation), as a self-contained model family (see `sdfeat.models.families`).

Blocks. A position is `conv_in`, `conv_out`, or `down_blocks.i|up_blocks.i|mid_block` . `resnets.j|attentions.j|
downsamplers.0|upsamplers.0`, named by its PyTorch module path, as for SD-1.x/2.x. SDXL has three levels
(320/640/1280 channels), no attention at the first (`DownBlock2D`) and last (`UpBlock2D`) stage, 1/2/10
transformer layers per attention block: 34 positions, 32 inside the stages.

Presets. `all` (every position) and `stages` (`conv_in`, the last position of every down, mid and up stage,
`conv_out`: one map per stage, for cross-model plots on a relative-depth axis). The paper's `paper` preset has no
meaning here: it is SD-1.5's list of 45 module paths minus `up_blocks.0.resnets.2`, an omission of sdhelper's block
list; SDXL's paths name other modules (its `up_blocks.0` is a cross-attention stage at the lowest resolution). The
paper's choice, "every resnet, attention and sampler output plus conv_in/conv_out", is `all` here.

Conditioning (the job spec's `conditioning`, keys in `CONDITIONING_SPEC`). Prompts go through both text encoders as
diffusers' SDXL pipeline does (`encode_prompt`, no clip skip): the penultimate hidden states of CLIP ViT-L (768) and
OpenCLIP bigG (1280), concatenated to `encoder_hidden_states` (B, 77, 2048); bigG's projected pooled output is
`text_embeds` (B, 1280). `time_ids` (B, 6) are SDXL's micro-conditioning, `original_size + crops_coords_top_left +
target_size`, each (height, width) / (top, left) in pixels; settings may give `original_size`,
`crops_coords_top_left`, `target_size`; the defaults are the pipeline's for an image generated at the job's
resolution, (res, res), (0, 0), (res, res): "an uncropped image at its native size", which is what a centre-cropped,
resized input is asked to be. Each distinct prompt is encoded once, on its own (its embedding does not depend on the
batch it came in); the text encoders are loaded for new prompts and dropped right after.

Protocols. `standard` only (`PROTOCOLS`). `paper` reproduces sdhelper 1.0.0 on the paper's three models, quirks
included (pixels / 255, one noise field per batch from the global RNG, the pipeline scheduler's
`scale_model_input` on top of `add_noise`); applied to SDXL it would reproduce nothing, so it is refused.

Shapes come from the config (`_config_shapes`, no torch); `meta_shapes` builds the U-Net on the meta device and
records every position's output in hook-firing order (tests pin both against a real forward). The VAE runs in
`vae_dtype` (float32 under float16/bfloat16: SDXL's VAE overflows in float16; see
`sdfeat.models.families.vae_precision`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdfeat.errors import ArgumentError, ModelNotFoundError
from sdfeat.models.families import sdxl_text
from sdfeat.models.families.loading import (created_in, fired_shapes, not_available, prepare, require_local,
                                            scheduler_from_config)
from sdfeat.models.families.sd import meta_model  # the same UNet2DConditionModel, on the meta device
from sdfeat.models.families.sdxl_text import TextLoader
from sdfeat.models.families.vae_precision import vae_dtype
from sdfeat.models.vae_encoder import encoder_only

NAME = "sdxl"
DENOISER = "unet"  # the pipeline's subfolder holding the denoiser
REGISTRY: dict[str, str] = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sdxl-turbo": "stabilityai/sdxl-turbo"}
NATIVE_RESOLUTION = {"sdxl": 1024, "sdxl-turbo": 512}  # the pipelines' default image sizes
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
VAE_FACTOR = 8
_TURBO_OWN = ("scheduler",)  # SDXL-Turbo's other components have SDXL's architecture (sdxl_*.json)
_DOWN = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # block type -> has attentions
_UP = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_POSITION = re.compile(r"^(conv_in|conv_out|(down_blocks\.\d+|up_blocks\.\d+|mid_block)"
                       r"\.(resnets|attentions|downsamplers|upsamplers)\.\d+)$")
# What a job spec's conditioning settings may say for SDXL (key -> meaning; every key optional).
CONDITIONING_SPEC: dict[str, str] = {
    "original_size": "[height, width] in pixels of the image before cropping and resizing (time ids 0-1); "
                     "default [resolution, resolution]",
    "crops_coords_top_left": "[top, left] in pixels of the crop (time ids 2-3); default [0, 0]",
    "target_size": "[height, width] in pixels the model is asked to produce (time ids 4-5); "
                   "default [resolution, resolution]",
}
SETTINGS = tuple(CONDITIONING_SPEC)
TAKES_PROMPT = True
PADDING_INTERVENTIONS = True  # its convolutions pad with zeros: the padding study applies
# `paper` reproduces sdhelper 1.0.0's handling of SD-1.5/2.1/SD-Turbo (PROTOCOL.md); it is not defined for SDXL.
PROTOCOLS = ("standard",)

# Tiny: SDXL's block types, attention-free first and last stages, transformer depth varying per level (1, 1, 2),
# text_time added conditioning; two CLIP text encoders of width 32 (cross-attention width 64 = 32 + 32).
TINY_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64, 64], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": [1, 2, 2], "use_linear_projection": True,
    "cross_attention_dim": 64, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80, "norm_num_groups": 32, "sample_size": 16,
    "in_channels": 4, "out_channels": 4,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [8, 8, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
    "sample_size": 128, "scaling_factor": 0.13025, "force_upcast": True,
}


# ---------------------------------------------------------------- config side (no torch)

def shipped_config(name: str, component: str) -> dict[str, Any]:
    """The public config of `name`'s component (`unet`, `vae`, `scheduler`, `text_encoder`, `text_encoder_2`)."""
    if name not in REGISTRY:
        raise ArgumentError(f"name {name!r}: not an SDXL model; known: {', '.join(sorted(REGISTRY))}")
    prefix = "sdxlturbo" if name == "sdxl-turbo" and component in _TURBO_OWN else "sdxl"
    path = DATA_DIR / f"{prefix}_{component}.json"
    if not path.is_file():
        raise ModelNotFoundError(f"model {name!r}: no shipped {component} config ({path.name})")
    return json.loads(path.read_text())


def owns(denoiser_config: Mapping[str, Any]) -> bool:
    """True for an SDXL-style U-Net: `UNet2DConditionModel` with the `text_time` added conditioning."""
    return (denoiser_config.get("_class_name", "UNet2DConditionModel") == "UNet2DConditionModel"
            and denoiser_config.get("addition_embed_type") == "text_time")


def config_positions(config: Mapping[str, Any]) -> list[str] | None:
    """Every position in execution order from the config alone; None for block types other than SDXL's."""
    down, up = config.get("down_block_types"), config.get("up_block_types")
    layers = config.get("layers_per_block", 2)
    if (not isinstance(down, list) or not isinstance(up, list) or not isinstance(layers, int)
            or any(t not in _DOWN for t in down) or any(t not in _UP for t in up)
            or (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn"):
        return None
    names = ["conv_in"]
    for i, kind in enumerate(down):
        for j in range(layers):
            names += [f"down_blocks.{i}.resnets.{j}"] + ([f"down_blocks.{i}.attentions.{j}"] if _DOWN[kind] else [])
        names += [f"down_blocks.{i}.downsamplers.0"] if i < len(down) - 1 else []
    names += ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    for i, kind in enumerate(up):
        for j in range(layers + 1):
            names += [f"up_blocks.{i}.resnets.{j}"] + ([f"up_blocks.{i}.attentions.{j}"] if _UP[kind] else [])
        names += [f"up_blocks.{i}.upsamplers.0"] if i < len(up) - 1 else []
    return names + ["conv_out"]


def positions(config: Mapping[str, Any]) -> list[str]:
    """Every hookable position of the U-Net, by module path, in execution order."""
    names = config_positions(config)
    return names if names is not None else list(meta_shapes(config, VAE_FACTOR * 16))


def presets(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """`all` and `stages` (see the module docstring; there is no `paper` preset for SDXL, and why)."""
    names = positions(config)

    def stage(name: str) -> str:  # `down_blocks.1`, `mid_block`, `conv_in`, ...
        return ".".join(name.split(".")[:2]) if name.startswith(("down_blocks", "up_blocks")) else name.split(".")[0]

    last = [n for k, n in enumerate(names) if k + 1 == len(names) or stage(names[k + 1]) != stage(n)]
    return {"all": names, "stages": last}


def _check_resolution(resolution: int) -> int:
    if not isinstance(resolution, int) or resolution <= 0 or resolution % VAE_FACTOR:
        raise ArgumentError(f"resolution {resolution!r}: must be a positive multiple of {VAE_FACTOR} pixels")
    return resolution // VAE_FACTOR


def _config_shapes(config: Mapping[str, Any], resolution: int) -> dict[str, tuple[int, int, int]] | None:
    """(C, H, W) per position as diffusers' forward gives it: channels from `block_out_channels` (reversed on the
    way up) and `out_channels`; sides halved by each stride-2 padding-1 downsampler (rounding up: 17 -> 9) and
    restored by each upsampler to its skip's size. None where the config has anything else."""
    names, channels = config_positions(config), config.get("block_out_channels")
    out = config.get("out_channels", 4)
    kernels = (config.get("conv_in_kernel", 3), config.get("conv_out_kernel", 3))
    if (names is None or not isinstance(channels, list) or len(channels) != len(config["down_block_types"])
            or len(channels) != len(config["up_block_types"]) or not isinstance(out, int)
            or config.get("downsample_padding", 1) != 1 or not all(isinstance(k, int) and k % 2 for k in kernels)):
        return None
    sides = [_check_resolution(resolution)]  # sides[level]: the latent side inside down block `level`
    for _ in channels[1:]:
        sides.append((sides[-1] - 1) // 2 + 1)
    top = len(channels) - 1

    def shape(name: str) -> tuple[int, int, int]:
        parts = name.split(".")
        if name in ("conv_in", "conv_out"):
            c = channels[0] if name == "conv_in" else out
            return c, sides[0], sides[0]
        if parts[0] == "mid_block":
            return channels[-1], sides[-1], sides[-1]
        i, kind = int(parts[1]), parts[2]
        if parts[0] == "down_blocks":
            s = sides[i + 1] if kind == "downsamplers" else sides[i]
            return channels[i], s, s
        level = top - i  # up block i works at down block `level`'s side, its upsampler at the next level up
        s = sides[level - 1] if kind == "upsamplers" else sides[level]
        return channels[level], s, s

    return {name: shape(name) for name in names}


def shapes(config: Mapping[str, Any], resolution: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of every position at `resolution` pixels, in execution order: from the config, else `meta_shapes`."""
    return _config_shapes(config, resolution) or meta_shapes(config, resolution)


# ---------------------------------------------------------------- torch side

def meta_inputs(config: Mapping[str, Any], resolution: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) of one image's U-Net forward on the meta device (shapes, FLOP counts): a latent, timestep 50,
    an 77-token context and the added conditioning widths the config implies."""
    import torch

    side = _check_resolution(resolution)
    time_width = 6 * config.get("addition_time_embed_dim", 256)
    pooled = config.get("projection_class_embeddings_input_dim", 2816) - time_width
    with torch.device("meta"):
        sample = torch.empty(1, config.get("in_channels", 4), side, side)  # (1, 4, h, w)
        context = torch.empty(1, 77, config["cross_attention_dim"])  # (1, 77, 2048)
        added = {"text_embeds": torch.empty(1, pooled), "time_ids": torch.empty(1, 6)}  # (1, 1280), (1, 6)
    return (sample, torch.tensor(50)), {"encoder_hidden_states": context, "added_cond_kwargs": added}


def meta_shapes(config: Mapping[str, Any], resolution: int) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of every position, from a U-Net built on the meta device (no memory, no weights) and one meta
    forward with a hook on every module whose path is a position; the dict is in hook-firing order."""
    unet = meta_model(config)
    names = [name for name, _ in unet.named_modules() if _POSITION.match(name)]
    return fired_shapes(unet, names, meta_inputs(config, resolution), lambda name, out: as_map(name, out, (0, 0)))


@dataclass
class Components:
    """One SDXL model ready for extraction. `scheduler` is the pipeline's own; the noise for `standard` comes from a
    DDIM scheduler made from its config. `text_loader` gives the text encoders on `device` for new prompts."""

    name: str
    denoiser: Any  # UNet2DConditionModel, eval, no grad, on device in dtype
    vae: Any  # AutoencoderKL without its decoder, in vae_dtype(vae_config, dtype)
    scheduler: Any
    vae_config: dict[str, Any]
    device: Any
    dtype: Any
    text_loader: TextLoader = field(repr=False)
    prompt_cache: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False)  # -> ((77, D), (P,))


def _build(name: str, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any], scheduler: Mapping[str, Any],
           text_configs: tuple[Mapping[str, Any], Mapping[str, Any]], seed: int, dtype: Any = None) -> Components:
    """Modules on the CPU with weights created in `dtype` (default float32), the VAE in `vae_dtype`; seeds
    `seed` (U-Net), +1 (VAE), +2 and +3 (text encoders)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    device, dtype = torch.device("cpu"), dtype or torch.float32
    vae_in = vae_dtype(vae_config, dtype)
    with created_in(dtype, seed):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    with created_in(vae_in, seed + 1):
        vae = encoder_only(AutoencoderKL.from_config(dict(vae_config)))
    return Components(name, prepare(unet, device, dtype), prepare(vae, device, vae_in),
                      scheduler_from_config(scheduler), dict(vae_config), device, dtype,
                      sdxl_text.random_loader(text_configs, seed + 2, device, dtype))


def tiny_components(seed: int = 0) -> Components:
    """An offline tiny SDXL (block types, added conditioning and two text encoders of SDXL), float32 on the CPU;
    the same `seed` gives the same weights. The text encoders are built on first use and dropped after."""
    text = {**sdxl_text.TINY_TEXT_CONFIG, "vocab_size": len(sdxl_text.tiny_tokenizer().get_vocab())}
    return _build("tiny-sdxl", TINY_UNET_CONFIG, TINY_VAE_CONFIG, shipped_config("sdxl", "scheduler"),
                  (text, text), seed)


def random_components(name: str, seed: int = 0, *, dtype: Any = None) -> Components:
    """The full architecture of `name` (a REGISTRY name) from the shipped configs, deterministic random weights,
    on the CPU in `dtype` (default float32; the U-Net alone is 2.6 G parameters, 10.3 GB in float32). The text
    encoders (0.8 G parameters) are built only when a prompt is first embedded, and dropped after."""
    return _build(f"random:{name}", shipped_config(name, "unet"), shipped_config(name, "vae"),
                  shipped_config(name, "scheduler"),
                  (shipped_config(name, "text_encoder"), shipped_config(name, "text_encoder_2")), seed, dtype)


_FILES = ("*.json", "*.txt", "*.safetensors")  # what `hf download` needs to fetch for sdfeat


def load_pretrained(source: str, revision: str | None, device: Any, dtype: Any) -> Components:
    """An SDXL pipeline from the hub (a REGISTRY name or hub id, through the HF cache) or a local diffusers
    directory: U-Net in `dtype`, VAE encoder in `vae_dtype`, safetensors only; text encoders loaded per new prompt."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from huggingface_hub.errors import HFValidationError

    name, source = source, REGISTRY.get(source, source)
    device = torch.device(device)
    require_local(source, revision, "unet", "SDXL", list(REGISTRY), _FILES)
    try:
        unet_config = dict(UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision))
        vae_config = dict(AutoencoderKL.load_config(source, subfolder="vae", revision=revision))
        scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler", revision=revision)
    except (OSError, HFValidationError) as err:
        raise not_available(source, "SDXL", type(err).__name__, _FILES) from None
    if not owns(unet_config):
        raise ModelNotFoundError(f"model {name!r}: its U-Net has no text_time added conditioning (not an SDXL)")
    vae_in = vae_dtype(vae_config, dtype)
    common = {"revision": revision, "use_safetensors": True}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **common)
        vae = encoder_only(AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_in, **common))
    except (OSError, HFValidationError) as err:
        raise not_available(source, "SDXL", type(err).__name__, _FILES) from None
    return Components(name, prepare(unet, device, dtype), prepare(vae, device, vae_in),
                      scheduler_from_config(scheduler_config), vae_config, device, dtype,
                      sdxl_text.pretrained_loader(source, revision, device, dtype))


def _pair(settings: Mapping[str, Any], key: str, default: tuple[int, int]) -> tuple[int, int]:
    value = settings.get(key, default)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ArgumentError(f"field 'conditioning.{key}': expected two non-negative integers (height, width), "
                            f"got {value!r}")
    return int(value[0]), int(value[1])


def _time_ids(settings: Mapping[str, Any], resolution: int) -> list[int]:
    """SDXL's six micro-conditioning numbers: original (h, w) + crop (top, left) + target (h, w)."""
    _check_resolution(resolution)
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ArgumentError(f"field 'conditioning.{unknown[0]}': unknown for SDXL; known: {', '.join(SETTINGS)}")
    native = (resolution, resolution)
    return [*_pair(settings, "original_size", native), *_pair(settings, "crops_coords_top_left", (0, 0)),
            *_pair(settings, "target_size", native)]


def conditioning(components: Components, labels: Sequence[int], prompts: Sequence[str], resolution: int,
                 settings: Mapping[str, Any]) -> dict[str, Any]:
    """The U-Net's keyword inputs for a batch: `encoder_hidden_states` (B, 77, 2048) and `added_cond_kwargs`
    {`text_embeds` (B, 1280), `time_ids` (B, 6)} (widths of the full model). `labels` are not used by SDXL (a
    class name reaches it through the prompt); `settings`: see the module docstring."""
    import torch

    if not prompts or len(labels) != len(prompts):
        raise ArgumentError(f"prompts: {len(prompts)} prompts for {len(labels)} labels (at least one of each)")
    ids = _time_ids(settings, resolution)
    cache = components.prompt_cache
    new = [p for p in dict.fromkeys(prompts) if p not in cache]
    if new:
        encoders = components.text_loader()
        for prompt in new:  # one at a time: a prompt's embedding never depends on which prompts came with it
            hidden, pooled = sdxl_text.encode(encoders, [prompt])  # (1, 77, 2048), (1, 1280)
            cache[prompt] = (hidden[0].to(components.device, components.dtype),
                             pooled[0].to(components.device, components.dtype))
        del encoders  # the text encoders are dropped here
    config = components.denoiser.config
    width = config.addition_time_embed_dim * len(ids) + cache[prompts[0]][1].shape[-1]
    if width != config.projection_class_embeddings_input_dim:
        raise ArgumentError(f"components: time ids and pooled text of {components.name!r} give {width} added "
                            f"features, its U-Net expects {config.projection_class_embeddings_input_dim}")
    context = torch.stack([cache[p][0] for p in prompts])  # (B, 77, 2048)
    pooled = torch.stack([cache[p][1] for p in prompts])  # (B, 1280)
    times = torch.tensor([ids], dtype=components.dtype, device=components.device).expand(len(prompts), -1)  # (B, 6)
    return {"encoder_hidden_states": context, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": times}}


def call(denoiser: Any, latents: Any, timestep: Any, conditioning: Mapping[str, Any]) -> Any:
    """One U-Net forward on `latents` (B, 4, h, w) at `timestep` (a tensor, (1,) or (B,)), without autograd;
    returns the noise prediction (B, 4, h, w). An exception raised by a caller's hook ends it early and propagates."""
    import torch

    with torch.inference_mode():
        return denoiser(latents, timestep, encoder_hidden_states=conditioning["encoder_hidden_states"],
                        added_cond_kwargs=conditioning["added_cond_kwargs"], return_dict=False)[0]


def as_map(name: str, output: Any, latent_hw: tuple[int, int]) -> Any:
    """A hooked output as a (B, C, H, W) map: a tuple or list gives its element 0 (down blocks and attention blocks
    return tuples), a tensor is itself. `latent_hw` is not needed by a U-Net (its outputs are maps already)."""
    import torch

    value = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(value, torch.Tensor) or value.ndim != 4:
        raise TypeError(f"block {name!r}: expected a (B, C, H, W) tensor or a tuple starting with one, "
                        f"got {type(value).__name__}{tuple(getattr(value, 'shape', ()))}")
    return value
