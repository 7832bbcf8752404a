"""What planning hands to reading: `SampleRef` (where one image lies and how it is read), `SamplePlan`, and what
reading yields, `DecodedImage`; plus the tiny loaders every layout's reader shares.

The layout modules (`parquet`, `webdataset`, `folder`) build refs when planning and turn runs of refs back into
loaders when reading; `reading` dispatches on `SampleRef.kind`, the one place that says how a ref is read. The
store's manifest keeps a ref's fields (not `kind`), so a ref rebuilt from a manifest row reads as planned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from sdfeat.sources.decode import ImageDecodeError
from sdfeat.sources.synthetic import SYNTHETIC_FILE

if TYPE_CHECKING:
    import pyarrow as pa

REASON_CHARS = 200


@dataclass(frozen=True)
class SampleRef:
    sample_id: str  # "<file>#<row>" (parquet), "<file>#<member>" (tar), relative path (folder), "synthetic#<i>"
    label: int  # -1 where unknown
    file: str  # path or fsspec URL of the containing file ("synthetic" for generated images)
    member: str  # parquet: row index as str ; tar: member name ; synthetic: image index ; folder: ""
    offset: int = -1  # tar: byte offset of the member's data ; else -1
    size: int = -1  # tar: member size in bytes ; else -1
    error: str = ""  # set when planning already knows the sample is unusable: it becomes a failure row

    @property
    def kind(self) -> str:
        """How the image is read: the layout its planner recorded in the fields above ("parquet": a row of a
        Parquet file, "webdataset": a tar member at `offset`, "folder": a whole image file, "synthetic": generated),
        or "error" for a ref that planning found unusable (never read). Derived from the fields, so a ref rebuilt
        from a store's manifest row reads exactly as the planned one."""
        if self.error:
            return "error"
        if self.file == SYNTHETIC_FILE:
            return "synthetic"
        if self.offset >= 0:
            return "webdataset"
        return "parquet" if self.member else "folder"


@dataclass
class SamplePlan:
    refs: list[SampleRef]  # in the deterministic sample order; index = store row
    class_names: list[str] | None
    format: str  # "parquet" | "webdataset" | "folder" | "synthetic": the `kind` of every usable ref


@dataclass
class DecodedImage:
    index: int  # position in the refs passed to read_images
    pixels: np.ndarray | None  # uint8 (resolution, resolution, 3)
    error: str | None  # short reason when pixels is None


def manifest_table(refs: list[SampleRef]) -> pa.Table:
    """The store manifest of `refs` (`store.write_manifest`): one row per store row, every field of a ref but
    `kind` (derived); a ref planned unusable keeps its `error` (a failure row, never opened). `manifest_refs`
    reads it back."""
    import pyarrow as pa

    return pa.table({
        "sample_id": [r.sample_id for r in refs], "label": pa.array([r.label for r in refs], pa.int64()),
        "file": [r.file for r in refs], "member": [r.member for r in refs],
        "offset": pa.array([r.offset for r in refs], pa.int64()), "size": pa.array([r.size for r in refs], pa.int64()),
        "error": pa.array([r.error for r in refs], pa.string()),
    })


def manifest_refs(table: pa.Table) -> list[SampleRef]:
    """The refs of a store manifest's rows (`store.read_manifest`, or a slice of it) in row order, `error` included:
    a row planned unusable stays a failure ref (never opened). The one way back from manifest rows to refs."""
    names = [f.name for f in fields(SampleRef) if f.name in table.column_names]  # older stores: no `error`
    return [SampleRef(**row) for row in table.select(names).to_pylist()]


Loader = Callable[[], "bytes | Image.Image"]  # runs in a decode thread


def given(data: bytes) -> bytes:
    return data


def failed(reason: str) -> bytes:
    raise ImageDecodeError(reason)


def one_line(err: BaseException | str) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:REASON_CHARS]
