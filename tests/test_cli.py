"""The command line: commands parse, delegate, and turn domain errors into one line and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sdfeat.cli.app import app
from sdfeat.store.query import open_store

runner = CliRunner()


def test_blocks_sd15_paper_preset_matches_the_protocol_table() -> None:
    result = runner.invoke(app, ["blocks", "sd15", "--preset", "paper", "--resolution", "512", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 45
    cells = [(r["name"], r["paper_name"], r["channels"], r["height"], r["width"]) for r in rows]
    assert cells[0] == ("conv_in", "conv_in", 320, 64, 64)
    assert cells[5] == ("down_blocks.0.downsamplers.0", "down_blocks[0].downsamplers[0]", 320, 32, 32)
    by_name = {c[0]: c[2:] for c in cells}
    assert "up_blocks.0.resnets.2" not in by_name
    assert by_name["up_blocks.1.upsamplers.0"] == (1280, 32, 32)
    assert by_name["up_blocks.1.resnets.0"] == (1280, 16, 16)
    assert by_name["up_blocks.2.upsamplers.0"] == (640, 64, 64)
    assert by_name["down_blocks.2.downsamplers.0"] == (1280, 8, 8)
    assert by_name["mid_block.attentions.0"] == (1280, 8, 8)
    assert cells[-1] == ("conv_out", "conv_out", 4, 64, 64)
    table = runner.invoke(app, ["blocks", "sd15", "--preset", "all"])
    assert table.exit_code == 0 and "conv_out" in table.output
    assert table.output.splitlines()[0] == "# sd15 at 512px (all); --json for JSON lines"  # the choice, not its enum
    all46 = runner.invoke(app, ["blocks", "sd15", "--preset", "all", "--json"])
    assert len(all46.output.splitlines()) == 46 and "up_blocks.0.resnets.2" in all46.output


def test_spec_error_exits_2_with_one_line(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("source: synthetic:4\noutput: out\nresolution: 100\n")
    result = runner.invoke(app, ["extract", str(job), "--local"])
    assert result.exit_code == 2
    assert "field 'resolution'" in result.output and "Traceback" not in result.output


def test_unknown_block_suggests_the_closest(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("source: synthetic:4\noutput: out\nmodel: tiny\nblocks: [up_blocks.1.upsampler.0]\n")
    result = runner.invoke(app, ["plan", str(job), "--samples", "10"])
    assert result.exit_code == 2 and "up_blocks.1.upsamplers.0" in result.output


def test_plan_prints_bytes_for_a_source_out_of_reach() -> None:
    result = runner.invoke(app, ["plan", "jobs/sd15-paper.yaml", "--samples", "500", "--images-per-second", "5"],
                           terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "500 images" in result.output and "total" in result.output and "h at 5 img/s" in result.output


def test_info_query_show_verify(tiny_store: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", tiny_store], terminal_width=200)
    assert result.exit_code == 0 and "samples 12 (12 ok)" in result.output and "compression" in result.output

    npy = tmp_path / "x.npy"
    result = runner.invoke(app, ["query", tiny_store, "--block", "conv_in", "--sample", "synthetic#00002",
                                 "--sample", "0", "--timestep", "50", "-o", str(npy)])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(npy), open_store(tiny_store).read("conv_in", [2, 0], timestep=50))

    png = tmp_path / "map.png"
    result = runner.invoke(app, ["show", tiny_store, "--block", "up_blocks.1.upsamplers.0", "--sample", "3",
                                 "--kind", "similarity", "--at", "2,5", "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(app, ["show", tiny_store, "--block", "conv_in", "--sample", "3", "--kind", "similarity",
                                 "--at", "99,0", "-o", str(png)])
    assert result.exit_code == 2 and "outside" in result.output

    assert runner.invoke(app, ["verify", tiny_store]).exit_code == 0
    broken = tmp_path / "broken"
    shutil.copytree(tiny_store, broken)
    (broken / "progress" / "unit-000001.json").unlink()
    result = runner.invoke(app, ["verify", str(broken)])
    assert result.exit_code == 1 and "no done marker" in result.output


def test_query_unknown_sample_exits_2(tiny_store: str) -> None:
    result = runner.invoke(app, ["query", tiny_store, "--block", "conv_in", "--sample", "nope"])
    assert result.exit_code == 2 and "sample 'nope'" in result.output


@pytest.mark.parametrize("args, option", [(["metrics", "out", "--metric", "probe"], "--metric"),
                                          (["report", "out", "-o", "x", "--reference", "sd3"], "--reference")])
def test_choices_are_checked_by_the_parser_and_named(args: list[str], option: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert option in result.output and "is not one of" in result.output


def test_extract_write_workers_overrides_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdfeat.errors import SpecError
    import sdfeat.extract

    job = tmp_path / "job.yaml"
    job.write_text(f"source: synthetic:4\noutput: {tmp_path / 'out'}\nmodel: tiny\nwrite_workers: 3\n")
    given = []

    def run_local(spec, **_: object) -> dict:
        given.append(spec.write_workers)
        raise SpecError("stopped here")

    monkeypatch.setattr(sdfeat.extract, "run_local", run_local)
    assert runner.invoke(app, ["extract", str(job), "--local"]).exit_code == 2
    assert runner.invoke(app, ["extract", str(job), "--local", "--write-workers", "1"]).exit_code == 2
    assert given == [3, 1]
    refused = runner.invoke(app, ["extract", str(job), "--local", "--write-workers", "0"])
    assert refused.exit_code == 2 and "--write-workers" in refused.output and given == [3, 1]


@pytest.mark.parametrize(("model", "presets"), [("sd15", "all, paper"), ("sdxl", "all, stages"),
                                                 ("dit-xl-2", "all, blocks")])
def test_a_preset_the_models_family_lacks_is_named_with_the_ones_it_has(model: str, presets: str) -> None:
    result = runner.invoke(app, ["blocks", model, "--preset", "most"])
    assert result.exit_code == 2 and f"--preset 'most': not a preset of {model}" in result.output
    assert f"choose one of {presets}" in result.output
