"""Image sources: plan which images a job covers (cheaply, in a deterministic order) and read them back.

`plan_samples` turns a `source` (a local path, glob or fsspec URL such as s3://..., or `synthetic:N`) into a
`SamplePlan`: one `SampleRef` per image, in the order that becomes the store's row order. Planning never reads
image bytes: Parquet via row-group metadata and the `label` column only, tars via their headers.
`read_images` (run by the workers) fetches each ref's bytes - a Parquet file's needed row groups once per run of
refs, a tar member by a ranged read of its offset and size - and decodes them (`sdfeat.decode`), optionally in
threads, yielding results in ref order. One bad image becomes a failed `DecodedImage`; a whole unreadable file
raises `SourceError` naming it.

Layouts (`source_format: auto` picks the first present: Parquet, then tars, then image files):
- parquet: HF imagenet-1k style, column `image` = struct{bytes, path}, int column `label` (optional); class
  names from the ClassLabel in the `huggingface` schema metadata. sample_id `<file>#<row>`.
- webdataset: uncompressed `.tar` shards; members grouped by key (path up to the first dot of the basename);
  the first `.jpg`/`.jpeg`/`.png` member is the image, `.cls` holds the integer label. sample_id `<file>#<member>`.
- folder: ILSVRC synset directories (`n01440764/x.JPEG`): the label is the synset's line index in
  `LOC_synset_mapping.txt` when that file sits in the root or up to 3 directories above it (class names from its
  lines), else the index of the directory among the sorted class directories found (class names = their names).
  Images directly in the root get label -1. sample_id = the relative path.
Order: files sorted by relative path (path components compared in turn), then rows / tar members in file order.
Sample ids are relative to the source root (the directory, or the glob's fixed prefix) so they are stable across
machines and mounts.
"""

from __future__ import annotations

import bisect
import itertools
import json
import tarfile
from collections import deque
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem
from PIL import Image

from sdfeat.decode import ImageDecodeError, center_crop_resize, decode_rgb
from sdfeat.errors import SourceError, SourceNotFoundError
from sdfeat.synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from sdfeat.synthetic import SYNTHETIC_FILE, parse_synthetic, synthetic_image, synthetic_label, synthetic_png

