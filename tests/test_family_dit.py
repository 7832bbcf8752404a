"""The DiT family (`sdfeat.models.families.dit`) against independent expectations.

Expectations come from diffusers itself: a plain `DiTTransformer2DModel` forward called the way `DiTPipeline` calls
it (timesteps expanded to the batch, `class_labels` a tensor), plain `register_forward_hook`s for block outputs and
firing order, the model's own unpatchify (its final output) and its patch embedding for the token -> grid layout,
and the public DiT-XL/2 architecture (28 blocks of width 1152, patch 2, 16 x 16 tokens at 256 px, null class
1000). Inputs follow sdfeat's `standard` protocol (`sdfeat.protocol.standard_noise`, DDIM's `add_noise` with
DiT's linear betas), written out here. Fast tier: the tiny config. `slow`: DiT-XL/2 with random weights at 64 px.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdfeat.errors import ArgumentError, ModelNotFoundError
from sdfeat.models.families import dit

LABELS = [3, 999, 0]


@pytest.fixture(scope="module")
def tiny() -> dit.Components:
    return dit.tiny_components(seed=0)


def _standard_inputs(components: dit.Components, resolution: int, timestep: int, seed: int = 42) -> torch.Tensor:
    """`standard` protocol inputs for len(LABELS) images, written out: pixels in [-1, 1], the VAE posterior,
    per-sample eps and noise, DDIM's add_noise at `timestep`. (B, 4, h, w)."""
    from diffusers import DDIMScheduler

    from sdfeat.extract.protocol import standard_noise

    ids = [f"img-{k}" for k in range(len(LABELS))]
    pixels = torch.randint(0, 256, (len(ids), 3, resolution, resolution), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        dist = components.vae.encode(pixels.float() * 2 / 255 - 1).latent_dist
    eps, noise = standard_noise(seed, ids, dist.mean.shape[1:])
    latents = (dist.mean + dist.std * eps) * components.vae_config["scaling_factor"]  # (B, 4, h, w)
    return DDIMScheduler.from_config(components.scheduler.config).add_noise(latents, noise, torch.tensor([timestep]))


def _plain_forward(model: torch.nn.Module, names: list[str], *args, **kwargs) -> tuple[list[str], dict, torch.Tensor]:
    """A plain forward with plain forward hooks: (firing order, {name: output}, the model's output)."""
    fired, outputs, handles = [], {}, []
    for name in names:
        def hook(_m, _i, out, name=name):
            fired.append(name)
            outputs[name] = out
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            result = model(*args, **kwargs).sample
    finally:
        for h in handles:
            h.remove()
    return fired, outputs, result


def test_registry_and_ownership() -> None:
    from sdfeat.models.registry import shipped_config as sd_config
    from sdfeat.models.families import sdxl

    assert dit.NAME == "dit" and dit.REGISTRY == {"dit-xl-2": "facebook/DiT-XL-2-256"}
    assert dit.owns(dit.shipped_config("dit-xl-2", "transformer"))  # the hub's class name: Transformer2DModel
    assert dit.owns({**dit.TINY_TRANSFORMER_CONFIG, "_class_name": "DiTTransformer2DModel"})
    assert not dit.owns({**dit.TINY_TRANSFORMER_CONFIG, "_class_name": "Transformer2DModel",
                         "norm_type": "ada_norm_single"})  # PixArt
    assert not dit.owns(sd_config("sd15", "unet")) and not dit.owns(sdxl.shipped_config("sdxl", "unet"))


def test_shipped_config_matches_the_public_architecture() -> None:
    config = dit.shipped_config("dit-xl-2", "transformer")
    names = dit.positions(config)
    assert len(names) == 1 + 3 * 28 + 1 and names[:4] == ["pos_embed", "transformer_blocks.0.attn1",
                                                           "transformer_blocks.0.ff", "transformer_blocks.0"]
    table = dit.shapes(config, 256)
    assert table["pos_embed"] == table["transformer_blocks.27"] == (1152, 16, 16)
    assert table["proj_out_2"] == (2 * 2 * 8, 16, 16)
    assert dit.shapes(config, 512)["transformer_blocks.3"] == (1152, 32, 32)
    meta = dit.meta_shapes(config, 256)  # a meta-device forward, hooks in firing order
    assert meta == table and list(meta) == names
    scheduler = dit.shipped_config("dit-xl-2", "scheduler")
    assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"]) == ("linear", 0.0001, 0.02)
    assert dit.shipped_config("dit-xl-2", "vae")["scaling_factor"] == 0.18215


def test_config_side_imports_no_torch() -> None:
    """Names, presets and shapes of the shipped config without torch or diffusers (a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys; from sdfeat.models.families import dit; c = dit.shipped_config('dit-xl-2', 'transformer'); "
            "assert dit.owns(c) and len(dit.positions(c)) == 86 and dit.presets(c)['blocks']; "
            "assert dit.shapes(c, 256)['transformer_blocks.0.ff'] == (1152, 16, 16); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_presets() -> None:
    presets = dit.presets(dit.TINY_TRANSFORMER_CONFIG)
    assert "paper" not in presets and presets["all"] == dit.positions(dit.TINY_TRANSFORMER_CONFIG)
    assert presets["blocks"] == ["pos_embed", "transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2",
                                 "proj_out_2"]


def test_positions_fire_in_execution_order(tiny: dit.Components) -> None:
    from diffusers.models.attention import BasicTransformerBlock

    model = tiny.denoiser
    blocks = [n for n, m in model.named_modules() if isinstance(m, BasicTransformerBlock)]
    every = (["pos_embed"] + [f"{b}.{part}" for b in blocks for part in ("attn1", "ff")] + blocks + ["proj_out_2"])
    assert sorted(dit.positions(dict(model.config))) == sorted(every)
    fired, _, _ = _plain_forward(model, every, torch.zeros(2, 4, 8, 8), timestep=torch.tensor([50, 50]),
                                 class_labels=torch.tensor([1, 2]))
    assert fired == dit.positions(dict(model.config))


@pytest.mark.parametrize("settings", [{}, {"class_labels": "null"}, {"class_labels": "label"}])
def test_hooked_call_equals_a_plain_diffusers_forward(tiny: dit.Components, settings: dict) -> None:
    """Under `standard` inputs: the family's conditioning + call with plain hooks give exactly the block outputs of
    a plain forward called as DiTPipeline calls it, with the null class (1000) or the images' own labels."""
    resolution, t = 64, 200
    noisy = _standard_inputs(tiny, resolution, t)  # (3, 4, 8, 8)
    names = dit.positions(dict(tiny.denoiser.config))
    classes = torch.tensor(LABELS if settings.get("class_labels") == "label" else [1000] * len(LABELS))
    _, expected, _ = _plain_forward(tiny.denoiser, names, noisy, timestep=torch.tensor([t]).expand(len(LABELS)),
                                    class_labels=classes)
    got = {}
    handles = [tiny.denoiser.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: got.__setitem__(n, dit.as_map(n, out, (8, 8)))) for n in names]
    try:
        cond = dit.conditioning(tiny, LABELS, [""] * len(LABELS), resolution, settings)
        prediction = dit.call(tiny.denoiser, noisy, torch.tensor([t]), cond)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(cond["class_labels"], classes) and prediction.shape == (3, 8, 8, 8)
    for name in names:
        assert torch.equal(got[name], dit.as_map(name, expected[name], (8, 8))), name
        assert torch.equal(got[name].flatten(2).transpose(1, 2), expected[name]), name  # a pure reshape


