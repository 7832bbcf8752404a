"""Fail safe on first contact (issue 17): a job that cannot run writes nothing and is refused in one line before
anything heavy is imported (unknown model, empty output, by every command that takes a job); errors keep their
useful half (a dedented section, a job file given as a store, a store that cannot take the metric tables: checked
before the work, with `--results DIR` as the way around)."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_hardening import _one_error_line, run_cli

COMMANDS = {"extract --local": ["extract", "JOB", "--local"], "extract (Ray)": ["extract", "JOB"],
            "plan": ["plan", "JOB"], "submit": ["submit", "JOB", "--address", "127.0.0.1:9"]}


@pytest.mark.parametrize("command", COMMANDS, ids=list(COMMANDS))
@pytest.mark.parametrize("case, field", [("model: nosuch", "field 'model': model 'nosuch': not a registry name"),
                                         ("output:", "field 'output': has no value")])
def test_unknown_model_and_empty_output_are_refused_before_anything_heavy(tmp_path: Path, command: str, case: str,
                                                                         field: str) -> None:
    lines = {"model": "model: tiny", "source": "source: synthetic:2", "resolution": "resolution: 64",
             "blocks": "blocks: [conv_in]", "output": f"output: {tmp_path / 'out'}"}
    lines[case.split(":")[0]] = case
    job = tmp_path / "job.yaml"
    job.write_text("\n".join(lines.values()) + "\n")
    result = run_cli(*[str(job) if a == "JOB" else a for a in COMMANDS[command]])
    assert field in _one_error_line(result)
    assert result.stderr.rstrip().endswith("HEAVY="), result.stderr   # no torch, diffusers or Ray imported
    assert not (tmp_path / "out").exists()


def test_a_dedented_section_names_the_key_and_where_it_belongs(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(f"model: tiny\nsource: synthetic:2\nvariants:\ncrops: auto\noutput: {tmp_path / 'out'}\n")
    line = _one_error_line(run_cli("extract", str(job), "--local"))
    assert "field 'crops': unknown key; it is a key of 'variants:' (indent it under 'variants:')" in line
    assert "field 'variants': has no value" in line and "valid dictionary" not in line


@pytest.mark.parametrize("command", [["report", "JOB", "-o", "OUT"], ["info", "JOB"], ["metrics", "JOB", "--local"],
                                     ["explore", "JOB"]])
def test_a_job_file_given_as_a_store_names_its_store_and_writes_nothing(tmp_path: Path, command: list[str]) -> None:
    job = tmp_path / "demo.yaml"
    job.write_text("model: tiny\nsource: synthetic:2\noutput: out/demo\n")
    out = tmp_path / "report"
    line = _one_error_line(run_cli(*[str(job) if a == "JOB" else str(out) if a == "OUT" else a for a in command]))
    assert line == f"error: {job} is a file, not a store: a job spec? its store is out/demo"
    assert not out.exists()


def test_metrics_check_where_tables_go_before_measuring(tiny_store: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that refuses writes (read-only: as root, permissions do not bind, so the refusal is simulated at
    the one place the runner asks) fails at once, no task run, naming --results; with --results DIR the tables
    go there and `report DIR` draws them."""
    from sdfeat import store
    from sdfeat.cli.app import app
    from sdfeat.metrics import runner

    copy = str(tmp_path / "s")
    shutil.copytree(tiny_store, copy)
    real = store.check_writable

    def read_only(folder: str) -> None:
        if folder.startswith(copy):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), folder)
        real(folder)

    monkeypatch.setattr(store, "check_writable", read_only)
    calls: list[int] = []
    execute = runner.execute

    def counted(tasks: list, *args: object, **kwargs: object) -> list:
        calls.append(len(tasks))
        return execute(tasks, *args, **kwargs)

    monkeypatch.setattr(runner, "execute", counted)
    args = ["metrics", copy, "--local", "--metric", "position", "--block", "conv_in"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and calls == []
    assert refused.output.strip() == (f"error: {copy}/results: {os.strerror(errno.EROFS)} (EROFS): the metric tables "
                                      "cannot be written there; pass results=DIR (`sdfeat metrics --results DIR`) "
                                      "to write them elsewhere")
    elsewhere = tmp_path / "tables"
    done = CliRunner().invoke(app, [*args, "--results", str(elsewhere), "--json"])
    assert done.exit_code == 0, done.output
    assert (elsewhere / "position.parquet").is_file() and not (Path(copy) / "results").exists()
    report = CliRunner().invoke(app, ["report", str(elsewhere), "-o", str(tmp_path / "rep")])
    assert report.exit_code == 0, report.output
    assert "Partial" not in (tmp_path / "rep" / "summary.md").read_text()


def test_missing_weights_leave_no_store(tmp_path: Path) -> None:
    """`model: sd15` without weights: refused in one line before the store template (no skeleton left to block
    the next run as "a store of another spec")."""
    import subprocess

    job = tmp_path / "job.yaml"
    job.write_text(f"model: sd15\nsource: synthetic:2\nresolution: 64\nblocks: [conv_in]\noutput: {tmp_path}/o\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    result = subprocess.run([sys.executable, "-m", "sdfeat.cli", "extract", str(job), "--local", "-q"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no unet weights in the Hugging Face cache" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.ray
def test_missing_weights_leave_no_store_on_ray(tmp_path: Path) -> None:
    """The same through Ray (a private instance): the weights are checked where the actors run, before the
    template is written."""
    import subprocess

    job = tmp_path / "job.yaml"
    job.write_text(f"model: sd15\nsource: synthetic:2\nresolution: 64\nblocks: [conv_in]\noutput: {tmp_path}/o\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", HOME=str(tmp_path),
               RAY_AUTH_MODE="disabled")
    result = subprocess.run([sys.executable, "-m", "sdfeat.cli", "extract", str(job), "-q"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: model 'sd15': weights for"), result.stderr
    assert not (tmp_path / "o").exists()


def test_the_write_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    from sdfeat import store

    store.check_writable(str(tmp_path / "store" / "results"))   # neither exists yet: probed in tmp_path
    store.check_writable(str(tmp_path))
    assert list(tmp_path.iterdir()) == []
