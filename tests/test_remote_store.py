"""Sources and stores on S3 (a moto server on 127.0.0.1): Parquet shards read from s3://, the store written to
s3://, by the local runner and by Ray actors; the activations equal those of an all-local run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import zarr

from imagegen import write_parquet_shards
from raycluster import ray_cluster, ray_cluster_processes  # noqa: F401  (fixtures)
from raycluster import free_port, job_spec
from storecompare import array_paths, assert_same_store
from sdfeat.extract import run_local

BUCKET = "sdfeat-test"


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server with one bucket; the AWS_* variables pointing at it are set while the module runs.
    Modules importing this fixture each start a server, in one process: moto's backend is process-global (the
    bucket may exist already) and s3fs caches filesystems bound to an earlier endpoint (cleared here)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def shards(s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The same two Parquet shards (8 images) on local disk and under s3://BUCKET/data/."""
    import fsspec

    local = tmp_path_factory.mktemp("data")
    write_parquet_shards(local, n_files=2, rows_per_file=4)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for path in sorted(local.glob("*.parquet")):
        fs.put_file(str(path), f"{BUCKET}/data/{path.name}")
    return local, f"s3://{BUCKET}/data"


def _run_local_one_thread(spec) -> dict:
    import torch

    threads = torch.get_num_threads()
    try:
        return run_local(spec, progress=False, threads=1)  # one thread, as the 1-CPU actors: bitwise comparable
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def s3_local_run(shards: tuple[Path, str]) -> str:
    output = f"s3://{BUCKET}/local-run"
    _run_local_one_thread(job_spec(output, source=shards[1], limit=None))
    return output


def test_parquet_on_s3_into_store_on_s3_equals_all_local(shards: tuple[Path, str], s3_local_run: str,
                                                          tmp_path: Path) -> None:
    local_out = tmp_path / "store"
    _run_local_one_thread(job_spec(local_out, source=str(shards[0])))
    assert_same_store(s3_local_run, local_out, same_spec=False)  # the specs differ in `source` only
    remote = zarr.open_group(f"{s3_local_run}/features.zarr", mode="r")
    assert bool(remote["ok"][...].all()) and len(array_paths(remote)) >= 5


@pytest.mark.ray
def test_ray_actors_read_and_write_s3(ray_cluster, shards: tuple[Path, str], s3_local_run: str,
                                      s3_env: dict[str, str]) -> None:
    from sdfeat.extract.driver import run_on_ray

    output = f"s3://{BUCKET}/ray-run"
    summary = run_on_ray(job_spec(output, source=shards[1]), workers=2, progress=False,
                         runtime_env={"env_vars": s3_env})
    assert (summary["ok"], summary["ray"]["units_run"]) == (8, 2)
    assert_same_store(output, s3_local_run)
