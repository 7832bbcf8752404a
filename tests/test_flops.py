"""FLOP counts on the meta device: the published SD-1.5 figures, and early exit counts only what runs."""

from __future__ import annotations

import pytest

from sdfeat.models.flops import unet_flops, vae_encoder_flops
from sdfeat.models.registry import TINY_UNET_CONFIG, shipped_config


def test_sd15_counts_match_the_known_figures() -> None:
    # SD-1.5 at 512 px: U-Net 803.27 GFLOP, VAE encoder 1,116.66 GFLOP per image (matmuls and convolutions)
    assert unet_flops(shipped_config("sd15", "unet"), 512) / 1e9 == pytest.approx(803.27, abs=0.01)
    assert vae_encoder_flops(shipped_config("sd15", "vae"), 512) / 1e9 == pytest.approx(1116.66, abs=0.01)


def test_flops_up_to_a_block_grow_with_depth_and_conv_in_is_time_embedding_plus_one_convolution() -> None:
    full = unet_flops(TINY_UNET_CONFIG, 128)
    depths = [unet_flops(TINY_UNET_CONFIG, 128, b) for b in
              ("conv_in", "down_blocks.1.resnets.0", "mid_block.resnets.1", "up_blocks.1.upsamplers.0")]
    assert depths == sorted(depths) and depths[-1] < full
    # up to conv_in: the time embedding MLP (32 -> 128 -> 128) runs first, then the 3x3 conv, 4 -> 32 channels on
    # a 16x16 latent; 2 FLOPs per multiply-add
    assert depths[0] == 2 * (32 * 128 + 128 * 128) + 2 * 16 * 16 * 32 * 4 * 9
