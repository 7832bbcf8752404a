"""The extraction core end to end on the tiny model: store values, failures, resume, spec identity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_spec
from storecompare import assert_same_store
from sdfeat import store
from sdfeat.errors import SpecError, StoreError, UnitFailedError
from sdfeat.extract import UnitRunner, open_job, pending_units, prepare_job, run_local
from sdfeat.extract.stages import STAGES
from sdfeat.store.query import open_store


def test_store_holds_what_a_plain_hooked_forward_gives(tiny_store: str) -> None:
    """Independent expectation: load the model, encode one image, add noise, run the U-Net with a plain
    forward hook (not sdfeat.models.hooks) and compare with the store's row."""
    from sdfeat.extract.protocol import encode, noisy_latents
    from sdfeat.models.loading import load_model
    from sdfeat.sources.decode import center_crop_resize
    from sdfeat.sources.synthetic import synthetic_image

    features = open_store(tiny_store)
    row = 5
    model = load_model("tiny")
    pixels = torch.from_numpy(np.array(center_crop_resize(synthetic_image(row), 128)))[None]  # (1, 128, 128, 3)
    dist = encode(model, pixels, "standard")
    latents = noisy_latents(model, dist, "standard", 42, [features.sample_ids[row]], [200])[200]
    got: dict[str, torch.Tensor] = {}
    module = model.unet.get_submodule("up_blocks.1.resnets.2")
    handle = module.register_forward_hook(lambda m, i, o: got.__setitem__("x", o))
    try:
        with torch.inference_mode():
            model.unet(latents, 200, encoder_hidden_states=model.prompt_embeddings([""]))
    finally:
        handle.remove()
    stored = features.read("up_blocks.1.resnets.2", [row], timestep=200, seed=42)[0]
    np.testing.assert_allclose(stored, got["x"][0].float().numpy(), rtol=2e-3, atol=2e-3)
    assert features.read("up_blocks.1.resnets.2", [row], timestep=50, seed=42).shape == (1, *stored.shape)


def test_store_layout_and_markers(tiny_store: str) -> None:
    features = open_store(tiny_store)
    assert len(features) == 12 and features.ok.all() and features.timesteps == [50, 200] and features.seeds == [42]
    assert features.blocks[0] == "conv_in" and features.blocks[-1] == "up_blocks.1.upsamplers.0"
    arr = features.array("up_blocks.1.upsamplers.0")
    assert arr.shape == (12, 2, 1, 64, 8, 8) and arr.dtype == np.float16
    assert arr.shards == (4, 2, 1, 64, 8, 8) and arr.chunks == (1, 1, 1, 64, 8, 8)
    assert arr.metadata.dimension_names == ("sample", "timestep", "seed", "channel_64", "y_8", "x_8")
    assert store.done_units(tiny_store) == {0, 1, 2}
    report = json.loads(Path(store.marker_path(tiny_store, 1)).read_text())
    assert report["rows"] == 4 and report["ok"] == 4 and set(report["seconds"]) == set(STAGES)
    busy = report["seconds"]
    assert all(isinstance(busy[k], float) and busy[k] >= 0 for k in STAGES), busy
    assert isinstance(report["wall"], float) and report["wall"] >= 0 and isinstance(report["worker"], str)
    assert features.verify() == []


def test_rerun_skips_done_units_and_keeps_bytes(tiny_store: str, tmp_path: Path) -> None:
    output = str(tmp_path / "copy")
    shutil.copytree(tiny_store, output)
    summary = run_local(small_spec(output), progress=False)
    assert summary["rows"] == 12 and summary["ok"] == 12
    assert_same_store(output, tiny_store)  # the copy is unchanged


def test_units_submitted_at_once_give_the_same_store(tiny_store: str, tmp_path: Path) -> None:
    """All units queued at once (reading and decoding run ahead across units): same reports, same bytes."""
    output = str(tmp_path / "ahead")
    spec = small_spec(output)
    plan = prepare_job(spec)
    runner = UnitRunner(plan, device="cpu")
    reports = list(runner.run_many(plan.units))
    runner.close()
    assert [r.unit for r in reports] == [0, 1, 2] and all(r.ok == 4 for r in reports)
    assert_same_store(output, tiny_store)


