"""Padding interventions: each mode pads like numpy's own padding would, `zeros` is exactly no intervention (spec
hash and store bytes), another mode changes the activations, and planning sizes do not move."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from conftest import small_spec
from storecompare import array_paths, assert_same_store

from sdfeat.errors import SpecError
from sdfeat.models.interventions import apply_padding, set_padding
from sdfeat.models.loading import build_tiny_pipeline, load_model
from sdfeat.spec import parse_spec, spec_hash

NUMPY_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
MODES = list(NUMPY_MODE)


def _expected(conv: torch.nn.Conv2d, x: torch.Tensor, mode: str) -> torch.Tensor:
    """numpy pads (independently of torch's padding code), then an unpadded convolution with the same weights."""
    ph, pw = conv.padding
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode=NUMPY_MODE[mode])
    return F.conv2d(torch.from_numpy(padded), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


@pytest.mark.parametrize("mode", MODES)
def test_tiny_model_conv_pads_like_numpy(mode: str) -> None:
    conv = build_tiny_pipeline().unet.conv_in  # 3×3, padding 1
    weight = conv.weight.detach().clone()
    x = torch.randn(2, conv.in_channels, 9, 7, generator=torch.Generator().manual_seed(0))
    assert set_padding(conv, mode) == 1
    with torch.no_grad():
        got = conv(x)
        torch.testing.assert_close(got, _expected(conv, x, mode), rtol=1e-5, atol=1e-5)
    assert torch.equal(conv.weight, weight)  # weights untouched


@pytest.mark.parametrize("mode", MODES)
def test_odd_padding_pads_like_numpy(mode: str) -> None:
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 5, kernel_size=(5, 3), padding=(2, 1), stride=(1, 2))
    x = torch.randn(1, 3, 8, 11)
    set_padding(conv, mode)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), _expected(conv, x, mode), rtol=1e-5, atol=1e-5)
    if mode != "zeros":  # the border really changes
        with torch.no_grad():
            zero = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        assert not torch.allclose(conv(x).detach(), zero)


def test_scope_and_unpadded_convs() -> None:
    pipe = build_tiny_pipeline()
    unet_padded = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)]
    vae_padded = [m for m in pipe.vae.encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)]
    assert apply_padding(pipe.unet, pipe.vae.encoder, "zeros", "unet+vae") == 0
    assert apply_padding(pipe.unet, pipe.vae.encoder, "circular", "unet") == len(unet_padded) > 10
    assert all(m.padding_mode == "zeros" for m in vae_padded)
    unpadded = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.padding == (0, 0)]
    assert unpadded and all(m.padding_mode == "zeros" for m in unpadded)  # 1×1 convs stay as they are
    assert apply_padding(pipe.unet, pipe.vae.encoder, "reflect", "unet+vae") == len(unet_padded) + len(vae_padded)
    for lazy_vae in (False, True):  # a VAE loaded on first use is padded as one loaded with the U-Net
        loaded = load_model("tiny", padding="replicate", padding_scope="unet+vae", lazy_vae=lazy_vae)
        modes = {m.padding_mode for part in (loaded.unet, loaded.vae) for m in part.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)}
        assert modes == {"replicate"}, lazy_vae
        unet_only = load_model("tiny", padding="replicate", padding_scope="unet", lazy_vae=lazy_vae)
        assert {m.padding_mode for m in unet_only.vae.modules()
                if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)} == {"zeros"}, lazy_vae


def test_spec_zeros_is_no_intervention() -> None:
    base = {"source": "synthetic:4", "output": "out"}
    plain = parse_spec(base)
    zeros = parse_spec({**base, "intervention": {"padding": "zeros", "scope": "unet+vae"}})
    reflect = parse_spec({**base, "intervention": {"padding": "reflect"}})
    assert zeros.intervention is None and zeros == plain and spec_hash(zeros) == spec_hash(plain)
    assert spec_hash(reflect) != spec_hash(plain)
    assert spec_hash(reflect) != spec_hash(parse_spec({**base, "intervention": {"padding": "reflect",
                                                                                 "scope": "unet+vae"}}))
    assert parse_spec(reflect.model_dump(mode="json")) == reflect
    with pytest.raises(SpecError, match="intervention.padding"):
        parse_spec({**base, "intervention": {"padding": "mirror"}})
    with pytest.raises(SpecError, match="resolution >= 128"):
        parse_spec({**base, "resolution": 64, "intervention": {"padding": "reflect"}})


