"""Between pixel masks and patch grids, with the reference's nearest-neighbour semantics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def to_grid(label_map: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Shrink a label map (or binary mask) to ``height x width`` patches.

    Exactly PIL's ``NEAREST`` resize of the whole map, as the reference builds its training
    descriptors: each patch takes the one pixel under its centre, no majority vote.
    """
    width = height if width is None else width
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"a label map is 2-D, got shape {label_map.shape}")
    image = Image.fromarray(label_map.astype(np.int32), mode="I")
    return np.asarray(image.resize((width, height), Image.NEAREST), dtype=np.int32)


def to_image(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Blow a patch grid up to ``height x width`` pixels by nearest neighbour.

    Pixel ``y`` takes grid row ``floor(y * H / height)``, the rule of the reference's
    ``F.interpolate(mode="nearest")``, computed exactly in integers.
    """
    grid = np.asarray(grid)
    rows = (np.arange(height) * grid.shape[0]) // height
    cols = (np.arange(width) * grid.shape[1]) // width
    return grid[rows[:, None], cols[None, :]]


def load_mask(path: str | Path) -> np.ndarray:
    """A mask file as a boolean array: any pixel > 0 is the target (first channel of colour files)."""
    with Image.open(path) as image:
        array = np.asarray(image)
    if array.ndim == 3:
        array = array[..., 0]
    return array > 0
