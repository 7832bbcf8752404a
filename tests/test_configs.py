"""Model names and configs without torch: `configs`, the config-computed block shapes, and the torch-free layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sdfeat.errors import ModelNotFoundError
from sdfeat.models import registry as configs
from sdfeat.models.families.sd import _config_shapes, meta_shapes

ROOT = Path(__file__).parents[1]


def test_layout_plan_and_checks_of_the_demo_import_no_torch() -> None:
    """The store layout, unit size and cheap checks of jobs/demo.yaml, and `sdfeat blocks`, run without importing
    torch or diffusers (a fresh interpreter, so nothing imported by other tests counts)."""
    code = """
import sys
from typer.testing import CliRunner
from sdfeat.cli.app import app
from sdfeat.planning.checks import check_job
from sdfeat.planning.layout import job_layout
from sdfeat.planning.units import estimate_job
from sdfeat.spec import load_spec

spec = load_spec("jobs/demo.yaml", output=sys.argv[1])
check_job(spec)
layout = job_layout(spec)
est = estimate_job(spec)
result = CliRunner().invoke(app, ["blocks", "sd15", "--json"])
assert result.exit_code == 0, result.output
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print(len(layout.arrays), len(layout.passes), est.n_units, len(result.output.splitlines()), heavy)
"""
    out = subprocess.run([sys.executable, "-c", code, "/nonexistent/demo-store"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # demo at 256 px: the 8 blocks' maps are 32, 16, 8 and 4 tokens wide -> crop margins 8, 16, 32, 64 px, so the
    # full pass and 4 crop passes, and more arrays than blocks; 24 images in units of 8; sd15's paper preset: 45
    arrays, passes, units, lines, heavy = out.stdout.split(maxsplit=4)
    assert heavy.strip() == "[]"
    assert (int(passes), int(units), int(lines)) == (5, 3, 45)
    assert int(arrays) > 8


@pytest.mark.parametrize("model", ["tiny", "sd15", "sd21"])
@pytest.mark.parametrize("resolution", [64, 72, 136, 248, 256, 496, 512])
def test_config_shapes_match_the_meta_forward(model: str, resolution: int) -> None:
    """Odd latent sides (72 px -> 9, 136 -> 17, 248 -> 31, crop passes) round as diffusers' forward does."""
    config = configs.unet_config(model)
    meta = meta_shapes(config, resolution)
    assert _config_shapes(config, resolution) == meta and list(meta) == list(_config_shapes(config, resolution))


def test_config_shapes_leave_other_layouts_to_the_meta_forward() -> None:
    tiny = configs.unet_config("tiny")
    assert _config_shapes({**tiny, "down_block_types": ["SomethingNew2D"] * 4}, 256) is None
    assert _config_shapes({**tiny, "mid_block_type": None}, 256) is None
    assert _config_shapes({**tiny, "block_out_channels": [32, 64, 64]}, 256) is None
    assert _config_shapes({**tiny, "downsample_padding": 0}, 256) is None
    assert _config_shapes({**tiny, "addition_embed_type": "text_time"}, 256) is None


def test_local_unet_config_reads_files_only(tmp_path: Path) -> None:
    assert configs.local_unet_config("sd21") == configs.shipped_config("sd21", "unet")
    assert configs.local_unet_config("random:sdturbo") == configs.shipped_config("sdturbo", "unet")
    assert configs.local_unet_config("tiny") == configs.TINY_UNET_CONFIG
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"block_out_channels": [1]}')
    assert configs.local_unet_config(str(tmp_path)) == {"block_out_channels": [1]}
    (tmp_path / "unet" / "config.json").write_text("{not json")
    assert configs.local_unet_config(str(tmp_path)) is None  # the loader reports it
    assert configs.local_unet_config("owner/name") is None  # a hub id: only huggingface_hub knows
    assert configs.local_unet_config("random:sd3") is None
    with pytest.raises(ModelNotFoundError, match="random:sd3"):
        configs.unet_config("random:sd3")


def test_resolve_model_names_kind_source_family_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name resolved once: the family by name where the name says, else by the denoiser's config (a local
    directory holding a DiT's transformer is a DiT); a relative directory becomes the absolute path it means."""
    import json

    expected = {"tiny": ("tiny", "tiny", "sd"), "sd15": ("hub", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd"),
                "random:sdxl": ("random", "sdxl", "sdxl"), "tiny-dit": ("tiny", "tiny-dit", "dit")}
    for name, (kind, source, family) in expected.items():
        ref = configs.resolve_model(name, revision="main")
        assert (ref.name, ref.kind, ref.source, ref.family.NAME, ref.revision) == (name, kind, source, family, "main")
        assert ref.config == configs.unet_config(name)
    pipeline = tmp_path / "pipe"
    (pipeline / "transformer").mkdir(parents=True)
    dit = configs.unet_config("tiny-dit")
    (pipeline / "transformer" / "config.json").write_text(json.dumps(dit))
    monkeypatch.chdir(tmp_path)
    ref = configs.resolve_model("pipe")
    assert (ref.kind, ref.source, ref.family.NAME, ref.config) == ("local", str(pipeline), "dit", dit)
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        configs.resolve_model("no-such-model")
