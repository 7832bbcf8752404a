"""The SDXL family (`sdfeat.models.families.sdxl`) against independent expectations.

Expectations come from diffusers itself, not from the module under test: `StableDiffusionXLPipeline.encode_prompt`
and `_get_add_time_ids` for the conditioning, a plain `UNet2DConditionModel` forward with plain
`register_forward_hook`s for block outputs and their firing order, and the public SDXL architecture (320/640/
1280 channels, 32 stage sub-blocks, latent 128 at 1024 px) for the shipped config. Inputs follow sdfeat's
`standard` protocol (per-sample draws from `sdfeat.protocol.standard_noise`, DDIM's `add_noise`), written out here.
Fast tier: the tiny config (seconds). `slow`: the full U-Net from the shipped config with random weights at 128 px.
"""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

import pytest
import torch

from sdfeat.errors import ArgumentError, ModelNotFoundError
from sdfeat.models.families import sdxl
from sdfeat.models.families.vae_precision import vae_dtype

PROMPTS = ["a photo of the dog", "", "the cat, 2"]
POSITION = re.compile(r"^(conv_in|conv_out|(down_blocks|up_blocks)\.\d+\.(resnets|attentions|downsamplers|upsamplers)"
                      r"\.\d+|mid_block\.(resnets|attentions)\.\d+)$")  # the test's own notion of a block


@pytest.fixture(scope="module")
def tiny() -> sdxl.Components:
    return sdxl.tiny_components(seed=0)


def _pipeline(components: sdxl.Components, vae: torch.nn.Module | None = None):
    """diffusers' own SDXL pipeline around the same modules (the reference for the conditioning)."""
    from diffusers import StableDiffusionXLPipeline

    tok, te, tok2, te2 = components.text_loader()
    return StableDiffusionXLPipeline(vae=vae or components.vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=components.denoiser, scheduler=components.scheduler,
                                     add_watermarker=False)


