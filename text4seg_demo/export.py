"""Writing results out: mask PNGs, COCO run-length JSON and descriptor text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .descriptors.codec import OTHERS

# Colour-blind-safe palette (Okabe-Ito) for foreground labels; background stays black.
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
           (0, 114, 178), (213, 94, 0), (204, 121, 167), (153, 153, 153)]


def label_colour(index: int) -> tuple[int, int, int]:
    """The display colour of foreground label number ``index`` (1-based; 0 is background)."""
    return (0, 0, 0) if index == 0 else PALETTE[(index - 1) % len(PALETTE)]


def save_binary_png(mask: np.ndarray, path: str | Path) -> Path:
    """An 8-bit PNG: 255 where the mask is set, 0 elsewhere."""
    Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), mode="L").save(path)
    return Path(path)


def save_label_png(label_map: np.ndarray, labels: list[str], path: str | Path) -> Path:
    """A palette PNG whose pixel values are label ids and whose palette shows them in colour."""
    label_map = np.asarray(label_map)
    if len(labels) > 256:
        raise ValueError("a palette PNG holds at most 256 labels")
    image = Image.fromarray(label_map.astype(np.uint8), mode="P")
    image.putpalette([c for i in range(256) for c in label_colour(i)])
    meta = PngInfo()
    meta.add_text("labels", json.dumps(labels))
    image.save(path, pnginfo=meta)
    return Path(path)


def coco_rle(mask: np.ndarray) -> dict:
    """COCO run-length encoding of a binary mask (``counts`` as a UTF-8 string)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask) > 0, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_json(label_map: np.ndarray, labels: list[str]) -> dict:
    """One COCO RLE per foreground label of a label map, keyed by label."""
    label_map = np.asarray(label_map)
    return {
        "size": list(label_map.shape),
        "segmentations": [
            {"label": label, "rle": coco_rle(label_map == i), "area": int((label_map == i).sum())}
            for i, label in enumerate(labels)
            if label != OTHERS
        ],
    }
