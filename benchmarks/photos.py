"""Photo-like JPEGs for the host-pipeline benchmarks, generated (never downloaded): 1/f ("pink") noise per channel,
whose spectrum falls off like a natural photo's, plus a few smooth shapes, encoded with PIL at `quality`.
At 500×375 and quality 90 an image is ≈100–120 KB, as ImageNet's are; at 1600×1200 ≈1 MB.

    write_parquet(directory, n, width, height) -> the HF-style Parquet file (struct{bytes, path}, label)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def photo_like(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(width, height)) ** 1.1  # (H, W/2+1)
    channels = []
    base = rng.standard_normal((height, width // 2 + 1)) + 1j * rng.standard_normal((height, width // 2 + 1))
    for c in range(3):  # correlated colour channels, as in photos
        own = rng.standard_normal(base.shape) + 1j * rng.standard_normal(base.shape)
        field = np.fft.irfft2((0.8 * base + 0.6 * own) * falloff, s=(height, width))
        field = (field - field.mean()) / (field.std() + 1e-9)
        channels.append(128 + 42 * field + rng.uniform(-30, 30))
    image = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)  # (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_parquet(directory: Path, n: int, width: int = 500, height: int = 375, row_group_size: int = 256,
                  name: str = "train-00000-of-00001.parquet") -> Path:
    """n photo-like JPEGs in one HF imagenet-1k-style Parquet file (labels i % 1000)."""
    directory.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())])
    images = [{"bytes": photo_like(width, height, i), "path": f"{i:08d}.JPEG"} for i in range(n)]
    table = pa.table({"image": images, "label": [i % 1000 for i in range(n)]}, schema=schema)
    path = directory / name
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
