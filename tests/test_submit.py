"""`sdfeat submit` through the Ray Jobs API of a local cluster (dashboard on 127.0.0.1): the spec is validated
locally, shipped with the package, run to completion on the cluster; resubmissions get the next id."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from raycluster import ray_cluster, ray_cluster_processes  # noqa: F401  (fixtures)
from raycluster import JOB
from sdfeat import store
from sdfeat.cluster.submit import build_entrypoint, logs, next_submission_id, status, submit_job, wait
from sdfeat.errors import SdfeatError, SpecError
from sdfeat.spec import load_spec, spec_hash


def _write_job(path: Path, **changes: object) -> Path:
    path.write_text(yaml.safe_dump({**JOB, **changes}))
    return path


def test_submission_ids_count_up_per_spec_hash() -> None:
    assert next_submission_id("ab12", []) == "sdfeat-ab12-1"
    assert next_submission_id("ab12", ["sdfeat-ab12-1", "sdfeat-ab12-3", "sdfeat-ff00-7", "raysubmit_x"]) == \
        "sdfeat-ab12-4"


def test_entrypoint_passes_the_actor_options() -> None:
    entry = build_entrypoint(workers=3, gpus_per_worker=0.5, overwrite=True)
    assert entry == 'exec sh -c "$SDFEAT_JOB_SCRIPT" sdfeat-job --workers 3 --gpus-per-worker 0.5 --overwrite'


# `extract` options a submitted job does not take: Ray-free runs only, or the cluster the Jobs API already joins
NOT_FOR_SUBMIT = {"job", "local", "device", "threads", "address", "as_json"}  # (submit has its own --json)


class _FakeJobsClient:
    """Stands in for Ray's JobSubmissionClient: no jobs yet; keeps what `submit_job` sends."""

    def __init__(self) -> None:
        self.sent: dict = {}

    def list_jobs(self) -> list:
        return []

    def submit_job(self, **kwargs: object) -> str:
        self.sent = kwargs
        return str(kwargs["submission_id"])

    def get_address(self) -> str:
        return "http://head.invalid:8265"


