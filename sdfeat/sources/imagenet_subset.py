"""Rebuild the paper's 500-image ImageNet subset (PROTOCOL.md, "Data") from any supported source layout.

Walk the source in its stored order (restricted to the paper's five classes); keep an image while its class has
fewer than `per_class` kept and `min(w, h) >= min_side` (the size comes from the image header, nothing is
decoded); stop at `total`. The result is one HF-style Parquet shard holding the original encoded bytes (so
extraction applies the paper's crop itself), labels re-indexed 0..4 in the order of `classes`, and a
`manifest.csv` tying every row to its source image. `sdfeat imagenet-subset --source PATH -o DIR` calls
`build_paper_subset`; the output directory is itself a valid `source`.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from sdfeat.errors import SourceError
from sdfeat.sources import plan_samples, read_image_bytes
from sdfeat.sources.decode import ImageDecodeError, image_size

PAPER_CLASSES = (235, 242, 282, 717, 980)  # German shepherd, boxer, tiger cat, pickup, volcano
SHARD_NAME = "train-00000-of-00001.parquet"
MANIFEST_NAME = "manifest.csv"
_ROW_GROUP_ROWS = 100

log = logging.getLogger(__name__)


def build_paper_subset(
    source: str,
    out_dir: str | Path,
    per_class: int = 100,
    classes: Sequence[int] = PAPER_CLASSES,
    min_side: int = 350,
    total: int = 500,
) -> Path:
    """Write `out_dir/train-00000-of-00001.parquet` and `out_dir/manifest.csv`; returns the Parquet path."""
    if not classes or len(set(classes)) != len(classes):
        raise SourceError(f"classes must be a non-empty list of distinct label indices, got {list(classes)}")
    if per_class < 1 or total < 1 or min_side < 0:
        raise SourceError(f"per_class and total must be >= 1 and min_side >= 0 (got {per_class}, {total}, {min_side})")
    plan = plan_samples(source, classes=classes)
    new_label = {original: i for i, original in enumerate(classes)}
    kept_per_class = dict.fromkeys(classes, 0)
    images: list[dict] = []
    manifest: list[dict] = []
    for index, data, reason in read_image_bytes(plan.refs):
        ref = plan.refs[index]
        if ref.label not in kept_per_class:  # an unreadable part of the source, its class unknown
            log.warning("imagenet-subset: skipping %s (%s)", ref.sample_id, reason)
            continue
        if kept_per_class[ref.label] >= per_class:
            continue
        size = None
        if data is not None:
            try:
                size = image_size(data)
            except ImageDecodeError as err:
                reason = str(err)
        if size is None:
            log.warning("imagenet-subset: skipping %s (%s)", ref.sample_id, reason)
            continue
        if min(size) < min_side:
            continue
        kept_per_class[ref.label] += 1
        images.append({"bytes": data, "path": ref.sample_id})
        manifest.append({"index": len(manifest), "sample_id": ref.sample_id, "original_label": ref.label,
                         "label": new_label[ref.label], "width": size[0], "height": size[1]})
        if len(manifest) == total or all(n >= per_class for n in kept_per_class.values()):
            break
    if len(manifest) < total:
        short = ", ".join(f"{c}: {kept_per_class[c]}/{per_class}" for c in classes if kept_per_class[c] < per_class)
        log.warning("imagenet-subset: source '%s' gave only %d of %d images; short per class (kept/wanted, min "
                    "side %d): %s", source, len(manifest), total, min_side, short)

    names = [plan.class_names[c] if plan.class_names and c < len(plan.class_names) else str(c) for c in classes]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard = out / SHARD_NAME
    pq.write_table(_hf_table(images, [m["label"] for m in manifest], names), shard, row_group_size=_ROW_GROUP_ROWS)
    with open(out / MANIFEST_NAME, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["index", "sample_id", "original_label", "label", "width", "height"])
        writer.writeheader()
        writer.writerows(manifest)
    return shard


def _hf_table(images: list[dict], labels: list[int], class_names: list[str]) -> pa.Table:
    """The HF imagenet-1k schema, with ClassLabel names in the `huggingface` metadata (read by plan_samples)."""
    features = {"image": {"_type": "Image"}, "label": {"names": class_names, "_type": "ClassLabel"}}
    schema = pa.schema(
        [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    return pa.table({"image": images, "label": labels}, schema=schema)
