"""Done-marker reads: `sdfeat.store.done_units` on a store with N finished units (default 20,000), the old way
(one fsspec listing, then `fs.cat` of every marker and a JSON parse, on every call; reimplemented here as the
baseline) against the current one (one listing; only markers not verified before in this process are read).

Three cases, each best of `--repeats`, old and new interleaved, with the ratio old / new:

    cold      the first call in a process (the current code still reads and parses every marker once: a torn
              marker written before markers were atomic looks like a sound one in a listing)
    warm      a later call in the same process (the explorer's refreshes; `cli status` in a long session)
    resume    what resuming a finished job does: `pending_units` twice (prepare_job, run_local), then
              `finalize_job`'s `done_units` + `read_markers`

On a local folder (tmpfs by default) or, with `--moto`, on an S3 bucket served by moto in this process (every
read is an HTTP request there, as on S3; use a smaller N).

    python benchmarks/bench_markers.py [--n 20000] [--dir /dev/shm] [--repeats 3] [--moto]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable

from fsspec.implementations.local import LocalFileSystem

from sdfeat.store import files as store  # the private marker helpers too


def old_done_units(output: str) -> dict[int, dict]:
    """The previous `store._markers`: list, `fs.cat` every marker, parse each (the baseline)."""
    fs, root = store.filesystem(output)
    folder = store.join(root, store.PROGRESS)
    if not fs.exists(folder):
        return {}
    paths = {}
    for path in fs.ls(folder, detail=False):
        name = path.rsplit("/", 1)[-1]
        if name.startswith("unit-") and name.endswith(".json") and name[5:-5].isdigit():
            paths[path] = int(name[5:-5])
    found = fs.cat(list(paths), on_error="return") if paths else {}
    reports = {}
    for path, unit in paths.items():
        report = store._parse_marker(found.get(path, OSError("not read")), unit)
        if report is not None:
            reports[unit] = report
    return reports


def _report(unit: int) -> dict:
    """A unit report shaped like the runner's (rows, ok, failures, busy seconds per stage, wall)."""
    return {"unit": unit, "rows": 64, "ok": 63, "failures": [{"sample_id": f"s{unit}-7", "reason": "decode: bad",
                                                              "unit": unit}],
            "seconds": {"load": 0.0, "encode": 3.41, "unet": 12.7, "write": 1.93, "decode": 0.52},
            "wall": 19.2}


def _fill(output: str, n: int) -> None:
    fs, root = store.filesystem(output)
    folder = store.join(root, store.PROGRESS)
    fs.makedirs(folder, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        for unit in range(n):
            with open(store.marker_path(root, unit), "w") as f:
                f.write(json.dumps(_report(unit)))
    else:
        fs.pipe({store.marker_path(root, u): json.dumps(_report(u)).encode() for u in range(n)})


def _old_resume(output: str) -> None:
    for _ in range(3):
        old_done_units(output)
    old_done_units(output)  # read_markers read them all again


def _new_resume(output: str, n: int) -> None:
    store.done_units(output)
    store.done_units(output)
    store.done_units(output)
    store.read_markers(output, range(n))


def _timed(fn: Callable[[], None], before: Callable[[], None] = lambda: None) -> float:
    before()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(output: str, n: int, repeats: int) -> None:
    _fill(output, n)
    assert set(old_done_units(output)) == store.done_units(output) == set(range(n))
    forget = store._SOUND.clear
    cases = {
        "cold": (lambda: old_done_units(output), lambda: store.done_units(output), forget),
        "warm": (lambda: old_done_units(output), lambda: store.done_units(output), lambda: store.done_units(output)),
        "resume": (lambda: _old_resume(output), lambda: _new_resume(output, n), forget),
    }
    print(f"{n} markers under {output}")
    for case, (old, new, before) in cases.items():
        times_old, times_new = [], []
        for _ in range(repeats):
            times_old.append(_timed(old))
            times_new.append(_timed(new, before))
        print(f"  {case:7s} old {min(times_old):8.3f} s   new {min(times_new):8.3f} s   "
              f"ratio {min(times_old) / min(times_new):6.2f}x")


def _moto_output() -> tuple[str, Callable[[], None]]:
    import logging

    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": f"http://{host}:{port}"})
    fs.mkdir("bench-markers")
    fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    return "s3://bench-markers/store", server.stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="finished units (markers)")
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the local store goes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--moto", action="store_true", help="an S3 bucket served by moto instead of a folder")
    args = parser.parse_args()
    if args.moto:
        output, stop = _moto_output()
        try:
            run(output, args.n, args.repeats)
        finally:
            stop()
        return
    folder = tempfile.mkdtemp(prefix="bench-markers-", dir=args.dir)
    try:
        run(os.path.join(folder, "store"), args.n, args.repeats)
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
