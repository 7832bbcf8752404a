"""The WebDataset layout: uncompressed `.tar` shards, planned from their headers, read by ranged reads.

Members are grouped by key (the path up to the first dot of the basename); the first member in a format the
decoder reads (`decode.IMAGE_EXTENSIONS`) is the sample's image and `.cls` holds its integer label. `plan` yields
one `SampleRef` per sample (sample_id `<file>#<member>`, `offset`/`size` of the member's data; `<file>#<key>` and
an error for a sample without an image), a failure row for a shard that cannot be read and one for an unreadable
tail; `loaders` reads each member of a run of one shard's refs by seeking to its offset.
"""

from __future__ import annotations

import itertools
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import fsspec

from sdfeat.errors import SourceError
from sdfeat.sources.listing import IMAGE_SUFFIXES, Listing, hidden, require_regular, unreadable
from sdfeat.sources.refs import Loader, SampleRef, failed, given, one_line

TAR_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_SUFFIXES)


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
        sample.error = f"{member.name}: unreadable label ({one_line(err)})"
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
            if member.isdir() or hidden(name):
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
            stopped = f"unreadable from byte {tar.offset}: {one_line(err)}"
    if not stopped and tar.offset < size:  # tarfile stops silently at a cut or invalid header after the first
        handle.seek(tar.offset)
        if handle.read(tarfile.BLOCKSIZE).strip(b"\0"):  # not the end-of-archive marker
            stopped = f"truncated or invalid member header at byte {tar.offset}"
    return samples, stopped


def _plan_tar(listing: Listing, path: str) -> Iterator[SampleRef]:
    """One shard's samples. A shard that cannot be read at all is one failure row; a sample without an image, with
    a non-integer `.cls` or with its data cut off is a failure row; an unreadable tail is one more."""
    url, rel = listing.url(path), listing.relative(path)
    if path in listing.irregular:
        yield unreadable(listing, path, listing.irregular[path])
        return
    try:
        with listing.fs.open(path, "rb") as handle:
            size = listing.fs.size(path)
            samples, stopped = _scan_tar(handle, size)
    except (tarfile.TarError, OSError, EOFError) as err:
        yield unreadable(listing, path, f"unreadable WebDataset tar ({one_line(err)})")
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


def plan(listing: Listing) -> Iterator[SampleRef]:
    """The refs of every shard, lazily, in listing order."""
    return itertools.chain.from_iterable(_plan_tar(listing, f) for f in listing.files)


# ---- reading ---------------------------------------------------------------------------------------------------

def loaders(run: list[tuple[int, SampleRef]]) -> Iterator[tuple[int, Loader]]:
    """Loaders of a run of one shard's refs: one open file, a seek and a read per member."""
    url = run[0][1].file
    try:
        fs, path = fsspec.core.url_to_fs(url)
        require_regular(fs, path)
        handle = fs.open(path, "rb")
    except OSError as err:
        raise SourceError(f"{url}: unreadable WebDataset tar ({one_line(err)})") from err
    with handle:
        for index, ref in run:
            handle.seek(ref.offset)
            data = handle.read(ref.size)
            short = len(data) < ref.size
            yield index, partial(failed, "truncated tar member") if short else partial(given, data)

