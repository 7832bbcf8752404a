"""Image sources: plan which images a job covers (cheaply, in a deterministic order) and read them back.

`plan_samples` turns a `source` (a local path, glob or fsspec URL such as s3://..., or `synthetic:N`) into a
`SamplePlan`: one `SampleRef` per image, in the order that becomes the store's row order. Planning never reads
image bytes: Parquet via row-group metadata and the `label` column only, tars via their headers.
`read_images` (run by the workers) fetches each ref's bytes - a Parquet file's needed row groups once per run of
refs, a tar member by a ranged read of its offset and size - and decodes them (`sdfeat.decode`), optionally in
threads, yielding results in ref order. One bad image becomes a failed `DecodedImage`; a file that was readable
when planned but cannot be opened now raises `SourceError` naming it (its unit fails and is retried).

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
machines and mounts.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import json
import math
import os
import stat
import tarfile
from collections import deque
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem
from PIL import Image

from sdfeat.decode import IMAGE_EXTENSIONS, ImageDecodeError, center_crop_resize, decode_rgb
from sdfeat.errors import SourceError, SourceNotFoundError
from sdfeat.synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from sdfeat.synthetic import SYNTHETIC_FILE, parse_synthetic, synthetic_image, synthetic_label, synthetic_png

__all__ = ["SampleRef", "SamplePlan", "DecodedImage", "plan_samples", "read_images", "read_image_bytes",
           "center_crop_resize"]

IMAGE_SUFFIXES = tuple(sorted(IMAGE_EXTENSIONS))  # every format decode_rgb reads
TAR_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_SUFFIXES)
FORMAT_SUFFIXES = {"parquet": (".parquet",), "webdataset": (".tar",), "folder": IMAGE_SUFFIXES}
FORMAT_NAMES = {"parquet": "Parquet files", "webdataset": ".tar files", "folder": "image files"}
_IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
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
    error: str = ""  # set when planning already knows the sample is unusable: it becomes a failure row


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
    irregular: dict[str, str] = field(default_factory=dict)  # path -> why it is not a regular file (never opened)

    def relative(self, path: str) -> str:
        prefix = self.root.rstrip("/") + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path.rsplit("/", 1)[-1]

    def url(self, path: str) -> str:
        """A string that `fsspec.core.url_to_fs` maps back to this file (plain path for local files)."""
        return path if _is_local(self.fs) else self.fs.unstrip_protocol(path)


def _is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def _hidden(relative: str) -> bool:
    """Hidden entries, macOS resource forks (`._x`, `__MACOSX/`) and desktop litter are no part of a source."""
    return any((part.startswith(".") and part not in (".", "..")) or part in _IGNORED_NAMES
               for part in relative.split("/"))


def _irregular_reason(path: str) -> str:
    """Why a local path that is listed but not a regular file cannot be read (it is never opened)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:  # a broken or looping symbolic link
        kind = "symbolic link loop" if err.errno == errno.ELOOP else "broken link"
        return f"not a regular file: {kind} ({err.strerror})"
    kinds = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"))
    return "not a regular file: " + next((name for test, name in kinds if test(mode)), "special file")


def _find(fs: AbstractFileSystem, path: str, glob: bool) -> dict[str, dict]:
    """{path: info} of the files under `path` (or matching the glob; matched directories are searched too)."""
    found = fs.glob(path, detail=True) if glob else fs.find(path, detail=True)
    entries: dict[str, dict] = {}
    for name, info in found.items():
        if info.get("type") == "directory":
            entries.update(fs.find(name, detail=True))
        else:
            entries[name] = info
    return entries


