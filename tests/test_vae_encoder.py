"""`vae_encoder.encoder_only`: the lean resnet forward gives diffusers' values bit for bit (its memory is
benchmarks/bench_extract.py's cold peak RSS)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D

from sdfeat.models.registry import TINY_VAE_CONFIG, shipped_config
from sdfeat.models.vae_encoder import encoder_only


@functools.cache
def _plain_vae(name: str) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return AutoencoderKL.from_config(TINY_VAE_CONFIG if name == "tiny" else shipped_config("sd15", "vae")).eval()


CASES = [(name, dtype, layout) for name in ("tiny", "sd15") for dtype in (torch.float32, torch.bfloat16)
         for layout in (torch.contiguous_format, torch.channels_last)
         if not (name == "sd15" and dtype == torch.bfloat16)]  # SD's bf16 convs on a CPU: minutes, nothing new


@pytest.mark.parametrize(("name", "dtype", "layout"), CASES)
def test_lean_encoder_equals_diffusers_bit_for_bit(name: str, dtype: torch.dtype, layout: torch.memory_format) -> None:
    plain = copy.deepcopy(_plain_vae(name)).to(dtype)
    lean = encoder_only(copy.deepcopy(plain))
    lean_blocks = [m for m in lean.encoder.modules() if isinstance(m, ResnetBlock2D)]
    assert lean_blocks and all("forward" in vars(m) for m in lean_blocks)  # every encoder resnet runs lean
    assert lean.decoder is None and lean.post_quant_conv is None
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    x = x.contiguous(memory_format=layout)
    with torch.inference_mode():
        expected = plain.encode(x).latent_dist.parameters
        got = lean.encode(x).latent_dist.parameters
    assert torch.equal(got, expected)


def test_blocks_with_a_time_embedding_resampling_or_another_activation_keep_diffusers_forward() -> None:
    from sdfeat.models.vae_encoder import _plain_resnet

    assert not _plain_resnet(ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=8, groups=8))
    assert not _plain_resnet(ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=None, groups=8,
                                           down=True))
    assert not _plain_resnet(ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=None, groups=8,
                                           non_linearity="mish"))
