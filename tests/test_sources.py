"""Planning and reading image sources: HF Parquet, ILSVRC folders, WebDataset tars, synthetic:N, fsspec URLs."""

from __future__ import annotations

import hashlib
import io
import os

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import imagegen
from sdfeat.errors import SourceError, SourceNotFoundError
from sdfeat.sources import SampleRef, plan_samples, read_images
from sdfeat.sources.synthetic import CLASS_NAMES, synthetic_array, synthetic_size

RES = 16


def assert_colors(results, expected_indices):
    """Each decoded image is the solid colour of its dataset index (JPEG: within a few levels)."""
    assert [r.error for r in results] == [None] * len(results)
    for result, index in zip(results, expected_indices, strict=True):
        assert result.pixels.shape == (RES, RES, 3) and result.pixels.dtype == np.uint8
        assert np.abs(result.pixels.astype(int) - np.array(imagegen.color_for(index))).max() <= 4, index


# ---- Parquet ----------------------------------------------------------------------------------------------------


def test_parquet_plan_order_ids_labels_and_class_names(tmp_path):
    names = [f"class {i}" for i in range(5)]
    imagegen.write_parquet_shards(tmp_path / "data", 3, 4, row_group_size=3, class_names=names)
    plan = plan_samples(str(tmp_path / "data"))
    assert plan.format == "parquet" and plan.class_names == names
    assert len(plan.refs) == 12
    assert plan.refs[5].sample_id == "train-00001-of-00003.parquet#1"
    assert plan.refs[5].member == "1" and plan.refs[5].file == str(tmp_path / "data" / "train-00001-of-00003.parquet")
    assert [r.label for r in plan.refs] == [i % 5 for i in range(12)]
    assert_colors(list(read_images(plan.refs, RES)), range(12))


def test_parquet_sample_ids_do_not_depend_on_the_mount(tmp_path):
    for where in ("a", "b/c"):
        imagegen.write_parquet_shards(tmp_path / where, 1, 2)
    ids = [[r.sample_id for r in plan_samples(str(tmp_path / where)).refs] for where in ("a", "b/c")]
    assert ids[0] == ids[1] == ["train-00000-of-00001.parquet#0", "train-00000-of-00001.parquet#1"]


def test_parquet_filters_classes_then_limits(tmp_path):
    imagegen.write_parquet_shards(tmp_path, 2, 10)
    plan = plan_samples(str(tmp_path), classes=[1, 3], limit=5)
    assert [int(r.sample_id.split("#")[1]) + 10 * ("00001-of" in r.sample_id) for r in plan.refs] == [1, 3, 6, 8, 11]
    assert [r.label for r in plan.refs] == [1, 3, 1, 3, 1]
    assert_colors(list(read_images(plan.refs, RES)), [1, 3, 6, 8, 11])


def test_parquet_planning_reads_no_image_bytes(tmp_path):
    """Destroy the image column's pages: planning (metadata + label column) still works; reading gives a failed
    image per row naming the file and the row group (the same bytes fail on every try)."""
    (path,) = imagegen.write_parquet_shards(tmp_path, 1, 6, row_group_size=6)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)  # image.bytes
    assert chunk.path_in_schema == "image.bytes"
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(raw))
    plan = plan_samples(str(tmp_path))
    assert [r.label for r in plan.refs] == [0, 1, 2, 3, 4, 0] and not any(r.error for r in plan.refs)
    results = list(read_images(plan.refs, RES))
    assert [r.pixels for r in results] == [None] * 6
    assert all("row group 0" in r.error and "train-00000-of-00001.parquet" in r.error for r in results)


def test_parquet_limit_stops_before_later_files(tmp_path):
    paths = imagegen.write_parquet_shards(tmp_path, 2, 4)
    paths[1].write_bytes(b"not parquet")
    assert len(plan_samples(str(tmp_path), limit=4).refs) == 4
    refs = plan_samples(str(tmp_path), limit=5).refs  # the unreadable file is one failure row, named
    assert [bool(r.error) for r in refs] == [False] * 4 + [True]
    assert refs[4].sample_id == "train-00001-of-00002.parquet#(unreadable)" and "train-00001" in refs[4].error


