"""Source images for the explorer: a store row -> its image as the extractor saw it, as PNG.

The image is found through the store's manifest (which file and row/member it came from), read with
`sources.read_image_bytes` and cropped with `decode.center_crop_resize` at the store's resolution, exactly as the
extractor does; a crop variant's image is that crop with `margin` px cut from every side. Only store rows (ints)
come from a request, never a path. Decoded rows are cached; a miss reads a block of neighbouring rows at once,
since Parquet rows of one file share a row group (one read instead of one per thumbnail of a grid page). A row the
manifest records as planned unusable (`SampleRef.error`: a named pipe, a broken link) is never opened: asking for
its image raises `RowNotReadyError` with the recorded reason, as for any failed row.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sdfeat import store
from sdfeat.errors import ArgumentError, RowNotReadyError, SourceError, StoreError
from sdfeat.explore.cache import ByteLRU
from sdfeat.sources import SampleRef, read_image_bytes
from sdfeat.sources.decode import ImageDecodeError, center_crop_resize, decode_rgb
from sdfeat.sources.refs import manifest_refs

READ_BLOCK = 16  # rows decoded together on a cache miss
MIN_SIZE, MAX_SIZE = 16, 1024  # PNG side in pixels


class SourceImages:
    """Decoded, centre-cropped images of one store's rows (uint8 (R, R, 3) at the store's resolution R)."""

    def __init__(self, path: str, resolution: int, n_rows: int, cache_bytes: int = 96 * 2**20) -> None:
        self.path, self.resolution, self.n_rows = path, resolution, n_rows
        self._manifest = None
        self._cache: ByteLRU[np.ndarray | str] = ByteLRU(cache_bytes)
        self._planned_errors: dict[int, tuple[str, str]] = {}  # row -> (sample_id, reason) of refs never opened

    def _refs(self, start: int, stop: int) -> list[SampleRef]:
        if self._manifest is None:
            try:
                self._manifest = store.read_manifest(self.path)
            except (OSError, ValueError) as err:
                raise SourceError(f"{self.path}: no readable manifest.parquet ({err})") from None
        return manifest_refs(self._manifest.slice(start, stop - start))

    def _read_block(self, row: int) -> dict[int, np.ndarray | str]:
        start = row - row % READ_BLOCK
        refs = self._refs(start, min(start + READ_BLOCK, self.n_rows))
        for i, ref in enumerate(refs):
            if ref.error:
                self._planned_errors[start + i] = (ref.sample_id, ref.error)
        found: dict[int, np.ndarray | str] = {}
        for i, data, reason in read_image_bytes(refs):  # planned errors come back unread, with their reason
            if data is None:
                found[start + i] = reason or "unreadable"
                continue
            try:
                found[start + i] = center_crop_resize(decode_rgb(data), self.resolution)  # (R, R, 3) uint8
            except ImageDecodeError as err:
                found[start + i] = str(err)
        return found

    def pixels(self, row: int) -> np.ndarray:
        """(R, R, 3) uint8: the image of store row `row` as the extractor decoded it."""
        if not 0 <= row < self.n_rows:
            raise StoreError(f"row: {row} is out of range for {self.n_rows} samples (0..{self.n_rows - 1})")

        def compute() -> np.ndarray | str:
            block = self._read_block(row)
            for other, value in block.items():  # keep the neighbours too: the grid asks for them next
                if other != row:
                    self._cache.get(other, lambda v=value: v, _nbytes)
            return block[row]

        value = self._cache.get(row, compute, _nbytes)
        if row in self._planned_errors:
            sample_id, reason = self._planned_errors[row]
            raise RowNotReadyError(f"row {row} ({sample_id}) failed at extraction: {reason}")
        if isinstance(value, str):
            raise SourceError(f"row {row}: its image could not be read ({value})")
        return value

    def png(self, row: int, size: int | None = None, margin: int = 0) -> bytes:
        """PNG of row `row` at `size` px (default: the store's resolution), optionally the crop variant's image
        (`margin` px cut from every side, before resizing)."""
        size = size or self.resolution
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ArgumentError(f"size: {size} px is outside {MIN_SIZE}..{MAX_SIZE}")
        pixels = self.pixels(row)
        if margin:
            pixels = pixels[margin:-margin, margin:-margin]  # (R - 2m, R - 2m, 3)
        image = Image.fromarray(pixels)
        if image.width != size:
            image = image.resize((size, round(size * image.height / image.width)))
        out = io.BytesIO()
        image.save(out, format="PNG", compress_level=1)
        return out.getvalue()


def _nbytes(value: np.ndarray | str) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else 64