def _standard_inputs(components: sdxl.Components, resolution: int, timestep: int, seed: int = 42) -> torch.Tensor:
    """`standard` protocol inputs for len(PROMPTS) images, written out: pixels in [-1, 1], the VAE posterior,
    per-sample eps and noise, DDIM's add_noise at `timestep`. (B, 4, h, w)."""
    from diffusers import DDIMScheduler

    from sdfeat.extract.protocol import standard_noise

    ids = [f"img-{k}" for k in range(len(PROMPTS))]
    pixels = torch.randint(0, 256, (len(ids), 3, resolution, resolution), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        dist = components.vae.encode(pixels.float() * 2 / 255 - 1).latent_dist
    eps, noise = standard_noise(seed, ids, dist.mean.shape[1:])
    latents = (dist.mean + dist.std * eps) * components.vae_config["scaling_factor"]  # (B, 4, h, w)
    return DDIMScheduler.from_config(components.scheduler.config).add_noise(latents, noise, torch.tensor([timestep]))


def _plain_forward(unet: torch.nn.Module, names: list[str], *args, **kwargs) -> tuple[list[str], dict]:
    """A plain diffusers forward with plain forward hooks: (firing order, {name: output tensor})."""
    fired, outputs = [], {}
    handles = []
    for name in names:
        def hook(_m, _i, out, name=name):
            fired.append(name)
            outputs[name] = out[0] if isinstance(out, tuple) else out
        handles.append(unet.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            unet(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return fired, outputs


def test_registry_and_ownership() -> None:
    from sdfeat.models.registry import shipped_config as sd_config
    from sdfeat.models.families import dit

    assert sdxl.NAME == "sdxl"
    assert sdxl.REGISTRY == {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sdxl-turbo": "stabilityai/sdxl-turbo"}
    assert sdxl.owns(sdxl.shipped_config("sdxl", "unet")) and sdxl.owns(sdxl.TINY_UNET_CONFIG)
    assert not sdxl.owns(sd_config("sd15", "unet")) and not sdxl.owns(sd_config("sd21", "unet"))
    assert not sdxl.owns(dit.shipped_config("dit-xl-2", "transformer"))


def test_shipped_configs_fit_together_and_match_the_public_architecture() -> None:
    """The U-Net's cross-attention width is both encoders' widths, its added-conditioning width 6 time ids x 256 +
    the second encoder's projection; 34 positions (32 in the stages); shapes at 1024 px from the public facts."""
    unet = sdxl.shipped_config("sdxl", "unet")
    te, te2 = sdxl.shipped_config("sdxl", "text_encoder"), sdxl.shipped_config("sdxl", "text_encoder_2")
    assert unet["cross_attention_dim"] == te["hidden_size"] + te2["hidden_size"] == 2048
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
    assert sdxl.shipped_config("sdxl", "vae")["force_upcast"] is True
    assert sdxl.shipped_config("sdxl-turbo", "unet") == unet  # same architecture; the scheduler is Turbo's own
    assert sdxl.shipped_config("sdxl-turbo", "scheduler")["timestep_spacing"] == "trailing"
    names = sdxl.positions(unet)
    assert len(names) == 34 and names[0] == "conv_in" and names[-1] == "conv_out"
    assert "down_blocks.0.attentions.0" not in names and "down_blocks.2.downsamplers.0" not in names
    assert "up_blocks.2.attentions.0" not in names and "up_blocks.0.attentions.2" in names
    table = sdxl.shapes(unet, 1024)
    assert table["conv_in"] == (320, 128, 128) and table["down_blocks.0.downsamplers.0"] == (320, 64, 64)
    assert table["down_blocks.2.attentions.1"] == (1280, 32, 32) and table["mid_block.attentions.0"] == (1280, 32, 32)
    assert table["up_blocks.0.upsamplers.0"] == (1280, 64, 64) and table["up_blocks.1.attentions.2"] == (640, 64, 64)
    assert table["up_blocks.2.resnets.2"] == (320, 128, 128) and table["conv_out"] == (4, 128, 128)
    meta = sdxl.meta_shapes(unet, 1024)  # a meta-device forward, hooks in firing order
    assert meta == table and list(meta) == names


def test_config_side_imports_no_torch() -> None:
    """Names, presets and shapes of the shipped config without torch or diffusers (a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys; from sdfeat.models.families import sdxl; c = sdxl.shipped_config('sdxl', 'unet'); "
            "assert sdxl.owns(c) and len(sdxl.positions(c)) == 34 and sdxl.presets(c)['all']; "
            "assert sdxl.shapes(c, 512)['mid_block.resnets.1'] == (1280, 16, 16); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_presets() -> None:
    presets = sdxl.presets(sdxl.shipped_config("sdxl", "unet"))
    assert "paper" not in presets and presets["all"] == sdxl.positions(sdxl.shipped_config("sdxl", "unet"))
    assert presets["stages"] == ["conv_in", "down_blocks.0.downsamplers.0", "down_blocks.1.downsamplers.0",
                                 "down_blocks.2.attentions.1", "mid_block.resnets.1", "up_blocks.0.upsamplers.0",
                                 "up_blocks.1.upsamplers.0", "up_blocks.2.resnets.2", "conv_out"]


def test_positions_are_every_block_in_firing_order(tiny: sdxl.Components) -> None:
    unet, config = tiny.denoiser, dict(tiny.denoiser.config)
    every = [n for n, _ in unet.named_modules() if POSITION.match(n)]
    assert sorted(sdxl.positions(config)) == sorted(every)
    cond = sdxl.conditioning(tiny, [0, 0, 0], PROMPTS, 128, {})
    fired, _ = _plain_forward(unet, every, torch.zeros(3, 4, 16, 16), torch.tensor([50]),
                              encoder_hidden_states=cond["encoder_hidden_states"],
                              added_cond_kwargs=cond["added_cond_kwargs"])
    assert fired == sdxl.positions(config)


def test_hooked_call_equals_a_plain_diffusers_forward(tiny: sdxl.Components) -> None:
    """Under `standard` inputs: the family's conditioning + call with plain hooks give exactly the block outputs of
    a plain U-Net forward conditioned by diffusers' own SDXL pipeline code, at every position."""
    resolution, t = 128, 200
    noisy = _standard_inputs(tiny, resolution, t)  # (3, 4, 16, 16)
    pipe = _pipeline(tiny)
    with torch.inference_mode():  # one prompt at a time, as sdfeat embeds them (batch-independent bytes)
        encoded = [pipe.encode_prompt(p, device="cpu", do_classifier_free_guidance=False) for p in PROMPTS]
    embeds, pooled = torch.cat([e[0] for e in encoded]), torch.cat([e[2] for e in encoded])
    times = pipe._get_add_time_ids((resolution, resolution), (0, 0), (resolution, resolution), embeds.dtype,
                                   text_encoder_projection_dim=pooled.shape[-1]).repeat(len(PROMPTS), 1)
    names = sdxl.positions(dict(tiny.denoiser.config))
    _, expected = _plain_forward(tiny.denoiser, names, noisy, torch.tensor([t]), encoder_hidden_states=embeds,
                                 added_cond_kwargs={"text_embeds": pooled, "time_ids": times})

    got = {}
    handles = [tiny.denoiser.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: got.__setitem__(n, sdxl.as_map(n, out, (16, 16)))) for n in names]
    try:
        cond = sdxl.conditioning(tiny, [0, 1, 2], PROMPTS, resolution, {})
        prediction = sdxl.call(tiny.denoiser, noisy, torch.tensor([t]), cond)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(cond["added_cond_kwargs"]["text_embeds"],
                                                                             pooled)
    assert torch.equal(cond["added_cond_kwargs"]["time_ids"], times)
    assert set(got) == set(expected) == set(names)
    for name in names:
        assert torch.equal(got[name], expected[name]), name
    assert torch.equal(prediction, expected["conv_out"])  # conv_out is the last module of the U-Net


def test_a_hook_can_end_the_call_early(tiny: sdxl.Components) -> None:
    class Stop(Exception):
        pass

    fired = []
    names = sdxl.positions(dict(tiny.denoiser.config))
    stop_at = "mid_block.attentions.0"

    def hook(_m, _i, _o, name):
        fired.append(name)
        if name == stop_at:
            raise Stop

    handles = [tiny.denoiser.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n))
               for n in names]
    try:
        with pytest.raises(Stop):
            sdxl.call(tiny.denoiser, torch.zeros(1, 4, 16, 16), torch.tensor([50]),
                      sdxl.conditioning(tiny, [0], [""], 128, {}))
    finally:
        for h in handles:
            h.remove()
    assert fired == names[: names.index(stop_at) + 1]


@pytest.mark.parametrize("resolution", [128, 136])  # 136 px: a 17-token latent, rounded up by each downsampler
def test_shapes_equal_real_forward_outputs(tiny: sdxl.Components, resolution: int) -> None:
    side = resolution // 8
    names = sdxl.positions(dict(tiny.denoiser.config))
    cond = sdxl.conditioning(tiny, [0], [""], resolution, {})
    fired, outputs = _plain_forward(tiny.denoiser, names, torch.zeros(1, 4, side, side), torch.tensor([50]),
                                    encoder_hidden_states=cond["encoder_hidden_states"],
                                    added_cond_kwargs=cond["added_cond_kwargs"])
    real = {n: tuple(sdxl.as_map(n, outputs[n], (side, side)).shape[1:]) for n in fired}
    assert sdxl.shapes(dict(tiny.denoiser.config), resolution) == real
    assert list(sdxl.shapes(dict(tiny.denoiser.config), resolution)) == fired
    assert sdxl.meta_shapes(dict(tiny.denoiser.config), resolution) == real


def test_resolution_must_be_a_multiple_of_8(tiny: sdxl.Components) -> None:
    with pytest.raises(ArgumentError, match="resolution 130"):
        sdxl.shapes(dict(tiny.denoiser.config), 130)
    with pytest.raises(ArgumentError, match="resolution"):
        sdxl.conditioning(tiny, [0], [""], 0, {})


def test_conditioning_shapes_time_ids_and_settings(tiny: sdxl.Components) -> None:
    cond = sdxl.conditioning(tiny, [0, 1], ["the dog", "the dog"], 256, {})
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)  # both tiny encoders: 32 + 32
    assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[256, 256, 0, 0, 256, 256]] * 2
    settings = {"original_size": [375, 500], "crops_coords_top_left": [0, 62], "target_size": (256, 256)}
    times = sdxl.conditioning(tiny, [0], ["x"], 256, settings)["added_cond_kwargs"]["time_ids"]
    pipe = _pipeline(tiny)
    assert torch.equal(times, pipe._get_add_time_ids((375, 500), (0, 62), (256, 256), torch.float32,
                                                     text_encoder_projection_dim=32))
    with pytest.raises(ArgumentError, match="field 'conditioning.aesthetic_score'"):
        sdxl.conditioning(tiny, [0], [""], 256, {"aesthetic_score": 6})
    with pytest.raises(ArgumentError, match="field 'conditioning.original_size'"):
        sdxl.conditioning(tiny, [0], [""], 256, {"original_size": 256})
    with pytest.raises(ArgumentError, match="prompts: 1 prompts for 2 labels"):
        sdxl.conditioning(tiny, [0, 1], [""], 256, {})
    with pytest.raises(ArgumentError, match="prompts: 0 prompts for 0 labels"):
        sdxl.conditioning(tiny, [], [], 256, {})


