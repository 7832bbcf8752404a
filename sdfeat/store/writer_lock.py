"""One writer per store: `hold(output)` is held around a whole extraction job (`extract.run_local`,
`driver.run_on_ray`, and so through `sdfeat submit` on the head), so a second run on the same output refuses in
one line naming the run that writes it, instead of doing every unit a second time.

The lock is the file `<output>/writer.lock` (JSON: host, pid, since, heartbeat, a random token), created
exclusively and whole (`_create`: a hard link of a finished temporary file on a local disk, a conditional put on
S3), so of two runs starting together exactly one gets it, and a reader never sees half a lock. The holder rewrites its heartbeat every `HEARTBEAT_S` seconds. A lock is stale, and
taken over, when its process is gone: on the same host its pid no longer runs; on any host its heartbeat is older
than `STALE_AFTER_S` (a killed machine, a run on a node that died). The holder removes the lock at the end (also
after an error or Ctrl-C), and the output folder too when the lock made it and nothing else was written, so a job
refused before its first unit leaves nothing behind. Imports fsspec and `store` only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import fsspec
from fsspec.implementations.local import LocalFileSystem

from sdfeat import store
from sdfeat.errors import StoreError

log = logging.getLogger(__name__)

LOCK = "writer.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # a heartbeat this old means the holder is gone (generous: clocks of two hosts may differ)


@dataclass(frozen=True)
class Holder:
    """Who writes a store: the content of its lock file."""

    host: str
    pid: int
    since: str        # local time with its UTC offset, when the run took the lock
    heartbeat: float  # Unix time of the holder's last sign of life
    token: str        # this holder's own mark: the lock is released or beaten only by it

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.since}"


class OutputLockedError(StoreError):
    """Another live run holds the output's writer lock; the message names it."""


def lock_path(output: str) -> str:
    return store.join(output, LOCK)


def read_holder(output: str) -> Holder | None:
    """The holder recorded in the output's lock, or None when there is no lock (or one that does not parse, which
    counts as none: it is replaced)."""
    fs, root = store.filesystem(output)
    try:
        data = json.loads(fs.cat_file(store.join(root, LOCK)))
        return Holder(str(data["host"]), int(data["pid"]), str(data["since"]), float(data["heartbeat"]),
                      str(data["token"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


def stale_reason(holder: Holder, now: float | None = None) -> str | None:
    """Why `holder` no longer writes (its process is gone), or None while it may still be writing."""
    age = (time.time() if now is None else now) - holder.heartbeat
    if holder.host == socket.gethostname() and not _pid_runs(holder.pid):
        return f"pid {holder.pid} no longer runs on {holder.host}"
    if age > STALE_AFTER_S:
        return f"its last heartbeat is {age:.0f} s old (more than {STALE_AFTER_S:.0f} s)"
    return None


def check_free(output: str) -> None:
    """Refuse (OutputLockedError, one line naming the holder) when a live run writes `output`; a stale lock or none
    passes. For callers that only want to know, such as `sdfeat submit` before it submits."""
    holder = read_holder(output)
    if holder is not None and stale_reason(holder) is None:
        raise _locked(output, holder)


def _locked(output: str, holder: Holder) -> OutputLockedError:
    return OutputLockedError(f"{output} is being written by another run ({holder.describe()}; lock "
                             f"{lock_path(output)}): wait for it to end or stop it; a lock whose process is gone is "
                             "taken over by the next run")


def _record(holder: Holder) -> bytes:
    return json.dumps(asdict(holder)).encode()


def _acquire(output: str) -> Holder:
    """Create the lock for this process, taking over a stale one; OutputLockedError when a live run holds it."""
    fs, root = store.filesystem(output)
    path = store.join(root, LOCK)
    mine = Holder(socket.gethostname(), os.getpid(),
                  datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"), time.time(), uuid.uuid4().hex)
    for _ in range(5):
        try:
            _create(fs, path, _record(mine))
            return mine
        except FileExistsError:
            pass
        holder = read_holder(output)
        if holder is None:  # removed just now, being written just now, or unreadable: replaced once old enough
            if fs.exists(path) and time.time() - _modified(fs, path) > STALE_AFTER_S:
                log.warning("%s: replacing an unreadable writer lock", output)
                fs.rm(path)
            else:
                time.sleep(0.2)
            continue
        reason = stale_reason(holder)
        if reason is None:
            raise _locked(output, holder)
        if read_holder(output) == holder:  # still the same stale lock (no other run took it over meanwhile)
            log.warning("%s: taking over the writer lock of %s (%s)", output, holder.describe(), reason)
            fs.rm(path)
    raise OutputLockedError(f"{output}: cannot take the writer lock {lock_path(output)} (it does not parse or keeps "
                            "changing); remove it if no run writes this output")


def _create(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Create `path` holding `data`, or FileExistsError when it exists, atomically: locally a finished temporary
    file hard-linked to the name (fsspec's local `mode="create"` tests, then writes: two runs could both pass);
    elsewhere fsspec's exclusive put (S3's If-None-Match)."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data, mode="create")
        return
    folder, name = path.rsplit("/", 1)
    temporary = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
    with open(temporary, "wb") as f:
        f.write(data)
    try:
        os.link(temporary, path)  # fails with FileExistsError when the name is taken
    finally:
        os.remove(temporary)


def _modified(fs: fsspec.AbstractFileSystem, path: str) -> float:
    info = fs.info(path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
    return stamp.timestamp() if isinstance(stamp, datetime) else float(stamp or 0.0)


def _beat(output: str, holder: Holder, stop: threading.Event) -> None:
    """Rewrite the heartbeat every HEARTBEAT_S seconds until `stop`; stop beating if another run took the lock."""
    fs, root = store.filesystem(output)
    while not stop.wait(HEARTBEAT_S):
        current = read_holder(output)
        if current is None or current.token != holder.token:
            log.error("%s: this run's writer lock was taken over (%s)", output,
                      current.describe() if current else "removed")
            return
        try:
            store.write_whole(fs, store.join(root, LOCK), _record(replace(holder, heartbeat=time.time())))
        except OSError as err:  # a transient storage error: the next beat tries again
            log.warning("%s: writer lock heartbeat failed (%s)", output, err)


@contextmanager
def hold(output: str) -> Iterator[Holder]:
    """Hold the writer lock of `output` for the duration of the block (see the module docstring)."""
    fs, root = store.filesystem(output)
    made_folder = isinstance(fs, LocalFileSystem) and not fs.exists(root)
    fs.makedirs(root, exist_ok=True)
    try:
        holder = _acquire(output)
    except BaseException:
        _remove_folder_if_empty(fs, root, made_folder)
        raise
    stop = threading.Event()
    beater = threading.Thread(target=_beat, args=(output, holder, stop), name="sdfeat-writer-lock", daemon=True)
    beater.start()
    try:
        yield holder
    finally:
        stop.set()
        beater.join()
        current = read_holder(output)
        if current is not None and current.token == holder.token:
            fs.rm(store.join(root, LOCK))
        _remove_folder_if_empty(fs, root, made_folder)


def _remove_folder_if_empty(fs: fsspec.AbstractFileSystem, root: str, made_folder: bool) -> None:
    if made_folder and fs.exists(root) and not fs.ls(root):
        fs.rmdir(root)
