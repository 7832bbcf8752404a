"""The terminal as a new user meets it, each command run as a subprocess with its output piped: `--version`, help
without type noise, tables that are never cut, one-line errors that say what to do (unknown key with the nearest
valid one, YAML line numbers, missing weights naming `hf download`), and "N failed" pointing to failures.parquet."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sdfeat

SDFEAT = [sys.executable, "-m", "sdfeat.cli"]


def _sdfeat(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SDFEAT, *args], capture_output=True, text=True, timeout=300, env=env)


def test_version_and_help_without_type_noise() -> None:
    result = _sdfeat("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"sdfeat {sdfeat.__version__}"
    for command in ([], ["extract"], ["submit"], ["metrics"]):
        result = _sdfeat(*command, "--help")
        assert result.returncode == 0 and "<bool>" not in result.stdout, result.stdout
    assert "Exit code: 0 SUCCEEDED" in _sdfeat("status", "--help").stdout


def test_piped_tables_are_tab_separated_and_never_cut() -> None:
    result = _sdfeat("blocks", "sd15")
    assert result.returncode == 0
    lines = [line for line in result.stdout.splitlines() if "down_blocks.0.attentions" in line]
    assert [line.split("\t")[1:3] for line in lines] == [
        ["down_blocks.0.attentions.0", "down_blocks[0].attentions[0]"],
        ["down_blocks.0.attentions.1", "down_blocks[0].attentions[1]"]]
    assert "…" not in result.stdout and "--json" in result.stdout



def test_piped_plan_and_extract_print_plain_lines_without_bars(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(f"model: tiny\nsource: synthetic:4\nresolution: 64\nblocks: [conv_in, down_blocks.1.attentions.1]\n"
                   f"variants: {{crops: auto}}\nbatch_size: 2\nunit_size: 2\noutput: {tmp_path}/o\n")
    plan = _sdfeat("plan", str(job))
    assert plan.returncode == 0, plan.stderr
    assert "crops/16/down_blocks.1.attentions.1\t" in plan.stdout                   # one row, tab-separated
    assert not any(ch in plan.stdout for ch in "┃━│…")                                # no box drawing, nothing cut
    run = _sdfeat("extract", str(job), "--local")                                   # progress bar on: not piped
    assert run.returncode == 0 and "━" not in run.stdout + run.stderr, run.stdout
    again = _sdfeat("extract", str(job), "--local")
    assert "stages: none (nothing left to do)" in again.stdout and "resumed: 2 of 2 units" in again.stdout


def test_unknown_key_suggests_and_yaml_errors_keep_the_line(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("model: tiny\nsource: synthetic:4\noutput: out\nresoluton: 64\n")
    result = _sdfeat("plan", str(job))
    assert result.returncode == 2 and "did you mean 'resolution'?" in result.stderr
    job.write_text("model: tiny\nsource: synthetic:4\noutput: out\nvariants:\n  crop: auto\n")
    assert "did you mean 'crops'?" in _sdfeat("plan", str(job)).stderr
    job.write_text("model: tiny\nsource: [synthetic:4\noutput: out\n")
    result = _sdfeat("plan", str(job))
    assert result.returncode == 2 and f"{job}:3:" in result.stderr and "not valid YAML" in result.stderr


def test_missing_weights_fail_in_one_line_naming_hf_download(tmp_path: Path) -> None:
    assert (Path(sys.executable).parent / "hf").exists()          # the CLI the advice names is installed
    job = tmp_path / "job.yaml"
    job.write_text(f"model: sd15\nsource: synthetic:2\nresolution: 64\nblocks: [conv_in]\noutput: {tmp_path}/o\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")   # empty cache, no hub
    start = time.monotonic()
    result = _sdfeat("extract", str(job), "--local", "-q", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in lines[0] and "huggingface-cli" not in lines[0]
    assert time.monotonic() - start < 60                          # imports only: no hub retries


def test_failed_images_point_to_the_failure_table(tmp_path: Path) -> None:
    import imagegen

    imagegen.write_parquet_shards(tmp_path / "src", 1, 4, image_fn=lambda i: b"junk" if i == 1 else
                                  imagegen.solid_jpeg(40, 40, imagegen.color_for(i)))
    job = tmp_path / "job.yaml"
    job.write_text(f"model: tiny\nsource: {tmp_path}/src\nresolution: 64\nblocks: [conv_in]\nbatch_size: 4\n"
                   f"output: {tmp_path}/o\n")
    result = _sdfeat("extract", str(job), "--local", "-q")
    assert result.returncode == 0, result.stderr
    assert f"1 failed (see {tmp_path}/o/failures.parquet)" in result.stdout


def test_ctrl_c_says_how_many_units_are_done_and_exits_130(tmp_path: Path) -> None:
    import signal

    out = tmp_path / "o"
    job = tmp_path / "job.yaml"
    job.write_text(f"model: tiny\nsource: synthetic:64\nresolution: 128\nunit_size: 4\nbatch_size: 4\n"
                   f"blocks: [conv_in, up_blocks.1.upsamplers.0]\ntimesteps: [50, 200, 400]\noutput: {out}\n")
    # a shell without job control starts background commands with SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: give the child the default, as a terminal would
    proc = subprocess.Popen([*SDFEAT, "extract", str(job), "--local", "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not list((out / "progress").glob("unit-*.json")) if (out / "progress").exists() else True:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    done = len(list((out / "progress").glob("unit-*.json")))
    assert f"interrupted: {done} of 16 units done; run the same command to resume" in err


@pytest.mark.ray
def test_a_run_prints_only_sdfeat_lines_unless_verbose(tmp_path: Path) -> None:
    """Ray (a private instance, whose actors load the model) and --local: no transformers/accelerate notices,
    no Ray INFO lines, no weight-loading bars; with -v the details come back."""
    job = tmp_path / "job.yaml"
    job.write_text(f"model: tiny\nsource: synthetic:4\nresolution: 64\nblocks: [conv_in]\nbatch_size: 2\n"
                   f"unit_size: 2\noutput: {tmp_path}/o\n")
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    for extra in (["-q"], ["--local", "-q", "-o", f"{tmp_path}/l"]):
        result = _sdfeat("extract", str(job), *extra, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == "", result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith("4/4 images extracted") and lines[-1].startswith("store: "), result.stdout
        assert all(line.startswith(("4/4 images", "ran on", "store: ")) for line in lines), result.stdout
    verbose = _sdfeat("-v", "extract", str(job), "--local", "-q", "-o", f"{tmp_path}/v", env=env)
    assert verbose.returncode == 0 and "INFO" in verbose.stderr
