"""First contact with a cluster, as a new user meets it: a real `ray start --head` on 127.0.0.1 with token
authentication (the test's own process group, HOME and TMPDIR), joined by the `sdfeat` command in a subprocess.
A wrong address fails in seconds with one line; a token is picked up; without a token the error names
RAY_AUTH_MODE and the token file; no --address means a private local instance, `--address auto` the recorded one;
`submit --wait`, `status` and `logs --follow` exit with the job's state; a private instance listens on loopback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from raycluster import JOB
from rayhead import free_port, start_head

SDFEAT = [sys.executable, "-m", "sdfeat.cli"]


def _sdfeat(args: list[str], env: dict | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run([*SDFEAT, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - start


def _job(path: Path, **changes: object) -> Path:
    path.write_text(yaml.safe_dump({**JOB, "source": "synthetic:4", "unit_size": 4, **changes}))
    return path


# A wrong address: no cluster needed.

@pytest.mark.parametrize("command", [["extract", "JOB", "--address"], ["metrics", "STORE", "--metric", "position", "--address"],
                                     ["status", "sdfeat-x-1", "--address"], ["submit", "JOB", "--address"]])
def test_wrong_address_fails_in_seconds_with_one_line(command: list[str], tmp_path: Path, request) -> None:
    job = _job(tmp_path / "job.yaml", output=str(tmp_path / "store"))
    address = f"127.0.0.1:{free_port()}"                     # nothing listens there
    store = request.getfixturevalue("tiny_store") if command[0] == "metrics" else ""
    args = [str(job) if a == "JOB" else store if a == "STORE" else a for a in command] + [address]
    result, seconds = _sdfeat(args, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert address in lines[0] and "nothing answers" in lines[0]
    assert seconds < 15


@pytest.fixture(scope="module")
def head():
    root = Path(tempfile.mkdtemp(prefix="sdh", dir="/tmp"))     # short: Ray's socket paths live under TMPDIR
    h = start_head(root, token=True, venv_on_path=False)  # as the README starts it: `.venv/bin/ray start --head`
    yield h
    h.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.ray
def test_token_is_picked_up_and_a_missing_one_is_named(head, tmp_path: Path) -> None:
    job = _job(tmp_path / "job.yaml", output=str(tmp_path / "store"))
    result, seconds = _sdfeat(["extract", str(job), "--address", head.gcs_address, "-q"], env=head.client_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ran on the Ray cluster at {head.gcs_address}" in result.stdout
    assert "4/4 images extracted" in result.stdout

    stranger = tmp_path / "home"                               # a user without the head's token
    stranger.mkdir()
    env = head.client_env(HOME=str(stranger))
    for command in (["status", "sdfeat-x-1", "--address", head.dashboard_address],
                    ["status", "sdfeat-x-1", "--address", head.gcs_address],
                    ["extract", str(job), "--address", head.gcs_address, "-o", str(tmp_path / "s2"), "-q"]):
        result, _ = _sdfeat(command, env=env, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "RAY_AUTH_MODE" in result.stderr and str(stranger / ".ray" / "auth_token") in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no Ray "InvalidAuthToken" lines
    assert not (tmp_path / "s2").exists()


@pytest.mark.ray
def test_auto_joins_the_recorded_cluster_and_no_address_starts_a_private_one(head, tmp_path: Path) -> None:
    job = _job(tmp_path / "job.yaml", output=str(tmp_path / "a"))
    result, _ = _sdfeat(["extract", str(job), "--address", "auto", "-q"], env=head.client_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(rf"ran on the Ray cluster at [\d.]+:{head.gcs_port}\n", result.stdout), result.stdout

    result, _ = _sdfeat(["extract", str(job), "-o", str(tmp_path / "b"), "-q"], env=head.client_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ran on a private local Ray instance" in result.stdout


@pytest.mark.ray
def test_submit_wait_status_and_logs_exit_with_the_job_state(head, tmp_path: Path) -> None:
    """The head runs without the venv on its PATH (`.venv/bin/ray start --head`): the job still runs with the
    head's Ray Python, which has sdfeat. A GCS address finds the Jobs API as `ray job` does."""
    env = head.client_env()
    address = head.dashboard_address                           # HOST:PORT, no http://
    good = _job(tmp_path / "good.yaml", output=str(tmp_path / "good"))
    result, _ = _sdfeat(["submit", str(good), "--address", address, "--wait"], env=env, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4/4 images extracted" in result.stdout and "SUCCEEDED" in result.stdout
    job_id = next(w for w in result.stdout.split() if w.startswith("sdfeat-"))
    status, _ = _sdfeat(["status", job_id, "--address", address], env=env)
    assert status.returncode == 0 and status.stdout.strip() == "SUCCEEDED"
    by_gcs, _ = _sdfeat(["status", job_id, "--json"], env={**env, "RAY_ADDRESS": head.gcs_address})
    assert by_gcs.returncode == 0 and json.loads(by_gcs.stdout) == {"submission_id": job_id, "state": "SUCCEEDED"}
    followed, _ = _sdfeat(["logs", job_id, "--follow", "--address", address], env=env)
    assert followed.returncode == 0 and "4/4 images extracted" in followed.stdout

    bad = _job(tmp_path / "bad.yaml", output=str(tmp_path / "bad"), source="/nonexistent/images/*.parquet")
    result, _ = _sdfeat(["submit", str(bad), "--address", address, "--wait"], env=env, timeout=400)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "FAILED" in result.stdout
    job_id = next(w for w in result.stdout.split() if w.startswith("sdfeat-"))
    status, _ = _sdfeat(["status", job_id, "--address", address], env=env)
    assert status.returncode == 1 and status.stdout.strip() == "FAILED"

    # the output holds the good job's store: another spec is refused before anything is submitted
    other = _job(tmp_path / "other.yaml", output=str(tmp_path / "good"), resolution=64)
    listed = _sdfeat(["status", "nope", "--address", address], env=env)[0]
    result, _ = _sdfeat(["submit", str(other), "--address", address], env=env)
    assert result.returncode == 2 and "another spec" in result.stderr, result.stderr
    assert "submitted" not in result.stdout
    assert listed.returncode == 2


_LISTENERS = r"""
import json, os, ray
import psutil                                   # shipped in ray/thirdparty_files, on sys.path after `import ray`
from sdfeat.cluster.connect import init_ray
init_ray(None)
ray.get(ray.remote(lambda: 1).remote())                 # a worker process too
me = psutil.Process()
rows = []
for p in [me, *me.children(recursive=True)]:
    try:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                rows.append([p.name(), c.laddr.ip, c.laddr.port])
    except psutil.Error:
        pass
http = [a.split("=", 1)[1] for p in me.children(recursive=True) if "dashboard/dashboard.py" in " ".join(p.cmdline())
        for a in p.cmdline() if a.startswith(("--host=", "--port="))]
print(json.dumps({"listeners": rows, "http": http}))
ray.shutdown()
"""


@pytest.mark.ray
def test_private_instance_listens_on_loopback_only(tmp_path: Path) -> None:
    """Every server of the private instance (GCS, raylet, object manager, a worker, agents, the dashboard's HTTP
    server) listens on the loopback interface only: nothing of it is reachable from another machine."""
    root = Path(tempfile.mkdtemp(prefix="sdl", dir="/tmp"))
    try:
        env = {**start_env(root), "RAY_AUTH_MODE": "disabled"}
        result = subprocess.run([sys.executable, "-c", _LISTENERS], env=env, capture_output=True, text=True,
                                timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        found = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    host, port = found["http"]                       # the dashboard process's --host and --port
    assert host == "127.0.0.1"
    on_port = {ip for _, ip, p in found["listeners"] if p == int(port)}
    assert on_port <= {"127.0.0.1"}, found          # (empty: without the dashboard nothing serves HTTP there)
    names = {name for name, _, _ in found["listeners"]}
    assert {"gcs_server", "raylet"} <= names, found  # the gRPC servers were seen
    assert {ip for _, ip, _ in found["listeners"]} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, found


def start_env(root: Path) -> dict:
    import os

    (root / "home").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(HOME=str(root / "home"), TMPDIR=str(root), RAY_USAGE_STATS_ENABLED="0")
    return env
