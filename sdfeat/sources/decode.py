"""Image bytes -> RGB PIL image -> the paper's centre crop as a uint8 array. Pure functions, no I/O.

`sources.read_images` fetches bytes and calls `decode_rgb` + `center_crop_resize` per image (in worker threads).
Real ImageNet oddities are handled here: the format is sniffed from the bytes (a PNG named `.JPEG` decodes),
EXIF orientation is applied, CMYK / grayscale / palette / RGBA / 16-bit images become 8-bit RGB, and
truncated, corrupt, non-image and oversized ("decompression bomb") inputs raise `ImageDecodeError` with a short
reason, which the caller records as a failed image. `IMAGE_EXTENSIONS` (every format PIL decodes here) is what the
sources count as image files and tar image members.
"""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Image.open warns (instead of raising) between Image.MAX_IMAGE_PIXELS and twice that. We turn that warning into
# an error around Image.open only; warnings filters are process-global in Python 3.11, so opens are serialised
# (header parsing only: microseconds) to keep concurrent threads from restoring each other's filters.
_OPEN_LOCK = threading.Lock()
_REASON_CHARS = 120
_UNREADABLE_FORMATS = {"EPS", "MPEG"}  # need an external program (Ghostscript) or have no decoder in PIL


def _image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) of every format PIL can open and decode here: what
    `decode_rgb` reads, so sources accept exactly these (stub plugins and the formats above excluded)."""
    Image.init()
    found = set()
    for ext, fmt in Image.registered_extensions().items():
        factory = Image.OPEN.get(fmt, (None,))[0]
        stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        if factory is not None and not stub and fmt not in _UNREADABLE_FORMATS:
            found.add(ext.lower())
    return frozenset(found)


IMAGE_EXTENSIONS = _image_extensions()  # {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ...}


class ImageDecodeError(ValueError):
    """One image could not be decoded; the message is the short reason stored with the failure."""


def _open(data: bytes) -> Image.Image:
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _reason(err: Exception) -> str:
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {err}"[:_REASON_CHARS]
    if isinstance(err, Image.UnidentifiedImageError):
        return "not a recognised image"
    return f"{type(err).__name__}: {err}"[:_REASON_CHARS]


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) as stored, from the header only. Raises ImageDecodeError."""
    try:
        with _open(data) as img:
            return img.size
    except Exception as err:  # see decode_rgb
        raise ImageDecodeError(_reason(err)) from err


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """Modes I;16* and I (16-bit grayscale PNG): scale 0..65535 to 0..255 with rounding (convert() would clip)."""
    values = np.asarray(img).astype(np.uint32)  # (H, W)
    gray = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))  # (H, W, 3)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):
        return _sixteen_bit_to_rgb(img)
    if img.mode == "F":
        gray = np.clip(np.asarray(img), 0, 255).round().astype(np.uint8)  # (H, W)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency first, so convert("RGB") does not warn
    return img.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Decoded 8-bit RGB image, EXIF orientation applied. Raises ImageDecodeError with a short reason."""
    try:
        img = _open(data)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for bad data
        raise ImageDecodeError(_reason(err)) from err


def center_crop_resize(img: Image.Image, resolution: int) -> np.ndarray:
    """The paper's crop: s = min(w, h), box (w//2 - s//2, h//2 - s//2, w//2 + s//2, h//2 + s//2), then
    `resize((resolution, resolution))` with PIL's default filter. Returns uint8 (resolution, resolution, 3).
    A 1 px short side (1 x 1, 1 x 5000) would give an empty box: the middle pixel is used, resized up."""
    img = to_rgb(img)
    width, height = img.size
    side = min(width, height)
    half = side // 2
    if half == 0:  # the paper's box is empty when the short side is 1 px: take the middle pixel (1 x 1) instead
        box = (width // 2, height // 2, width // 2 + 1, height // 2 + 1)
    else:
        box = (width // 2 - half, height // 2 - half, width // 2 + half, height // 2 + half)
    return np.asarray(img.crop(box).resize((resolution, resolution)))
