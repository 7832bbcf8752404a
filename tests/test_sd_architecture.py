"""Slow tier: the full SD-1.5 architecture (random weights) through all 46 positions, and the paper's crop sizes."""

from __future__ import annotations

import pytest
import torch

from sdfeat.extract.protocol import encode, noisy_latents
from sdfeat.models.blocks import block_shapes, preset_names
from sdfeat.models.hooks import capture
from sdfeat.models.loading import load_model
from sdfeat.models.registry import unet_config
from modelkit import pixels
from test_hooks import check_odd_latent_size

ALL = preset_names("all")
pytestmark = pytest.mark.slow


def test_random_sd15_all_46_positions_have_the_predicted_shapes() -> None:
    model = load_model("random:sd15")
    assert sum(p.numel() for p in model.unet.parameters()) == 859_520_964
    resolution, ids = 128, ["x", "y"]
    inputs = noisy_latents(model, encode(model, pixels(2, resolution), "standard"), "standard", 0, ids, [50])
    context = model.prompt_embeddings([""] * 2)
    assert context.shape == (2, 77, 768)
    with capture(model.unet, ALL) as cap:
        out = cap.run(inputs[50], 50, encoder_hidden_states=context)
    expected = {i.name: (2, i.channels, i.height, i.width) for i in block_shapes(unet_config("sd15"), resolution, ALL)}
    assert {n: tuple(v.shape) for n, v in out.items()} == expected
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("resolution", [128, 512])
def test_sd21_and_sdturbo_shapes_equal_sd15(resolution: int) -> None:
    sd15 = block_shapes(unet_config("sd15"), resolution, ALL)
    assert block_shapes(unet_config("sd21"), resolution, ALL) == sd15
    assert block_shapes(unet_config("sdturbo"), resolution, ALL) == sd15


@pytest.mark.parametrize("resolution", [496, 480, 448, 384])  # 512 cropped by 8/16/32/64 px: latents 62/60/56/48
def test_paper_crop_sizes_through_the_tiny_unet(resolution: int) -> None:
    check_odd_latent_size(resolution)