__all__ = ["SampleRef", "SamplePlan", "DecodedImage", "plan_samples", "read_images", "read_image_bytes",
           "center_crop_resize"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
FORMAT_SUFFIXES = {"parquet": (".parquet",), "webdataset": (".tar",), "folder": IMAGE_SUFFIXES}
SYNSET_MAPPING = "LOC_synset_mapping.txt"
_MAPPING_LEVELS_UP = 3
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class SampleRef:
    sample_id: str  # "<file>#<row>" (parquet), "<file>#<member>" (tar), relative path (folder), "synthetic#<i>"
    label: int  # -1 where unknown
    file: str  # path or fsspec URL of the containing file ("synthetic" for generated images)
    member: str  # parquet: row index as str ; tar: member name ; synthetic: image index ; folder: ""
    offset: int = -1  # tar: byte offset of the member's data ; else -1
    size: int = -1  # tar: member size in bytes ; else -1


@dataclass
class SamplePlan:
    refs: list[SampleRef]  # in the deterministic sample order; index = store row
    class_names: list[str] | None
    format: str  # "parquet" | "webdataset" | "folder" | "synthetic"


@dataclass
class DecodedImage:
    index: int  # position in the refs passed to read_images
    pixels: np.ndarray | None  # uint8 (resolution, resolution, 3)
    error: str | None  # short reason when pixels is None


@dataclass
class _Listing:
    fs: AbstractFileSystem
    root: str  # fs path that sample ids are relative to
    files: list[str]  # fs paths, sorted by relative path

    def relative(self, path: str) -> str:
        prefix = self.root.rstrip("/") + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path.rsplit("/", 1)[-1]

    def url(self, path: str) -> str:
        """A string that `fsspec.core.url_to_fs` maps back to this file (plain path for local files)."""
        return path if _is_local(self.fs) else self.fs.unstrip_protocol(path)


def _is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def _list_source(source: str) -> _Listing:
    fs, path = fsspec.core.url_to_fs(source)
    glob_at = min((path.index(c) for c in _GLOB_CHARS if c in path), default=-1)
    if glob_at >= 0:
        files = fs.glob(path)
        root = path[:glob_at].rsplit("/", 1)[0] if "/" in path[:glob_at] else ""
    elif fs.isdir(path):
        files, root = fs.find(path), path
    elif fs.isfile(path):
        files, root = [path], path.rsplit("/", 1)[0] if "/" in path else ""
    else:
        files, root = [], path
    if not files:
        raise SourceNotFoundError(f"source '{source}': no such file or directory, or the glob matches nothing")
    listing = _Listing(fs, root, [])
    listing.files = sorted(files, key=lambda f: listing.relative(f).split("/"))
    return listing


def _select_format(source: str, listing: _Listing, source_format: str) -> str:
    candidates = list(FORMAT_SUFFIXES) if source_format == "auto" else [source_format]
    for fmt in candidates:
        if fmt not in FORMAT_SUFFIXES:
            raise SourceError(f"source_format '{source_format}' is not one of auto, {', '.join(FORMAT_SUFFIXES)}")
        files = [f for f in listing.files if f.lower().endswith(FORMAT_SUFFIXES[fmt])]
        if files:
            listing.files = files
            return fmt
    wanted = "Parquet, .tar or image" if source_format == "auto" else source_format
    raise SourceError(f"source '{source}': no {wanted} files found")


@contextmanager
def _open_parquet(fs: AbstractFileSystem, path: str, url: str) -> Iterator[pq.ParquetFile]:
    try:
        handle = fs.open(path, "rb")
    except OSError as err:
        raise SourceError(f"{url}: unreadable Parquet file ({err})") from err
    with handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as err:
            raise SourceError(f"{url}: unreadable Parquet file ({err})") from err
        if "image" not in parquet.schema_arrow.names:
            raise SourceError(f"{url}: Parquet file has no 'image' column")
        yield parquet


def _hf_class_names(parquet: pq.ParquetFile) -> list[str] | None:
    metadata = parquet.schema_arrow.metadata or {}
    if b"huggingface" not in metadata:
        return None
    label = json.loads(metadata[b"huggingface"]).get("info", {}).get("features", {}).get("label", {})
    return list(label["names"]) if label.get("_type") == "ClassLabel" and "names" in label else None


def _plan_parquet(listing: _Listing) -> tuple[Iterator[SampleRef], list[str] | None]:
    def refs() -> Iterator[SampleRef]:
        for path in listing.files:
            url, rel = listing.url(path), listing.relative(path)
            with _open_parquet(listing.fs, path, url) as parquet:
                n_rows = sum(parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups))
                try:
                    if "label" in parquet.schema_arrow.names:
                        labels = parquet.read(columns=["label"]).column("label").to_pylist()
                    else:
                        labels = [None] * n_rows
                except (pa.ArrowException, OSError) as err:
                    raise SourceError(f"{url}: unreadable 'label' column ({err})") from err
            for row, label in enumerate(labels):
                yield SampleRef(f"{rel}#{row}", -1 if label is None else int(label), url, str(row))

    first = listing.files[0]
    with _open_parquet(listing.fs, first, listing.url(first)) as parquet:
        class_names = _hf_class_names(parquet)
    return refs(), class_names


