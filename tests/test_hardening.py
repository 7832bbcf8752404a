"""Issue 9: every bad image, bad source, bad spec and partial state ends in a clear answer; nothing is silently
dropped, wrong, or hanging. One test per item; the odd-input corpus over all three layouts is test_odd_corpus.py."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import imagegen
from conftest import deadline, small_spec
from sdfeat import store
from sdfeat.errors import SourceError, StoreError
from sdfeat.store.schema import UnitReport
from sdfeat.sources import plan_samples, read_images

RES = 16
RED, BLUE = (230, 20, 20), (20, 20, 230)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def solid(fmt: str, color=RED, size=(20, 12), mode: str = "RGB") -> bytes:
    return imagegen.encode(Image.new(mode, size, color), fmt)


def decoded(plan, threads: int = 1) -> dict[str, object]:
    """sample_id -> pixels (uint8) or the failure reason."""
    with deadline(30):
        results = list(read_images(plan.refs, RES, threads=threads))
    return {plan.refs[r.index].sample_id: (r.pixels if r.pixels is not None else r.error) for r in results}


def is_color(value, color, tol: int = 4) -> bool:
    return isinstance(value, np.ndarray) and np.abs(value.astype(int) - np.array(color)).max() <= tol


# ---- images and sources -----------------------------------------------------------------------------------------


def test_webdataset_reads_every_format_the_decoder_reads(tmp_path):
    formats = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "gif": "GIF", "tiff": "TIFF",
               "tif": "TIFF", "jpeg": "JPEG", "ppm": "PPM"}
    members = []
    for i, (ext, fmt) in enumerate(formats.items()):
        members += [(f"s{i:02d}.{ext}", solid(fmt, RED if fmt != "GIF" else (255, 0, 0))), (f"s{i:02d}.cls", b"3")]
    write_tar(tmp_path / "a.tar", members)
    plan = plan_samples(str(tmp_path))
    assert [r.sample_id for r in plan.refs] == [f"a.tar#s{i:02d}.{ext}" for i, ext in enumerate(formats)]
    assert [r.label for r in plan.refs] == [3] * len(formats)
    values = decoded(plan)
    assert all(is_color(v, RED, tol=30) for v in values.values()), values  # gif: a palette colour


def test_webdataset_sample_without_image_and_bad_cls_are_failure_rows(tmp_path):
    write_tar(tmp_path / "a.tar", [
        ("k0.jpg", solid("JPEG")), ("k0.cls", b"1"),
        ("k1.json", b"{}"), ("k1.cls", b"2"),                  # no image
        ("k2.txt", b"caption only"),                           # no image
        ("k3.jpg", solid("JPEG")), ("k3.cls", b"tench"),      # label not an integer
        ("k4.jpg", solid("JPEG")),                             # no label: kept, label -1
        ("k5.jpg", solid("JPEG")), ("k5.cls", b" 7\n"),
    ])
    plan = plan_samples(str(tmp_path))
    ids = [r.sample_id for r in plan.refs]
    assert ids == ["a.tar#k0.jpg", "a.tar#k1", "a.tar#k2", "a.tar#k3.jpg", "a.tar#k4.jpg", "a.tar#k5.jpg"]
    assert [r.label for r in plan.refs] == [1, 2, -1, -1, -1, 7]
    values = decoded(plan)
    assert "no image member (found .json, .cls)" in values["a.tar#k1"]
    assert "no image member (found .txt)" in values["a.tar#k2"]
    assert "k3.cls: label is not an integer: 'tench'" in values["a.tar#k3.jpg"]
    assert all(is_color(values[i], RED) for i in ("a.tar#k0.jpg", "a.tar#k4.jpg", "a.tar#k5.jpg"))


def _six_sample_tar(path: Path) -> list[int]:
    """Six jpg+cls samples; returns the data offsets of the images."""
    write_tar(path, [m for i in range(6) for m in ((f"s{i}.jpg", solid("JPEG", imagegen.color_for(i))),
                                                     (f"s{i}.cls", str(i).encode()))])
    with tarfile.open(path) as tar:
        return [m.offset_data for m in tar if m.name.endswith(".jpg")]


@pytest.mark.parametrize("damage", ["cut_in_data", "cut_in_header", "garbage_appended", "garbage_inside"])
def test_damaged_tar_keeps_its_readable_members(tmp_path, damage):
    good = _six_sample_tar(tmp_path / "src" / "a.tar")
    path = tmp_path / "src" / "b.tar"
    offsets = _six_sample_tar(path)
    raw = path.read_bytes()
    if damage == "cut_in_data":
        raw = raw[: offsets[3] + 10]               # s0..s2 whole, s3's image cut
    elif damage == "cut_in_header":
        raw = raw[: offsets[3] - 512 + 100]        # s0..s2 and s2.cls whole, s3's header cut
    elif damage == "garbage_appended":
        raw = raw[: offsets[3] - 512] + os.urandom(3000)
    else:
        raw = raw[: offsets[3] - 512] + b"\x07" * 512 + raw[offsets[3] - 512:]
    path.write_bytes(raw)
    plan = plan_samples(str(tmp_path / "src"))
    assert len(good) == 6 and [r.sample_id for r in plan.refs[:9]] == \
        [f"a.tar#s{i}.jpg" for i in range(6)] + [f"b.tar#s{i}.jpg" for i in range(3)]
    values = decoded(plan)
    for i in range(3):
        assert is_color(values[f"b.tar#s{i}.jpg"], imagegen.color_for(i))
    rest = [r for r in plan.refs[9:]]
    assert rest, "the damage must leave a failure row"
    for ref in rest:
        assert isinstance(values[ref.sample_id], str) and "b.tar" in values[ref.sample_id]
    if damage == "cut_in_data":
        assert [r.sample_id for r in rest] == ["b.tar#s3.jpg"] and "truncated tar member" in values["b.tar#s3.jpg"]
    else:
        assert [r.sample_id for r in rest] == ["b.tar#(unreadable tail)"]


def test_garbage_and_empty_tars_are_one_failure_row_each(tmp_path):
    _six_sample_tar(tmp_path / "a.tar")
    (tmp_path / "b.tar").write_bytes(os.urandom(5000))
    (tmp_path / "c.tar").write_bytes(b"")
    plan = plan_samples(str(tmp_path))
    assert [r.sample_id for r in plan.refs[6:]] == ["b.tar#(unreadable)", "c.tar#(unreadable)"]
    values = decoded(plan)
    assert "b.tar" in values["b.tar#(unreadable)"] and "unreadable WebDataset tar" in values["b.tar#(unreadable)"]


def test_a_source_with_nothing_readable_is_refused(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"garbage" * 100)
    (tmp_path / "b.tar").write_bytes(b"")
    with pytest.raises(SourceError, match="nothing readable.*a.tar"):
        plan_samples(str(tmp_path))


def test_half_written_parquet_is_a_failure_row(tmp_path):
    good, half = imagegen.write_parquet_shards(tmp_path, 2, 3)
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])  # no footer
    plan = plan_samples(str(tmp_path))
    assert [r.sample_id for r in plan.refs] == [f"{good.name}#{i}" for i in range(3)] + [f"{half.name}#(unreadable)"]
    values = decoded(plan)
    assert all(is_color(values[f"{good.name}#{i}"], imagegen.color_for(i)) for i in range(3))
    assert half.name in values[f"{half.name}#(unreadable)"]


def test_parquet_row_group_with_unreadable_labels_fails_its_rows_only(tmp_path):
    (path,) = imagegen.write_parquet_shards(tmp_path, 1, 6, row_group_size=3)
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(2)  # row group 1's label column
    assert chunk.path_in_schema == "label"
    raw = bytearray(path.read_bytes())
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw[start: start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(raw))
    plan = plan_samples(str(tmp_path))
    assert [bool(r.error) for r in plan.refs] == [False] * 3 + [True] * 3
    assert all("row group 1" in r.error for r in plan.refs[3:])
    values = decoded(plan)
    assert all(is_color(values[plan.refs[i].sample_id], imagegen.color_for(i)) for i in range(3))


def _parquet(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_schemas_are_checked_and_unambiguous_ones_coerced(tmp_path):
    jpegs = [imagegen.default_image(i) for i in range(3)]
    hf = [{"bytes": b, "path": f"{i}.JPEG"} for i, b in enumerate(jpegs)]
    cases = {
        "int_strings": ({"image": hf, "label": ["3", " 4", None]}, [3, 4, -1]),
        "integral_floats": ({"image": hf, "label": [1.0, 2.0, None]}, [1, 2, -1]),
        "plain_binary": ({"image": pa.array(jpegs, pa.binary()), "label": [0, 1, 2]}, [0, 1, 2]),
        "large_binary": ({"image": pa.array(jpegs, pa.large_binary())}, [-1, -1, -1]),
    }
    for name, (columns, labels) in cases.items():
        _parquet(tmp_path / name / "x.parquet", columns)
        plan = plan_samples(str(tmp_path / name))
        assert [r.label for r in plan.refs] == labels, name
        values = decoded(plan)
        assert all(is_color(values[f"x.parquet#{i}"], imagegen.color_for(i)) for i in range(3)), name
    refused = {
        "word_labels": ({"image": hf, "label": ["tench", "goldfish", "3"]}, r"column 'label' holds strings.*'tench'"),
        "fractional_labels": ({"image": hf, "label": [1.0, 2.5, 3.0]}, r"column 'label' holds non-integral.*2.5"),
        "other_struct": ({"image": [{"data": b, "name": "x"} for b in jpegs]}, r"fields \['data', 'name'\]"),
        "path_strings": ({"image": ["a.JPEG", "b.JPEG", "c.JPEG"]}, r"column 'image' holds strings \(file paths"),
        "no_image": ({"picture": jpegs}, r"no 'image' column \(columns: picture\)"),
        "list_labels": ({"image": hf, "label": [[1], [2], [3]]}, r"column 'label' has type list"),
        "negative_labels": ({"image": hf, "label": [0, -5, 1]}, r"column 'label' holds -5"),
    }
    for name, (columns, message) in refused.items():
        _parquet(tmp_path / name / "x.parquet", columns)
        with pytest.raises(SourceError, match=message):
            plan_samples(str(tmp_path / name))


def test_named_pipes_and_broken_links_are_failure_rows_never_opened(tmp_path):
    classes = imagegen.write_ilsvrc_folders(tmp_path, synsets=("n01000000",), per_class=2)
    folder = classes / "n01000000"
    os.mkfifo(folder / "p.JPEG")
    (folder / "loop.JPEG").symlink_to(folder / "loop.JPEG")
    (folder / "gone.JPEG").symlink_to(folder / "nowhere.JPEG")
    (folder / "link.JPEG").symlink_to(folder / "n01000000_0.JPEG")
    (folder / "dir.JPEG").mkdir()
    (folder / "dir.JPEG" / "inner.JPEG").write_bytes(imagegen.default_image(5))
    with deadline(20):
        plan = plan_samples(str(classes))
        values = decoded(plan, threads=2)
    assert sorted(values) == sorted(f"n01000000/{n}" for n in (
        "dir.JPEG/inner.JPEG", "gone.JPEG", "link.JPEG", "loop.JPEG", "n01000000_0.JPEG", "n01000000_1.JPEG",
        "p.JPEG"))
    assert "named pipe" in values["n01000000/p.JPEG"]
    assert "symbolic link loop" in values["n01000000/loop.JPEG"] and "broken link" in values["n01000000/gone.JPEG"]
    assert is_color(values["n01000000/link.JPEG"], imagegen.color_for(0))
    assert is_color(values["n01000000/dir.JPEG/inner.JPEG"], imagegen.color_for(5))


def test_pipe_named_like_a_tar_or_parquet_is_never_opened(tmp_path):
    _six_sample_tar(tmp_path / "a.tar")
    os.mkfifo(tmp_path / "b.tar")
    with deadline(20):
        plan = plan_samples(str(tmp_path))
        values = decoded(plan)
    assert "named pipe" in values["b.tar#(unreadable)"]
    imagegen.write_parquet_shards(tmp_path / "pq", 1, 2)
    os.mkfifo(tmp_path / "pq" / "z.parquet")
    with deadline(20):
        plan = plan_samples(str(tmp_path / "pq"))
    assert plan.refs[-1].sample_id == "z.parquet#(unreadable)" and "named pipe" in plan.refs[-1].error


def test_ilsvrc_ignores_hidden_entries_and_resource_forks(tmp_path):
    classes = imagegen.write_ilsvrc_folders(tmp_path, synsets=("n01000000", "n02000000"), per_class=1)
    (classes / "__MACOSX" / "n01000000").mkdir(parents=True)
    (classes / "__MACOSX" / "n01000000" / "._n01000000_0.JPEG").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (classes / "n01000000" / "._n01000000_0.JPEG").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (classes / "n01000000" / ".DS_Store").write_bytes(b"Bud1")
    (classes / ".DS_Store").write_bytes(b"Bud1")
    (classes / ".cache").mkdir()
    (classes / ".cache" / "x.JPEG").write_bytes(imagegen.default_image(9))
    plan = plan_samples(str(classes))
    assert [r.sample_id for r in plan.refs] == ["n01000000/n01000000_0.JPEG", "n02000000/n02000000_0.JPEG"]
    assert [r.label for r in plan.refs] == [0, 1] and plan.class_names == ["n01000000", "n02000000"]


def test_hidden_parent_of_the_source_root_is_not_ignored(tmp_path):
    classes = imagegen.write_ilsvrc_folders(tmp_path / ".cache", synsets=("n01000000",), per_class=2)
    assert len(plan_samples(str(classes)).refs) == 2


def test_ambiguous_layout_is_refused_naming_both(tmp_path):
    classes = imagegen.write_ilsvrc_folders(tmp_path, synsets=("n01000000",), per_class=2)
    imagegen.write_parquet_shards(classes / "n01000000", 1, 2)
    with pytest.raises(SourceError, match=r"ambiguous.*Parquet files \(e.g. n01000000/train-00000-of-00001.parquet\) "
                                          r"and image files \(e.g. n01000000/n01000000_0.JPEG\).*source_format: "
                                          r"parquet or source_format: folder"):
        plan_samples(str(classes))
    assert len(plan_samples(str(classes), source_format="folder").refs) == 2


# ---- specs: one line, exit 2, before anything heavy ---------------------------------------------------------------

_PROBE = """
import sys, runpy
sys.argv = ["sdfeat", *sys.argv[1:]]
try:
    runpy.run_module("sdfeat.cli", run_name="__main__")
