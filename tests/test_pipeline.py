"""The worker's continuous pipeline (`feed` -> `forward` -> writer): a source file is opened and each row group
read once per worker, decoding runs ahead across unit boundaries, failed images' rows are spread out and filled,
and a simulated device drives the real host code end to end (cold and warm latent cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import small_spec
from imagegen import corrupt_png, write_parquet_shards
from sdfeat import store
from sdfeat.extract import UnitRunner, prepare_job, run_local
from sdfeat.extract.simdevice import Simulation
from sdfeat.extract.worker import spread_rows
from sdfeat.store.query import open_store


def test_spread_rows_moves_compacted_rows_to_their_places_and_fills_the_rest() -> None:
    values = np.zeros((6, 2), np.float32)
    values[:4] = [[1, 1], [2, 2], [3, 3], [4, 4]]  # rows 0, 2, 3, 5 in order; 1 and 4 failed
    spread_rows(values, [0, 2, 3, 5])
    missing = store.missing_value(values.dtype)
    expected = np.array([[1, 1], [missing] * 2, [2, 2], [3, 3], [missing] * 2, [4, 4]], np.float32)
    np.testing.assert_array_equal(values, expected)
    limited = np.array([[7.0], [8.0], [9.0]], np.float32)  # an array holding the unit's first 3 rows only
    spread_rows(limited, [1, 2, 4])  # rows 1 and 2 are in it (compacted to 0 and 1), row 0 failed
    np.testing.assert_array_equal(limited, [[missing], [7.0], [8.0]])


def _count_row_group_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The row groups a reader starts reading (a row group is read in batches, from its first row on)."""
    reads: list[int] = []
    original = pq.ParquetFile.iter_batches

    def counted(self, *args, row_groups=None, **kwargs):
        reads.extend(row_groups)
        return original(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    return reads


def test_each_row_group_is_read_once_by_a_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six units of 4 rows over one file whose 24 rows lie in 2 row groups: 2 reads, not one per unit."""
    write_parquet_shards(tmp_path / "src", 1, 24, row_group_size=12)
    spec = small_spec(str(tmp_path / "out"), source=str(tmp_path / "src"), batch_size=2, unit_size=4,
                      blocks=["up_blocks.1.upsamplers.0"], timesteps=[50], resolution=64)
    plan = prepare_job(spec)  # planning reads the label column only
    reads = _count_row_group_reads(monkeypatch)
    runner = UnitRunner(plan, device="cpu", threads=1)
    reports = list(runner.run_many(plan.units))
    runner.close()
    assert [r.ok for r in reports] == [4] * 6
    assert reads == [0, 1]


def test_decoding_runs_ahead_into_the_next_unit_while_the_device_works(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With a slow (simulated) device, unit 1's images are decoded while unit 0 computes: by the time unit 0's
    marker is written, all 8 images of both units have been decoded (a unit-at-a-time worker: 4)."""
    from sdfeat.extract import feed

    decodes: list[int] = []
    at_marker: dict[int, int] = {}
    decode, write_marker = feed.decode_one, store.write_marker

    def counted_decode(index, load, resolution):
        decodes.append(index)
        return decode(index, load, resolution)

    def noted_marker(output, report):
        at_marker[report.unit] = len(decodes)
        write_marker(output, report)

    monkeypatch.setattr(feed, "decode_one", counted_decode)
    monkeypatch.setattr(store, "write_marker", noted_marker)
    spec = small_spec(str(tmp_path / "out"), source="synthetic:8", batch_size=4, unit_size=4, timesteps=[50],
                      blocks=["up_blocks.1.upsamplers.0"], resolution=64)
    plan = prepare_job(spec)
    runner = UnitRunner(plan, threads=1, simulate=Simulation(images_per_second=8.0))  # 0.5 s a batch
    reports = list(runner.run_many(plan.units))
    runner.close()
    assert [r.ok for r in reports] == [4, 4]
    assert at_marker == {0: 8, 1: 8}


def test_failed_images_inside_batches_keep_their_rows_empty(tmp_path: Path) -> None:
    """Rows 1 and 6 of 8 cannot be decoded: they read as the missing value, every other row equals the same
    image extracted in a store without failures."""
    bad = {1, 6}

    def image(i: int) -> bytes:
        from imagegen import default_image

        return corrupt_png() if i in bad else default_image(i)

    write_parquet_shards(tmp_path / "src", 1, 8, image_fn=image)
    write_parquet_shards(tmp_path / "clean", 1, 8)
    common = {"batch_size": 3, "unit_size": 8, "timesteps": [10, 50], "seeds": [1, 2], "resolution": 64,
              "protocol": "standard", "blocks": ["up_blocks.1.upsamplers.0", "conv_in"], "dtype": "float32"}
    run_local(small_spec(str(tmp_path / "a"), source=str(tmp_path / "src"), **common), progress=False, threads=1)
    run_local(small_spec(str(tmp_path / "b"), source=str(tmp_path / "clean"), **common), progress=False,
              threads=1)
    got, clean = open_store(str(tmp_path / "a")), open_store(str(tmp_path / "b"))
    assert [bool(x) for x in got.ok] == [i not in bad for i in range(8)]
    for block in common["blocks"]:
        a, b = np.asarray(got.group[block][:]), np.asarray(clean.group[block][:])
        for row in range(8):
            if row in bad:  # NaN for these float arrays (assert_array_equal takes NaN as equal to NaN)
                np.testing.assert_array_equal(a[row], np.full_like(a[row], store.missing_value(a.dtype)))
            else:  # `standard`: a row depends on its image only, so it equals the clean store's
                np.testing.assert_array_equal(a[row], b[row], err_msg=f"{block} row {row}")


@pytest.mark.parametrize("cache", [False, True])
def test_a_simulated_device_runs_the_real_host_pipeline_to_a_complete_store(tmp_path: Path, cache: bool) -> None:
    """SD-1.5 shapes without weights: every unit written and marked, failures recorded, the latent cache filled
    and then used (a warm run decodes nothing)."""
    write_parquet_shards(tmp_path / "src", 1, 10, image_fn=lambda i: corrupt_png() if i == 3 else
                         __import__("imagegen").default_image(i))
    fields = {"model": "random:sd15", "source": str(tmp_path / "src"), "resolution": 64, "batch_size": 4,
              "unit_size": 4, "blocks": ["up_blocks.1.upsamplers.0"], "timesteps": [50]}
    if cache:
        fields["latent_cache"] = str(tmp_path / "cache")
    runs = []
    for name in ("first", "second"):
        spec = small_spec(str(tmp_path / name), **fields)
        runs.append(run_local(spec, progress=False, simulate=Simulation(images_per_second=1e4)))
    for summary in runs:
        assert (summary["rows"], summary["ok"], summary["failures"]) == (10, 9, 1)
        assert summary["seconds"]["unet"] > 0  # the simulated device's busy time
        assert summary["cpu"]["process"] > 0 and summary["cpu"]["write"] > 0
    assert runs[0]["cpu"]["decode"] > 0
    assert (runs[1]["cpu"]["decode"] == 0) == cache  # warm: no image decoded