def _list_source(source: str) -> _Listing:
    fs, path = fsspec.core.url_to_fs(source)
    glob_at = min((path.index(c) for c in _GLOB_CHARS if c in path), default=-1)
    if glob_at >= 0:
        entries = _find(fs, path, glob=True)
        root = path[:glob_at].rsplit("/", 1)[0] if "/" in path[:glob_at] else ""
    elif fs.isdir(path):
        entries, root = _find(fs, path, glob=False), path
    elif fs.isfile(path):  # named explicitly: kept even when hidden
        entries, root = {path: {"type": "file"}}, path.rsplit("/", 1)[0] if "/" in path else ""
    elif _is_local(fs) and os.path.lexists(path):  # a named pipe, socket or broken link: never opened
        raise SourceError(f"source '{source}': {_irregular_reason(path)}")
    else:
        entries, root = {}, path
    listing = _Listing(fs, root, [])
    if glob_at >= 0 or root == path:
        entries = {f: info for f, info in entries.items() if not _hidden(listing.relative(f))}
    if not entries:
        raise SourceNotFoundError(f"source '{source}': no such file or directory, or the glob matches nothing")
    listing.files = sorted(entries, key=lambda f: listing.relative(f).split("/"))
    if _is_local(fs):
        listing.irregular = {f: _irregular_reason(f) for f, info in entries.items()
                             if info.get("type") != "file" and not os.path.isfile(f)}  # links to files are files
    return listing


def _select_format(source: str, listing: _Listing, source_format: str) -> str:
    if source_format != "auto" and source_format not in FORMAT_SUFFIXES:
        raise SourceError(f"source_format '{source_format}' is not one of auto, {', '.join(FORMAT_SUFFIXES)}")
    candidates = list(FORMAT_SUFFIXES) if source_format == "auto" else [source_format]
    found = {fmt: [f for f in listing.files if f.lower().endswith(FORMAT_SUFFIXES[fmt])] for fmt in candidates}
    found = {fmt: files for fmt, files in found.items() if files}
    if len(found) > 1:
        shown = " and ".join(f"{FORMAT_NAMES[fmt]} (e.g. {listing.relative(files[0])})" for fmt, files in found.items())
        raise SourceError(f"source '{source}' is ambiguous: it holds {shown}; set source_format: "
                          + " or source_format: ".join(found))
    if not found:
        wanted = "Parquet, .tar or image" if source_format == "auto" else source_format
        raise SourceError(f"source '{source}': no {wanted} files found")
    (fmt, files), = found.items()
    listing.files = files
    return fmt


_REASON_CHARS = 200


def _one_line(err: BaseException | str) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:_REASON_CHARS]


def _require_regular(fs: AbstractFileSystem, path: str) -> None:
    """Never open a named pipe (it blocks forever) or other special file that replaced a planned one."""
    if _is_local(fs) and os.path.exists(path) and not os.path.isfile(path):
        raise OSError(f"{path}: {_irregular_reason(path)}")


@contextmanager
def _open_parquet(fs: AbstractFileSystem, path: str, url: str) -> Iterator[pq.ParquetFile]:
    try:
        _require_regular(fs, path)
        handle = fs.open(path, "rb")
    except OSError as err:
        raise SourceError(f"{url}: unreadable Parquet file ({_one_line(err)})") from err
    with handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as err:
            raise SourceError(f"{url}: unreadable Parquet file ({_one_line(err)})") from err
        yield parquet


def _is_binary(kind: pa.DataType) -> bool:
    view = getattr(pa.types, "is_binary_view", lambda _: False)
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or view(kind)


def _image_kind(schema: pa.Schema, url: str) -> str:
    """How a file stores its images: "struct" (HF: struct{bytes, path}) or "binary" (the encoded bytes).
    Anything else is refused, naming what was found."""
    if "image" not in schema.names:
        raise SourceError(f"{url}: Parquet file has no 'image' column (columns: {', '.join(schema.names)})")
    kind = schema.field("image").type
    if pa.types.is_struct(kind):
        fields = [kind.field(i).name for i in range(kind.num_fields)]
        if "bytes" in fields and _is_binary(kind.field("bytes").type):
            return "struct"
        raise SourceError(f"{url}: column 'image' is a struct with fields {fields}; expected a binary 'bytes' "
                          "field holding the encoded image (Hugging Face's struct{bytes, path})")
    if _is_binary(kind):
        return "binary"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        raise SourceError(f"{url}: column 'image' holds strings (file paths?), not image bytes; sdfeat reads "
                          "images stored in the Parquet file (binary or struct{bytes, path}); for image files "
                          "on disk use source_format: folder")
    raise SourceError(f"{url}: column 'image' has type {kind}; expected binary or struct{{bytes, path}}")


