"""Which files a source names, and which layout they are: the first step of `plan_samples`.

`list_source` turns a local path, glob or fsspec URL into a `Listing` (files sorted by relative path, hidden
entries left out, local files that are no regular file noted but never opened); `select_format` keeps the files
of the one layout present (or asked for) and refuses a source holding two. The layout modules plan from the
listing; `require_regular` guards every later open, `unreadable` is the failure row of a file that cannot be read.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

import fsspec
from fsspec.spec import AbstractFileSystem

from sdfeat.errors import SourceError, SourceNotFoundError
from sdfeat.sources.decode import IMAGE_EXTENSIONS
from sdfeat.sources.refs import SampleRef, one_line

IMAGE_SUFFIXES = tuple(sorted(IMAGE_EXTENSIONS))  # every format decode_rgb reads
FORMAT_SUFFIXES = {"parquet": (".parquet",), "webdataset": (".tar",), "folder": IMAGE_SUFFIXES}
FORMAT_NAMES = {"parquet": "Parquet files", "webdataset": ".tar files", "folder": "image files"}
_IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
_GLOB_CHARS = "*?["


@dataclass
class Listing:
    fs: AbstractFileSystem
    root: str  # fs path that sample ids are relative to
    files: list[str]  # fs paths, sorted by relative path
    irregular: dict[str, str] = field(default_factory=dict)  # path -> why it is not a regular file (never opened)

    def relative(self, path: str) -> str:
        prefix = self.root.rstrip("/") + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path.rsplit("/", 1)[-1]

    def url(self, path: str) -> str:
        """A string that `fsspec.core.url_to_fs` maps back to this file (plain path for local files)."""
        return path if is_local(self.fs) else self.fs.unstrip_protocol(path)


def is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def hidden(relative: str) -> bool:
    """Hidden entries, macOS resource forks (`._x`, `__MACOSX/`) and desktop litter are no part of a source."""
    return any((part.startswith(".") and part not in (".", "..")) or part in _IGNORED_NAMES
               for part in relative.split("/"))


def irregular_reason(path: str) -> str:
    """Why a local path that is listed but not a regular file cannot be read (it is never opened)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:  # a broken or looping symbolic link
        kind = "symbolic link loop" if err.errno == errno.ELOOP else "broken link"
        return f"not a regular file: {kind} ({err.strerror})"
    kinds = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"))
    return "not a regular file: " + next((name for test, name in kinds if test(mode)), "special file")


def require_regular(fs: AbstractFileSystem, path: str) -> None:
    """Never open a named pipe (it blocks forever) or other special file that replaced a planned one."""
    if is_local(fs) and os.path.exists(path) and not os.path.isfile(path):
        raise OSError(f"{path}: {irregular_reason(path)}")


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


def list_source(source: str) -> Listing:
    fs, path = fsspec.core.url_to_fs(source)
    glob_at = min((path.index(c) for c in _GLOB_CHARS if c in path), default=-1)
    if glob_at >= 0:
        entries = _find(fs, path, glob=True)
        root = path[:glob_at].rsplit("/", 1)[0] if "/" in path[:glob_at] else ""
    elif fs.isdir(path):
        entries, root = _find(fs, path, glob=False), path
    elif fs.isfile(path):  # named explicitly: kept even when hidden
        entries, root = {path: {"type": "file"}}, path.rsplit("/", 1)[0] if "/" in path else ""
    elif is_local(fs) and os.path.lexists(path):  # a named pipe, socket or broken link: never opened
        raise SourceError(f"source '{source}': {irregular_reason(path)}")
    else:
        entries, root = {}, path
    listing = Listing(fs, root, [])
    if glob_at >= 0 or root == path:
        entries = {f: info for f, info in entries.items() if not hidden(listing.relative(f))}
    if not entries:
        raise SourceNotFoundError(f"source '{source}': no such file or directory, or the glob matches nothing")
    listing.files = sorted(entries, key=lambda f: listing.relative(f).split("/"))
    if is_local(fs):
        listing.irregular = {f: irregular_reason(f) for f, info in entries.items()
                             if info.get("type") != "file" and not os.path.isfile(f)}  # links to files are files
    return listing


def select_format(source: str, listing: Listing, source_format: str) -> str:
    """The layout of the source (one of `FORMAT_SUFFIXES`); keeps only its files in `listing.files`."""
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


def unreadable(listing: Listing, path: str, reason: str) -> SampleRef:
    """The placeholder row of a file that cannot be read at all: one failure row naming the file."""
    rel = listing.relative(path)
    return SampleRef(f"{rel}#(unreadable)", -1, listing.url(path), "", error=f"{rel}: {one_line(reason)}")
