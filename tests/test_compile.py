"""`compile: true` holds: every U-Net block stays compiled for every shape a job runs (full image and crops, a full
and a short batch, two resolutions in one process), counted with Dynamo's own counters on the CPU (eager backend,
so nothing is code-generated), and the warm-up compiles everything before the first unit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from sdfeat.extract.forward import Forward
from sdfeat.models.loading import compile_unet_blocks, load_model, unet_blocks
from sdfeat.planning.layout import job_layout
from sdfeat.spec import parse_spec


@pytest.fixture
def fresh_dynamo():
    config = torch._dynamo.config
    names = ("recompile_limit", "accumulated_recompile_limit", "fail_on_recompile_limit_hit")
    with config.patch({name: getattr(config, name) for name in names}):  # restored after the test
        torch._dynamo.reset()
        counters.clear()
        yield
        torch._dynamo.reset()


def _forward(model, resolution: int, tmp_path: Path) -> Forward:
    spec = parse_spec({"model": "tiny", "source": "synthetic:4", "resolution": resolution, "blocks": "paper",
                       "variants": {"crops": "auto"}, "batch_size": 3, "output": str(tmp_path / f"r{resolution}")})
    layout = job_layout(spec)
    return Forward(model, spec, layout, torch.device("cpu"), lambda path, unit: unit.rows, False, None)


def _compiled_frames() -> int:
    return counters["frames"]["ok"]


@pytest.mark.slow
def test_every_block_stays_compiled_for_every_shape_of_two_jobs(fresh_dynamo, tmp_path: Path) -> None:
    model = load_model("tiny", "cpu", torch.float32)
    model.vae  # loaded: the warm-up encodes too (the VAE itself is compiled on a GPU only)
    jobs = [_forward(model, resolution, tmp_path) for resolution in (64, 128)]
    shapes = sum(len(job.layout.passes) for job in jobs)
    assert shapes == 3 + 4  # 64 px: the full image and 2 crops; 128 px: and 3 crops
    assert compile_unet_blocks(model.unet, backend="eager", shapes=shapes) == len(unet_blocks(model.unet)) == 44

    for job in jobs:
        job.warm_up()
    limits_hit = [k for k in counters["unimplemented"] if "recompile limit" in k.lower()]
    assert limits_hit == []
    assert counters["frames"]["total"] == counters["frames"]["ok"]  # no frame fell back to eager
    compiled = _compiled_frames()
    # graphs are shared by instances of equal shapes and made dynamic after a shape changes: at least one per
    # block class, and every frame Dynamo saw compiled (none fell back)
    assert compiled >= len({type(b).forward.__code__ for b in unet_blocks(model.unet)})

    for job in jobs:  # the job's own shapes again, a short batch included: nothing new to compile
        job.warm_up()
    assert _compiled_frames() == compiled


def test_the_default_limit_would_have_left_blocks_eager(fresh_dynamo) -> None:
    """Why `allow_recompiles` exists: with Dynamo's default limit (8) the 22 ResnetBlock2D-like instances of
    one code object cannot all compile, and a block runs eager from then on (counted as a fallback)."""
    torch._dynamo.config.recompile_limit = 8
    model = load_model("tiny", "cpu", torch.float32)
    for block in unet_blocks(model.unet):
        block.forward = torch.compile(block.forward, backend="eager")
    emb = model.prompt_embeddings([""])
    with torch.inference_mode():
        model.unet(torch.zeros(1, 4, 8, 8), torch.tensor([50]), encoder_hidden_states=emb)
    assert any("recompile limit" in k.lower() for k in counters["unimplemented"])