def test_repeated_prompts_match_the_pipeline(tiny: sdxl.Components) -> None:
    prompts = ["", "the dog", "", "the dog"]
    pipe = _pipeline(tiny)
    with torch.inference_mode():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    cond = sdxl.conditioning(sdxl.tiny_components(), [0] * 4, prompts, 128, {})
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled, rtol=1e-6, atol=1e-6)


def test_a_prompts_embedding_does_not_depend_on_its_batch() -> None:
    """Encoded with others in one batch, the tiny bigG-style projection's pooled output differs in its last bits
    (a matrix-vector product vs a matrix product); sdfeat encodes each prompt alone."""
    alone = sdxl.conditioning(sdxl.tiny_components(), [0], ["the dog"], 128, {})
    among = sdxl.conditioning(sdxl.tiny_components(), [0] * 3, ["a", "the dog", "zz top"], 128, {})
    assert torch.equal(alone["encoder_hidden_states"][0], among["encoder_hidden_states"][1])
    assert torch.equal(alone["added_cond_kwargs"]["text_embeds"][0], among["added_cond_kwargs"]["text_embeds"][1])


def test_text_encoders_are_used_once_per_prompt_and_dropped() -> None:
    components = sdxl.tiny_components()
    loads, alive = [], []
    inner = components.text_loader

    def counting_loader():
        encoders = inner()
        loads.append(1)
        alive.extend(weakref.ref(m) for m in (encoders[1], encoders[3]))
        return encoders

    components.text_loader = counting_loader
    sdxl.conditioning(components, [0, 0, 0], ["a", "b", "a"], 128, {})
    sdxl.conditioning(components, [0], ["b"], 128, {})
    assert len(loads) == 1 and set(components.prompt_cache) == {"a", "b"}
    gc.collect()
    assert all(ref() is None for ref in alive)  # nothing keeps the text encoders after the prompts are embedded
    sdxl.conditioning(components, [0], ["c"], 128, {})
    assert len(loads) == 2