def test_parquet_reads_each_needed_row_group_once(tmp_path, monkeypatch):
    imagegen.write_parquet_shards(tmp_path, 1, 12, row_group_size=4)
    refs = plan_samples(str(tmp_path)).refs
    calls: list[list[int]] = []
    original = pq.ParquetFile.iter_batches

    def counted(self, *args, row_groups=None, **kwargs):
        calls.append(row_groups)
        return original(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    picked = [refs[i] for i in (0, 2, 3, 9, 11)]
    assert_colors(list(read_images(picked, RES, threads=2)), [0, 2, 3, 9, 11])
    assert calls == [[0], [2]]


def test_corrupt_parquet_shard_raises_naming_it(tmp_path):
    (tmp_path / "train-00000-of-00001.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(SourceError, match="train-00000-of-00001.parquet"):
        plan_samples(str(tmp_path))
    ref = SampleRef("x#0", 0, str(tmp_path / "train-00000-of-00001.parquet"), "0")
    with pytest.raises(SourceError, match="train-00000-of-00001.parquet"):
        list(read_images([ref], RES))


def test_glob_source_and_missing_sources(tmp_path):
    imagegen.write_parquet_shards(tmp_path / "data", 2, 2, prefix="train")
    imagegen.write_parquet_shards(tmp_path / "data", 1, 3, prefix="validation")
    plan = plan_samples(str(tmp_path / "data" / "train-*.parquet"))
    assert [r.sample_id for r in plan.refs][:1] == ["train-00000-of-00002.parquet#0"] and len(plan.refs) == 4
    with pytest.raises(SourceNotFoundError, match="nowhere"):
        plan_samples(str(tmp_path / "nowhere"))
    with pytest.raises(SourceNotFoundError, match=r"test-\*"):
        plan_samples(str(tmp_path / "data" / "test-*.parquet"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("hi")
    with pytest.raises(SourceError, match="no Parquet, .tar or image files"):
        plan_samples(str(tmp_path / "empty"))


def test_threads_keep_order_and_values(tmp_path):
    imagegen.write_parquet_shards(tmp_path, 2, 15, row_group_size=4)
    refs = plan_samples(str(tmp_path)).refs
    one = list(read_images(refs, RES, threads=1))
    three = list(read_images(refs, RES, threads=3))
    assert [r.index for r in three] == list(range(30))
    for a, b in zip(one, three, strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)
    with pytest.raises(SourceError, match="threads"):
        list(read_images(refs, RES, threads=0))


# ---- ILSVRC folders ---------------------------------------------------------------------------------------------


def test_folder_labels_from_sorted_synset_dirs(tmp_path):
    train = imagegen.write_ilsvrc_folders(tmp_path, synsets=("n03000000", "n01000000", "n02000000"), per_class=2)
    plan = plan_samples(str(train))
    assert plan.format == "folder" and plan.class_names == ["n01000000", "n02000000", "n03000000"]
    assert [r.sample_id for r in plan.refs][:3] == ["n01000000/n01000000_0.JPEG", "n01000000/n01000000_1.JPEG",
                                                    "n02000000/n02000000_0.JPEG"]
    assert [r.label for r in plan.refs] == [0, 0, 1, 1, 2, 2]
    assert_colors(list(read_images(plan.refs, RES, threads=2)), range(6))


def test_folder_labels_from_synset_mapping_above(tmp_path):
    mapping = ["n09000000", "n03000000", "n05000000", "n01000000"]
    train = imagegen.write_ilsvrc_folders(tmp_path, synsets=("n01000000", "n03000000"), per_class=1, mapping=mapping)
    plan = plan_samples(str(train))
    assert [r.label for r in plan.refs] == [3, 1]
    assert plan.class_names == ["class 0", "class 1", "class 2", "class 3"]
    assert [r.label for r in plan_samples(str(train), classes=[1]).refs] == [1]
    (train / "n07000000").mkdir()
    (train / "n07000000" / "x.JPEG").write_bytes(imagegen.default_image(0))
    with pytest.raises(SourceError, match="n07000000"):
        plan_samples(str(train))


# ---- WebDataset -------------------------------------------------------------------------------------------------


def test_webdataset_offsets_labels_and_ranged_reads(tmp_path):
    paths = imagegen.write_webdataset_tars(tmp_path, 2, 3)
    plan = plan_samples(str(tmp_path))
    assert plan.format == "webdataset" and plan.class_names is None
    assert [r.sample_id for r in plan.refs][:2] == ["shard-00000.tar#sample000000.jpg", "shard-00000.tar#sample000001.jpg"]
    assert [r.label for r in plan.refs] == [i % 5 for i in range(6)]
    for i, ref in enumerate(plan.refs):
        raw = paths[i // 3].read_bytes()
        assert raw[ref.offset : ref.offset + ref.size] == imagegen.default_image(i)
    assert_colors(list(read_images(plan.refs[::-1], RES)), range(5, -1, -1))


def test_webdataset_without_labels_and_truncated_tar(tmp_path):
    (path,) = imagegen.write_webdataset_tars(tmp_path, 1, 3, label_fn=None, ext="png",
                                             image_fn=lambda i: imagegen.encode(np.full((8, 12, 3), i, np.uint8), "PNG"))
    plan = plan_samples(str(tmp_path))
    assert [r.label for r in plan.refs] == [-1, -1, -1]
    last = plan.refs[-1]
    path.write_bytes(path.read_bytes()[: last.offset + 5])  # cut inside the last image
    results = list(read_images(plan.refs, RES))
    assert [int(r.pixels[0, 0, 0]) for r in results[:2]] == [0, 1]
    assert results[2].pixels is None and "truncated" in results[2].error
    (tmp_path / "shard-00000.tar").write_bytes(b"\x1f\x8b compressed?")
    with pytest.raises(SourceError, match="shard-00000.tar"):
        plan_samples(str(tmp_path))


# ---- fsspec URLs ------------------------------------------------------------------------------------------------


def test_memory_filesystem_urls(tmp_path):
    fs = fsspec.filesystem("memory")
    for path in imagegen.write_parquet_shards(tmp_path / "pq", 2, 3, row_group_size=2):
        fs.pipe(f"/sdfeat-test/pq/{path.name}", path.read_bytes())
    for path in imagegen.write_webdataset_tars(tmp_path / "wds", 1, 2):
        fs.pipe(f"/sdfeat-test/wds/{path.name}", path.read_bytes())
    try:
        plan = plan_samples("memory://sdfeat-test/pq")
        assert plan.refs[4].sample_id == "train-00001-of-00002.parquet#1"
        assert plan.refs[4].file.startswith("memory://")
        assert_colors(list(read_images(plan.refs, RES)), range(6))
        tars = plan_samples("memory://sdfeat-test/wds/*.tar")
        assert tars.refs[1].sample_id == "shard-00000.tar#sample000001.jpg"
        assert_colors(list(read_images(tars.refs, RES, threads=2)), range(2))
    finally:
        fs.rm("/sdfeat-test", recursive=True)


# ---- synthetic --------------------------------------------------------------------------------------------------


def test_synthetic_plan_and_read():
    plan = plan_samples("synthetic:24", classes=[2, 4], limit=5)
    assert plan.format == "synthetic" and plan.class_names == CLASS_NAMES
    assert [r.sample_id for r in plan.refs] == ["synthetic#00002", "synthetic#00004", "synthetic#00007",
                                                "synthetic#00009", "synthetic#00012"]
    results = list(read_images(plan_samples("synthetic:24").refs, 256, threads=2))
    assert len(results) == 24 and all(r.pixels.shape == (256, 256, 3) for r in results)
    with pytest.raises(SourceError, match="synthetic:N"):
        plan_samples("synthetic:0")


def test_synthetic_images_are_pinned_non_square_and_varied():
    digest = hashlib.sha256(b"".join(synthetic_array(i).tobytes() for i in range(10))).hexdigest()
    assert digest[:16] == PINNED_SYNTHETIC_DIGEST  # same bytes on every machine and version
    sizes = [synthetic_size(i) for i in range(200)]
    assert all(abs(w - h) >= 32 for w, h in sizes)
    assert len(set(sizes)) > 150
    assert synthetic_array(7).shape == (synthetic_size(7)[1], synthetic_size(7)[0], 3)


PINNED_SYNTHETIC_DIGEST = "65eb942a91719bb7"


# ---- how a ref is read: decided once, when planning -------------------------------------------------------------


def _noise_png(index: int) -> bytes:
    """PNG bytes (lossless, so pixels compare exactly) of a noise image 40..56 x 24..36 px; sources name it JPEG."""
    width, height = 40 + 8 * (index % 3), 24 + 6 * (index % 3)
    return imagegen.encode(np.random.default_rng(index).integers(0, 256, (height, width, 3), np.uint8), "PNG")


def _paper_crop(pixels: np.ndarray) -> np.ndarray:
    """The paper's centre crop written out: the central square of side 2 * (min(w, h) // 2), resized to RES."""
    height, width = pixels.shape[:2]
    half = min(width, height) // 2
    top, left = height // 2 - half, width // 2 - half
    return np.asarray(Image.fromarray(pixels[top : top + 2 * half, left : left + 2 * half]).resize((RES, RES)))


def _layouts(tmp_path) -> dict[str, tuple[str, list]]:
    """{name: (source, expected pixels per ref or None for a failed one)}. Every image is PNG bytes under a JPEG
    name: a .JPEG file, a .jpg tar member, an HF struct whose `path` says .JPEG, a plain binary column."""
    noise = [np.asarray(Image.open(io.BytesIO(_noise_png(i)))) for i in range(6)]
    imagegen.write_parquet_shards(tmp_path / "struct", 2, 3, row_group_size=2, image_fn=_noise_png)
    binary = pa.table({"image": pa.array([_noise_png(i) for i in range(3)], pa.binary()), "label": [0, 1, 2]})
    (tmp_path / "binary").mkdir()
    pq.write_table(binary, tmp_path / "binary" / "images.parquet")
    train = imagegen.write_ilsvrc_folders(tmp_path / "folder", per_class=2, image_fn=_noise_png, suffix=".JPEG")
    os.symlink(tmp_path / "missing.JPEG", train / "n01440764" / "n01440764_2.JPEG")  # planned as a failure row
    imagegen.write_webdataset_tars(tmp_path / "wds", 2, 2, image_fn=_noise_png, ext="jpg")
    return {
        "parquet": (str(tmp_path / "struct"), [_paper_crop(p) for p in noise]),
        "parquet (binary column)": (str(tmp_path / "binary"), [_paper_crop(p) for p in noise[:3]]),
        "folder": (str(train), [_paper_crop(p) for p in noise[:2]] + [None] + [_paper_crop(p) for p in noise[2:]]),
        "webdataset": (str(tmp_path / "wds"), [_paper_crop(p) for p in noise[:4]]),
        "synthetic": ("synthetic:3", [_paper_crop(synthetic_array(i)) for i in range(3)]),
    }


def test_refs_read_as_planned_also_when_rebuilt_from_the_manifest(tmp_path):
    """Planning records how each image is read (`SampleRef.kind`: the layout, or "error" for a failure row); the
    workers rebuild refs from the store's manifest and must read them the same way. The images are PNG bytes
    under JPEG names and metadata: the encoding comes from the bytes, the way of reading from the plan."""
    from sdfeat import store
    from sdfeat.sources.refs import manifest_table

    for name, (source, expected) in _layouts(tmp_path).items():
        plan = plan_samples(source)
        assert [r.kind for r in plan.refs] == [plan.format if e is not None else "error" for e in expected], name
        output = str(tmp_path / "stores" / name.split()[0])
        store.write_manifest(output, manifest_table(plan.refs))
        rebuilt = [SampleRef(**row) for row in store.read_manifest(output).to_pylist()]  # as extract's workers do
        assert rebuilt == plan.refs, name
        for refs in (plan.refs, rebuilt):
            results = list(read_images(refs, RES, threads=2))
            assert [r.error is None for r in results] == [e is not None for e in expected], name
            for result, pixels in zip(results, expected, strict=True):
                if pixels is not None:
                    np.testing.assert_array_equal(result.pixels, pixels, err_msg=name)
                else:
                    assert "not a regular file" in result.error, name
