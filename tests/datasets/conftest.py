"""A small refer-layout dataset that the tests write: COCO ``instances.json`` with polygon,
compressed-RLE and uncompressed-RLE annotations, a RefCOCO ``refs(unc).p`` pickle and a
gRefCOCO ``grefs(unc).json``, over three images in a train2014 folder."""

import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

W, H = 64, 48


def _box(x0, y0, x1, y1) -> np.ndarray:
    """The pixels of a box, as a mask (x1, y1 exclusive)."""
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _compressed(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, starting with zeros."""
    flat, counts, current, run = mask.T.flatten(), [], False, 0
    for pixel in flat:
        if pixel != current:
            counts.append(run)
            current, run = pixel, 0
        run += 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


@pytest.fixture
def refer(tmp_path):
    images = tmp_path / "train2014"
    images.mkdir()
    files = [f"COCO_train2014_{i:012d}.jpg" for i in (1, 2, 3)]
    for name in files:
        Image.new("RGB", (W, H), (90, 120, 150)).save(images / name)
    truth = {10: _box(4, 4, 20, 30), 11: _box(30, 10, 60, 40), 12: _box(0, 0, 16, 16), 13: _box(40, 20, 50, 44)}
    annotations = [
        # a rectangle as a polygon: pycocotools fills it up to its far edges
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[4, 4, 20, 4, 20, 30, 4, 30]]},
        {"id": 11, "image_id": 1, "category_id": 1, "segmentation": _compressed(truth[11])},
        {"id": 12, "image_id": 2, "category_id": 2, "segmentation": _uncompressed(truth[12])},
        {"id": 13, "image_id": 2, "category_id": 2, "segmentation": [[40, 20, 50, 20, 50, 44, 40, 44]]},
        {"id": 14, "image_id": 3, "category_id": 2, "segmentation": []},  # cannot be rendered
    ]
    instances = {"images": [{"id": i, "file_name": f, "height": H, "width": W} for i, f in zip((1, 2, 3), files)],
                 "annotations": annotations, "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}

    def sentences(*texts):
        return [{"sent": t, "raw": t, "sent_id": 100 + k, "tokens": t.split()} for k, t in enumerate(texts)]

    refs = [
        {"ref_id": 1, "ann_id": 10, "image_id": 1, "split": "val", "category_id": 1,
         "sentences": sentences("left cat", "the cat on the left")},
        {"ref_id": 2, "ann_id": 11, "image_id": 1, "split": "val", "category_id": 1, "sentences": sentences("big cat")},
        {"ref_id": 3, "ann_id": 12, "image_id": 2, "split": "val", "category_id": 2, "sentences": sentences("dog")},
        {"ref_id": 4, "ann_id": 14, "image_id": 3, "split": "val", "category_id": 2, "sentences": sentences("ghost")},
        {"ref_id": 5, "ann_id": 13, "image_id": 2, "split": "testA", "category_id": 2,
         "sentences": sentences("small dog")},
    ]
    grefs = [
        {"ref_id": 1, "ann_id": [10, 11], "image_id": 1, "split": "val", "category_id": [1], "no_target": False,
         "sentences": sentences("both cats")},
        {"ref_id": 2, "ann_id": [-1], "image_id": 2, "split": "val", "category_id": [], "no_target": True,
         "sentences": sentences("the zebra", "a horse")},
        {"ref_id": 3, "ann_id": [12], "image_id": 2, "split": "val", "category_id": [2], "no_target": False,
         "sentences": sentences("top left dog")},
    ]
    root = tmp_path / "refer_seg"
    for dataset in ("refcoco", "grefcoco"):
        (root / dataset).mkdir(parents=True)
        (root / dataset / "instances.json").write_text(json.dumps(instances))
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(grefs))
    return SimpleNamespace(root=root, images=images, truth=truth, files=files)
