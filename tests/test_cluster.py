"""The Ray driver on a real local cluster (a head and two worker nodes): the store equals the one `run_local`
writes, value for value, also when an actor dies mid-write, a worker node leaves mid-job, or the driver is killed
and run again; a unit that cannot be read is named and the other units are kept."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from raycluster import ray_cluster, ray_cluster_processes  # noqa: F401  (fixtures)
from raycluster import DiesMidWrite, DiskFull, HangsOnce, RecordsNode, job_spec, wait_for
from storecompare import assert_same_store
from sdfeat import store
from sdfeat.errors import ArgumentError, StorageError, UnitFailedError, storage_error
from sdfeat.extract import prepare_job, run_local
from sdfeat.extract.driver import gpu_decode_threads, plan_actors, run_on_ray

N_UNITS = 4  # synthetic:16 in units of 4


# Actor layout (no Ray needed)

def test_cpu_only_actors_leave_a_core_for_tasks() -> None:
    layout = plan_actors([(2, 0)], workers=2)
    assert (layout.count, layout.threads, layout.num_gpus, layout.device) == (2, 1, 0.0, "cpu")
    assert layout.count * layout.num_cpus <= 2 - 1


def test_cpu_only_default_is_one_actor_per_node_using_its_cores() -> None:
    layout = plan_actors([(8, 0), (8, 0)])
    assert (layout.count, layout.threads) == (2, 8)
    assert layout.count * layout.num_cpus <= 15


def test_no_actor_asks_for_more_cpus_than_one_node_has() -> None:
    layout = plan_actors([(1, 0)] * 3, workers=1)
    assert layout.num_cpus <= 1 and layout.threads == 1


def test_gpu_actors_ask_for_the_cpus_that_come_with_their_gpus() -> None:
    """One actor per GPU, asking for its GPU's share of the node's CPUs (it feeds the device from them), on the
    node with the fewest per GPU, so it fits everywhere; capped where more threads cannot help."""
    layout = plan_actors([(96, 8)])
    assert (layout.count, layout.num_gpus, layout.num_cpus, layout.device) == (8, 1.0, 12.0, "cuda")
    assert plan_actors([(96, 8), (32, 4)]).num_cpus == 8.0  # the 4-GPU node gives 8 per GPU
    assert plan_actors([(96, 8)], gpus_per_worker=2).count == 4
    assert plan_actors([(96, 8)], gpus_per_worker=2).num_cpus == 16.0  # capped: GPU_ACTOR_CPUS_MAX
    assert plan_actors([(96, 8)], workers=3, gpus_per_worker=0.5).num_gpus == 0.5
    assert plan_actors([(4, 0)], gpus_per_worker=1).num_cpus == 8.0  # no GPU node up yet (autoscaling)
    assert plan_actors([(6, 8)]).num_cpus == 1.0  # never less than one


def test_gpu_decode_threads_leave_two_cpus_to_the_launching_and_writing_threads() -> None:
    assert [gpu_decode_threads(c) for c in (1, 2, 3, 12.0, 24)] == [1, 1, 1, 10, 22]


def test_gpus_per_worker_zero_forces_cpu_actors_and_bad_counts_are_named() -> None:
    assert plan_actors([(8, 2)], gpus_per_worker=0).device == "cpu"
    with pytest.raises(ArgumentError, match="workers: must be at least 1"):
        plan_actors([(8, 0)], workers=0)


# On the cluster

@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """run_local's store, with one torch thread like the actors here (CPU results depend on the thread count)."""
    import torch

    out = tmp_path_factory.mktemp("reference") / "store"
    threads = torch.get_num_threads()
    try:
        run_local(job_spec(out), progress=False, threads=1)
    finally:
        torch.set_num_threads(threads)
    return out


def _markers(output: Path) -> set[int]:
    return store.done_units(str(output))


def _fault_env(tmp_path: Path, **extra: str) -> dict:
    return {"env_vars": {"SDFEAT_TEST_DIR": str(tmp_path), **extra}}


