"""A whole job on each family's tiny model (`tiny-sdxl`, `tiny-dit`) through `run_local`: the stored activations equal
a plain diffusers forward with plain hooks under `standard` inputs written out here (the VAE posterior, per-sample
eps and noise, DDIM's add_noise), conditioned as diffusers' own SDXL pipeline and DiT pipeline condition; the
spec refuses what a family does not define, in one line naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_spec
from sdfeat import open_store
from sdfeat.errors import SpecError, UnknownBlockError
from sdfeat.extract import run_local
from sdfeat.models.families import dit, sdxl
from sdfeat.sources import plan_samples, read_images
from test_family_dit import _plain_forward as dit_forward
from test_family_sdxl import _pipeline
from test_family_sdxl import _plain_forward as unet_forward

RES, T, SEED = 64, 200, 42


def _noisy(components, images: list, ids: list[str]) -> torch.Tensor:
    """`standard` inputs of decoded images (B, 4, h, w), written out with diffusers."""
    from diffusers import DDIMScheduler

    from sdfeat.extract.protocol import standard_noise

    pixels = torch.from_numpy(np.stack([im.pixels for im in images])).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    with torch.inference_mode():
        dist = components.vae.encode(pixels.float() * 2 / 255 - 1).latent_dist
    eps, noise = standard_noise(SEED, ids, dist.mean.shape[1:])
    latents = (dist.mean + dist.std * eps) * components.vae_config["scaling_factor"]
    return DDIMScheduler.from_config(components.scheduler.config).add_noise(latents, noise, torch.tensor([T]))


def _images(source: str, resolution: int = RES) -> tuple[list, list[str], list[int]]:
    plan = plan_samples(source)
    images = list(read_images(plan.refs, resolution))
    return images, [r.sample_id for r in plan.refs], [r.label for r in plan.refs]


def _sdxl_expected(components, blocks: list[str], prompt: str, resolution: int = RES) -> dict[str, torch.Tensor]:
    """Block outputs of a plain U-Net forward on the job's images, conditioned by diffusers' own SDXL pipeline
    code (`encode_prompt`, `_get_add_time_ids` for an uncropped image at `resolution`)."""
    images, ids, _ = _images("synthetic:4", resolution)
    pipe = _pipeline(components)
    with torch.inference_mode():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    times = pipe._get_add_time_ids((resolution, resolution), (0, 0), (resolution, resolution), embeds.dtype,
                                   text_encoder_projection_dim=pooled.shape[-1])
    del pipe  # its text encoders (a full SDXL's are 0.8 G parameters)
    n = len(ids)
    _, expected = unet_forward(components.denoiser, blocks, _noisy(components, images, ids), torch.tensor([T]),
                               encoder_hidden_states=embeds.expand(n, -1, -1),
                               added_cond_kwargs={"text_embeds": pooled.expand(n, -1), "time_ids": times.repeat(n, 1)})
    return expected


def _extract(tmp_path: Path, model: str, blocks: list[str], **extra) -> object:
    spec = small_spec(str(tmp_path / model), model=model, source="synthetic:4", blocks=blocks, timesteps=[T],
                      seeds=[SEED], batch_size=2, dtype="float32", **{"resolution": RES, **extra})
    run_local(spec, progress=False, device="cpu")
    return open_store(str(tmp_path / model))


def test_tiny_sdxl_job_equals_a_plain_diffusers_forward(tmp_path: Path) -> None:
    blocks = ["conv_in", "down_blocks.1.attentions.0", "mid_block.resnets.1", "up_blocks.1.upsamplers.0"]
    store = _extract(tmp_path, "tiny-sdxl", blocks, prompt="a photo")
    expected = _sdxl_expected(sdxl.tiny_components(seed=0), blocks, "a photo")
    assert store.sample_ids == _images("synthetic:4")[1]
    for block in blocks:
        stored = store.read(block, timestep=T, seed=SEED)  # (n, C, h, w)
        np.testing.assert_allclose(stored, expected[block].numpy(), rtol=1e-4, atol=1e-5, err_msg=block)


@pytest.mark.parametrize("class_labels", ["null", "label"])
def test_tiny_dit_job_equals_a_plain_diffusers_forward(tmp_path: Path, class_labels: str) -> None:
    blocks = ["pos_embed", "transformer_blocks.0.attn1", "transformer_blocks.1", "proj_out_2"]
    store = _extract(tmp_path, "tiny-dit", blocks, conditioning={"class_labels": class_labels})
    tiny = dit.tiny_components(seed=0)
    images, ids, labels = _images("synthetic:4")
    classes = torch.tensor(labels if class_labels == "label" else [1000] * len(ids))
    _, expected, _ = dit_forward(tiny.denoiser, blocks, _noisy(tiny, images, ids),
                                 timestep=torch.tensor([T]).expand(len(ids)), class_labels=classes)
    side = RES // 8 // 2  # tokens per side: latent side / patch 2
    for block in blocks:
        tokens = expected[block][0] if isinstance(expected[block], tuple) else expected[block]  # (n, N, D)
        grid = tokens.transpose(1, 2).reshape(len(ids), -1, side, side)  # token k at (k // side, k % side)
        np.testing.assert_allclose(store.read(block, timestep=T, seed=SEED), grid.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=block)


def test_tiny_sdxl_padding_intervention_equals_a_plain_forward_with_that_padding(tmp_path: Path) -> None:
    """The padding study applies to SDXL's U-Net: every padded convolution pads circularly (independently: each
    nn.Conv2d with padding switched here), and the values differ from the model as released."""
    blocks = ["down_blocks.1.attentions.0", "up_blocks.1.upsamplers.0"]
    store = _extract(tmp_path, "tiny-sdxl", blocks, resolution=128, intervention={"padding": "circular"})
    tiny = sdxl.tiny_components(seed=0)
    switched = 0
    for module in tiny.denoiser.modules():
        if isinstance(module, torch.nn.Conv2d) and any(p > 0 for p in module.padding):
            module.padding_mode, switched = "circular", switched + 1
    assert switched > 10
    expected = _sdxl_expected(tiny, blocks, "", 128)
    released = _extract(tmp_path / "released", "tiny-sdxl", blocks, resolution=128)
    for block in blocks:
        got = store.read(block, timestep=T, seed=SEED)
        np.testing.assert_allclose(got, expected[block].numpy(), rtol=1e-4, atol=1e-5, err_msg=block)
        assert np.abs(got - released.read(block, timestep=T, seed=SEED)).max() > 1e-3, block


def test_tiny_dit_reads_its_latents_back_from_the_cache(tmp_path: Path) -> None:
    """A second DiT job over the same images takes every posterior from the latent cache (no VAE) and stores the
    same values as the cold one."""
    blocks = ["transformer_blocks.0", "proj_out_2"]
    cold = _extract(tmp_path / "cold", "tiny-dit", blocks, latent_cache=str(tmp_path / "cache"))
    warm = _extract(tmp_path / "warm", "tiny-dit", blocks, latent_cache=str(tmp_path / "cache"))
    def vae_seconds(run: str) -> list[float]:
        return [json.loads(p.read_text())["seconds"]["vae"]
                for p in sorted((tmp_path / run / "tiny-dit" / "progress").glob("*.json"))]

    assert all(s > 0 for s in vae_seconds("cold")) and vae_seconds("warm") == [0.0]
    for block in blocks:
        np.testing.assert_array_equal(warm.read(block, timestep=T, seed=SEED), cold.read(block, timestep=T, seed=SEED))


@pytest.mark.slow
def test_full_dit_xl_2_with_random_weights_equals_a_plain_forward(tmp_path: Path) -> None:
    """The whole DiT-XL/2 architecture (random weights, 64 px: a 4 x 4 token grid), the deepest block and the
    final projection, against a plain forward of the same random model."""
    blocks = ["transformer_blocks.27", "proj_out_2"]
    spec = small_spec(str(tmp_path / "dit"), model="random:dit-xl-2", source="synthetic:2", resolution=RES,
                      blocks=blocks, timesteps=[T], seeds=[SEED], batch_size=2, dtype="float32")
    run_local(spec, progress=False, device="cpu")
    store = open_store(str(tmp_path / "dit"))
    model = dit.random_components("dit-xl-2", dtype=torch.float32)
    images, ids, _ = _images("synthetic:2")
    _, expected, _ = dit_forward(model.denoiser, blocks, _noisy(model, images, ids),
                                 timestep=torch.tensor([T]).expand(len(ids)), class_labels=torch.tensor([1000, 1000]))
    assert store.shape("transformer_blocks.27")[-3:] == (1152, 4, 4) and store.shape("proj_out_2")[-3:] == (32, 4, 4)
    for block in blocks:
        tokens = expected[block][0] if isinstance(expected[block], tuple) else expected[block]  # (2, 16, D)
        grid = tokens.transpose(1, 2).reshape(len(ids), -1, 4, 4)
        np.testing.assert_allclose(store.read(block, timestep=T, seed=SEED), grid.numpy(), rtol=1e-3, atol=1e-4,
                                   err_msg=block)


@pytest.mark.slow
def test_full_sdxl_with_random_weights_equals_a_plain_forward(tmp_path: Path) -> None:
    """The whole SDXL U-Net (2.6 G parameters, random weights, 64 px: an 8 x 8 latent) through a job, against a
    plain forward of the same random model conditioned by diffusers' own SDXL pipeline code; the model is built
    again for the expectation only after the job's copy is freed (10 GB each in float32)."""
    import gc

    blocks = ["down_blocks.2.attentions.1", "up_blocks.0.upsamplers.0"]
    store = _extract(tmp_path, "random:sdxl", blocks, prompt="a photo")
    gc.collect()
    expected = _sdxl_expected(sdxl.random_components("sdxl", dtype=torch.float32), blocks, "a photo")
    assert store.shape("down_blocks.2.attentions.1")[-3:] == (1280, 2, 2)
    for block in blocks:
        np.testing.assert_allclose(store.read(block, timestep=T, seed=SEED), expected[block].numpy(), rtol=1e-3,
                                   atol=1e-4, err_msg=block)


