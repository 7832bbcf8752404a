"""Loading a model for extraction.

Which model a name means (`sd15`, `sd21`, `sdturbo`, a hub id, a local diffusers directory, `tiny`, `random:<name>`)
and its configs are `configs`' (torch-free); this module builds or loads the weights for those names: `tiny` is
built in code from `registry.TINY_UNET_CONFIG` and friends, `random:<name>` from the shipped configs with
deterministic random weights (for slow tests and benchmarks).

Hub ids and local directories go through the real loading path: each component separately from safetensors
(never pickled weights), resolved by huggingface_hub, so HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE apply. The
U-Net and the VAE are read tensor by tensor into modules built on the meta device (`sdfeat.models.weights`; peak =
final weights + one tensor), falling back to diffusers' `from_pretrained` for checkpoints that do not map name for
name. Missing weights raise `ModelNotFoundError` with one line.

For extraction only the U-Net, the VAE's encoder, the schedulers and one prompt embedding are needed: the VAE
decoder is dropped after loading, the text encoder is loaded when a new prompt is first embedded and freed right
after. Everything is in eval mode without gradients.
"""

from __future__ import annotations

import ctypes
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch

from sdfeat.errors import ModelNotFoundError
from sdfeat.models.families import sd
from sdfeat.models.families.vae_precision import vae_dtype
from sdfeat.models.hooks import Capture, capture
from sdfeat.models.interventions import apply_padding
from sdfeat.models.registry import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG, ModelRef, shipped_config
from sdfeat.models.registry import not_available as _not_found
from sdfeat.models.registry import require_weights, resolve_model
from sdfeat.models.vae_encoder import encoder_only

log = logging.getLogger(__name__)


TextLoader = Callable[[], tuple[Any, torch.nn.Module]]  # -> (tokenizer, text encoder on device)


