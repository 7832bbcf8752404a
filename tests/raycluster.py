"""Shared helpers for the Ray tests: one local multi-node cluster per pytest process, a small job spec, a store
comparison, and test-only actor bodies that inject faults (never used in production code).

The cluster (`ray.cluster_utils.Cluster`: a 1-CPU head with the dashboard / Jobs API on 127.0.0.1 and two 1-CPU
worker nodes) is a process-wide singleton, so test modules that import the `ray_cluster` fixture share it; the
test process is connected to it as a driver.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from sdfeat.extract.driver import ExtractionWorker
from sdfeat.planning.units import Unit
from sdfeat.spec import JobSpec, parse_spec

_CLUSTER = None

JOB = {
    "model": "tiny", "source": "synthetic:16", "resolution": 128, "timesteps": [50], "batch_size": 2,
    "unit_size": 4, "blocks": ["down_blocks.0.resnets.0", "down_blocks.1.attentions.0"],
}


def job_spec(output: str | Path, **changes: object) -> JobSpec:
    return parse_spec({**JOB, **changes, "output": str(output)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_cluster():
    """Start (once per process) the local cluster; stopped by `shutdown_cluster`."""
    global _CLUSTER
    if _CLUSTER is None:
        import ray.cloudpickle
        from ray.cluster_utils import Cluster

        os.environ["RAY_AUTH_MODE"] = "disabled"
        # as in an activated venv: Jobs API entrypoints run `python` from PATH
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(), "object_store_memory": 80 * 2**20})
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        cluster.wait_for_nodes()
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
        _CLUSTER = cluster
    return _CLUSTER


def shutdown_cluster() -> None:
    global _CLUSTER
    if _CLUSTER is not None:
        _CLUSTER.shutdown()
        _CLUSTER = None


@pytest.fixture(scope="session")
def ray_cluster_processes():
    yield shared_cluster()
    shutdown_cluster()


@pytest.fixture
def ray_cluster(ray_cluster_processes):
    """The shared cluster, with this process connected as a driver for the test's duration only (other tests
    start Ray instances of their own)."""
    import ray

    ray.init(address=ray_cluster_processes.address)
    yield ray_cluster_processes
    ray.shutdown()


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


# Test-only actor bodies, configured through env vars given to the actors via runtime_env.

def _claim_once(name: str) -> bool:
    """True for exactly one caller across all processes (atomic file creation in SDFEAT_TEST_DIR)."""
    try:
        fd = os.open(Path(os.environ["SDFEAT_TEST_DIR"]) / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


class DiesMidWrite(ExtractionWorker):
    """Dies (hard process exit) halfway through writing unit SDFEAT_TEST_UNIT's arrays, once per test."""

    def run(self, unit: Unit) -> dict:
        if unit.index == int(os.environ["SDFEAT_TEST_UNIT"]) and _claim_once(f"died-{unit.index}"):
            from sdfeat import store

            real_write = store.write_unit

            def half_then_die(group, start, stop, data, ok, **options):
                first_half = dict(list(data.items())[: max(1, len(data) // 2)])
                real_write(group, start, stop, first_half, ok, **options)
                os._exit(1)

            store.write_unit = half_then_die
        return super().run(unit)


class HangsOnce(ExtractionWorker):
    """Hangs forever (alive, silent) on unit SDFEAT_TEST_UNIT, once per test."""

    def run(self, unit: Unit) -> dict:
        if unit.index == int(os.environ["SDFEAT_TEST_UNIT"]) and _claim_once(f"hung-{unit.index}"):
            while True:
                time.sleep(1)
        return super().run(unit)


class RecordsNode(ExtractionWorker):
    """Notes which node starts which unit (files `started-<unit>-<node id>`), then works slowly enough
    (SDFEAT_TEST_DELAY_S per unit) for a test to act while units are in flight."""

    def run(self, unit: Unit) -> dict:
        import ray

        node = ray.get_runtime_context().get_node_id()
        (Path(os.environ["SDFEAT_TEST_DIR"]) / f"started-{unit.index}-{node}").touch()
        time.sleep(float(os.environ.get("SDFEAT_TEST_DELAY_S", "0")))
        return super().run(unit)


class SlowBatches(ExtractionWorker):
    """Pauses after each batch's progress message, so a unit outlasts the driver's wait (WAIT_S) and the driver
    reads the batch tally while units are still in flight: per-batch progress becomes observable, not a race."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        tell = self.runner.on_batch

        def slowly(unit: int, rows: int) -> None:
            if tell is not None:
                tell(unit, rows)
            time.sleep(0.8)

        self.runner.on_batch = slowly


class DiskFull(ExtractionWorker):
    """The storage is full for unit SDFEAT_TEST_UNIT: writing its arrays fails as write() reports it (ENOSPC, no
    file name), on every attempt."""

    def run(self, unit: Unit) -> dict:
        if unit.index != int(os.environ["SDFEAT_TEST_UNIT"]):
            return super().run(unit)
        import errno

        from sdfeat import store

        def full(*_args: object, **_kwargs: object) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        real_write, store.write_unit = store.write_unit, full
        try:
            return super().run(unit)
        finally:
            store.write_unit = real_write