def _label_values(column: pa.ChunkedArray, url: str) -> list[int | None]:
    """Integer labels (None where null). Integral floats and integer strings are converted; anything else is
    refused naming the column, never truncated."""
    if pa.types.is_dictionary(column.type):  # e.g. a pandas categorical: its values decide
        column = column.cast(column.type.value_type)
    kind, values = column.type, column.to_pylist()
    if pa.types.is_integer(kind) or pa.types.is_null(kind):
        labels = values
    elif pa.types.is_floating(kind):
        bad = [v for v in values if v is not None and not (math.isfinite(v) and float(v).is_integer())]
        if bad:
            raise SourceError(f"{url}: column 'label' holds non-integral floats (e.g. {bad[0]}); labels must be "
                              "class indices")
        labels = [None if v is None else int(v) for v in values]
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        labels = []
        for v in values:
            try:
                labels.append(None if v is None else int(v.strip()))
            except ValueError:
                raise SourceError(f"{url}: column 'label' holds strings that are not integers (e.g. {v!r}); "
                                  "labels must be class indices") from None
    else:
        raise SourceError(f"{url}: column 'label' has type {kind}; expected integer class indices")
    low = min((v for v in labels if v is not None), default=0)
    if low < -1:
        raise SourceError(f"{url}: column 'label' holds {low}; labels are class indices (-1 = unknown)")
    return labels


def _hf_class_names(parquet: pq.ParquetFile) -> list[str] | None:
    metadata = parquet.schema_arrow.metadata or {}
    if b"huggingface" not in metadata:
        return None
    try:
        label = json.loads(metadata[b"huggingface"]).get("info", {}).get("features", {}).get("label", {})
    except (ValueError, AttributeError):  # metadata that is not the datasets library's: no class names
        return None
    return list(label["names"]) if label.get("_type") == "ClassLabel" and "names" in label else None


def _unreadable(listing: _Listing, path: str, reason: str) -> SampleRef:
    """The placeholder row of a file that cannot be read at all: one failure row naming the file."""
    rel = listing.relative(path)
    return SampleRef(f"{rel}#(unreadable)", -1, listing.url(path), "", error=f"{rel}: {_one_line(reason)}")


def _plan_parquet_file(listing: _Listing, path: str) -> Iterator[SampleRef]:
    """One file's rows. A file that cannot be opened is one failure row; a row group whose labels cannot be read
    gives a failure row per row; a schema sdfeat cannot use raises SourceError (before anything is written)."""
    url, rel = listing.url(path), listing.relative(path)
    if path in listing.irregular:
        yield _unreadable(listing, path, listing.irregular[path])
        return
    try:
        with _open_parquet(listing.fs, path, url) as parquet:
            _image_kind(parquet.schema_arrow, url)
            has_label = "label" in parquet.schema_arrow.names
            groups = []
            for g in range(parquet.num_row_groups):
                n_rows = parquet.metadata.row_group(g).num_rows
                try:
                    column = parquet.read_row_group(g, columns=["label"]).column("label") if has_label else None
                    groups.append((n_rows, _label_values(column, url) if has_label else [None] * n_rows, ""))
                except (pa.ArrowException, OSError) as err:
                    groups.append((n_rows, [None] * n_rows, f"unreadable row group {g}: {_one_line(err)}"))
    except SourceError as err:
        if isinstance(err.__cause__, (pa.ArrowException, OSError)):  # unreadable: a failure row, not the job's end
            yield _unreadable(listing, path, str(err).removeprefix(f"{url}: "))
            return
        raise
    row = 0
    for n_rows, labels, error in groups:
        for label in labels:
            yield SampleRef(f"{rel}#{row}", -1 if label is None else label, url, str(row),
                            error=f"{rel}: {error}" if error else "")
            row += 1