@dataclass
class LoadedModel:
    """A model ready for extraction. `scheduler` is the pipeline's own (for `scale_model_input`),
    `noise_scheduler` a DDIM scheduler from its config (for `add_noise`)."""

    name: str
    source: str
    revision: str | None
    unet: Any  # UNet2DConditionModel
    _vae: Any  # AutoencoderKL without its decoder; None until first used when loaded lazily (see `vae`)
    scheduler: Any
    noise_scheduler: Any
    device: torch.device
    dtype: torch.dtype
    scaling_factor: float
    _text_loader: TextLoader = field(repr=False)
    _prompt_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _vae_loader: Callable[[], Any] | None = field(default=None, repr=False)
    _vae_digest: Callable[[], str] | None = field(default=None, repr=False)
    family: ModuleType = sd  # `sdfeat.models.families`: how the denoiser is conditioned, called and read
    components: Any = None   # the family's own components (SDXL's text encoders, ...); None for SD

    def condition(self, labels: Sequence[int], prompts: Sequence[str], resolution: int,
                  settings: Mapping[str, Any]) -> dict[str, Any]:
        """The denoiser's keyword inputs for a batch besides latents and timestep (SD: the prompts' embeddings)."""
        if self.family is sd:
            return {"encoder_hidden_states": self.prompt_embeddings(prompts)}  # (B, 77, D)
        return self.family.conditioning(self.components, labels, prompts, resolution, settings)

    def capture(self, names: Sequence[str], latent_hw: tuple[int, int]) -> AbstractContextManager[Capture]:
        """Hooks on the denoiser's blocks `names` for one `with` block (`hooks.capture`): its `run(latents,
        timestep, conditioning)` calls the denoiser as the family does (ending after the deepest block) and returns
        each block's output as a (B, C, H, W) map (a DiT's tokens on their `latent_hw` grid)."""
        family, denoiser = self.family, self.unet
        return capture(denoiser, names, call=lambda *inputs: family.call(denoiser, *inputs),
                       to_map=lambda name, output: family.as_map(name, output, latent_hw))

    @property
    def vae(self) -> Any:
        """The VAE (encoder only), loaded on first use when `load_model(lazy_vae=True)`."""
        if self._vae is None:
            if self._vae_loader is None:
                raise ModelNotFoundError(f"model {self.name!r}: no VAE loader")
            self._vae = self._vae_loader()
        return self._vae

    @property
    def vae_loaded(self) -> bool:
        return self._vae is not None

    def vae_weights_digest(self) -> str:
        """A digest of the VAE encoder's and quant_conv's weights as this model computes with them (after the
        fp16 rounding and the cast to `dtype`), read from the weights file without loading the VAE where there is
        one. Two models whose encoders hold the same values give the same digest (the latent cache's key)."""
        if self._vae_digest is None:
            raise ModelNotFoundError(f"model {self.name!r}: no VAE weights to digest")
        return self._vae_digest()

    def prompt_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 77, D) last hidden states of the text encoder, one row per prompt; each distinct prompt is encoded
        once (the encoder is loaded for new prompts and freed after). One repeated prompt gives an expanded view."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if new:
            tokenizer, text_encoder = self._text_loader()
            ids = tokenizer(new, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids  # (n, 77)
            with torch.inference_mode():
                hidden = text_encoder(ids.to(text_encoder.device))[0]  # (n, 77, D)
            for prompt, row in zip(new, hidden):
                self._prompt_cache[prompt] = row.to(self.device, self.dtype)
            del text_encoder, hidden
            _return_freed_memory()
        if len(set(prompts)) == 1:
            return self._prompt_cache[prompts[0]].expand(len(prompts), -1, -1)
        return torch.stack([self._prompt_cache[p] for p in prompts])


def _return_freed_memory() -> None:
    """Hand memory freed by Python back to the OS (glibc keeps it otherwise: 0.35 GB of SD-1.5's text encoder
    stayed resident after it was deleted). A no-op where glibc is not the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _prepare(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, fp16_rounded: bool,
             channels_last: bool = False) -> torch.nn.Module:
    """eval, no grad, weights optionally rounded through fp16 (sdhelper's loading), then on device in dtype."""
    module.eval().requires_grad_(False)
    # torch's own `to`: diffusers' ModelMixin.to warns on every dtype cast (about modules it keeps in fp32: none here)
    if fp16_rounded:
        torch.nn.Module.to(module, torch.float16)
    torch.nn.Module.to(module, device=device, dtype=dtype)
    if channels_last:
        torch.nn.Module.to(module, memory_format=torch.channels_last)
    return module


def _tiny_tokenizer(max_length: int = 77) -> Any:
    """A CLIP BPE tokenizer over lower-case letters, digits and a few marks, built in code (no files)."""
    from transformers import CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    tokens = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    # transformers 5: CLIPTokenizer(vocab_file=..., merges_file=...) silently ignores its files: pass them in memory
    return CLIPTokenizer(vocab=vocab, merges=[("t", "h"), ("th", "e</w>")], model_max_length=max_length)


def _text_encoder_from_config(config: dict[str, Any], tokenizer: Any, seed: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(**{**config, **ids}))


def build_tiny_pipeline(seed: int = 0) -> Any:
    """An SD-1.5-shaped StableDiffusionPipeline small enough for tests: same U-Net block types and nesting (46
    positions), a factor-8 VAE, a CLIP text encoder of width 32, the SD-1.5 PNDM scheduler. Deterministic: the same
    `seed` gives the same weight bytes on every build."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _tiny_tokenizer()
    text_config = {**TINY_TEXT_CONFIG, "vocab_size": len(tokenizer.get_vocab())}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(TINY_UNET_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(TINY_VAE_CONFIG)
    text_encoder = _text_encoder_from_config(text_config, tokenizer, seed + 2)
    scheduler = PNDMScheduler.from_config(shipped_config("sd15", "scheduler"))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline as a normal diffusers directory (safetensors) that `load_model(str(path))` loads."""
    path = Path(path)
    build_tiny_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


def _scheduler_from_config(config: dict[str, Any]) -> Any:
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ModelNotFoundError(f"scheduler config: unknown scheduler class {config.get('_class_name')!r}")
    return cls.from_config(config)


class _Components(NamedTuple):
    """How a model's SD-family components are had: the U-Net (a loader), the VAE, the scheduler, the text encoder."""

    unet: Callable[[], torch.nn.Module]
    vae: _VaeSource
    scheduler: Any
    text: TextLoader


def _components_random(name: str) -> _Components:
    """Full architecture from the shipped configs, deterministic random weights (seeds 0, 1, 2).

    The text encoder is built from the real config too, but with random weights prompt text means nothing, so
    the tokenizer is the tiny in-code one (its token ids are valid for any CLIP vocabulary size)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    def unet() -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return UNet2DConditionModel.from_config(shipped_config(name, "unet"))

    def vae_built() -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return encoder_only(AutoencoderKL.from_config(shipped_config(name, "vae")))

    def text_loader() -> tuple[Any, torch.nn.Module]:
        tokenizer = _tiny_tokenizer()
        return tokenizer, _text_encoder_from_config(shipped_config(name, "text_encoder"), tokenizer, 2)

    vae = _VaeSource(shipped_config(name, "vae"), vae_built, lambda: vae_built().state_dict().items())
    return _Components(unet, vae, _scheduler_from_config(shipped_config(name, "scheduler")), text_loader)


def _weights_file(source: str, subfolder: str, revision: str | None) -> Path | None:
    """The component's single safetensors file (local directory or HF cache/hub), or None (sharded, absent)."""
    name = "diffusion_pytorch_model.safetensors"
    if Path(source).is_dir():
        path = Path(source) / subfolder / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(source, name, subfolder=subfolder, revision=revision))
    except EntryNotFoundError:
        return None


def _components_pretrained(ref: ModelRef, dtype: torch.dtype, fp16_rounded: bool,
                           device: torch.device) -> _Components:
    """U-Net and VAE read tensor by tensor into modules built on the meta device (`weights.load_module`): the
    load peak is the final weights plus one tensor. Both come back already rounded and cast (`prepared`).
    Checkpoints that do not map name for name (old attention names) go through diffusers' `from_pretrained`."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from huggingface_hub.errors import HFValidationError
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdfeat.models import weights

    model, source, revision = ref.name, ref.source, ref.revision
    common = {"revision": revision, "use_safetensors": True}
    load_dtype = torch.float16 if fp16_rounded else dtype

    def pretrained(cls: Any, subfolder: str, file: Path | None, config: dict[str, Any],
                   prepare: Callable[[Any], Any] = lambda m: m) -> tuple[Any, bool]:
        """(module, already rounded and cast)."""
        if file is not None:
            module = weights.load_module(lambda: prepare(cls.from_config(config)), file, dtype, fp16_rounded,
                                         device)
            if module is not None:
                return module, True
        module = prepare(cls.from_pretrained(source, subfolder=subfolder, torch_dtype=load_dtype, **common))
        return module, False

    require_weights(ref)  # one line, before any hub request, when they are not where `ref` points
    try:
        unet_file, vae_file = _weights_file(source, "unet", revision), _weights_file(source, "vae", revision)
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision)
        vae_config = AutoencoderKL.load_config(source, subfolder="vae", revision=revision)
        scheduler = _scheduler_from_config(DDIMScheduler.load_config(source, subfolder="scheduler",
                                                                     revision=revision))
    except (OSError, HFValidationError) as err:
        raise _not_found(model, source, type(err).__name__) from None

    def unet() -> torch.nn.Module:
        try:
            module, prepared = pretrained(UNet2DConditionModel, "unet", unet_file, unet_config)
        except (OSError, HFValidationError) as err:
            raise _not_found(model, source, type(err).__name__) from None
        return module if prepared else _prepare(module, device, dtype, fp16_rounded)

    def vae_loader() -> torch.nn.Module:
        vae, prepared = pretrained(AutoencoderKL, "vae", vae_file, vae_config, encoder_only)
        return vae if prepared else _prepare(vae, device, dtype, fp16_rounded)

    def encoder_weights() -> Iterable[tuple[str, torch.Tensor]]:
        if vae_file is None:
            vae = encoder_only(AutoencoderKL.from_pretrained(source, subfolder="vae", **common))
            return vae.state_dict().items()
        return weights.read_tensors(vae_file, keep=lambda n: n.startswith(ENCODER_PREFIXES))

    vae = _VaeSource(dict(vae_config), vae_loader, encoder_weights, prepared=True)

    def text_loader() -> tuple[Any, torch.nn.Module]:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=load_dtype,
                                                         **common)
        except (OSError, HFValidationError) as err:
            raise _not_found(model, source, type(err).__name__) from None
        return tokenizer, text_encoder

    return _Components(unet, vae, scheduler, text_loader)


def _components_tiny() -> _Components:
    pipe = build_tiny_pipeline()
    tokenizer, text_encoder, vae = pipe.tokenizer, pipe.text_encoder, encoder_only(pipe.vae)
    source = _VaeSource(dict(TINY_VAE_CONFIG), lambda: vae, lambda: vae.state_dict().items())
    return _Components(lambda: pipe.unet, source, pipe.scheduler, lambda: (tokenizer, text_encoder))


ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # the VAE weights extraction uses (and the latent cache keys)


@dataclass
class _VaeSource:
    """How a model's VAE is had: `load()` gives it without its decoder (already rounded, cast and on the device
    when `prepared`); `encoder_weights()` the (name, tensor) pairs of the encoder and quant_conv as stored, read
    without keeping a module where a weights file exists."""

    config: dict[str, Any]
    load: Callable[[], Any]
    encoder_weights: Callable[[], Iterable[tuple[str, torch.Tensor]]]
    prepared: bool = False


def unet_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block inside the U-Net's down, mid and up blocks (resnets, attentions, down/upsamplers); a
    transformer's blocks."""
    if hasattr(unet, "transformer_blocks"):
        return list(unet.transformer_blocks)
    stages = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [block for stage in stages for kind in ("resnets", "attentions", "downsamplers", "upsamplers")
            for block in getattr(stage, kind, None) or ()]