def test_tiny_components_are_deterministic() -> None:
    a, b, c = sdxl.tiny_components(0), sdxl.tiny_components(0), sdxl.tiny_components(1)
    sa, sb, sc = a.denoiser.state_dict(), b.denoiser.state_dict(), c.denoiser.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.vae.decoder is None  # extraction never decodes


def test_as_map_applies_the_tuple_rule() -> None:
    x = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert sdxl.as_map("down_blocks.0", (x, (x, x)), (3, 4)) is x and sdxl.as_map("conv_in", x, (3, 4)) is x
    with pytest.raises(TypeError, match="conv_in"):
        sdxl.as_map("conv_in", torch.zeros(2, 3), (3, 4))


@pytest.mark.parametrize(("config", "compute", "expected"), [
    ({"force_upcast": True}, torch.float16, torch.float32),
    ({"force_upcast": True}, torch.bfloat16, torch.float32),
    ({"force_upcast": True}, torch.float32, torch.float32),
    ({"force_upcast": True}, torch.float64, torch.float64),
    ({}, torch.float16, torch.float32),  # diffusers' default for an absent flag: upcast
    ({"force_upcast": False}, torch.float16, torch.float16),  # an fp16-safe VAE (e.g. the fp16-fix one) stays
    ({"force_upcast": False}, torch.bfloat16, torch.bfloat16),
])
def test_vae_dtype_rule(config: dict, compute: torch.dtype, expected: torch.dtype) -> None:
    assert vae_dtype(config, compute) == expected


def test_an_overflowing_vae_stays_finite_under_the_rule() -> None:
    """A tiny VAE whose first convolution's weights fit float16 (|w| < 4e4) but whose outputs pass its range
    (65504), as SDXL's VAE activations do: encoding in float16 gives inf/NaN, in the dtype the rule picks it stays
    finite."""
    import copy

    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(sdxl.TINY_VAE_CONFIG).eval()
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(2e5)  # kaiming bound 1/sqrt(27) -> |w| < 3.9e4; sums over 27 inputs > 65504
    assert vae.encoder.conv_in.weight.abs().max() < 65504
    x = torch.rand(1, 3, 64, 64) * 2 - 1  # (1, 3, 64, 64) in [-1, 1]
    chosen = vae_dtype(vae.config, torch.float16)
    with torch.inference_mode():
        half = torch.nn.Module.to(copy.deepcopy(vae), torch.float16).encode(x.half()).latent_dist.mean
        safe = torch.nn.Module.to(vae, chosen).encode(x.to(chosen)).latent_dist.mean
    assert chosen == torch.float32
    assert not torch.isfinite(half).all() and torch.isfinite(safe).all()


