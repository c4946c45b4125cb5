import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from text4seg_demo.export import coco_json, coco_rle, save_binary_png, save_label_png
from text4seg_demo.masks import load_mask, to_grid, to_image


@pytest.mark.parametrize("shape", [(480, 640), (333, 500), (17, 1000), (16, 16), (7, 5)])
def test_to_grid_is_pil_nearest(shape):
    rng = np.random.default_rng(0)
    label_map = rng.integers(0, 4, size=shape)
    expected = np.asarray(Image.fromarray(label_map.astype(np.uint8)).resize((16, 24), Image.NEAREST))
    assert (to_grid(label_map, 24, 16) == expected).all()


def test_to_grid_keeps_label_ids_above_255():
    label_map = np.full((64, 64), 300)
    label_map[:32] = 1000
    assert set(np.unique(to_grid(label_map, 8))) == {300, 1000}


def test_to_image_uses_floor_rule_and_inverts_on_exact_multiples():
    grid = np.arange(12).reshape(3, 4)
    up = to_image(grid, 7, 9)
    for y in range(7):
        for x in range(9):
            assert up[y, x] == grid[(y * 3) // 7, (x * 4) // 9]
    assert (to_grid(to_image(grid, 30, 40), 3, 4) == grid).all()


def test_binary_and_label_pngs(tmp_path):
    mask = np.zeros((20, 30), bool)
    mask[5:9, 3:20] = True
    save_binary_png(mask, tmp_path / "m.png")
    assert (load_mask(tmp_path / "m.png") == mask).all()
    assert set(np.unique(np.asarray(Image.open(tmp_path / "m.png")))) == {0, 255}

    label_map = mask.astype(int) + (np.arange(30)[None] > 25) * 2
    save_label_png(label_map, ["others", "cat", "dog"], tmp_path / "l.png")
    with Image.open(tmp_path / "l.png") as image:
        assert image.mode == "P"
        assert (np.asarray(image) == label_map).all()
        assert json.loads(image.text["labels"]) == ["others", "cat", "dog"]


def test_coco_rle_decodes_to_the_mask():
    rng = np.random.default_rng(3)
    label_map = rng.integers(0, 3, size=(37, 53))
    doc = coco_json(label_map, ["others", "cat", "dog"])
    assert [s["label"] for s in doc["segmentations"]] == ["cat", "dog"]
    for i, seg in enumerate(doc["segmentations"], start=1):
        rle = {"size": seg["rle"]["size"], "counts": seg["rle"]["counts"].encode()}
        assert (mask_utils.decode(rle) == (label_map == i)).all()
        assert seg["area"] == int((label_map == i).sum())
    json.dumps(doc)  # serialisable as is
    assert coco_rle(np.zeros((4, 4)))["size"] == [4, 4]