@pytest.mark.parametrize(("model", "fields", "message"), [
    ("tiny-sdxl", {"protocol": "paper"}, "field 'protocol': 'paper' reproduces sdhelper"),
    ("tiny-dit", {"protocol": "paper"}, "runs: standard"),
    ("tiny-dit", {"prompt": "a dog"}, "field 'prompt': model 'tiny-dit' .dit family. takes no prompt"),
    ("tiny-dit", {"conditioning": {"guidance": 4}}, "field 'conditioning.guidance': unknown for the dit family"),
    ("tiny", {"conditioning": {"class_labels": "null"}}, "field 'conditioning.class_labels': unknown for the sd"),
    ("tiny-dit", {"blocks": "paper"}, "field 'blocks': block preset 'paper': unknown for the dit family"),
    ("tiny-dit", {"intervention": {"padding": "reflect"}, "resolution": 128},
     "field 'intervention': model 'tiny-dit' .dit family. has no zero-padded convolution"),
])
def test_what_a_family_does_not_define_is_refused_in_one_line(tmp_path: Path, model: str, fields: dict,
                                                              message: str) -> None:
    spec = small_spec(str(tmp_path / "o"), model=model, source="synthetic:2",
                      **{"resolution": RES, "blocks": ["conv_in"] if model != "tiny-dit" else ["pos_embed"], **fields})
    with pytest.raises((SpecError, UnknownBlockError), match=message):
        run_local(spec, progress=False, device="cpu")
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_the_cross_model_figure_puts_families_on_a_relative_depth_axis() -> None:
    """A U-Net and a DiT share no block names: each line sits at order / (its model's positions - 1)."""
    import pyarrow as pa

    from sdfeat.metrics.catalog import PROBE
    from sdfeat.metrics.results import TIDY_SCHEMA
    from sdfeat.report import figure_cross_model

    def table(model: str, blocks: list[tuple[str, int]]) -> pa.Table:
        rows = [{"model": model, "block": b, "order": o, "metric": "position", "statistic": "accuracy",
                 "value": 0.5, "epoch": 3, "scale": s} for b, o in blocks for s in (8, 16, 32, 64)]
        return pa.Table.from_pylist(rows, schema=TIDY_SCHEMA)  # columns a row does not have are null

    # tiny-sdxl has 34 positions (conv_in .. conv_out), tiny-dit 11 (pos_embed, 3 x (attn1, ff, block), proj_out_2)
    sdxl_t = table("tiny-sdxl", [("conv_in", 0), ("mid_block.resnets.1", 15), ("conv_out", 33)])
    dit_t = table("tiny-dit", [("pos_embed", 0), ("transformer_blocks.1", 6), ("proj_out_2", 10)])
    fig = figure_cross_model({"sdxl": sdxl_t, "dit": dit_t},
                             rows=(("probe", PROBE[8], False),))
    ax = fig.axes[0]
    xs = [[v for v in np.asarray(line.get_xdata(), float) if not np.isnan(v)] for line in ax.lines]
    assert len(xs) == 2 and np.allclose(xs[0], [0.0, 15 / 33, 1.0]) and np.allclose(xs[1], [0.0, 0.6, 1.0])
    assert "relative depth" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sdxl (sdxl)", "dit (dit)"]


def test_plan_budgets_other_families_with_their_analogues() -> None:
    from typer.testing import CliRunner

    from sdfeat.cli.app import app

    result = CliRunner().invoke(app, ["plan", "jobs/sd15-imagenet-full.yaml", "--imagenet", "--models",
                                      "sd15,sdxl,dit-xl-2"], terminal_width=250)
    assert result.exit_code == 0, result.output
    lines = {line.split("\t")[0]: line for line in result.output.splitlines()}
    assert "sd15" in lines and "sdxl (summaries: all)" in lines and "dit-xl-2 (summaries: all)" in lines
    assert "× 3 models" in result.output