def _plan_parquet(listing: _Listing) -> tuple[Iterator[SampleRef], list[str] | None]:
    refs = itertools.chain.from_iterable(_plan_parquet_file(listing, f) for f in listing.files)
    class_names = None
    for path in listing.files:  # the first file that opens names the classes
        if path in listing.irregular:
            continue
        try:
            with _open_parquet(listing.fs, path, listing.url(path)) as parquet:
                class_names = _hf_class_names(parquet)
                break
        except SourceError:
            continue
    return refs, class_names


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
            yield SampleRef(rel, label, listing.url(path), "", error=listing.irregular.get(path, ""))

    return refs(), class_names


def _split_key(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return f"{directory}/{stem}" if directory else stem, ext.lower()


@dataclass
class _TarSample:
    image: tarfile.TarInfo | None = None
    label: int = -1
    error: str = ""
    extensions: list[str] = field(default_factory=list)


def _tar_label(tar: tarfile.TarFile, member: tarfile.TarInfo, sample: _TarSample) -> None:
    try:
        text = tar.extractfile(member).read().decode().strip()
    except (tarfile.TarError, OSError, UnicodeDecodeError, EOFError) as err:
        sample.error = f"{member.name}: unreadable label ({_one_line(err)})"
        return
    try:
        sample.label = int(text)
    except ValueError:
        sample.error = f"{member.name}: label is not an integer: {text[:40]!r}"
        return
    if sample.label < -1:
        sample.error = f"{member.name}: label {sample.label} is not a class index"


def _scan_tar(handle, size: int) -> tuple[dict[str, _TarSample], str]:
    """Samples by key in the order their first member appears, and why the scan stopped early ('' = it did not).
    A cut in a member's data is found when reading it; a cut in a header or unreadable bytes after the last good
    member give the reason."""
    samples: dict[str, _TarSample] = {}
    tar = tarfile.open(fileobj=handle, mode="r:")  # raises on a file that is no tar at all
    stopped = ""
    try:
        for member in tar:
            name = member.name.removeprefix("./")
            if member.isdir() or _hidden(name):
                continue
            key, ext = _split_key(name)
            sample = samples.setdefault(key, _TarSample())
            sample.extensions.append(ext)
            if member.isfile() and ext in TAR_IMAGE_EXTENSIONS and sample.image is None:
                sample.image = member
            elif member.isfile() and ext == "cls":
                _tar_label(tar, member, sample)
    except (tarfile.TarError, OSError, EOFError) as err:
        if tar.offset < size:  # bytes that could not be parsed (reading past the end is the last member's cut)
            stopped = f"unreadable from byte {tar.offset}: {_one_line(err)}"
    if not stopped and tar.offset < size:  # tarfile stops silently at a cut or invalid header after the first
        handle.seek(tar.offset)
        if handle.read(tarfile.BLOCKSIZE).strip(b"\0"):  # not the end-of-archive marker
            stopped = f"truncated or invalid member header at byte {tar.offset}"
    return samples, stopped


def _plan_tar(listing: _Listing, path: str) -> Iterator[SampleRef]:
    """One shard's samples. A shard that cannot be read at all is one failure row; a sample without an image, with
    a non-integer `.cls` or with its data cut off is a failure row; an unreadable tail is one more."""
    url, rel = listing.url(path), listing.relative(path)
    if path in listing.irregular:
        yield _unreadable(listing, path, listing.irregular[path])
        return
    try:
        with listing.fs.open(path, "rb") as handle:
            size = listing.fs.size(path)
            samples, stopped = _scan_tar(handle, size)
    except (tarfile.TarError, OSError, EOFError) as err:
        yield _unreadable(listing, path, f"unreadable WebDataset tar ({_one_line(err)})")
        return
    for key, sample in samples.items():
        member = sample.image
        if member is None:
            found = ", ".join(f".{e}" for e in dict.fromkeys(sample.extensions))
            yield SampleRef(f"{rel}#{key}", sample.label, url, "",
                            error=f"{rel}#{key}: no image member (found {found})")
            continue
        error = sample.error
        if not error and member.offset_data + member.size > size:
            error = f"truncated tar member (the file ends at byte {size})"
        yield SampleRef(f"{rel}#{member.name}", sample.label, url, member.name, member.offset_data, member.size,
                        error=f"{rel}#{member.name}: {error}" if error else "")
    if stopped:
        yield SampleRef(f"{rel}#(unreadable tail)", -1, url, "", error=f"{rel}: {stopped}")


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
    if classes is not None:  # unreadable parts of unknown class stay: they may hold images of these classes
        wanted = set(classes)
        refs = (r for r in refs if r.label in wanted or (r.error and r.label == -1))
    plan = SamplePlan(list(itertools.islice(refs, limit)), class_names, fmt)
    if plan.refs and all(r.error for r in plan.refs):
        raise SourceError(f"source '{source}': nothing readable ({len(plan.refs)} unusable sample(s), e.g. "
                          f"{plan.refs[0].error})")
    return plan


# ---- reading ---------------------------------------------------------------------------------------------------

Loader = Callable[[], "bytes | Image.Image"]  # runs in a decode thread


def _given(data: bytes) -> bytes:
    return data


def _failed(reason: str) -> bytes:
    raise ImageDecodeError(reason)


def _whole_file(url: str) -> bytes:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        _require_regular(fs, path)
        return fs.cat_file(path)
    except OSError as err:
        raise ImageDecodeError(f"unreadable file: {err}"[:120]) from err


def _kind(ref: SampleRef) -> str:
    if ref.error:
        return "error"
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
        _image_kind(parquet.schema_arrow, url)
        yield from _row_group_loaders(parquet, url, run)


def _row_group_loaders(
    parquet: pq.ParquetFile, url: str, run: list[tuple[int, SampleRef]]
) -> Iterator[tuple[int, Loader]]:
    """A row group that cannot be decoded (corrupt pages: the same on every try) fails its rows, naming it."""
    ends = list(itertools.accumulate(parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)))
    struct = _image_kind(parquet.schema_arrow, url) == "struct"
    loaded_group, image_bytes, group_error = -1, None, ""
    for index, ref in run:
        row = int(ref.member)
        group = bisect.bisect_right(ends, row)
        if group >= len(ends):
            raise SourceError(f"{url}: row {row} is out of range ({ends[-1] if ends else 0} rows)")
        if group != loaded_group:
            try:
                column = parquet.read_row_group(group, columns=["image"]).column("image")
                image_bytes = pc.struct_field(column, "bytes") if struct else column  # ChunkedArray of binary
                group_error = ""
            except (pa.ArrowException, OSError) as err:
                image_bytes, group_error = None, f"unreadable row group {group} of {url}: {_one_line(err)}"
            loaded_group = group
        if group_error:
            yield index, partial(_failed, group_error)
            continue
        data = image_bytes[row - (ends[group - 1] if group else 0)].as_py()
        yield index, partial(_given, data) if data is not None else partial(_failed, "no image bytes in row")


def _tar_loaders(run: list[tuple[int, SampleRef]]) -> Iterator[tuple[int, Loader]]:
    url = run[0][1].file
    try:
        fs, path = fsspec.core.url_to_fs(url)
        _require_regular(fs, path)
        handle = fs.open(path, "rb")
    except OSError as err:
        raise SourceError(f"{url}: unreadable WebDataset tar ({_one_line(err)})") from err
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
        elif kind == "error":  # planning found it unusable; never opened
            yield from ((index, partial(_failed, ref.error)) for index, ref in run)
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