def _save_tiny_pipeline(path: Path, safe: bool = True) -> sdxl.Components:
    """The tiny SDXL as a diffusers pipeline directory (with a full VAE: decoder included, as published)."""
    from diffusers import AutoencoderKL

    components = sdxl.tiny_components()
    torch.manual_seed(1)
    _pipeline(components, vae=AutoencoderKL.from_config(sdxl.TINY_VAE_CONFIG)).save_pretrained(
        path, safe_serialization=safe)
    return components


def test_load_pretrained_from_a_local_directory(tmp_path: Path) -> None:
    tiny = _save_tiny_pipeline(tmp_path / "pipe")
    loaded = sdxl.load_pretrained(str(tmp_path / "pipe"), None, "cpu", torch.float16)
    assert loaded.denoiser.dtype == torch.float16 and loaded.vae.dtype == torch.float32  # force_upcast
    assert loaded.vae.decoder is None and type(loaded.scheduler).__name__ == "EulerDiscreteScheduler"
    want = tiny.denoiser.state_dict()
    assert all(torch.equal(v, want[k].half()) for k, v in loaded.denoiser.state_dict().items())
    cond = sdxl.conditioning(loaded, [0], ["the dog"], 128, {})
    reference = sdxl.conditioning(tiny, [0], ["the dog"], 128, {})
    torch.testing.assert_close(cond["encoder_hidden_states"].float(), reference["encoder_hidden_states"],
                               rtol=1e-2, atol=1e-2)  # the text encoders ran in float16
    assert sdxl.call(loaded.denoiser, torch.zeros(1, 4, 16, 16, dtype=torch.float16), torch.tensor([50]),
                     cond).dtype == torch.float16


def test_load_pretrained_refuses_pickled_weights(tmp_path: Path) -> None:
    _save_tiny_pipeline(tmp_path / "pipe", safe=False)
    with pytest.raises(ModelNotFoundError) as err:
        sdxl.load_pretrained(str(tmp_path / "pipe"), None, "cpu", torch.float32)
    assert "\n" not in str(err.value) and "safetensors" in str(err.value)


def test_load_pretrained_offline_fails_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name in ("sdxl", "sdxl-turbo"):
        with pytest.raises(ModelNotFoundError) as err:
            sdxl.load_pretrained(name, None, "cpu", torch.float32)
        message = str(err.value)
        assert "\n" not in message and f"model {sdxl.REGISTRY[name]!r}" in message
        assert f"hf download {sdxl.REGISTRY[name]}" in message
    with pytest.raises(ModelNotFoundError, match="unet/config.json is missing"):
        sdxl.load_pretrained(str(tmp_path), None, "cpu", torch.float32)
    with pytest.raises(ModelNotFoundError, match="not one of the SDXL names"):
        sdxl.load_pretrained("no-such-model", None, "cpu", torch.float32)


@pytest.mark.slow
def test_full_sdxl_unet_positions_and_shapes_at_128px() -> None:
    """The shipped SDXL config with random weights (built in bfloat16: 5 GB instead of 10): every position fires in
    the order `positions` says, with the shapes `shapes` says, through the family's own conditioning."""
    components = sdxl.random_components("sdxl", dtype=torch.bfloat16)
    config = dict(components.denoiser.config)
    cond = sdxl.conditioning(components, [0, 0], ["", "a photo"], 128, {})
    assert cond["encoder_hidden_states"].shape == (2, 77, 2048)
    assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, 1280)
    names = sdxl.positions(config)
    fired, outputs = [], {}

    def record(name: str):
        def hook(_m, _i, out) -> None:
            fired.append(name)
            outputs[name] = sdxl.as_map(name, out, (16, 16))
        return hook

    handles = [components.denoiser.get_submodule(n).register_forward_hook(record(n)) for n in names]
    try:
        sdxl.call(components.denoiser, torch.randn(2, 4, 16, 16, dtype=torch.bfloat16), torch.tensor([50]), cond)
    finally:
        for h in handles:
            h.remove()
    assert fired == names and len(names) == 34
    assert {n: tuple(v.shape[1:]) for n, v in outputs.items()} == sdxl.shapes(config, 128)
