"""One writer per store: a second run on the same output refuses in one line naming the holder (host, pid, since);
a lock left by a dead process (or one whose heartbeat stopped) is taken over; of two runs starting together
exactly one gets the lock; the lock goes when the run ends, and with it an output folder that holds nothing else.
Locally, on S3 (moto), and through the `sdfeat extract` command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import small_spec
from test_remote_store import BUCKET, s3_env  # noqa: F401  (the moto S3 fixture)
from sdfeat.store import writer_lock
from sdfeat.store.writer_lock import OutputLockedError, hold, read_holder

SDFEAT = [sys.executable, "-m", "sdfeat.cli"]


def _write_lock(output: Path, **fields: object) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": "2026-01-01T00:00:00+00:00",
              "heartbeat": time.time(), "token": "other", **fields}
    output.mkdir(parents=True, exist_ok=True)
    (output / writer_lock.LOCK).write_text(json.dumps(record))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])  # a process that has ended (and been reaped): its pid runs no more
    proc.wait()
    return proc.pid


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    with hold(out) as first:
        recorded = read_holder(out)
        assert recorded == first and recorded.pid == os.getpid() and recorded.host == socket.gethostname()
        with pytest.raises(OutputLockedError) as refused:
            with hold(out):
                pass
        message = str(refused.value)
        assert "\n" not in message
        assert f"host {first.host}, pid {first.pid}, since {first.since}" in message
        assert f"{out}/writer.lock" in message
    assert read_holder(out) is None
    assert not Path(out).exists()  # made by the lock, nothing else written: gone with it


def test_a_folder_that_existed_is_kept_and_other_files_stay(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    with hold(str(out)):
        (out / "notes.txt").write_text("mine")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_lock_of_a_dead_process_is_taken_over(tmp_path: Path, caplog) -> None:
    out = tmp_path / "o"
    pid = _dead_pid()
    _write_lock(out, pid=pid)
    with hold(str(out)) as mine:
        assert read_holder(str(out)).token == mine.token
    assert f"pid {pid} no longer runs" in caplog.text


def test_a_lock_of_another_host_is_stale_only_when_its_heartbeat_stopped(tmp_path: Path) -> None:
    out = tmp_path / "o"
    _write_lock(out, host="elsewhere.invalid", pid=1, heartbeat=time.time() - 10)
    with pytest.raises(OutputLockedError, match="host elsewhere.invalid, pid 1"):
        with hold(str(out)):
            pass
    _write_lock(out, host="elsewhere.invalid", pid=1, heartbeat=time.time() - writer_lock.STALE_AFTER_S - 60)
    with hold(str(out)):
        assert read_holder(str(out)).host == socket.gethostname()


def test_the_heartbeat_moves_while_the_lock_is_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_lock, "HEARTBEAT_S", 0.05)
    out = str(tmp_path / "o")
    with hold(out) as mine:
        deadline = time.monotonic() + 30
        while read_holder(out).heartbeat == mine.heartbeat:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
        assert read_holder(out).token == mine.token


def test_of_runs_starting_together_exactly_one_holds(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    start, release = threading.Barrier(4), threading.Event()
    outcomes: list[str] = []

    def run() -> None:
        start.wait()
        try:
            with hold(out):
                outcomes.append("held")
                release.wait(30)
        except OutputLockedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(outcomes) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    release.set()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["held", "refused", "refused", "refused"]


def test_on_s3_a_second_holder_is_refused(s3_env: dict[str, str]) -> None:

    out = f"s3://{BUCKET}/locked-store"
    with hold(out) as first:
        with pytest.raises(OutputLockedError, match=f"pid {first.pid}"):
            with hold(out):
                pass
    assert read_holder(out) is None
    with hold(out):  # released: free again
        pass


def test_extract_refuses_an_output_another_run_writes(tmp_path: Path) -> None:
    """A live process holds the lock (a `sleep` on this host): `sdfeat extract` says so in one line, writes
    nothing; once that process is gone its lock is stale and the run goes ahead."""
    out = tmp_path / "o"
    holder = subprocess.Popen(["sleep", "300"])
    try:
        _write_lock(out, pid=holder.pid, since="2026-12-01T10:00:00+01:00")
        job = tmp_path / "job.yaml"
        job.write_text(f"model: tiny\nsource: synthetic:2\nresolution: 64\nblocks: [conv_in]\noutput: {out}\n")
        result = subprocess.run([*SDFEAT, "extract", str(job), "--local", "-q"], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"pid {holder.pid}, since 2026-12-01T10:00:00+01:00" in lines[0] and socket.gethostname() in lines[0]
        assert sorted(p.name for p in out.iterdir()) == ["writer.lock"]
    finally:
        holder.kill()
        holder.wait()
    result = subprocess.run([*SDFEAT, "extract", str(job), "--local", "-q"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2/2 images extracted" in result.stdout
    assert not (out / "writer.lock").exists()


def test_a_job_that_cannot_run_leaves_no_lock_and_no_folder(tmp_path: Path) -> None:
    from sdfeat.errors import SourceError
    from sdfeat.extract import run_local

    out = tmp_path / "o"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError):
        run_local(small_spec(str(out), source=str(tmp_path / "empty")), progress=False)
    assert not out.exists()


def test_info_names_the_run_writing_a_store(tiny_store: str, tmp_path: Path) -> None:
    import shutil

    from sdfeat.store.query import open_store

    copy = str(tmp_path / "s")
    shutil.copytree(tiny_store, copy)
    assert open_store(copy).info()["writer"] is None
    with hold(copy) as holder:
        assert open_store(copy).info()["writer"] == holder.describe()
