"""Reading planned images back (run by the workers): bytes per `SampleRef`, then decoded and centre-cropped.

`read_images` groups consecutive refs of one file and one `SampleRef.kind` into a run, asks that layout's module
for a loader per ref (a Parquet file's needed row groups are read once per run, a tar member by a ranged read of
its offset and size, a folder image whole) and decodes them (`sdfeat.sources.decode`), optionally in threads, yielding
results in ref order. A worker that reads unit after unit passes its own `OpenFiles` to `loaders`, so a Parquet
file stays open and each row group is read once across units (`feed.Feeder`). One bad image becomes a failed `DecodedImage`; a file that was readable when planned but
cannot be opened now raises `SourceError` naming it (its unit fails and is retried). `read_image_bytes` yields the
encoded bytes instead (the explorer, the ImageNet subset).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from PIL import Image

from sdfeat.errors import SourceError
from sdfeat.sources import folder, parquet, webdataset
from sdfeat.sources.decode import ImageDecodeError, center_crop_resize, decode_rgb
from sdfeat.sources.refs import DecodedImage, Loader, SampleRef, failed
from sdfeat.sources.synthetic import synthetic_image, synthetic_png

Run = list[tuple[int, SampleRef]]  # (index in the refs read, ref): consecutive refs of one file and one kind


class OpenFiles:
    """The Parquet files one reader keeps open across calls (at most `keep`, least recently used closed first),
    each with the row group it read last."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._readers: OrderedDict[str, parquet.ParquetReader] = OrderedDict()

    def parquet(self, url: str) -> parquet.ParquetReader:
        reader = self._readers.pop(url, None) or parquet.ParquetReader(url)
        self._readers[url] = reader
        while len(self._readers) > self.keep:
            self._readers.popitem(last=False)[1].close()
        return reader

    def close(self) -> None:
        while self._readers:
            self._readers.popitem()[1].close()


_RUN_LOADERS: dict[str, Callable[[Run], Iterator[tuple[int, Loader]]]] = {
    "parquet": parquet.loaders,
    "webdataset": webdataset.loaders,
    "folder": lambda run: ((index, partial(folder.whole_file, ref.file)) for index, ref in run),
    "synthetic": lambda run: ((index, partial(synthetic_image, int(ref.member))) for index, ref in run),
    "error": lambda run: ((index, partial(failed, ref.error)) for index, ref in run),  # planned unusable: never opened
}


def loaders(refs: Sequence[SampleRef], files: OpenFiles | None = None) -> Iterator[tuple[int, Loader]]:
    """(index, loader) in ref order; consecutive refs of one file share one open file, and with `files` a Parquet
    file stays open (with its current row group) for later calls."""
    for (url, kind), group in itertools.groupby(enumerate(refs), key=lambda item: (item[1].file, item[1].kind)):
        if kind == "parquet" and files is not None:
            yield from parquet.loaders(list(group), files.parquet(url))
        else:
            yield from _RUN_LOADERS[kind](list(group))


def decode_one(index: int, load: Loader, resolution: int) -> DecodedImage:
    """Load and decode one image to the paper's centre crop; a bad image becomes a failed `DecodedImage`."""
    try:
        loaded = load()
        image = loaded if isinstance(loaded, Image.Image) else decode_rgb(loaded)
        return DecodedImage(index, center_crop_resize(image, resolution), None)
    except ImageDecodeError as err:
        return DecodedImage(index, None, str(err))


def read_image_bytes(refs: Sequence[SampleRef]) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(index, original encoded bytes, None) per ref in order, or (index, None, reason) for an unreadable image.
    Synthetic images come as PNG. Raises SourceError when a whole file is unreadable."""
    for index, load in loaders(refs):
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
    found = loaders(refs)
    if threads == 1:
        yield from (decode_one(index, load, resolution) for index, load in found)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdfeat-decode") as pool:
        pending: deque = deque()
        for index, load in found:
            pending.append(pool.submit(decode_one, index, load, resolution))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
