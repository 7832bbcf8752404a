"""Model registry, shipped configs, the tiny pipeline, real loading from a directory, missing weights."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdfeat.errors import ModelNotFoundError
from sdfeat.models.blocks import block_shapes, preset_names
from sdfeat.models.loading import build_tiny_pipeline, load_model, save_tiny_pipeline
from sdfeat.models.registry import REGISTRY, TINY_UNET_CONFIG, shipped_config, unet_config
from modelkit import tiny_model


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_registry_and_shipped_configs() -> None:
    assert REGISTRY["sd15"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert REGISTRY["sd21"] == "stabilityai/stable-diffusion-2-1" and REGISTRY["sdturbo"] == "stabilityai/sd-turbo"
    schedulers = {name: shipped_config(name, "scheduler") for name in REGISTRY}
    assert schedulers["sd15"]["_class_name"] == "PNDMScheduler"
    assert schedulers["sd21"]["_class_name"] == "DDIMScheduler"
    assert schedulers["sd21"]["prediction_type"] == "v_prediction"
    assert schedulers["sdturbo"]["_class_name"] == "EulerDiscreteScheduler"
    assert schedulers["sdturbo"]["timestep_spacing"] == "trailing"
    for name in REGISTRY:
        assert (schedulers[name]["beta_start"], schedulers[name]["beta_end"]) == (0.00085, 0.012)
        assert shipped_config(name, "vae")["scaling_factor"] == 0.18215
        assert unet_config(name) == unet_config(f"random:{name}") == shipped_config(name, "unet")
    assert unet_config("sd15")["cross_attention_dim"] == shipped_config("sd15", "text_encoder")["hidden_size"] == 768
    assert unet_config("sd21")["cross_attention_dim"] == shipped_config("sd21", "text_encoder")["hidden_size"] == 1024


@pytest.mark.parametrize("name", ["nope", "random:sd99", "./missing/dir", "a/b/c"])
def test_unknown_model_names(name: str) -> None:
    with pytest.raises(ModelNotFoundError, match="model"):
        unet_config(name)


def test_tiny_is_sd15_shaped_and_deterministic() -> None:
    # same 46 positions, in the same order, and the same relative sizes as SD-1.5
    tiny = block_shapes(TINY_UNET_CONFIG, 256, preset_names("all"))
    sd15 = block_shapes(unet_config("sd15"), 256, preset_names("all"))
    assert [(i.name, i.height, i.order) for i in tiny] == [(i.name, i.height, i.order) for i in sd15]
    assert {i.channels for i in tiny if i.name != "conv_out"} == {32, 64}
    one, two = build_tiny_pipeline(), build_tiny_pipeline()
    for component in ("unet", "vae", "text_encoder"):
        assert _digest(getattr(one, component)) == _digest(getattr(two, component))
    assert _digest(build_tiny_pipeline(seed=1).unet) != _digest(one.unet)


def test_saved_tiny_pipeline_loads_through_the_real_path(tmp_path: Path) -> None:
    path = save_tiny_pipeline(tmp_path / "tiny")
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json"} <= files
    assert any(f.startswith("unet/") and f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)
    assert unet_config(str(path))["block_out_channels"] == TINY_UNET_CONFIG["block_out_channels"]

    loaded = load_model(str(path))
    reference = tiny_model()
    assert loaded.source == str(path.resolve())
    assert _digest(loaded.unet) == _digest(reference.unet)
    assert type(loaded.scheduler).__name__ == "PNDMScheduler"
    assert type(loaded.noise_scheduler).__name__ == "DDIMScheduler"
    assert loaded.scaling_factor == pytest.approx(0.18215)
    assert torch.equal(loaded.prompt_embeddings(["a photo"]), reference.prompt_embeddings(["a photo"]))


def test_local_dir_without_unet_is_reported(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="unet/config.json"):
        unet_config(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=str(tmp_path.name)):
        load_model(str(tmp_path))


def test_model_is_ready_for_extraction() -> None:
    model = tiny_model()
    assert model.vae.decoder is None and model.vae.post_quant_conv is None
    for module in (model.unet, model.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
        assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_fp16_rounded_weights_are_fp16_values_in_fp32() -> None:
    plain, rounded = tiny_model(), load_model("tiny", fp16_rounded_weights=True)
    w_plain = plain.unet.conv_in.weight
    w_rounded = rounded.unet.conv_in.weight
    assert w_rounded.dtype == torch.float32
    assert torch.equal(w_rounded, w_plain.half().float())
    assert not torch.equal(w_rounded, w_plain)


def test_prompt_embeddings_cached_expanded_and_equal_to_the_text_encoder() -> None:
    model = tiny_model()
    loads = []
    original = model._text_loader
    model._text_loader = lambda: loads.append(1) or original()
    batch = model.prompt_embeddings([""] * 3)
    assert batch.shape == (3, 77, 32) and batch.stride(0) == 0  # one row, expanded
    mixed = model.prompt_embeddings(["", "the cat", ""])
    model.prompt_embeddings(["the cat", ""])
    assert len(loads) == 2  # once for "", once for "the cat"
    pipe = build_tiny_pipeline()
    ids = pipe.tokenizer(["the cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, :3].tolist() == [pipe.tokenizer.bos_token_id, pipe.tokenizer.get_vocab()["the</w>"],
                                   pipe.tokenizer.get_vocab()["c"]]
    with torch.no_grad():
        expected = pipe.text_encoder(ids)[0][0]
    assert torch.allclose(mixed[1], expected, atol=1e-6)
    assert torch.equal(mixed[0], batch[0]) and torch.equal(mixed[2], batch[0])


_OFFLINE_SCRIPT = """
import socket, sys
def refuse(*a, **k):
    print("NETWORK", file=sys.stderr); raise OSError("network used")
socket.socket.connect = refuse
socket.create_connection = refuse
from sdfeat.errors import ModelNotFoundError
from sdfeat.models.loading import load_model
from sdfeat.models.registry import unet_config
for call in (lambda: load_model("sd15"), lambda: unet_config("someone/some-model")):
    try:
        call()
    except ModelNotFoundError as err:
        print(str(err))
"""


def test_missing_weights_offline_give_one_line_without_network(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert "NETWORK" not in done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout + done.stderr
    assert lines[0].startswith("model 'sd15'") and REGISTRY["sd15"] in lines[0]
    assert "hf download" in lines[0] and "huggingface-cli" not in lines[0] and "local diffusers" in lines[0]
    assert lines[1].startswith("model 'someone/some-model'")
    assert not (tmp_path / "hf" / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5").exists()


def test_text_encoder_is_freed_after_embedding() -> None:
    import gc
    import weakref

    model = tiny_model()
    pipe = build_tiny_pipeline()
    refs = []

    def fresh_loader():
        encoder = build_tiny_pipeline().text_encoder
        refs.append(weakref.ref(encoder))
        return pipe.tokenizer, encoder

    model._text_loader = fresh_loader
    model.prompt_embeddings(["a", "b"])
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None
