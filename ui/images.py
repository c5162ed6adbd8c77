"""Turn whatever a user uploads into an RGB image LLaVA can take, or a clear refusal. No gradio here."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from model_loader.errors import BadInput

MAX_SIDE = 1344  # LLaVA-1.5 sees 336x336; keep enough for later models, drop the rest of a huge photo


def load_image(path: str | Path, max_pixels: int = 40_000_000, max_side: int = MAX_SIDE) -> Image.Image:
    """Open, check and normalise an upload: first frame, EXIF rotation, RGB on white, 8-bit, at most max_side."""
    try:
        img = Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadInput(f"{Path(path).name} is not an image we can read.", "Upload a PNG, JPEG, GIF, WebP or BMP file.") from e
    except Image.DecompressionBombError as e:
        raise BadInput("This image is far too large (a decompression bomb?).", "Upload a smaller image.") from e
    w, h = img.size
    if w * h > max_pixels:
        raise BadInput(
            f"This image has {w}x{h} = {w * h / 1e6:.0f} megapixels; the limit is {max_pixels / 1e6:.0f}.",
            "Resize it and upload again.",
        )
    try:
        img.seek(0)  # GIF/APNG/TIFF stacks: the first frame
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise BadInput(f"{Path(path).name} is damaged or truncated ({e}).", "Upload the file again.") from e
    return normalise(img, max_side)


def normalise(img: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """Any mode (RGBA, LA, P, CMYK, I;16, I, F, 1) to 8-bit RGB, transparency over white, longest side <= max_side."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np  # noqa: PLC0415

        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else a * 0
        img = Image.fromarray(a.astype("uint8"), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        img = background
    elif img.mode != "RGB":
        img = img.convert("RGB")
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img