def test_plan_sizes_ignore_the_intervention() -> None:
    from sdfeat.planning.units import estimate_job

    data = {"model": "sd15", "source": "synthetic:8", "blocks": "all", "variants": {"crops": "auto"},
            "summaries": {"blocks": "all"}, "output": "out"}
    plain = estimate_job(parse_spec(data), images_per_second=10.0, samples=1_281_167)
    changed = estimate_job(parse_spec({**data, "intervention": {"padding": "circular", "scope": "unet+vae"}}),
                           images_per_second=10.0, samples=1_281_167)
    assert changed.layout.bytes_per_sample() == plain.layout.bytes_per_sample() > 0
    assert [a.path for a in changed.layout.arrays] == [a.path for a in plain.layout.arrays]
    assert changed.hours == plain.hours


def test_zeros_store_is_byte_identical_and_reflect_differs(tmp_path) -> None:
    from sdfeat.extract import run_local

    common = {"source": "synthetic:4", "timesteps": [50], "unit_size": 4,
              "blocks": ["conv_in", "down_blocks.1.resnets.0", "up_blocks.1.upsamplers.0"]}
    stores = {}
    for name, extra in (("plain", {}), ("zeros", {"intervention": {"padding": "zeros"}}),
                        ("reflect", {"intervention": {"padding": "reflect"}})):
        stores[name] = str(tmp_path / name)
        run_local(small_spec(stores[name], **common, **extra), progress=False, device="cpu")
    assert_same_store(stores["zeros"], stores["plain"])
    attrs = {k: zarr.open_group(f"{stores[k]}/features.zarr", mode="r").attrs.asdict() for k in stores}
    spec = {k: {key: v for key, v in attrs[k]["sdfeat"]["spec"].items() if key != "output"} for k in attrs}
    assert spec["zeros"] == spec["plain"] and spec["plain"]["intervention"] is None
    assert attrs["reflect"]["sdfeat"]["spec"]["intervention"] == {"padding": "reflect", "scope": "unet"}
    assert attrs["reflect"]["sdfeat"]["spec_hash"] != attrs["plain"]["sdfeat"]["spec_hash"]
    plain = zarr.open_group(f"{stores['plain']}/features.zarr", mode="r")
    reflect = zarr.open_group(f"{stores['reflect']}/features.zarr", mode="r")
    for block in common["blocks"]:
        a, b = plain[block][...].astype(np.float32), reflect[block][...].astype(np.float32)
        assert a.shape == b.shape and not np.array_equal(a, b), block
    conv_in_a, conv_in_b = plain["conv_in"][...], reflect["conv_in"][...]  # (4, 1, 1, C, 16, 16)
    np.testing.assert_array_equal(conv_in_a[..., 1:-1, 1:-1], conv_in_b[..., 1:-1, 1:-1])  # interior: same
    assert array_paths(plain) == array_paths(reflect)


def test_a_crop_pass_too_small_to_reflect_is_refused_before_anything_is_written(tmp_path) -> None:
    """At 128 px the mid block's maps are 4 tokens wide, so `crops: auto` adds a pass cropped by 32 px: 64 px images
    whose deepest maps are 1 token, which reflection cannot pad."""
    from sdfeat.extract import run_local

    output = tmp_path / "out"
    spec = small_spec(str(output), variants={"crops": "auto"}, intervention={"padding": "reflect"})
    with pytest.raises(SpecError, match=r"'intervention.padding': 'reflect' cannot pad the crop pass of margin "
                                        r"32 px: its 64 px images give 1-token maps"):
        run_local(spec, progress=False, device="cpu")
    assert not output.exists()