def test_a_head_without_a_job_agent_yet_is_asked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray refuses a submission to a head whose job agent is not up yet ("No available agent", nothing
    submitted): `submit_job` sends it again and succeeds once the agent is there; any other error is raised."""
    from sdfeat.cluster import submit

    class SlowAgent(_FakeJobsClient):
        def __init__(self, refusals: int, text: str) -> None:
            super().__init__()
            self.refusals, self.text, self.calls = refusals, text, 0

        def submit_job(self, **kwargs: object) -> str:
            self.calls += 1
            if self.calls <= self.refusals:
                raise RuntimeError(f"Request failed with status code 500: {self.text}")
            return super().submit_job(**kwargs)

    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    job = _write_job(tmp_path / "job.yaml", output=str(tmp_path / "store"))
    client = SlowAgent(2, "No available agent to submit job, please try again later.")
    monkeypatch.setattr(submit, "_client", lambda address: client)
    submission = submit.submit_job(job)
    assert client.calls == 3 and client.sent["submission_id"] == submission.submission_id

    other = SlowAgent(1, "Job with submission_id x already exists.")
    monkeypatch.setattr(submit, "_client", lambda address: other)
    with pytest.raises(RuntimeError, match="already exists"):
        submit.submit_job(job)
    assert other.calls == 1


def test_every_extract_option_reaches_the_jobs_extract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sdfeat submit` with every extract option set: the job's entrypoint runs `extract` with flags that the real
    `extract` command parses back to the same values."""
    import shlex

    import typer
    from typer.testing import CliRunner

    from sdfeat.cli.app import app
    from sdfeat.cluster import submit

    client = _FakeJobsClient()
    monkeypatch.setattr(submit, "_client", lambda address: client)
    job = _write_job(tmp_path / "job.yaml", output=str(tmp_path / "store"))
    given = {"workers": 3, "gpus_per_worker": 0.5, "overwrite": True, "unit_timeout": 45.0,
             "allow_version_change": True, "quiet": True}
    in_spec = {"output": str(tmp_path / "elsewhere"), "write_workers": 2}   # they travel inside the shipped spec
    args = ["submit", str(job), "--address", "head.invalid:8265", "--workers", "3", "--gpus-per-worker", "0.5",
            "--overwrite", "--unit-timeout", "45", "--allow-version-change", "--quiet", "--write-workers", "2",
            "--output", in_spec["output"]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    entry = str(client.sent["entrypoint"])
    assert entry.endswith('sdfeat-job --workers 3 --gpus-per-worker 0.5 --unit-timeout 45.0 --overwrite '
                          '--allow-version-change --quiet')
    assert '"$python" -m sdfeat.cli extract "$spec" "$@"' in submit.JOB_SCRIPT  # the options reach extract
    shipped = yaml.safe_load(client.sent["runtime_env"]["env_vars"][submit.SPEC_ENV_VAR])  # type: ignore[index]
    assert {k: shipped[k] for k in in_spec} == in_spec

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    extract_options = {p.name for p in commands["extract"].params}
    forwarded = extract_options - NOT_FOR_SUBMIT - set(in_spec)
    assert forwarded == set(given), "an extract option that submit does not pass on (or list in NOT_FOR_SUBMIT)"
    assert forwarded | set(in_spec) <= {p.name for p in commands["submit"].params}
    job_args = shlex.split(entry.split("sdfeat-job", 1)[1])
    parsed = commands["extract"].make_context("extract", [str(job), *job_args]).params
    assert {k: parsed[k] for k in given} == given
    assert all(parsed[k] in (None, False) for k in NOT_FOR_SUBMIT - {"job"})


def test_relative_output_is_refused_before_contacting_a_cluster(tmp_path: Path) -> None:
    job = _write_job(tmp_path / "job.yaml", output="out/store")
    with pytest.raises(SpecError, match="field 'output'.*relative"):
        submit_job(job, address="http://127.0.0.1:9")  # nothing listens there


def test_relative_model_directory_is_refused_before_contacting_a_cluster(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline directory named relative to here would be looked up in the job's working directory on the head."""
    import json

    from sdfeat.models.registry import TINY_UNET_CONFIG

    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "unet" / "config.json").write_text(json.dumps(TINY_UNET_CONFIG))
    monkeypatch.chdir(tmp_path)
    job = _write_job(tmp_path / "job.yaml", model="pipe", output=str(tmp_path / "store"))
    with pytest.raises(SpecError, match="field 'model': 'pipe' is a relative directory"):
        submit_job(job, address="http://127.0.0.1:9")  # nothing listens there


def test_invalid_spec_is_refused_locally(tmp_path: Path) -> None:
    job = _write_job(tmp_path / "job.yaml", output=str(tmp_path / "store"), resolution=100)
    with pytest.raises(SpecError, match="resolution"):
        submit_job(job, address="http://127.0.0.1:9")


@pytest.mark.ray
def test_submitted_job_runs_on_the_cluster_and_resubmission_is_recognisable(ray_cluster, tmp_path: Path) -> None:
    address = f"http://{ray_cluster.webui_url}"
    out = tmp_path / "store"
    job = _write_job(tmp_path / "job.yaml", output=str(out))
    digest = spec_hash(load_spec(job))

    first = submit_job(job, address=address, workers=2)
    assert first.submission_id == f"sdfeat-{digest}-1"
    assert first.submission_id in first.how_to_follow()
    with pytest.raises(SdfeatError, match=f"{first.submission_id} is still"):
        submit_job(job, address=address)              # two drivers must never write one store
    final = wait(first.submission_id, address, timeout_s=300)
    assert final == "SUCCEEDED", logs(first.submission_id, address)[-3000:]
    assert store.done_units(str(out)) == {0, 1, 2, 3}
    assert re.search(r"16/16 images extracted", logs(first.submission_id, address))

    second = submit_job(job, address=address)
    assert second.submission_id == f"sdfeat-{digest}-2"
    assert wait(second.submission_id, address, timeout_s=300) == "SUCCEEDED"
    assert status(second.submission_id, address) == "SUCCEEDED"
    with pytest.raises(SdfeatError, match="submission sdfeat-nope-1"):
        status("sdfeat-nope-1", address)


def _fake_head(tmp_path: Path, python3: str) -> dict:
    """A PATH with only the tools the job script uses and a `python3` script standing in for the head's Python."""
    import shutil

    folder = tmp_path / "bin"
    folder.mkdir(parents=True)
    for tool in ("sh", "sed", "tr", "mktemp", "printenv", "rm", "cat"):
        (folder / tool).symlink_to(shutil.which(tool))
    (folder / "python3").write_text(f"#!/bin/sh\n{python3}\n")
    (folder / "python3").chmod(0o755)
    from sdfeat.cluster.submit import JOB_SCRIPT, SCRIPT_ENV_VAR, SPEC_ENV_VAR

    return {"PATH": str(folder), SCRIPT_ENV_VAR: JOB_SCRIPT, SPEC_ENV_VAR: "model: tiny\n"}


def test_the_job_runs_extract_with_a_python_that_has_sdfeat_or_says_none_does(tmp_path: Path) -> None:
    """The job's entrypoint, run as Ray's supervisor runs it (`sh -c`), outside a raylet: the first candidate that
    has the dependencies runs `sdfeat extract` with the shipped spec and the options; with none, one line."""
    import subprocess

    entry = build_entrypoint(workers=3, gpus_per_worker=None, overwrite=False)
    ok = _fake_head(tmp_path / "ok", 'if [ "$1" = -c ]; then exit 0; fi; echo "ran $*"; cat "$4"')
    done = subprocess.run(["/bin/sh", "-c", entry], env=ok, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    first, spec = done.stdout.split("\n", 1)
    assert re.fullmatch(r"ran -m sdfeat\.cli extract \S+\.yaml --workers 3", first) and spec == "model: tiny\n\n"

    lacking = _fake_head(tmp_path / "lacking", 'echo "no module typer torch"; exit 1')
    done = subprocess.run(["/bin/sh", "-c", entry], env=lacking, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "python3: no module typer torch; python: not found;" in lines[0] and "ray start --head" in lines[0]


def test_an_output_another_run_writes_is_refused_before_submitting(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import socket
    import subprocess
    import time

    from sdfeat.cluster import submit
    from sdfeat.store.writer_lock import LOCK, OutputLockedError

    client = _FakeJobsClient()
    monkeypatch.setattr(submit, "_client", lambda address: client)
    out = tmp_path / "store"
    out.mkdir()
    job = _write_job(tmp_path / "job.yaml", output=str(out))
    holder = subprocess.Popen(["sleep", "300"])               # a live run on this host
    try:
        (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "since": "then",
                                            "heartbeat": time.time(), "token": "x"}))
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}, since then"):
            submit_job(job, address="http://head.invalid:8265")
        assert client.sent == {}
    finally:
        holder.kill()
        holder.wait()
    submit_job(job, address="http://head.invalid:8265")      # its process gone: the lock is stale
    assert client.sent["submission_id"].startswith("sdfeat-")
