"""Progress as a user watches it: the bar moves per batch (locally and from Ray actors), a unit's report replaces
its batches without counting twice, a resumed run says what was already done and its summary counts this run
only."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import small_spec
from raycluster import ray_cluster, ray_cluster_processes  # noqa: F401  (fixtures)
from raycluster import SlowBatches, job_spec
from sdfeat.progress import UnitProgress


def test_batches_move_the_bar_and_the_report_replaces_them() -> None:
    bar = UnitProgress(total_rows=12, done_rows=4, enabled=False, total_units=3, done_units=1)
    bar.advance(1, 2)
    bar.advance(2, 2)
    assert bar.completed == 8
    bar.update(1, 4, 1, {"unet": 1.5})
    assert bar.completed == 10                     # unit 1: 4 final rows, not 2 + 4
    bar.advance(1, 2)                              # a late batch message for a finished unit
    assert bar.completed == 10
    bar.update(2, 4, 0, {"unet": 0.5})
    assert bar.completed == 12
    assert bar.this_run()["units"] == 2 and bar.this_run()["rows"] == 8
    assert bar.this_run()["seconds"] == {"unet": 2.0}


def test_the_runner_reports_every_batch(tmp_path: Path) -> None:
    from sdfeat.extract import UnitRunner, pending_units, prepare_job

    spec = small_spec(str(tmp_path / "s"), source="synthetic:6", batch_size=2, unit_size=4, timesteps=[50])
    plan = prepare_job(spec)
    runner = UnitRunner(plan, "cpu")
    seen: list[tuple[int, int]] = []
    runner.on_batch = lambda unit, rows: seen.append((unit, rows))
    for unit in pending_units(plan):
        runner.run(unit)
    assert seen == [(0, 2), (0, 2), (1, 2)]        # units of 4 and 2 rows in batches of 2


def test_a_resumed_run_says_so_and_counts_this_run_only(tiny_store: str, tmp_path: Path) -> None:
    import yaml

    store = tmp_path / "s"
    shutil.copytree(tiny_store, store)
    (store / "progress" / "unit-000002.json").unlink()
    spec = small_spec(str(store)).model_dump(mode="json")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    result = subprocess.run([sys.executable, "-m", "sdfeat.cli", "extract", str(job), "--local", "-q"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resumed: 2 of 3 units were already done; this run extracted 4 images in 1 units" in result.stdout


@pytest.mark.ray
def test_ray_actors_report_batches_to_the_driver(ray_cluster, tmp_path: Path, monkeypatch) -> None:
    import sdfeat.extract.driver as cluster

    advances: list[tuple[int, int]] = []

    class Recording(UnitProgress):
        def advance(self, unit: int, rows: int) -> None:
            advances.append((unit, rows))
            super().advance(unit, rows)

    monkeypatch.setattr(cluster, "UnitProgress", Recording)
    spec = job_spec(tmp_path / "store", source="synthetic:24", unit_size=12, batch_size=2)
    summary = cluster.run_on_ray(spec, workers=1, progress=False, worker_class=SlowBatches)
    assert summary["ok"] == 24
    per_unit: dict[int, int] = {}
    for unit, rows in advances:                     # batches, summed by the tally between two reads
        per_unit[unit] = per_unit.get(unit, 0) + rows
    # the driver reads the tally while it waits (never blocking on it): batches of the units it saw in flight
    assert per_unit and all(unit in (0, 1) and 0 < rows <= 12 and rows % 2 == 0 for unit, rows in per_unit.items())
