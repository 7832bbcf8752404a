"""Image sources: plan which images a job covers (cheaply, in a deterministic order) and read them back.

`plan_samples` turns a `source` (a local path, glob or fsspec URL such as s3://..., or `synthetic:N`) into a
`SamplePlan`: one `SampleRef` per image, in the order that becomes the store's row order. Planning never reads
image bytes: Parquet via row-group metadata and the `label` column only, tars via their headers. `read_images`
(`reading`, run by the workers) fetches each ref's bytes the way its `SampleRef.kind` says and decodes them.

Modules: `refs` (SampleRef, SamplePlan, DecodedImage), `listing` (which files, which layout; regular-file checks),
one per layout (`parquet`, `webdataset`, `folder`: planning and that layout's loaders), `reading` (dispatch and
decoding). This module holds `plan_samples` and re-exports the public names.

Nothing vanishes: what planning finds unreadable becomes a ref with an `error` (a placeholder row that ends as a
failure row): a file that is not a regular file (named pipe, socket, broken or looping link), a tar or Parquet
file that cannot be read at all or only partly (the readable members / row groups are kept), a tar sample
without an image or with a non-integer `.cls`. Only a source with nothing readable at all is refused. Hidden
entries (`.x`, `._x` resource forks, `.DS_Store`) and `__MACOSX/` are not part of any source.

Layouts (`source_format: auto` takes the one present; files of two layouts at once are refused as ambiguous):
- parquet: HF imagenet-1k style, column `image` = struct{bytes, path} or plain binary, column `label` (optional;
  integers, or integral floats / integer strings, which are converted); class names from the ClassLabel in the
  `huggingface` schema metadata. Other schemas are refused while planning. sample_id `<file>#<row>`.
- webdataset: uncompressed `.tar` shards; members grouped by key (path up to the first dot of the basename);
  the first member in a format the decoder reads (`decode.IMAGE_EXTENSIONS`: jpg, png, webp, bmp, gif, tiff, ...)
  is the image, `.cls` holds the integer label. sample_id `<file>#<member>` (`<file>#<key>` without an image).
- folder: ILSVRC synset directories (`n01440764/x.JPEG`): the label is the synset's line index in
  `LOC_synset_mapping.txt` when that file sits in the root or up to 3 directories above it (class names from its
  lines), else the index of the directory among the sorted class directories found (class names = their names).
  Images directly in the root get label -1. sample_id = the relative path.
Order: files sorted by relative path (path components compared in turn), then rows / tar members in file order.
Sample ids are relative to the source root (the directory, or the glob's fixed prefix) so they are stable across
machines and mounts. An image's encoding (JPEG, PNG, ...) is never taken from a name: the decoder sniffs the bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from sdfeat.errors import SourceError
from sdfeat.sources import folder, parquet, webdataset
from sdfeat.sources.decode import center_crop_resize
from sdfeat.sources.folder import SYNSET_MAPPING
from sdfeat.sources.listing import FORMAT_SUFFIXES, IMAGE_SUFFIXES, list_source, select_format
from sdfeat.sources.reading import read_image_bytes, read_images
from sdfeat.sources.refs import DecodedImage, SamplePlan, SampleRef
from sdfeat.sources.synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from sdfeat.sources.synthetic import SYNTHETIC_FILE, parse_synthetic, synthetic_label
from sdfeat.sources.webdataset import TAR_IMAGE_EXTENSIONS

__all__ = ["SampleRef", "SamplePlan", "DecodedImage", "plan_samples", "read_images", "read_image_bytes",
           "center_crop_resize", "FORMAT_SUFFIXES", "IMAGE_SUFFIXES", "TAR_IMAGE_EXTENSIONS", "SYNSET_MAPPING"]


def _plan_synthetic(n: int) -> tuple[Iterator[SampleRef], list[str]]:
    refs = (SampleRef(f"synthetic#{i:05d}", synthetic_label(i), SYNTHETIC_FILE, str(i)) for i in range(n))
    return refs, list(SYNTHETIC_CLASS_NAMES)


def plan_samples(
    source: str, source_format: str = "auto", limit: int | None = None, classes: Iterable[int] | None = None
) -> SamplePlan:
    """The refs of `source` in the deterministic order, filtered to `classes` (label indices), then cut to the
    first `limit`. Stops reading labels once `limit` refs are found."""
    if limit is not None and limit < 1:
        raise SourceError(f"limit must be >= 1, got {limit}")
    n_synthetic = parse_synthetic(source)
    if n_synthetic is not None:
        if source_format not in ("auto", "synthetic"):
            raise SourceError(f"source '{source}' is synthetic but source_format is '{source_format}'")
        fmt, (refs, class_names) = "synthetic", _plan_synthetic(n_synthetic)
    else:
        if source_format == "synthetic":
            raise SourceError(f"source_format is 'synthetic' but source '{source}' is not synthetic:N")
        listing = list_source(source)
        fmt = select_format(source, listing, source_format)
        if fmt == "parquet":
            refs, class_names = parquet.plan(listing)
        elif fmt == "folder":
            refs, class_names = folder.plan(listing)
        else:
            refs, class_names = webdataset.plan(listing), None
    if classes is not None:  # unreadable parts of unknown class stay: they may hold images of these classes
        wanted = set(classes)
        refs = (r for r in refs if r.label in wanted or (r.error and r.label == -1))
    plan = SamplePlan(list(itertools.islice(refs, limit)), class_names, fmt)
    if plan.refs and all(r.error for r in plan.refs):
        raise SourceError(f"source '{source}': nothing readable ({len(plan.refs)} unusable sample(s), e.g. "
                          f"{plan.refs[0].error})")
    return plan
