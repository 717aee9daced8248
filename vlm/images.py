"""Opening user images safely: every way an image file can be wrong becomes a one-line `VLMError`."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# Decoding more pixels than this is refused before any pixel is read (decompression bombs); 64 MP covers
# any camera photo. Override with the VLM_MAX_IMAGE_PIXELS environment variable: a positive number of pixels, or
# 0 or "none" for no limit.
DEFAULT_MAX_PIXELS = 64_000_000
MAX_PIXELS_VARIABLE = "VLM_MAX_IMAGE_PIXELS"


def max_pixels() -> int | None:
    """The pixel limit from `VLM_MAX_IMAGE_PIXELS` (default `DEFAULT_MAX_PIXELS`); None for no limit."""
    from vlm.errors import VLMError

    value = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    if value.lower() == "none":
        return None
    try:
        limit = int(value.replace("_", ""))
    except ValueError:
        limit = -1
    if limit < 0:
        raise VLMError(
            f"{MAX_PIXELS_VARIABLE}={value!r} is not a pixel count: give a positive whole number, or 0 or none "
            "for no limit"
        )
    return limit or None


def load_image(path: str | Path, limit: int | None = None) -> Image.Image:
    """Opens an image as RGB: first frame of animations, EXIF rotation applied, transparency on white,
    16-bit and float greyscale scaled to 8 bits. Raises `VLMError` naming the file for anything else, including
    a path that is not a regular file (a named pipe would block the read). `limit`: the most pixels (default:
    `max_pixels()`)."""
    from vlm.files import open_regular

    with open_regular(Path(path), "image") as f:
        return _decode(f, str(path), limit)


def image_from_bytes(data: bytes, name: str, formats: tuple[str, ...], limit: int | None = None) -> Image.Image:
    """`load_image` for an image held in memory (e.g. sent to the server), decoded only if it is in one of `formats`
    (Pillow's names: "PNG", "JPEG", "WEBP"); `name` says which image in errors."""
    return _decode(io.BytesIO(data), name, limit, formats)


def _decode(f: BinaryIO, name: str, limit: int | None, formats: tuple[str, ...] | None = None) -> Image.Image:
    """The image in the open file `f` as RGB (see `load_image`), every problem a `VLMError` naming `name`."""
    from vlm.errors import VLMError

    limit = limit or max_pixels()
    # Pillow has its own bomb check (an error at twice its limit); make it follow ours, which runs first.
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(f, formats=formats)
            w, h = img.size
            if limit is not None and w * h > limit:
                raise VLMError(f"image too large: {name} is {w}x{h} pixels, above the limit of {limit:,}")
            img.seek(0)  # animated GIF/WebP/APNG: the first frame
            img.load()
    except VLMError:
        raise
    except UnidentifiedImageError:
        kind = f"a {', '.join(formats)} image" if formats else "an image (or an unsupported format)"
        raise VLMError(f"not {kind}: {name}") from None
    except Image.DecompressionBombError:
        raise VLMError(f"image too large: {name} exceeds the pixel limit of {limit:,}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise VLMError(f"corrupt or truncated image: {name} ({e})") from None
    try:
        return to_rgb(ImageOps.exif_transpose(img))
    except (OSError, ValueError) as e:
        raise VLMError(f"unsupported image: {name} ({e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's own conversion clips wide greyscale to 0..255; scale by the format's range instead.
        import numpy as np  # here, not at the top: `vlm caption` checks its image before numpy's import pays off

        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in a folder, by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