@pytest.mark.ray
def test_two_actors_write_the_same_store_as_local(ray_cluster, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    summary = run_on_ray(job_spec(out), workers=2, progress=False)
    assert_same_store(out, reference)
    assert (summary["ok"], summary["units"], summary["ray"]["units_run"]) == (16, N_UNITS, N_UNITS)
    assert summary["ray"]["retries"] == 0
    again = run_on_ray(job_spec(out), workers=2, progress=False)  # everything done: nothing to redo
    assert (again["ray"]["units_run"], again["ray"]["units_skipped"]) == (0, N_UNITS)


@pytest.mark.ray
def test_a_relative_model_directory_is_loaded_where_the_driver_resolved_it(ray_cluster, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`model:` a pipeline directory named relative to the driver's working directory (the actors work elsewhere):
    the actors load the path the driver resolved and write what `run_local` writes from that path."""
    import torch

    from sdfeat.models.loading import save_tiny_pipeline

    pipe = save_tiny_pipeline(tmp_path / "pipe").resolve()
    expected, threads = tmp_path / "expected", torch.get_num_threads()
    try:
        run_local(job_spec(expected, model=str(pipe)), progress=False, threads=1)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "store"
    summary = run_on_ray(job_spec(out, model="pipe"), workers=1, progress=False)
    assert summary["ok"] == 16
    assert_same_store(out, expected, same_spec=False)


@pytest.mark.ray
def test_actor_dying_mid_write_is_replaced_and_its_unit_redone(ray_cluster, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    summary = run_on_ray(job_spec(out), workers=2, progress=False, worker_class=DiesMidWrite,
                         runtime_env=_fault_env(tmp_path, SDFEAT_TEST_UNIT="1"))
    assert (tmp_path / "died-1").exists()  # the fault did happen
    assert summary["ray"]["actor_restarts"] >= 1 and summary["ray"]["retries"] >= 1
    assert _markers(out) == set(range(N_UNITS))
    assert_same_store(out, reference)


@pytest.mark.ray
def test_hung_unit_is_killed_after_the_timeout_and_redone(ray_cluster, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    summary = run_on_ray(job_spec(out), workers=2, progress=False, worker_class=HangsOnce, unit_timeout_s=20,
                         runtime_env=_fault_env(tmp_path, SDFEAT_TEST_UNIT="2"))
    assert (tmp_path / "hung-2").exists()  # the fault did happen
    assert summary["ray"]["actor_restarts"] >= 1 and summary["ray"]["retries"] >= 1
    assert _markers(out) == set(range(N_UNITS))
    assert_same_store(out, reference)


@pytest.mark.ray
def test_unreadable_shard_names_its_units_and_keeps_the_others(ray_cluster, tmp_path: Path) -> None:
    from imagegen import write_parquet_shards

    shards = write_parquet_shards(tmp_path / "data", n_files=2, rows_per_file=8)
    spec = job_spec(tmp_path / "store", source=str(tmp_path / "data"))
    prepare_job(spec)                                   # planned while both shards were readable
    shards[1].write_bytes(b"not a parquet file " * 100)
    with pytest.raises(UnitFailedError, match=r"unit 2 .*unreadable.*also failed: units 3") as err:
        run_on_ray(spec, workers=2, progress=False, max_retries=1)
    assert shards[1].name in str(err.value)
    assert _markers(tmp_path / "store") == {0, 1}


@pytest.mark.ray
def test_full_storage_in_an_actor_is_the_local_runners_one_line_error(ray_cluster, tmp_path: Path) -> None:
    """ENOSPC while an actor writes a unit: the same one-line `StorageError` naming the output that the CLI prints
    for the local runner (see test_hardening), at once rather than after the retries."""
    out = tmp_path / "store"
    with pytest.raises(StorageError) as err:
        run_on_ray(job_spec(out), workers=2, progress=False, worker_class=DiskFull, max_retries=3,
                   runtime_env=_fault_env(tmp_path, SDFEAT_TEST_UNIT="1"))
    assert str(err.value) == f"{out}: {os.strerror(errno.ENOSPC)} (ENOSPC)"
    assert err.value.errno == errno.ENOSPC
    assert 1 not in _markers(out)


def _permissions_bind(folder: Path) -> bool:
    """False where this process writes through a folder's permissions (root with CAP_DAC_OVERRIDE)."""
    probe = folder / "read-only"
    probe.mkdir(mode=0o555)
    try:
        (probe / "x").touch()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
    return False


@pytest.mark.ray
def test_unwritable_block_folder_in_an_actor_names_the_path_as_locally(ray_cluster, tmp_path: Path) -> None:
    """A block's folder that became read-only after the store template was written: the Ray run fails with the
    same one-line error, naming the same path, as the local runner's (mapped by `errors.storage_error`)."""
    if not _permissions_bind(tmp_path):
        pytest.skip("this user writes through folder permissions (root)")
    spec = job_spec(tmp_path / "ray")
    local = job_spec(tmp_path / "local")
    for s in (spec, local):
        prepare_job(s)
        (Path(s.output) / store.FEATURES / "down_blocks.1.attentions.0").chmod(0o555)
    try:
        with pytest.raises(PermissionError) as local_err:
            run_local(local, progress=False, threads=1)
        expected = str(storage_error(local_err.value, local.output)).replace(local.output, spec.output)
        with pytest.raises(StorageError) as err:
            run_on_ray(spec, workers=2, progress=False)
    finally:
        for s in (spec, local):
            (Path(s.output) / store.FEATURES / "down_blocks.1.attentions.0").chmod(0o755)
    assert str(err.value) == expected and "(EACCES)" in expected
    assert "down_blocks.1.attentions.0" in expected


DRIVER_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import ray.cloudpickle, raycluster
ray.cloudpickle.register_pickle_by_value(raycluster)
from sdfeat.extract.driver import run_on_ray
run_on_ray(raycluster.job_spec({out!r}), workers=1, progress=False, worker_class=raycluster.RecordsNode,
           runtime_env={{"env_vars": {{"SDFEAT_TEST_DIR": {tmp!r}, "SDFEAT_TEST_DELAY_S": "2"}}}})
"""


@pytest.mark.ray
def test_killed_driver_resumes_where_it_stopped(ray_cluster, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    script = DRIVER_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out), tmp=str(tmp_path))
    driver = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "RAY_ADDRESS": ray_cluster.address})
    try:
        wait_for(lambda: bool(_markers(out)) if (out / "progress").exists() else False, 120, "the first done marker")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    done_before = _markers(out)
    assert 1 <= len(done_before) < N_UNITS
    summary = run_on_ray(job_spec(out), workers=2, progress=False)
    # Ray ends a dead driver's actors a moment later, so a unit they had in flight may still be marked done
    # before the resume looks: it skips at least the units done at the kill, and runs exactly the others
    assert summary["ray"]["units_skipped"] >= len(done_before)
    assert summary["ray"]["units_run"] == N_UNITS - summary["ray"]["units_skipped"]
    assert_same_store(out, reference)


@pytest.mark.ray
def test_worker_node_leaving_mid_job_loses_nothing(ray_cluster, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    worker_nodes = {node.node_id: node for node in ray_cluster.worker_nodes}
    result: dict = {}

    def drive() -> None:
        try:
            result["summary"] = run_on_ray(job_spec(out), workers=2, progress=False, worker_class=RecordsNode,
                                           runtime_env=_fault_env(tmp_path, SDFEAT_TEST_DELAY_S="2"))
        except BaseException as err:  # re-raised in the test thread below
            result["error"] = err

    def busy_worker_node() -> str | None:
        started = [p.name.split("-", 2)[2] for p in tmp_path.glob("started-*")]
        return next((n for n in started if n in worker_nodes), None)

    thread = threading.Thread(target=drive)
    thread.start()
    try:
        wait_for(lambda: busy_worker_node() is not None, 120, "a unit to start on a worker node")
        ray_cluster.remove_node(worker_nodes[busy_worker_node()])
        thread.join(timeout=240)
    finally:
        if len(ray_cluster.worker_nodes) < 2:
            ray_cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    assert not thread.is_alive()
    if "error" in result:
        raise result["error"]
    assert result["summary"]["ray"]["retries"] >= 1
    assert _markers(out) == set(range(N_UNITS))
    assert_same_store(out, reference)
