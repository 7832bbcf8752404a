"""The Parquet layout (Hugging Face imagenet-1k style): plan rows from metadata and the `label` column only, read
the `image` column's bytes a row group at a time.

`plan` yields one `SampleRef` per row (sample_id `<file>#<row>`, `member` = the row index) and the class names of
the `huggingface` schema metadata; `image_kind` decides, from a file's schema, how it stores its images (and
refuses any other schema while planning); `loaders` turns a run of one file's refs into byte loaders for
`reading`. Labels may be integers, integral floats or integer strings (converted, never truncated).
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from sdfeat.errors import SourceError
from sdfeat.sources.listing import Listing, require_regular, unreadable
from sdfeat.sources.refs import Loader, SampleRef, failed, given, one_line


def _open_file(fs: AbstractFileSystem, path: str, url: str) -> tuple[object, pq.ParquetFile]:
    """(open handle, its ParquetFile); the caller closes the handle. Raises SourceError naming the file."""
    try:
        require_regular(fs, path)
        handle = fs.open(path, "rb")
    except OSError as err:
        raise SourceError(f"{url}: unreadable Parquet file ({one_line(err)})") from err
    try:
        return handle, pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as err:
        handle.close()
        raise SourceError(f"{url}: unreadable Parquet file ({one_line(err)})") from err


@contextmanager
def _open_parquet(fs: AbstractFileSystem, path: str, url: str) -> Iterator[pq.ParquetFile]:
    handle, parquet = _open_file(fs, path, url)
    with handle:
        yield parquet


def _is_binary(kind: pa.DataType) -> bool:
    view = getattr(pa.types, "is_binary_view", lambda _: False)
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or view(kind)


def image_kind(schema: pa.Schema, url: str) -> str:
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


def _plan_file(listing: Listing, path: str) -> Iterator[SampleRef]:
    """One file's rows. A file that cannot be opened is one failure row; a row group whose labels cannot be read
    gives a failure row per row; a schema sdfeat cannot use raises SourceError (before anything is written)."""
    url, rel = listing.url(path), listing.relative(path)
    if path in listing.irregular:
        yield unreadable(listing, path, listing.irregular[path])
        return
    try:
        with _open_parquet(listing.fs, path, url) as parquet:
            image_kind(parquet.schema_arrow, url)
            has_label = "label" in parquet.schema_arrow.names
            groups = []
            for g in range(parquet.num_row_groups):
                n_rows = parquet.metadata.row_group(g).num_rows
                try:
                    column = parquet.read_row_group(g, columns=["label"]).column("label") if has_label else None
                    groups.append((n_rows, _label_values(column, url) if has_label else [None] * n_rows, ""))
                except (pa.ArrowException, OSError) as err:
                    groups.append((n_rows, [None] * n_rows, f"unreadable row group {g}: {one_line(err)}"))
    except SourceError as err:
        if isinstance(err.__cause__, (pa.ArrowException, OSError)):  # unreadable: a failure row, not the job's end
            yield unreadable(listing, path, str(err).removeprefix(f"{url}: "))
            return
        raise
    row = 0
    for n_rows, labels, error in groups:
        for label in labels:
            yield SampleRef(f"{rel}#{row}", -1 if label is None else label, url, str(row),
                            error=f"{rel}: {error}" if error else "")
            row += 1


def plan(listing: Listing) -> tuple[Iterator[SampleRef], list[str] | None]:
    """The refs of every file (lazily, in listing order) and the class names of the first file that opens."""
    refs = itertools.chain.from_iterable(_plan_file(listing, f) for f in listing.files)
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


# ---- reading ---------------------------------------------------------------------------------------------------

class ParquetReader:
    """One open Parquet file, read forward in small record batches of its `image` column: a worker keeps its
    readers across units (`reading.OpenFiles`), so each row group is read once while consecutive units walk
    through it, and the first image of a row group is ready after one batch, not the whole group (a row group of
    large JPEGs can take a second to decompress)."""

    BATCH_BYTES = 8 * 2**20  # rows per read: about this many bytes (64 ImageNet JPEGs; 8 of 1 MB)

    def __init__(self, url: str) -> None:
        self.url = url
        fs, path = fsspec.core.url_to_fs(url)
        self._handle, self.parquet = _open_file(fs, path, url)
        try:
            self.struct = image_kind(self.parquet.schema_arrow, url) == "struct"
        except SourceError:
            self.close()
            raise
        self.ends = list(itertools.accumulate(self.parquet.metadata.row_group(i).num_rows
                                              for i in range(self.parquet.num_row_groups)))
        self._group = -1
        self._batches: Iterator[pa.RecordBatch] | None = None
        self._bytes: pa.Array | None = None  # the current batch's image bytes
        self._first = self._next = 0         # group-relative rows [first, next) are in `_bytes`
        self._error = ""

    def close(self) -> None:
        self._handle.close()

    def _start(self, group: int) -> None:
        self._group, self._bytes, self._first, self._next, self._error = group, None, 0, 0, ""
        meta = self.parquet.metadata.row_group(group)
        rows = max(1, min(1024, self.BATCH_BYTES * meta.num_rows // max(1, meta.total_byte_size)))
        self._batches = self.parquet.iter_batches(batch_size=rows, row_groups=[group], columns=["image"],
                                                  use_threads=False)

    def loader(self, row: int) -> Loader:
        """The loader of one row's image bytes. A row group that cannot be decoded (corrupt pages: the same on
        every try) fails its rows from there on, naming it."""
        group = bisect.bisect_right(self.ends, row)
        if group >= len(self.ends):
            raise SourceError(f"{self.url}: row {row} is out of range ({self.ends[-1] if self.ends else 0} rows)")
        at = row - (self.ends[group - 1] if group else 0)
        if group != self._group or at < self._first:  # another group, or back within this one: read it again
            self._start(group)
        while not self._error and at >= self._next:
            try:
                column = next(self._batches).column("image")
            except (pa.ArrowException, OSError) as err:
                self._error = f"unreadable row group {group} of {self.url}: {one_line(err)}"
                break
            self._bytes = pc.struct_field(column, "bytes") if self.struct else column
            self._first, self._next = self._next, self._next + len(column)
        if self._error:
            return partial(failed, self._error)
        data = self._bytes[at - self._first].as_py()
        return partial(given, data) if data is not None else partial(failed, "no image bytes in row")


def loaders(run: list[tuple[int, SampleRef]], reader: ParquetReader | None = None) -> Iterator[tuple[int, Loader]]:
    """Loaders of a run of one file's refs. Reads each needed row group once (refs in row order; a row group is
    re-read only when the refs jump back to it) and keeps only the current one in memory. `reader`: an open
    reader of the run's file to use (and keep open), else one is opened for the run."""
    own = reader is None
    reader = reader or ParquetReader(run[0][1].file)
    try:
        for index, ref in run:
            yield index, reader.loader(int(ref.member))
    finally:
        if own:
            reader.close()