def test_label_and_null_class_condition_differently(tiny: dit.Components) -> None:
    noisy = _standard_inputs(tiny, 64, 200)
    outs = [dit.call(tiny.denoiser, noisy, torch.tensor([200]), dit.conditioning(tiny, LABELS, [""] * 3, 64, s))
            for s in ({"class_labels": "null"}, {"class_labels": "label"})]
    assert not torch.equal(*outs)


def test_null_class_is_the_class_dropout_row(tiny: dit.Components) -> None:
    table = tiny.denoiser.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 1001  # 1000 ImageNet classes + the dropped-label (null) row
    cond = dit.conditioning(tiny, [5, -1], ["", ""], 64, {})
    assert cond["class_labels"].tolist() == [1000, 1000] and cond["class_labels"].dtype == torch.int64


def test_conditioning_refuses_what_it_cannot_mean(tiny: dit.Components) -> None:
    with pytest.raises(ArgumentError, match=r"labels\[1\] = -1"):
        dit.conditioning(tiny, [5, -1], ["", ""], 64, {"class_labels": "label"})
    with pytest.raises(ArgumentError, match=r"labels\[0\] = 1000"):
        dit.conditioning(tiny, [1000], [""], 64, {"class_labels": "label"})
    with pytest.raises(ArgumentError, match="field 'conditioning.class_labels'"):
        dit.conditioning(tiny, [5], [""], 64, {"class_labels": "random"})
    with pytest.raises(ArgumentError, match="field 'conditioning.guidance'"):
        dit.conditioning(tiny, [5], [""], 64, {"guidance": 4})
    with pytest.raises(ArgumentError, match="takes no prompt"):
        dit.conditioning(tiny, [5], ["a photo of a dog"], 64, {})
    with pytest.raises(ArgumentError, match="resolution 72"):
        dit.conditioning(tiny, [5], [""], 72, {})  # 9 latent tokens: not a whole number of 2 x 2 patches