def test_two_threads_running_units_give_the_same_store(tiny_store: str, tmp_path: Path) -> None:
    """How a GPU actor runs (two calls in flight): forwards take turns, writes overlap; bytes unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    output = str(tmp_path / "threads")
    spec = small_spec(output)
    plan = prepare_job(spec)
    runner = UnitRunner(plan, device="cpu")
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(runner.run, plan.units))
    assert [r.unit for r in reports] == [0, 1, 2]
    assert_same_store(output, tiny_store)


def test_killed_run_resumes_to_the_clean_store(tiny_store: str, tmp_path: Path) -> None:
    """Unit 0 finished, unit 1 half written (garbage, no marker), unit 2 untouched: a rerun equals a clean run."""
    output = str(tmp_path / "killed")
    spec = small_spec(output)
    plan = prepare_job(spec)
    runner = UnitRunner(plan)
    runner.run(plan.units[0])
    group = store.open_features(output, mode="r+")
    group["up_blocks.1.upsamplers.0"][4:8] = 7.0  # a torn write of unit 1, never marked done
    assert [u.index for u in pending_units(plan)] == [1, 2]
    run_local(spec, progress=False)
    assert_same_store(output, tiny_store)


def test_other_spec_is_refused_unless_overwrite(tiny_store: str, tmp_path: Path) -> None:
    output = str(tmp_path / "other")
    shutil.copytree(tiny_store, output)
    other = small_spec(output, timesteps=[50])
    with pytest.raises(StoreError, match="another spec"):
        prepare_job(other)
    plan = prepare_job(other, overwrite=True)
    assert store.done_units(output) == set() and len(plan.units) == 3
    assert open_store(output).timesteps == [50]


def test_bad_images_become_failure_rows(tmp_path: Path) -> None:
    """A corrupt and a non-image row land in failures.parquet; the rest of the unit is kept."""
    import pyarrow.parquet as pq

    from imagegen import write_parquet_shards

    src = tmp_path / "src"
    bad = {2: b"\xff\xd8\xff\xe0 truncated", 5: b"not an image at all"}
    write_parquet_shards(src, n_files=1, rows_per_file=8,
                         image_fn=lambda i: bad.get(i) or _jpeg(i))
    output = str(tmp_path / "out")
    summary = run_local(small_spec(output, source=str(src), blocks=["conv_in", "mid_block.resnets.0"]),
                        progress=False)
    assert summary["failures"] == 2 and summary["ok"] == 6
    failures = pq.read_table(f"{output}/failures.parquet").to_pylist()
    features = open_store(output)
    assert sorted(f["sample_id"] for f in failures) == sorted(features.sample_ids[i] for i in bad)
    assert all(f["reason"] for f in failures)
    assert features.ok.tolist() == [i not in bad for i in range(8)]
    assert features.to_xarray()["conv_in"][2].isnull().all() and (features.read("conv_in", [3]) != 0).any()
    assert features.verify() == []


def _jpeg(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (160 + 8 * i, 130), (20 * i % 255, 90, 200)).save(buf, "JPEG")
    return buf.getvalue()


def test_unreadable_shard_fails_its_unit_only(tmp_path: Path) -> None:
    from imagegen import write_parquet_shards

    src = tmp_path / "src"
    files = write_parquet_shards(src, n_files=3, rows_per_file=4, image_fn=_jpeg)
    output = str(tmp_path / "out")
    spec = small_spec(output, source=str(src), blocks=["conv_in"])
    prepare_job(spec)
    files[1].write_bytes(b"PAR1 this is no longer parquet")
    with pytest.raises(UnitFailedError, match="unit 1"):
        run_local(spec, progress=False)
    assert store.done_units(output) == {0, 2}  # the unit after the failed one still ran


def test_prompt_template_uses_class_names(tiny_store: str, tmp_path: Path) -> None:
    """`{class_name}` prompts change the conditioning per class; a source without names is refused by field."""
    from imagegen import write_parquet_shards

    output = str(tmp_path / "prompted")
    run_local(small_spec(output, prompt="a photo of a {class_name}", blocks=["up_blocks.1.resnets.2"]),
              progress=False, device="cpu")
    plain, prompted = open_store(tiny_store), open_store(output)
    assert not np.allclose(plain.read("up_blocks.1.resnets.2", [0]), prompted.read("up_blocks.1.resnets.2", [0]))
    row = 5  # its class's prompt written out, as a fixed prompt: the same activations
    name = prompted.attrs.class_names[int(prompted.labels[row])]
    fixed = str(tmp_path / "fixed")
    run_local(small_spec(fixed, prompt=f"a photo of a {name}", blocks=["up_blocks.1.resnets.2"]), progress=False,
              device="cpu")
    np.testing.assert_allclose(prompted.read("up_blocks.1.resnets.2", [row]),
                               open_store(fixed).read("up_blocks.1.resnets.2", [row]), rtol=0, atol=1e-5)

    src = tmp_path / "src"
    write_parquet_shards(src, n_files=1, rows_per_file=4, image_fn=_jpeg)
    with pytest.raises(SpecError, match="field 'prompt'"):
        run_local(small_spec(str(tmp_path / "nameless"), source=str(src), prompt="{class_name}",
                             blocks=["conv_in"]), progress=False, device="cpu")


def test_a_runner_leaves_torch_threads_alone_and_run_local_sets_them_while_it_runs(
        tiny_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Constructing a `UnitRunner` in a library caller changes nothing process-wide; `run_local` applies its
    `threads` while the job runs (seen from inside the job's end) and restores the count afterwards."""
    from sdfeat.extract import local as extract

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    output = str(tmp_path / "copy")
    shutil.copytree(tiny_store, output)
    spec = small_spec(output)
    runner = UnitRunner(open_job(spec, output), device="cpu", threads=other)
    assert torch.get_num_threads() == before
    assert runner.decode_threads == other  # the runner's own decoding threads follow the argument
    seen: list[int] = []
    end_job = extract.end_job
    monkeypatch.setattr(extract, "end_job", lambda *a, **k: seen.append(torch.get_num_threads()) or end_job(*a, **k))
    summary = run_local(spec, progress=False, threads=other)
    assert seen == [other] and summary["units_skipped"] == 3
    assert torch.get_num_threads() == before


def test_write_workers_reach_the_shard_writer_and_change_no_stored_byte(tiny_store: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The spec's `write_workers` is the shard writer's thread count; every array file is byte for byte the
    default run's (only the root's attrs record the spec as given)."""
    from sdfeat.store import shard_writer

    seen: list[int | None] = []
    write = shard_writer.write_shards
    monkeypatch.setattr(shard_writer, "write_shards",
                        lambda target, jobs, workers=None: (seen.append(workers), write(target, jobs, workers))[1])
    output = tmp_path / "one-writer"
    run_local(small_spec(str(output), write_workers=1), progress=False)
    assert seen == [1, 1, 1]  # one write per unit, each with one thread

    def files(root: Path) -> dict[str, bytes]:
        base = root / "features.zarr"
        return {str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*")
                if p.is_file() and p.relative_to(base) != Path("zarr.json")}

    got, want = files(output), files(Path(tiny_store))
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