except SystemExit as exit:
    heavy = sorted(m for m in ("torch", "diffusers", "ray") if m in sys.modules)
    print(f"HEAVY={','.join(heavy)}", file=sys.stderr)
    raise
"""


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if not line.startswith("HEAVY=")]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("case, field", [
    ("output: ''", "field 'output'"),
    ("output: {existing_file}", "field 'output'"),
    ("output: {existing_file}/below", "field 'output'"),
    ("seeds: [18446744073709551616]", "field 'seeds'"),
    ("seeds: [-1]", "field 'seeds'"),
    ("batch_size: yes", "field 'batch_size'"),
    ("batch_size: 4\nbatch_size: 8", "duplicate key 'batch_size'"),
    ("blocks: [up_blocks.1.upsampler.0]", "field 'blocks': block 'up_blocks.1.upsampler.0': unknown; closest valid "
                                          "names: up_blocks.1.upsamplers.0"),
    ("summaries:\n  blocks: [mid_block.resnet.0]", "field 'summaries.blocks'"),
    ("source: {missing}", "field 'source'"),
    ("source: {missing}/*.parquet", "field 'source'"),
])
def test_bad_specs_stop_with_one_line_before_torch_is_imported(tmp_path, case, field):
    (tmp_path / "a-file").write_text("x")
    text = case.format(existing_file=tmp_path / "a-file", missing=tmp_path / "nowhere")
    base = {"source": "source: synthetic:4", "output": f"output: {tmp_path / 'out'}", "model": "model: tiny",
            "resolution": "resolution: 64", "blocks": "blocks: [conv_in]"}
    replaced = {line.split(":")[0] for line in text.splitlines() if not line.startswith(" ")}
    job = tmp_path / "job.yaml"
    job.write_text("\n".join([v for k, v in base.items() if k not in replaced] + text.splitlines()) + "\n")
    result = run_cli("extract", str(job), "--local")
    assert field in _one_error_line(result)
    assert "HEAVY=\n" in result.stderr or result.stderr.rstrip().endswith("HEAVY="), result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_parquet_schema_stops_before_the_model_and_leaves_no_store(tmp_path, monkeypatch):
    from sdfeat import extract
    from sdfeat.extract import worker as unit_runner

    _parquet(tmp_path / "src" / "x.parquet", {"image": [{"data": imagegen.default_image(0)}], "label": [0]})
    monkeypatch.setattr(unit_runner, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SourceError, match=r"fields \['data'\]"):
        extract.run_local(small_spec(str(tmp_path / "out"), source=str(tmp_path / "src"), blocks=["conv_in"]),
                          progress=False)
    assert not (tmp_path / "out").exists()


# ---- state and faults -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "memory"])
def test_markers_are_written_atomically(tmp_path, monkeypatch, where):
    import fsspec

    output = str(tmp_path / "out") if where == "local" else "memory://sdfeat-hardening/out"
    fs, _ = store.filesystem(output)
    store.write_marker(output, UnitReport(unit=0, rows=4, ok=4, failures=()))

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt  # killed between writing the temporary file and the rename

    monkeypatch.setattr(type(fs), "mv", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write_marker(output, UnitReport(unit=1, rows=4, ok=4, failures=()))
    monkeypatch.undo()
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(store.join(store.filesystem(output)[1], store.PROGRESS),
                                                 detail=False)]
    assert names == ["unit-000000.json"]  # no marker for unit 1, no temporary file left
    assert store.done_units(output) == {0}
    if where == "memory":
        fsspec.filesystem("memory").rm("/sdfeat-hardening", recursive=True)


def test_torn_marker_is_redone_and_finalize_does_not_crash(tiny_store, tmp_path, caplog):
    from storecompare import assert_same_store
    from sdfeat.extract import pending_units, prepare_job, run_local

    output = str(tmp_path / "torn")
    shutil.copytree(tiny_store, output)
    marker = Path(store.marker_path(output, 1))
    marker.write_text(marker.read_text()[:17])  # a half-written marker from before markers were atomic
    spec = small_spec(output)
    with caplog.at_level(logging.WARNING):
        assert [u.index for u in pending_units(prepare_job(spec))] == [1]
    assert "unit-000001.json: done marker does not parse" in caplog.text
    summary = run_local(spec, progress=False)
    assert summary["ok"] == 12 and json.loads(marker.read_text())["unit"] == 1
    assert_same_store(output, tiny_store)


def _other_versions(output: str) -> None:
    attrs = store.read_attrs(output)
    store.update_attrs(output, {"versions": {**attrs.versions, "torch": "1.0.0", "diffusers": "0.1.0"}})


def test_resume_under_other_library_versions_is_refused_unless_allowed(tiny_store, tmp_path):
    from sdfeat.cli.app import app
    from typer.testing import CliRunner

    from sdfeat.extract import prepare_job, run_local

    output = str(tmp_path / "versions")
    shutil.copytree(tiny_store, output)
    Path(store.marker_path(output, 2)).unlink()
    _other_versions(output)
    spec = small_spec(output)
    with pytest.raises(StoreError, match=r"torch 1.0.0 -> \S+, diffusers 0.1.0 -> \S+.*--allow-version-change"):
        prepare_job(spec)
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec.model_dump(mode="json")))  # JSON is YAML
    result = CliRunner().invoke(app, ["extract", str(job), "--local", "-q"])
    assert result.exit_code == 2 and "other library versions (torch 1.0.0 ->" in result.output
    summary = run_local(spec, progress=False, allow_version_change=True)
    assert summary["ok"] == 12
    (change,) = store.read_attrs(output).version_changes
    assert change["from"] == {"torch": "1.0.0", "diffusers": "0.1.0"} and change["units_done"] == 2


def test_finished_store_under_other_versions_is_a_no_op(tiny_store, tmp_path):
    """Nothing left to compute: nothing can mix, so the rerun neither refuses nor writes."""
    from sdfeat.extract import run_local

    output = str(tmp_path / "finished")
    shutil.copytree(tiny_store, output)
    _other_versions(output)
    before = _snapshot(Path(output))
    assert run_local(small_spec(output), progress=False)["ok"] == 12
    assert _snapshot(Path(output)) == before


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def test_finished_job_rerun_writes_nothing(tiny_store, tmp_path):
    from sdfeat.extract import run_local

    output = tmp_path / "again"
    shutil.copytree(tiny_store, output)
    os.utime(output / store.FAILURES, ns=(1, 1))  # any rewrite would move the mtime
    before = _snapshot(output)
    summary = run_local(small_spec(str(output)), progress=False)
    assert summary["ok"] == 12 and _snapshot(output) == before


def test_storage_errors_are_one_line_naming_path_and_errno(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sdfeat.cli.app import app
    from sdfeat.extract import job as extract_job

    job = tmp_path / "job.yaml"
    job.write_text(f"source: synthetic:4\noutput: {tmp_path / 'out'}\nmodel: tiny\nresolution: 64\n"
                   "blocks: [conv_in]\n")
    for code, name in ((errno.ENOSPC, "ENOSPC"), (errno.EROFS, "EROFS"), (errno.EDQUOT, "EDQUOT")):
        def refuse(*_args, code=code):
            raise OSError(code, os.strerror(code))  # as a write() reports it: no file name

        monkeypatch.setattr(extract_job.store, "write_manifest", refuse)
        result = CliRunner().invoke(app, ["extract", str(job), "--local", "-q"])
        assert result.exit_code == 2, result.output
        assert result.output.strip() == f"error: {tmp_path / 'out'}: {os.strerror(code)} ({name})"


def test_unwritable_output_in_a_real_process(tmp_path):
    if os.geteuid() == 0:  # root writes through permissions; sysfs refuses new entries even to root
        if not Path("/sys/kernel").is_dir():
            pytest.skip("needs /sys or a non-root user")
        output, names = "/sys/kernel/sdfeat-test-output", ("EPERM", "EACCES", "EROFS")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        output, names = str(tmp_path / "ro" / "out"), ("EACCES", "EROFS")
    job = tmp_path / "job.yaml"
    job.write_text(f"source: synthetic:4\noutput: {output}\nmodel: tiny\nresolution: 64\nblocks: [conv_in]\n")
    line = _one_error_line(run_cli("extract", str(job), "--local", "-q"))
    assert line.startswith(f"error: {output}") and any(f"({n})" in line for n in names), line


def test_overwrite_names_what_it_removes_and_keeps_other_files(tiny_store, tmp_path, caplog):
    from sdfeat.extract import prepare_job

    output = tmp_path / "over"
    shutil.copytree(tiny_store, output)
    (output / "results").mkdir()
    (output / "results" / "position.parquet").write_bytes(b"x")
    (output / "report").mkdir()
    (output / "notes.txt").write_text("mine")
    with caplog.at_level(logging.WARNING):
        prepare_job(small_spec(str(output), timesteps=[50]), overwrite=True)
    assert (f"--overwrite: removing features.zarr, manifest.parquet, progress, failures.parquet, results, report "
            f"from {output}") in caplog.text
    assert (output / "notes.txt").read_text() == "mine" and not (output / "results").exists()
    assert store.done_units(str(output)) == set()


def test_cheap_block_names_agree_with_the_meta_forward():
    """The names `checks` refuses by (from the config, no torch) are exactly the meta forward's, for every model
    it checks that way: tiny, sd15, sd21, sdturbo, random:sd15."""
    from sdfeat.models.families.sd import config_positions, meta_shapes
    from sdfeat.models.registry import local_unet_config, unet_config

    for model in ("tiny", "sd15", "sd21", "sdturbo", "random:sd15"):
        config = unet_config(model)
        assert config_positions(local_unet_config(model)) == list(meta_shapes(config, 256)), model
    assert local_unet_config("owner/not-cached") is None and local_unet_config("no-such-model") is None
    assert config_positions({"down_block_types": ["SomethingNew2D"], "up_block_types": []}) is None


def test_start_killed_while_writing_the_template_is_written_again(tiny_store, tmp_path, monkeypatch):
    from storecompare import assert_same_store
    from sdfeat.extract import prepare_job, run_local

    output = str(tmp_path / "half")
    spec = small_spec(output)

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt  # after the arrays, before the consolidated metadata: the template's last step

    monkeypatch.setattr(store.files.zarr, "consolidate_metadata", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_job(spec)
    monkeypatch.undo()
    assert store.read_attrs(output).spec_hash and not store.template_complete(output)
    assert run_local(spec, progress=False)["ok"] == 12
    assert_same_store(output, tiny_store)


def test_unreadable_store_metadata_is_refused_unless_overwrite(tiny_store, tmp_path):
    from sdfeat.extract import prepare_job

    output = tmp_path / "torn-meta"
    shutil.copytree(tiny_store, output)
    meta = output / store.FEATURES / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(StoreError, match=r"features.zarr: unreadable store metadata .*--overwrite"):
        prepare_job(small_spec(str(output)))
    assert len(prepare_job(small_spec(str(output)), overwrite=True).units) == 3
    assert store.template_complete(str(output))


def test_output_inside_the_source_is_refused(tmp_path):
    from sdfeat.errors import SpecError
    from sdfeat.planning.checks import check_job

    classes = imagegen.write_ilsvrc_folders(tmp_path, synsets=("n01000000",), per_class=1)
    with pytest.raises(SpecError, match="field 'output': .* lies inside the source"):
        check_job(small_spec(str(classes / "n01000000" / "out"), source=str(classes)))
    check_job(small_spec(str(tmp_path / "out"), source=str(classes)))  # beside it is fine
