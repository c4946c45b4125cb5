"""Turning whatever a user hands in into an RGB image the model can take, saying what changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_SIDE = 2048
MAX_PIXELS = 50_000_000  # larger images are refused from their header, before any pixel is decoded


class BadImage(ValueError):
    """An input that is not a usable image; the message says what to do."""


def prepare(source, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, list[str]]:
    """An upright 8-bit RGB image from a path, PIL image or array, and notes on each fix.

    EXIF rotation is applied, 16-bit and float images are rescaled, alpha is composited on
    white, the first frame of an animation is taken, and images larger than ``max_side`` are
    downscaled; a file of more than ``max_pixels`` (a decompression bomb) is refused unread.
    """
    notes = []
    if source is None:
        raise BadImage("no image given: upload, paste or pick an example image first")
    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as opened:
                _check_pixels(opened.width, opened.height, max_pixels)
                if getattr(opened, "n_frames", 1) > 1:
                    notes.append(f"an animation of {opened.n_frames} frames: its first frame is used")
                opened.load()
                image = opened.copy()
                image.info.update(opened.info)
                exif = opened.getexif()
        except Image.DecompressionBombError:  # PIL's own refusal, far above ``max_pixels``
            raise BadImage(f"{Path(source).name} has too many pixels to open safely; this demo takes up to "
                           f"{max_pixels / 1e6:g} million: downscale it first") from None
        except (UnidentifiedImageError, OSError) as err:
            raise BadImage(f"{Path(source).name} is not a readable image ({type(err).__name__}); "
                           "use a PNG, JPEG or WebP file") from None
    elif isinstance(source, np.ndarray):
        image, exif = _from_array(source, notes), None
    elif isinstance(source, Image.Image):
        image, exif = source, source.getexif()
    else:
        raise BadImage(f"unsupported image input of type {type(source).__name__}")

    if exif and exif.get(0x0112, 1) != 1:
        image = ImageOps.exif_transpose(image)
        notes.append("rotated upright from its EXIF orientation")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image), notes))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
        notes.append("transparent areas shown on white")
    if image.mode != "RGB":
        if image.mode in ("L", "1"):
            notes.append("grayscale image converted to RGB")
        elif image.mode == "CMYK":
            notes.append("CMYK colours converted to RGB")
        image = image.convert("RGB")
    if min(image.size) < 1:
        raise BadImage("the image is empty")
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        notes.append(f"downscaled from {image.width}x{image.height} to {size[0]}x{size[1]}")
        image = image.resize(size, Image.LANCZOS)
    return image, notes


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise BadImage(f"the image is {width} x {height} pixels; this demo takes up to {max_pixels / 1e6:g} "
                       "million pixels: downscale it first")


def _to_uint8(array: np.ndarray, notes: list[str]) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    notes.append(f"{array.dtype} pixel values rescaled to 8 bits")  # named before the conversion below
    array = array.astype(np.float64)
    top = 65535.0 if array.max() > 255 else 255.0 if array.max() > 1 else 1.0
    return np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _from_array(array: np.ndarray, notes: list[str]) -> Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)) or array.size == 0:
        raise BadImage(f"an image array must be H x W (x 1, 3 or 4), got shape {array.shape}")
    array = _to_uint8(array, notes)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return Image.fromarray(array)