def test_a_hook_can_end_the_call_early(tiny: dit.Components) -> None:
    class Stop(Exception):
        pass

    fired = []
    names = dit.positions(dict(tiny.denoiser.config))

    def hook(name):
        def inner(_m, _i, _o):
            fired.append(name)
            if name == "transformer_blocks.1":
                raise Stop
        return inner

    handles = [tiny.denoiser.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with pytest.raises(Stop):
            dit.call(tiny.denoiser, torch.zeros(1, 4, 8, 8), torch.tensor([50]),
                     dit.conditioning(tiny, [0], [""], 64, {}))
    finally:
        for h in handles:
            h.remove()
    assert fired == names[: names.index("transformer_blocks.1") + 1]


@pytest.mark.parametrize("resolution", [64, 96])
def test_shapes_equal_real_forward_outputs(tiny: dit.Components, resolution: int) -> None:
    side = resolution // 8
    names = dit.positions(dict(tiny.denoiser.config))
    fired, outputs, _ = _plain_forward(tiny.denoiser, names, torch.zeros(1, 4, side, side),
                                       timestep=torch.tensor([50]), class_labels=torch.tensor([1000]))
    real = {n: tuple(dit.as_map(n, outputs[n], (side, side)).shape[1:]) for n in fired}
    assert dit.shapes(dict(tiny.denoiser.config), resolution) == real
    assert list(dit.shapes(dict(tiny.denoiser.config), resolution)) == fired
    assert dit.meta_shapes(dict(tiny.denoiser.config), resolution) == real


@pytest.mark.parametrize(("latent_hw", "k"), [((8, 8), 0), ((8, 8), 13), ((8, 12), 7), ((8, 12), 23)])
def test_a_planted_token_lands_at_its_grid_cell(latent_hw: tuple[int, int], k: int) -> None:
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    tokens = torch.zeros(2, h * w, 5)  # (B, N, D)
    tokens[1, k] = torch.arange(1.0, 6.0)
    grid = dit.as_map("transformer_blocks.0", tokens, latent_hw)  # (B, D, h, w)
    assert grid.shape == (2, 5, h, w)
    assert grid[1, :, k // w, k % w].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert grid.abs().sum() == 15.0


def test_grid_cells_are_the_latent_patches_they_came_from(tiny: dit.Components) -> None:
    """The patch embedding of a latent (8 x 12: non-square) changed in one 2 x 2 patch changes only the map cell
    of that patch."""
    base = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    changed = base.clone()
    changed[:, :, 4:6, 2:4] += 1.0  # patch row 2, column 1
    with torch.inference_mode():
        a, b = (dit.as_map("pos_embed", tiny.denoiser.pos_embed(x), (8, 12)) for x in (base, changed))
    moved = (a - b).abs().sum(dim=(0, 1)) > 0  # (4, 6)
    assert moved.nonzero().tolist() == [[2, 1]]


def test_proj_out_2_map_is_the_models_own_unpatchified_output(tiny: dit.Components) -> None:
    """The model unpatchifies `proj_out_2`'s tokens into its (B, 8, h, w) output: channel (py*p + px)*8 + c of map
    cell (y, x) is output pixel (c, y*p + py, x*p + px)."""
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    _, outputs, result = _plain_forward(tiny.denoiser, ["proj_out_2"], noisy, timestep=torch.tensor([10, 10]),
                                        class_labels=torch.tensor([1, 1000]))
    grid = dit.as_map("proj_out_2", outputs["proj_out_2"], (8, 8))  # (2, 32, 4, 4)
    for py in range(2):
        for px in range(2):
            for c in (0, 5):
                assert torch.equal(grid[:, (py * 2 + px) * 8 + c], result[:, c, py::2, px::2])


def test_as_map_refuses_tokens_that_tile_no_grid() -> None:
    with pytest.raises(ArgumentError, match="latent_hw"):
        dit.as_map("pos_embed", torch.zeros(1, 15, 4), (8, 8))
    with pytest.raises(TypeError, match="pos_embed"):
        dit.as_map("pos_embed", torch.zeros(1, 4, 4, 4), (8, 8))


def _save_tiny_pipeline(path: Path, safe: bool = True) -> dit.Components:
    """The tiny DiT as a diffusers DiTPipeline directory, its transformer config named as the hub's is."""
    import json

    from diffusers import AutoencoderKL, DiTPipeline

    components = dit.tiny_components()
    torch.manual_seed(1)
    DiTPipeline(transformer=components.denoiser, vae=AutoencoderKL.from_config(dit.TINY_VAE_CONFIG),
                scheduler=components.scheduler).save_pretrained(path, safe_serialization=safe)
    config_path = path / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "_class_name": "Transformer2DModel"}))
    return components


