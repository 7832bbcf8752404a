"""Loading safetensors tensor by tensor (`sdfeat.models.weights`) gives the weights diffusers' `from_pretrained` gives,
bit for bit — rounded through float16 for `protocol: paper` (sdhelper's loading), plain otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from sdfeat.errors import ModelNotFoundError
from sdfeat.models import weights
from sdfeat.models.loading import build_tiny_pipeline, load_model


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny pipeline saved in float32 and in float16."""
    root = tmp_path_factory.mktemp("pipelines")
    out = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        pipe = build_tiny_pipeline()
        pipe.to(dtype).save_pretrained(root / name, safe_serialization=True)
        out[name] = root / name
    return out


def _reference(path: Path, rounded: bool) -> tuple[dict, dict]:
    """What the loading did before `weights`: from_pretrained(torch_dtype=fp16 if rounded), then float32."""
    load_dtype = torch.float16 if rounded else torch.float32
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=load_dtype).to(torch.float32)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=load_dtype).to(torch.float32)
    return unet.state_dict(), {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}


@pytest.mark.parametrize("saved", ["fp32", "fp16"])
@pytest.mark.parametrize("rounded", [True, False])
def test_loaded_weights_equal_from_pretrained(pipelines: dict[str, Path], saved: str, rounded: bool) -> None:
    model = load_model(str(pipelines[saved]), fp16_rounded_weights=rounded)
    unet_ref, vae_ref = _reference(pipelines[saved], rounded)
    got_unet, got_vae = model.unet.state_dict(), model.vae.state_dict()
    assert set(got_unet) == set(unet_ref) and set(got_vae) == set(vae_ref)
    for got, ref in ((got_unet, unet_ref), (got_vae, vae_ref)):
        for name, value in ref.items():
            assert got[name].dtype == torch.float32 and torch.equal(got[name], value), name
    if saved == "fp32" and rounded:  # the rounding did something
        assert not torch.equal(got_unet["conv_in.weight"], UNet2DConditionModel.from_pretrained(
            pipelines[saved], subfolder="unet").state_dict()["conv_in.weight"])
    assert model.vae.decoder is None and not any(p.requires_grad for p in model.unet.parameters())


def test_read_tensors_reads_the_file_and_refuses_a_truncated_one(pipelines: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    path = pipelines["fp16"] / "vae" / "diffusion_pytorch_model.safetensors"
    expected = load_file(path)
    got = dict(weights.read_tensors(path, keep=lambda n: n.startswith("encoder.")))
    assert set(got) == {n for n in expected if n.startswith("encoder.")}
    assert all(torch.equal(got[n], expected[n]) and got[n].dtype == torch.float16 for n in got)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelNotFoundError, match="truncated"):
        list(weights.read_tensors(cut))


def test_digest_depends_on_values_only(pipelines: dict[str, Path]) -> None:
    """The digest of the fp16 file rounded equals the fp32 file rounded (same values after the cast)."""
    fp16 = load_model(str(pipelines["fp16"]), fp16_rounded_weights=True, lazy_vae=True)
    fp32 = load_model(str(pipelines["fp32"]), fp16_rounded_weights=True, lazy_vae=True)
    plain = load_model(str(pipelines["fp32"]), lazy_vae=True)
    assert fp16.vae_weights_digest() == fp32.vae_weights_digest() != plain.vae_weights_digest()
    assert not fp16.vae_loaded and plain.vae_weights_digest() == load_model("tiny").vae_weights_digest()