def _synset_mapping(listing: _Listing) -> list[tuple[str, str]] | None:
    directory = listing.root
    for _ in range(_MAPPING_LEVELS_UP + 1):
        candidate = f"{directory.rstrip('/')}/{SYNSET_MAPPING}"
        if listing.fs.isfile(candidate):
            rows = [line.split(maxsplit=1) for line in listing.fs.cat_file(candidate).decode().splitlines()]
            return [(row[0], row[-1]) for row in rows if row]  # (wnid, "tench, Tinca tinca")
        if "/" not in directory.rstrip("/"):
            return None
        directory = directory.rstrip("/").rsplit("/", 1)[0] or "/"
    return None


def _plan_folder(listing: _Listing) -> tuple[Iterator[SampleRef], list[str]]:
    relatives = [listing.relative(f) for f in listing.files]
    class_dirs = sorted({rel.split("/", 1)[0] for rel in relatives if "/" in rel})
    mapping = _synset_mapping(listing)
    if mapping is None:
        class_names, index = class_dirs, {d: i for i, d in enumerate(class_dirs)}
    else:
        class_names, index = [name for _, name in mapping], {wnid: i for i, (wnid, _) in enumerate(mapping)}
        unknown = [d for d in class_dirs if d not in index]
        if unknown:
            raise SourceError(f"directory '{unknown[0]}' under '{listing.root}' is not a synset in {SYNSET_MAPPING}")

    def refs() -> Iterator[SampleRef]:
        for path, rel in zip(listing.files, relatives):
            label = index[rel.split("/", 1)[0]] if "/" in rel else -1
            yield SampleRef(rel, label, listing.url(path), "")

    return refs(), class_names


def _split_key(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return f"{directory}/{stem}" if directory else stem, ext.lower()


def _plan_tar(listing: _Listing, path: str) -> Iterator[SampleRef]:
    url, rel = listing.url(path), listing.relative(path)
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, int] = {}
    try:
        with listing.fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                key, ext = _split_key(member.name)
                if member.isfile() and ext in TAR_IMAGE_EXTENSIONS:
                    images.setdefault(key, member)
                elif member.isfile() and ext == "cls":
                    labels[key] = int(tar.extractfile(member).read().decode().strip())
    except (tarfile.TarError, OSError, ValueError) as err:
        raise SourceError(f"{url}: unreadable WebDataset tar ({err})") from err
    for key, member in images.items():
        yield SampleRef(f"{rel}#{member.name}", labels.get(key, -1), url, member.name, member.offset_data, member.size)


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
        listing = _list_source(source)
        fmt = _select_format(source, listing, source_format)
        if fmt == "parquet":
            refs, class_names = _plan_parquet(listing)
        elif fmt == "folder":
            refs, class_names = _plan_folder(listing)
        else:
            refs = itertools.chain.from_iterable(_plan_tar(listing, f) for f in listing.files)
            class_names = None
    if classes is not None:
        wanted = set(classes)
        refs = (r for r in refs if r.label in wanted)
    return SamplePlan(list(itertools.islice(refs, limit)), class_names, fmt)


# ---- reading ---------------------------------------------------------------------------------------------------

Loader = Callable[[], "bytes | Image.Image"]  # runs in a decode thread


def _given(data: bytes) -> bytes:
    return data


def _failed(reason: str) -> bytes:
    raise ImageDecodeError(reason)


def _whole_file(url: str) -> bytes:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.cat_file(path)
    except OSError as err:
        raise ImageDecodeError(f"unreadable file: {err}"[:120]) from err


def _kind(ref: SampleRef) -> str:
    if ref.file == SYNTHETIC_FILE:
        return "synthetic"
    if ref.offset >= 0:
        return "tar"
    return "parquet" if ref.member else "folder"


def _parquet_loaders(run: list[tuple[int, SampleRef]]) -> Iterator[tuple[int, Loader]]:
    """Reads each needed row group of one file once (refs in row order; a row group is re-read only when the refs
    jump back to it) and keeps only the current one in memory."""
    url = run[0][1].file
    fs, path = fsspec.core.url_to_fs(url)
    with _open_parquet(fs, path, url) as parquet:
        yield from _row_group_loaders(parquet, url, run)