def test_load_pretrained_from_a_local_directory(tmp_path: Path) -> None:
    tiny = _save_tiny_pipeline(tmp_path / "pipe")
    loaded = dit.load_pretrained(str(tmp_path / "pipe"), None, "cpu", torch.float16)
    assert loaded.denoiser.dtype == torch.float16
    assert loaded.vae.dtype == torch.float32  # an SD VAE config without force_upcast: diffusers' default upcasts
    assert type(loaded.scheduler).__name__ == "DDIMScheduler" and loaded.vae.decoder is None
    want = tiny.denoiser.state_dict()
    assert all(torch.equal(v, want[k].half()) for k, v in loaded.denoiser.state_dict().items())
    cond = dit.conditioning(loaded, [7], [""], 64, {"class_labels": "label"})
    out = dit.call(loaded.denoiser, torch.zeros(1, 4, 8, 8, dtype=torch.float16), torch.tensor([50]), cond)
    assert out.dtype == torch.float16 and out.shape == (1, 8, 8, 8)


def test_load_pretrained_refuses_pickled_weights(tmp_path: Path) -> None:
    _save_tiny_pipeline(tmp_path / "pipe", safe=False)
    with pytest.raises(ModelNotFoundError) as err:
        dit.load_pretrained(str(tmp_path / "pipe"), None, "cpu", torch.float32)
    assert "\n" not in str(err.value) and "safetensors" in str(err.value)


def test_load_pretrained_offline_fails_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError) as err:
        dit.load_pretrained("dit-xl-2", None, "cpu", torch.float32)
    message = str(err.value)
    assert "\n" not in message and "facebook/DiT-XL-2-256" in message and "hf download facebook/DiT-XL-2-256" in message
    with pytest.raises(ModelNotFoundError, match="transformer/config.json is missing"):
        dit.load_pretrained(str(tmp_path), None, "cpu", torch.float32)
    with pytest.raises(ModelNotFoundError, match="not one of the DiT names"):
        dit.load_pretrained("no-such-model", None, "cpu", torch.float32)


@pytest.mark.slow
def test_full_dit_xl_2_positions_and_shapes_at_64px() -> None:
    """DiT-XL/2 from the shipped config with random weights: every position fires in the order `positions` says,
    with the shapes `shapes` says (64 px: 4 x 4 tokens), through the family's conditioning and call."""
    components = dit.random_components("dit-xl-2")
    config = dict(components.denoiser.config)
    assert sum(p.numel() for p in components.denoiser.parameters()) > 600e6
    names = dit.positions(config)
    fired, outputs = [], {}

    def record(name: str):
        def hook(_m, _i, out) -> None:
            fired.append(name)
            outputs[name] = dit.as_map(name, out, (8, 8))
        return hook

    handles = [components.denoiser.get_submodule(n).register_forward_hook(record(n)) for n in names]
    try:
        cond = dit.conditioning(components, [207, 1], ["", ""], 64, {"class_labels": "label"})
        prediction = dit.call(components.denoiser, torch.randn(2, 4, 8, 8), torch.tensor([50]), cond)
    finally:
        for h in handles:
            h.remove()
    assert fired == names and len(names) == 86 and prediction.shape == (2, 8, 8, 8)
    assert {n: tuple(v.shape[1:]) for n, v in outputs.items()} == dit.shapes(config, 64)
