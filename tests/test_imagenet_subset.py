"""Rebuilding the paper's subset (class quota, min side from the header, stop at total) from generated data."""

from __future__ import annotations

import csv

import pyarrow.parquet as pq
import pytest

import imagegen
from sdfeat.errors import SourceError
from sdfeat.sources import plan_samples, read_images
from sdfeat.sources.imagenet_subset import build_paper_subset

# (label, width, height) per source row, in stored order; per_class=3, min_side=30
ROWS = [
    (235, 50, 40),  # 0 keep (235: 1)
    (235, 50, 40),  # 1 unreadable bytes: skipped
    (242, 20, 40),  # 2 too small
    (235, 40, 30),  # 3 keep, min side exactly 30 (235: 2)
    (235, 40, 29),  # 4 too small by one
    (980, 60, 35),  # 5 keep
    (235, 35, 50),  # 6 keep (235: 3)
    (235, 50, 50),  # 7 class full
    (3, 50, 50),  # 8 not a paper class
    (242, 45, 31),  # 9 keep
    (717, 31, 60),  # 10 keep
    (282, 33, 33),  # 11 keep
]
KEPT = [0, 3, 5, 6, 9, 10, 11]
NEW_LABELS = [0, 0, 4, 0, 1, 3, 2]


def image(i: int) -> bytes:
    return b"junk" if i == 1 else imagegen.solid_jpeg(ROWS[i][1], ROWS[i][2], imagegen.color_for(i))


def label(i: int) -> int:
    return ROWS[i][0]


@pytest.fixture(params=["parquet", "webdataset"])
def source(request, tmp_path) -> tuple[str, str]:
    if request.param == "parquet":
        names = [f"name {c}" for c in range(1000)]
        imagegen.write_parquet_shards(tmp_path / "src", 2, 6, row_group_size=4, image_fn=image, label_fn=label,
                                      class_names=names)
    else:
        imagegen.write_webdataset_tars(tmp_path / "src", 3, 4, image_fn=image, label_fn=label)
    return request.param, str(tmp_path / "src")


def test_builds_the_subset_in_stored_order(source, tmp_path):
    layout, source = source
    shard = build_paper_subset(source, tmp_path / "out", per_class=3, min_side=30)
    assert shard == tmp_path / "out" / "train-00000-of-00001.parquet"
    source_ids = [r.sample_id for r in plan_samples(source).refs]
    with open(tmp_path / "out" / "manifest.csv") as handle:
        manifest = list(csv.DictReader(handle))
    assert [m["sample_id"] for m in manifest] == [source_ids[i] for i in KEPT]
    assert [int(m["index"]) for m in manifest] == list(range(len(KEPT)))
    assert [int(m["original_label"]) for m in manifest] == [ROWS[i][0] for i in KEPT]
    assert [int(m["label"]) for m in manifest] == NEW_LABELS
    assert [(int(m["width"]), int(m["height"])) for m in manifest] == [ROWS[i][1:] for i in KEPT]

    table = pq.read_table(shard)
    assert [row["bytes"] for row in table.column("image").to_pylist()] == [image(i) for i in KEPT]  # original bytes
    subset = plan_samples(str(tmp_path / "out"))  # the output directory is itself a source (manifest ignored)
    assert [r.label for r in subset.refs] == NEW_LABELS
    if layout == "parquet":  # names from the source's ClassLabel metadata, else the original label
        assert subset.class_names == ["name 235", "name 242", "name 282", "name 717", "name 980"]
    else:
        assert subset.class_names == ["235", "242", "282", "717", "980"]
    decoded = list(read_images(subset.refs, 8))
    assert all(d.pixels is not None for d in decoded)


def test_stops_at_total(source, tmp_path):
    build_paper_subset(source[1], tmp_path / "out", per_class=3, min_side=30, total=4)
    with open(tmp_path / "out" / "manifest.csv") as handle:
        assert [int(m["label"]) for m in csv.DictReader(handle)] == NEW_LABELS[:4]


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(SourceError, match="classes"):
        build_paper_subset("synthetic:5", tmp_path, classes=(1, 1))
    with pytest.raises(SourceError, match="per_class"):
        build_paper_subset("synthetic:5", tmp_path, per_class=0)