def _row_group_loaders(
    parquet: pq.ParquetFile, url: str, run: list[tuple[int, SampleRef]]
) -> Iterator[tuple[int, Loader]]:
    ends = list(itertools.accumulate(parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)))
    loaded_group, image_bytes = -1, None
    for index, ref in run:
        row = int(ref.member)
        group = bisect.bisect_right(ends, row)
        if group >= len(ends):
            raise SourceError(f"{url}: row {row} is out of range ({ends[-1] if ends else 0} rows)")
        if group != loaded_group:
            try:
                column = parquet.read_row_group(group, columns=["image"]).column("image")
                image_bytes = pc.struct_field(column, "bytes")  # ChunkedArray of binary
            except (pa.ArrowException, OSError) as err:
                raise SourceError(f"{url}: unreadable row group {group} ({err})") from err
            loaded_group = group
        data = image_bytes[row - (ends[group - 1] if group else 0)].as_py()
        yield index, partial(_given, data) if data is not None else partial(_failed, "no image bytes in row")


def _tar_loaders(run: list[tuple[int, SampleRef]]) -> Iterator[tuple[int, Loader]]:
    url = run[0][1].file
    try:
        fs, path = fsspec.core.url_to_fs(url)
        handle = fs.open(path, "rb")
    except OSError as err:
        raise SourceError(f"{url}: unreadable WebDataset tar ({err})") from err
    with handle:
        for index, ref in run:
            handle.seek(ref.offset)
            data = handle.read(ref.size)
            short = len(data) < ref.size
            yield index, partial(_failed, "truncated tar member") if short else partial(_given, data)


def _loaders(refs: Sequence[SampleRef]) -> Iterator[tuple[int, Loader]]:
    """(index, loader) in ref order; consecutive refs of one file share one open file."""
    for (_, kind), group in itertools.groupby(enumerate(refs), key=lambda item: (item[1].file, _kind(item[1]))):
        run = list(group)
        if kind == "parquet":
            yield from _parquet_loaders(run)
        elif kind == "tar":
            yield from _tar_loaders(run)
        elif kind == "synthetic":
            yield from ((index, partial(synthetic_image, int(ref.member))) for index, ref in run)
        else:
            yield from ((index, partial(_whole_file, ref.file)) for index, ref in run)


def _decode(index: int, load: Loader, resolution: int) -> DecodedImage:
    try:
        loaded = load()
        image = loaded if isinstance(loaded, Image.Image) else decode_rgb(loaded)
        return DecodedImage(index, center_crop_resize(image, resolution), None)
    except ImageDecodeError as err:
        return DecodedImage(index, None, str(err))


def read_image_bytes(refs: Sequence[SampleRef]) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(index, original encoded bytes, None) per ref in order, or (index, None, reason) for an unreadable image.
    Synthetic images come as PNG. Raises SourceError when a whole file is unreadable."""
    for index, load in _loaders(refs):
        try:
            loaded = load()
        except ImageDecodeError as err:
            yield index, None, str(err)
            continue
        yield index, synthetic_png(int(refs[index].member)) if isinstance(loaded, Image.Image) else loaded, None


def read_images(refs: Sequence[SampleRef], resolution: int, threads: int = 1) -> Iterator[DecodedImage]:
    """Decoded, centre-cropped images in ref order. `threads` > 1 decodes in a thread pool (PIL releases the GIL)
    with at most 2 * threads images in flight. Never raises for one bad image; raises SourceError when a whole
    file is unreadable."""
    if threads < 1:
        raise SourceError(f"threads must be >= 1, got {threads}")
    loaders = _loaders(refs)
    if threads == 1:
        yield from (_decode(index, load, resolution) for index, load in loaders)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdfeat-decode") as pool:
        pending: deque = deque()
        for index, load in loaders:
            pending.append(pool.submit(_decode, index, load, resolution))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