def allow_recompiles(modules: Sequence[torch.nn.Module], shapes: int) -> None:
    """Raise Dynamo's recompile limits so that every module compiles for `shapes` input shapes and never falls
    back to eager, and make a limit that is hit anyway an error instead of a silent slowdown.

    Dynamo keeps the compiled graphs of one `forward` code object together: all of a class's instances share
    them, a new parameter shape or input shape adds one, and a smaller batch (a unit's last) one more with a
    dynamic batch dimension. Past `recompile_limit` (8) that code runs eager from then on, silently; the U-Net has
    22 ResnetBlock2D instances."""
    per_code = Counter(type(m).forward.__code__ for m in modules)
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 2 * shapes * max(per_code.values(), default=1) + 2)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit,
                                             2 * shapes * sum(per_code.values()) + 8)
    config.fail_on_recompile_limit_hit = True


def compile_unet_blocks(unet: torch.nn.Module, backend: str = "inductor", shapes: int = 1) -> int:
    """Compile the `forward` of every block inside the U-Net (`unet_blocks`) in place, for `shapes` input shapes
    (`allow_recompiles`); returns how many. Forward hooks run in `Module.__call__`, outside the compiled
    `forward`, so `hooks.capture` and its early exit stay eager and exact; compiling the whole U-Net instead
    would trace the hooks and break the early exit."""
    blocks = unet_blocks(unet)
    allow_recompiles(blocks, shapes)
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend)
    return len(blocks)


