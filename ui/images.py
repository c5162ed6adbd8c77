"""Turn whatever a user uploads into an RGB image LLaVA can take, or a clear refusal. No gradio here.

The header is read first (no pixels), so an over-limit or fake image is refused before anything is decoded; a large
JPEG is decoded at a reduced scale (`draft`), other formats at most once at full size (bounded by the pixel limit)
and reduced before any conversion.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from model_loader.errors import BadInput

MAX_SIDE = 1344  # LLaVA-1.5 sees 336x336; keep enough for later models, drop the rest of a huge photo
_ROWS = 256  # rows converted at a time for 16-bit images
# EXIF orientation -> the transposes that put the image upright (as PIL's ImageOps.exif_transpose does)
_UPRIGHT = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_270],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_90],
}


def open_image(path: str | Path, max_pixels: int = 40_000_000) -> Image.Image:
    """Open an upload without decoding it: refuse what is not an image or has more than `max_pixels`."""
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except FileNotFoundError as e:
        raise BadInput("This image is no longer on the server.", "Upload it again.") from e
    except Image.DecompressionBombError as e:
        raise BadInput("This image is far too large (a decompression bomb?).", "Upload a smaller image.") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadInput(f"{name} is not an image we can read.", "Upload a PNG, JPEG, GIF, WebP or BMP file.") from e
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise BadInput(
            f"This image has {w}x{h} = {w * h / 1e6:.0f} megapixels; the limit is {max_pixels / 1e6:.0f}.",
            "Resize it and upload again.",
        )
    return img


def load_image(path: str | Path, max_pixels: int = 40_000_000, max_side: int = MAX_SIDE) -> Image.Image:
    """Check and decode an upload: first frame, upright (EXIF), 8-bit RGB on white, longest side <= max_side."""
    img = open_image(path, max_pixels)
    try:
        img.seek(0)  # GIF/APNG/TIFF stacks: the first frame
        orientation = img.getexif().get(0x0112, 1)
        if img.format == "JPEG":
            img.draft(img.mode, (max_side, max_side))  # DCT scaling: decodes at 1/2, 1/4 or 1/8 size
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise BadInput(f"{Path(path).name} is damaged or truncated ({e}).", "Upload the file again.") from e
    img = normalise(img, max_side)
    for t in _UPRIGHT.get(orientation, []):
        img = img.transpose(t)
    return img


class ShrunkImages:
    """Decoded, shrunk uploads remembered by their content: a script that sends the same large picture with every
    question (a new temporary file each time) pays the decoding once, as the page does after its upload."""

    def __init__(self, entries: int = 8) -> None:  # at most 1344x1344 RGB each: ~5 MB
        self._images: OrderedDict[tuple[str, int, int], Image.Image] = OrderedDict()
        self._entries = entries
        self._lock = threading.Lock()  # called from worker threads

    def load(self, path: str | Path, max_pixels: int = 40_000_000, max_side: int = MAX_SIDE) -> Image.Image:
        """load_image's result for this file's bytes (a copy: the caller may change it)."""
        try:
            key = (_digest(path), max_pixels, max_side)
        except OSError:
            return load_image(path, max_pixels, max_side)  # let load_image say what is wrong with the file
        with self._lock:
            img = self._images.get(key)
            if img is not None:
                self._images.move_to_end(key)
                return img.copy()
        img = load_image(path, max_pixels, max_side)
        with self._lock:
            self._images[key] = img
            while len(self._images) > self._entries:
                self._images.popitem(last=False)
        return img.copy()


def _digest(path: str | Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit greys keep their levels (65535 -> 255, scaled, not clipped); 32-bit and float are stretched."""
    if img.mode.startswith("I;16"):
        w, h = img.size
        out = np.empty((h, w), dtype=np.uint8)
        for y in range(0, h, _ROWS):  # row bands: never a full-size wide copy
            band = np.asarray(img.crop((0, y, w, min(h, y + _ROWS))), dtype=np.uint16)
            out[y : y + band.shape[0]] = (band.astype(np.uint32) * 255 + 32767) // 65535
        return Image.fromarray(out, "L")
    a = np.asarray(img, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) * 255.0 if hi > lo else a * 0
    return Image.fromarray(a.astype("uint8"), "L")


def normalise(img: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """Any mode (RGBA, LA, P, CMYK, I;16, I, F, 1) to 8-bit RGB, transparency over white, longest side <= max_side.

    Reduces first (integer box filter, cheap at full size), then converts, then resamples the small image.
    """
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    elif img.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV", "PA", "La", "RGBa", "RGBX"):
        img = img.convert("RGBA" if "A" in img.mode or "a" in img.mode else "RGB")
    factor = max(img.size) // (2 * max_side)
    if factor >= 2:
        img = img.reduce(factor)
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        rgba = img.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        img = background
    elif img.mode != "RGB":
        img = img.convert("RGB")
    return img
