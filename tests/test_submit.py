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
from sdfeat.errors import SdfeatError, SpecError
from sdfeat.spec import load_spec, spec_hash
from sdfeat.submit import build_entrypoint, logs, next_submission_id, status, submit_job, wait


def _write_job(path: Path, **changes: object) -> Path:
    path.write_text(yaml.safe_dump({**JOB, **changes}))
    return path


def test_submission_ids_count_up_per_spec_hash() -> None:
    assert next_submission_id("ab12", []) == "sdfeat-ab12-1"
    assert next_submission_id("ab12", ["sdfeat-ab12-1", "sdfeat-ab12-3", "sdfeat-ff00-7", "raysubmit_x"]) == \
        "sdfeat-ab12-4"


def test_entrypoint_passes_the_actor_options() -> None:
    entry = build_entrypoint(workers=3, gpus_per_worker=0.5, overwrite=True)
    assert 'extract "$spec" --workers 3 --gpus-per-worker 0.5 --overwrite;' in entry


def test_relative_output_is_refused_before_contacting_a_cluster(tmp_path: Path) -> None:
    job = _write_job(tmp_path / "job.yaml", output="out/store")
    with pytest.raises(SpecError, match="field 'output'.*relative"):
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
