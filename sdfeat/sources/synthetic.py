"""Deterministic generated images: the `synthetic:N` source (demo jobs and tests need no data download).

Image `i` is a pure function of `i` (not of N): its class is `i % 5`, its size (non-square, 192..447 px a side, so
the centre crop matters) and colours come from SHA-256 of the index, and the pixels are computed with integer
numpy arithmetic only, so every machine produces the same RGB bytes. One image costs about a millisecond.
`sources.plan_samples` turns `synthetic:N` into refs; `sources.read_images` calls `synthetic_image`.
"""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
from PIL import Image

from sdfeat.errors import SourceError

CLASS_NAMES: list[str] = ["disc", "square", "stripes", "rings", "checkerboard"]
SYNTHETIC_FILE = "synthetic"
_PATTERN = re.compile(r"synthetic:(\d+)")


def parse_synthetic(source: str) -> int | None:
    """N for a `synthetic:N` source, None for any other source."""
    if not source.startswith("synthetic:"):
        return None
    match = _PATTERN.fullmatch(source)
    if match is None or int(match.group(1)) < 1:
        raise SourceError(f"source '{source}': expected synthetic:N with N >= 1")
    return int(match.group(1))


def synthetic_label(index: int) -> int:
    return index % len(CLASS_NAMES)


def _params(index: int) -> bytes:
    return hashlib.sha256(f"sdfeat-synthetic-{index}".encode()).digest()


def synthetic_size(index: int) -> tuple[int, int]:
    """(width, height) of image `index`; never square (they differ by at least 32 px)."""
    p = _params(index)
    width = 192 + p[0]
    height = 192 + p[1]
    if abs(width - height) < 32:
        height = height + 64 if height < 320 else height - 64
    return width, height


def synthetic_array(index: int) -> np.ndarray:
    """uint8 (height, width, 3): a two-colour gradient background with one class-specific pattern."""
    p = _params(index)
    width, height = synthetic_size(index)
    yy, xx = (axis.astype(np.int32) for axis in np.ogrid[0:height, 0:width])  # (H, 1), (1, W)
    bg_a, bg_b, fg = (np.frombuffer(p[k : k + 3], dtype=np.uint8).astype(np.int32) for k in (2, 5, 8))
    steps = np.arange(256, dtype=np.int32)[:, None]  # (256, 1)
    gradient = (bg_a * (255 - steps) + bg_b * steps) // 255  # (256, 3)
    palette = np.concatenate([gradient, fg[None, :]]).astype(np.uint8)  # (257, 3): gradient, then foreground
    ramp = (xx * 3 + yy * 2) * 256 // (3 * width + 2 * height)  # (H, W) in 0..255
    cx = width // 4 + p[11] * width // 512
    cy = height // 4 + p[12] * height // 512
    radius = min(width, height) // 4 + p[13] % 16
    dx, dy = xx - cx, yy - cy
    label = synthetic_label(index)
    if label == 0:
        mask = dx * dx + dy * dy <= radius * radius
    elif label == 1:
        mask = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    elif label == 2:
        period = 16 + p[14] % 24
        mask = (xx + yy) % period < period // 2
    elif label == 3:
        period = 12 + p[14] % 20
        mask = np.sqrt(dx * dx + dy * dy).astype(np.int32) % period < period // 2
    else:
        cell = 16 + p[14] % 32
        mask = (xx // cell + yy // cell) % 2 == 0
    return np.take(palette, np.where(mask, 256, ramp), axis=0)  # (H, W, 3) uint8


def synthetic_image(index: int) -> Image.Image:
    return Image.fromarray(synthetic_array(index))


def synthetic_png(index: int) -> bytes:
    """PNG bytes of image `index` (lossless: decodes to exactly `synthetic_array(index)`)."""
    buffer = io.BytesIO()
    synthetic_image(index).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