def load_model(model: str | ModelRef, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               revision: str | None = None, fp16_rounded_weights: bool = False,
               compiled: bool = False, padding: str = "zeros", padding_scope: str = "unet",
               lazy_vae: bool = False, prompts: Sequence[str] = (), shapes: int = 1) -> LoadedModel:
    """Load `model` (a name, or a `registry.ModelRef` resolved before: a job's, whose revision then applies) for
    extraction on `device` in `dtype`, component by component (U-Net, then the VAE encoder; the text encoder only
    while new prompts are embedded).

    `lazy_vae=True` loads the VAE on first use of `LoadedModel.vae` (a job whose latents all come from the
    latent cache never loads it). `prompts` are embedded before the U-Net is loaded, so the text encoder is
    never resident beside it (the peak RSS is the weights' and not the weights' plus the text encoder's).

    `padding`/`padding_scope`: the spec's padding intervention (`interventions.apply_padding`); `zeros` = as released.

    `fp16_rounded_weights=True` rounds every weight through float16 before casting to `dtype`, as sdhelper 1.0.0
    does on CPU (it loads with torch_dtype=float16, then `.to(cpu, float32)`); `protocol: paper` uses it.
    `compiled=True` compiles the VAE encoder and the U-Net's blocks with `torch.compile` on a GPU (ignored on a
    CPU; see `compile_unet_blocks`), for `shapes` input sizes (the job's passes: the full image and each crop)."""
    from diffusers import DDIMScheduler

    device = torch.device(device)
    ref = model if isinstance(model, ModelRef) else resolve_model(model, revision)
    model, kind, source, family, revision = ref.name, ref.kind, ref.source, ref.family, ref.revision
    if family is not sd:
        return _load_family(family, model, kind, source, device, dtype, revision, compiled, padding, padding_scope,
                            shapes)
    if kind == "tiny":
        components = _components_tiny()
    elif kind == "random":
        components = _components_random(source)
        source = model
    else:  # the U-Net comes back rounded and cast already
        components = _components_pretrained(ref, dtype, fp16_rounded_weights, device)
    unet_loader, vae_source, scheduler, raw_text_loader = components

    def vae_loader() -> Any:
        vae = vae_source.load()
        apply_padding(None, vae, padding, padding_scope)
        _prepare(vae, device, dtype, fp16_rounded_weights and not vae_source.prepared)
        if compiled and device.type == "cuda":
            allow_recompiles([vae.encoder], shapes)
            vae.encoder = torch.compile(vae.encoder)
        return vae

    def vae_digest() -> str:
        from sdfeat.models import weights

        return weights.digest(((n, t) for n, t in vae_source.encoder_weights() if n.startswith(ENCODER_PREFIXES)),
                              dtype, fp16_rounded_weights)

    def text_loader() -> tuple[Any, torch.nn.Module]:
        tokenizer, text_encoder = raw_text_loader()
        return tokenizer, _prepare(text_encoder, device, dtype, fp16_rounded_weights)

    loaded = LoadedModel(name=model, source=source, revision=revision, unet=None, _vae=None, scheduler=scheduler,
                         noise_scheduler=DDIMScheduler.from_config(scheduler.config), device=device, dtype=dtype,
                         scaling_factor=float(vae_source.config["scaling_factor"]), _text_loader=text_loader,
                         _vae_loader=vae_loader, _vae_digest=vae_digest)
    if prompts:  # embedded before the U-Net exists: the text encoder's load peak never adds to the weights
        loaded.prompt_embeddings(list(prompts))
    unet = unet_loader()
    apply_padding(unet, None, padding, padding_scope)  # the VAE's convs: in `vae_loader`
    # channels_last speeds up the U-Net's convolutions on a GPU but slows the VAE encoder, whose time goes to
    # GroupNorm/SiLU (benchmarks/bench_gpu.py measures both layouts).
    _prepare(unet, device, dtype, fp16_rounded_weights and kind in ("tiny", "random"),
             channels_last=device.type == "cuda")
    if compiled and device.type == "cuda":
        compile_unet_blocks(unet, shapes=shapes)
    loaded.unet = unet
    if not lazy_vae:
        loaded._vae = vae_loader()
    log.info("loaded %s from %s on %s (%s)", model, source, device, dtype)
    return loaded


