"""The folder layout: ILSVRC synset directories of image files (`n01440764/x.JPEG`), each read whole.

The label is the synset's line index in `LOC_synset_mapping.txt` when that file sits in the root or up to 3
directories above it (class names from its lines), else the index of the directory among the sorted class
directories found (class names = their names); images directly in the root get label -1. `plan` yields one
`SampleRef` per file (sample_id = the relative path, no `member`); `whole_file` is the loader `reading` uses.
"""

from __future__ import annotations

from collections.abc import Iterator

import fsspec

from sdfeat.errors import SourceError
from sdfeat.sources.decode import ImageDecodeError
from sdfeat.sources.listing import Listing, require_regular
from sdfeat.sources.refs import SampleRef

SYNSET_MAPPING = "LOC_synset_mapping.txt"
_MAPPING_LEVELS_UP = 3


def _synset_mapping(listing: Listing) -> list[tuple[str, str]] | None:
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


def plan(listing: Listing) -> tuple[Iterator[SampleRef], list[str]]:
    """The refs of every image file (lazily, in listing order) and the class names."""
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


# ---- reading ---------------------------------------------------------------------------------------------------

def whole_file(url: str) -> bytes:
    """The bytes of one image file (the loader of a folder ref); an unreadable file fails only its image."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        require_regular(fs, path)
        return fs.cat_file(path)
    except OSError as err:
        raise ImageDecodeError(f"unreadable file: {err}"[:120]) from err
