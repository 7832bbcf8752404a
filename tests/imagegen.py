"""Test datasets written into a directory (usually pytest's tmp_path): HF-style Parquet shards, ILSVRC synset
folders, WebDataset tars, and the odd images real ImageNet contains. Shared by every test that needs images.

Image `i` of a dataset (its position in the dataset's deterministic order) is by default a small non-square
JPEG of the solid colour `color_for(i)`, so a test can tell which image it got back from its pixels
(JPEG keeps a solid colour within ~2 levels). Labels default to `i % 5`.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ImageFn = Callable[[int], bytes]
LabelFn = Callable[[int], int]


def color_for(index: int) -> tuple[int, int, int]:
    return (17 + 37 * index) % 256, (101 + 59 * index) % 256, (211 + 83 * index) % 256


def encode(image: Image.Image | np.ndarray, fmt: str = "JPEG", **save_args) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def solid_jpeg(width: int, height: int, color: tuple[int, int, int], quality: int = 95) -> bytes:
    return encode(Image.new("RGB", (width, height), color), "JPEG", quality=quality)


def default_image(index: int) -> bytes:
    """A 40..56 x 24..36 px solid JPEG of `color_for(index)`."""
    return solid_jpeg(40 + 8 * (index % 3), 24 + 6 * (index % 3), color_for(index))


def default_label(index: int) -> int:
    return index % 5


def hf_schema(class_names: Sequence[str] | None = None) -> pa.Schema:
    """The schema of HF imagenet-1k Parquet shards, with the ClassLabel names in the `huggingface` metadata."""
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())])
    if class_names is None:
        return schema
    features = {"image": {"_type": "Image"}, "label": {"names": list(class_names), "_type": "ClassLabel"}}
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def write_parquet_shards(
    directory: Path,
    n_files: int,
    rows_per_file: int,
    row_group_size: int | None = None,
    image_fn: ImageFn = default_image,
    label_fn: LabelFn = default_label,
    class_names: Sequence[str] | None = None,
    prefix: str = "train",
) -> list[Path]:
    """`prefix-0000k-of-0000n.parquet` files; row r of file k is image k * rows_per_file + r."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_files):
        indices = range(k * rows_per_file, (k + 1) * rows_per_file)
        images = [{"bytes": image_fn(i), "path": f"{i:06d}.JPEG"} for i in indices]
        table = pa.table({"image": images, "label": [label_fn(i) for i in indices]}, schema=hf_schema(class_names))
        path = directory / f"{prefix}-{k:05d}-of-{n_files:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size or rows_per_file)
        paths.append(path)
    return paths


def write_ilsvrc_folders(
    directory: Path,
    synsets: Sequence[str] = ("n01440764", "n01443537", "n01484850"),
    per_class: int = 2,
    mapping: Sequence[str] | None = None,
    image_fn: ImageFn = default_image,
    suffix: str = ".JPEG",
) -> Path:
    """`directory/train/<synset>/<synset>_<k>.JPEG`; image index = position of the synset in sorted order *
    per_class + k. With `mapping` (synset ids in label order), writes `directory/LOC_synset_mapping.txt` (two
    levels above the images, as in the Kaggle ILSVRC download) naming class i `class <i>`. Returns the train dir."""
    train = directory / "train"
    for c, synset in enumerate(sorted(synsets)):
        (train / synset).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            (train / synset / f"{synset}_{k}{suffix}").write_bytes(image_fn(c * per_class + k))
    if mapping is not None:
        lines = [f"{wnid} class {i}" for i, wnid in enumerate(mapping)]
        (directory / "LOC_synset_mapping.txt").write_text("\n".join(lines) + "\n")
    return train


def write_webdataset_tars(
    directory: Path,
    n_files: int,
    per_file: int,
    image_fn: ImageFn = default_image,
    label_fn: LabelFn | None = default_label,
    ext: str = "jpg",
) -> list[Path]:
    """`shard-0000k.tar` with members `<key>.<ext>` then `<key>.cls` (and a `.json` that readers must skip);
    sample s of shard k is image k * per_file + s. `label_fn=None` writes no `.cls` members."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_files):
        path = directory / f"shard-{k:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for s in range(per_file):
                index = k * per_file + s
                members = {ext: image_fn(index), "json": json.dumps({"index": index}).encode()}
                if label_fn is not None:
                    members["cls"] = str(label_fn(index)).encode()
                for member_ext, data in members.items():
                    info = tarfile.TarInfo(f"sample{index:06d}.{member_ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


# ---- ImageNet oddities -----------------------------------------------------------------------------------------


def exif_rotated_jpeg() -> bytes:
    """Stored 40x20 (left half red, right half blue) with EXIF Orientation 6 (rotate 90 CW to display): displays
    as 20x40 with red on top."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def cmyk_jpeg(cmyk: tuple[int, int, int, int] = (0, 255, 255, 0), size: tuple[int, int] = (40, 30)) -> bytes:
    """Pure red in CMYK (C=0, M=Y=255, K=0) by default."""
    return encode(Image.new("CMYK", size, cmyk), "JPEG", quality=95)


def gray_jpeg(level: int = 77, size: tuple[int, int] = (40, 30)) -> bytes:
    return encode(Image.new("L", size, level), "JPEG", quality=95)


def palette_png(color: tuple[int, int, int] = (10, 200, 30), size: tuple[int, int] = (40, 30)) -> bytes:
    return encode(Image.new("RGB", size, color).convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG")


def rgba_png(color: tuple[int, int, int, int] = (200, 100, 50, 128), size: tuple[int, int] = (40, 30)) -> bytes:
    return encode(Image.new("RGBA", size, color), "PNG")


def png16(level: int = 40000, size: tuple[int, int] = (40, 30)) -> bytes:
    """16-bit grayscale PNG of one value (0..65535)."""
    return encode(Image.fromarray(np.full(size[::-1], level, dtype=np.uint16)), "PNG")


def truncated_jpeg() -> bytes:
    data = encode(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8), "JPEG", quality=90)
    return data[: len(data) // 2]


def corrupt_png() -> bytes:
    """A PNG whose image data bytes were flipped (the chunk checksum no longer matches)."""
    data = bytearray(encode(Image.new("RGB", (40, 30), (1, 2, 3)), "PNG"))
    at = data.index(b"IDAT") + 8
    data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
    return bytes(data)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height pixels (grayscale) with a few bytes of data: a decompression
    bomb that must be refused from its header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