def _load_family(family: ModuleType, model: str, kind: str, source: str, device: torch.device, dtype: torch.dtype,
                 revision: str | None, compiled: bool, padding: str, padding_scope: str, shapes: int) -> LoadedModel:
    """A model of a family other than SD, from the family's components (`tiny_components`, `random_components`,
    `load_pretrained`): the denoiser in `dtype`, the VAE encoder in `vae_precision.vae_dtype`, both on `device`."""
    from diffusers import DDIMScheduler

    from sdfeat.models import weights

    if kind == "tiny":
        components = family.tiny_components()
    elif kind == "random":
        components = family.random_components(source, dtype=dtype)
    else:  # the family's loader refuses absent weights in one line, before any hub request
        components = family.load_pretrained(model if kind == "hub" else source, revision, device, dtype)
    vae_in = vae_dtype(components.vae_config, dtype)
    denoiser = _prepare(components.denoiser, device, dtype, False, channels_last=device.type == "cuda")
    vae = _prepare(components.vae, device, vae_in, False)
    components.denoiser, components.vae, components.device, components.dtype = denoiser, vae, device, dtype
    apply_padding(denoiser, vae, padding, padding_scope)
    if compiled and device.type == "cuda":
        compile_unet_blocks(denoiser, shapes=shapes)
        allow_recompiles([vae.encoder], shapes)
        vae.encoder = torch.compile(vae.encoder)
    scheduler = components.scheduler

    def vae_digest() -> str:
        return weights.digest(((n, t) for n, t in vae.state_dict().items() if n.startswith(ENCODER_PREFIXES)),
                              vae_in, False)

    def no_text() -> tuple[Any, torch.nn.Module]:
        raise ModelNotFoundError(f"model {model!r}: the {family.NAME} family conditions through its own components")

    log.info("loaded %s (%s family) from %s on %s (%s)", model, family.NAME, source, device, dtype)
    return LoadedModel(name=model, source=source, revision=revision, unet=denoiser, _vae=vae, scheduler=scheduler,
                       noise_scheduler=DDIMScheduler.from_config(scheduler.config), device=device, dtype=dtype,
                       scaling_factor=float(components.vae_config["scaling_factor"]), _text_loader=no_text,
                       _vae_digest=vae_digest, family=family, components=components)
