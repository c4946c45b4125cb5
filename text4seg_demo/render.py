"""Pictures of a result: the patch grid over the image, mask overlays, the colour-linked answer."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageDraw

from .descriptors.codec import CLOSE_TAG, OPEN_TAG, OTHERS, split_run
from .export import label_colour
from .masks import to_image

DISPLAY_SIDE = 640
OTHERS_HEX = "#9e9e9e"


def hex_colour(index: int) -> str:
    return OTHERS_HEX if index == 0 else "#%02x%02x%02x" % label_colour(index)


def colour_map(labels: list[str]) -> dict[str, str]:
    """One colour per label, shared by the answer text, the grid and the overlays."""
    return {label: hex_colour(i) for i, label in enumerate(labels)}


def display_copy(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    scale = min(1.0, side / max(image.size))
    return image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                       Image.BILINEAR)


def grid_view(image: Image.Image, grid: np.ndarray | None, labels: list[str], rows_done: int | None = None,
              grid_size: int = 16):
    """The image with the patch grid drawn on it, and one (mask, label) annotation per label.

    Rows the model has not written yet are dimmed, so a streaming answer fills the grid in.
    Returns the value of a ``gr.AnnotatedImage``: hovering a patch shows its label.
    """
    base = display_copy(image)
    w, h = base.size
    n = grid.shape[0] if grid is not None else grid_size
    m = grid.shape[1] if grid is not None else grid_size
    done = n if rows_done is None else rows_done
    canvas = np.asarray(base).astype(np.float32)
    if done < n:
        y0 = int(round(done * h / n))
        canvas[y0:] = canvas[y0:] * 0.35 + 255 * 0.15
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for k in range(1, m):
        x = round(k * w / m)
        draw.line([(x, 0), (x, h)], fill=(255, 255, 255), width=1)
    for k in range(1, n):
        y = round(k * h / n)
        draw.line([(0, y), (w, y)], fill=(255, 255, 255), width=1)
    annotations = []
    if grid is not None:
        cell = to_image(grid, h, w)
        visible = ((np.arange(h) * n) // h)[:, None] < done  # the same row rule as to_image
        for i, label in enumerate(labels):
            if i == 0:
                continue
            region = (cell == i) & visible
            if region.any():
                annotations.append((region.astype(np.float32) * 0.6, label))
    return picture, annotations


def overlay(image: Image.Image, label_map: np.ndarray | None, alpha: float = 0.5) -> Image.Image:
    """Each foreground label tinted in its colour, with a bright outline."""
    base = display_copy(image)
    if label_map is None:
        return base
    small = np.asarray(Image.fromarray(label_map.astype(np.int32), mode="I").resize(base.size, Image.NEAREST))
    out = np.asarray(base).astype(np.float32)
    for i in np.unique(small):
        if i == 0:
            continue
        region = small == i
        out[region] = out[region] * (1 - alpha) + np.array(label_colour(int(i))) * alpha
        edge = region & ~_erode(region)
        out[edge] = label_colour(int(i))
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _erode(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def highlight(text: str, labels: list[str]) -> list[tuple[str, str | None]]:
    """The answer cut into pieces for ``gr.HighlightedText``: each run or label under its label."""
    start = text.find(OPEN_TAG)
    if start < 0:
        return [(text, None)]
    head, body = text[: start + len(OPEN_TAG)], text[start + len(OPEN_TAG):]
    end = body.find(CLOSE_TAG)
    tail = body[end:] if end >= 0 else ""
    body = body[:end] if end >= 0 else body
    known = set(labels) | {OTHERS}
    pieces: list[tuple[str, str | None]] = [(head, None)]
    for part in re.split(r"(\| |\n ?)", body):
        if not part:
            continue
        run = split_run(part.strip())
        name = run[0].strip() if run else part.strip()
        pieces.append((part, name if name in known else None))
    if tail:
        pieces.append((tail, None))
    return pieces
