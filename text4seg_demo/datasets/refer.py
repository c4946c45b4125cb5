"""The RefCOCO family as its datasets ship, turned into manifests.

Layout read (the refer toolkit's, which RefCOCO, RefCOCO+, RefCOCOg and gRefCOCO all use)::

    REFER_DIR/refcoco/   instances.json  refs(unc).p
    REFER_DIR/refcoco+/  instances.json  refs(unc).p
    REFER_DIR/refcocog/  instances.json  refs(umd).p
    REFER_DIR/grefcoco/  instances.json  grefs(unc).json
    COCO_TRAIN2014_DIR/COCO_train2014_000000000009.jpg ...

Each sentence becomes one query; the sentences of a referent share one mask file, rendered
from the COCO polygons or RLE with pycocotools. A gRefCOCO sentence may name several objects
(their masks united) or none (an empty mask).
"""

from __future__ import annotations

import json
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

# dataset -> (the refs file, the splits it has)
DATASETS = {
    "refcoco": ("refs(unc).p", ("train", "val", "testA", "testB")),
    "refcoco+": ("refs(unc).p", ("train", "val", "testA", "testB")),
    "refcocog": ("refs(umd).p", ("train", "val", "test")),
    "grefcoco": ("grefs(unc).json", ("train", "val", "testA", "testB")),
}


class DatasetError(ValueError):
    """A dataset folder or file that is missing or does not fit the layout."""


@dataclass
class Conversion:
    """What :func:`convert` wrote and what it had to leave out, by reason."""

    manifest: Path
    queries: int = 0
    referents: int = 0
    empty_targets: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        line = (f"{self.queries} queries from {self.referents} referents ({self.empty_targets} without a target) "
                f"written to {self.manifest}")
        if self.skipped:
            line += "; skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return line


class _PlainUnpickler(pickle.Unpickler):
    """Reads the refs pickles (lists of dicts of plain values) and refuses anything that would
    run code on loading, so that a tampered file cannot."""

    def find_class(self, module, name):
        raise DatasetError(f"the refs file asks for {module}.{name}; a refs file holds only plain lists and dicts")


def read_refs(path: Path) -> list[dict]:
    """The referents of a ``refs(*).p`` pickle or a ``grefs(*).json`` file."""
    if not path.is_file():
        raise DatasetError(f"missing {path}: expected the refer layout (see `text4seg data refcoco --help`)")
    try:
        if path.suffix == ".json":
            refs = json.loads(path.read_text())
        else:
            with open(path, "rb") as f:
                refs = _PlainUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, json.JSONDecodeError, EOFError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not a readable refs file ({err})") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) and "sentences" in r for r in refs[:100]):
        raise DatasetError(f"{path} does not hold a list of referents with sentences")
    return refs


def read_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """COCO ``instances.json``: images and annotations by id."""
    if not path.is_file():
        raise DatasetError(f"missing {path}: each dataset folder holds the COCO instances.json it was built on")
    try:
        data = json.loads(path.read_text())
        images = {int(im["id"]): im for im in data["images"]}
        annotations = {int(a["id"]): a for a in data["annotations"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"{path} is not a COCO instances file ({err})") from None
    return images, annotations


def render(annotation: dict, height: int, width: int) -> np.ndarray:
    """One annotation's binary mask: polygons, uncompressed or compressed RLE."""
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list):  # polygons: each a flat [x0, y0, x1, y1, ...]
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            raise ValueError("no polygon with three points")
        rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            counts = segmentation["counts"]
            rle = {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
        if list(rle["size"]) != [height, width]:
            raise ValueError(f"RLE of size {rle['size']} on an image of {height} x {width}")
    else:
        raise ValueError("no segmentation")
    return coco_mask.decode(rle).astype(bool)


def _target_ids(ref: dict) -> list[int]:
    """The annotation ids a referent names; none for a gRefCOCO no-target sentence (id -1)."""
    if ref.get("no_target"):
        return []
    ids = ref.get("ann_id")
    ids = ids if isinstance(ids, list) else [ids]
    return [int(i) for i in ids if i is not None and int(i) >= 0]


def convert(refer_dir: str | Path, images_dir: str | Path, dataset: str, split: str, out: str | Path,
            progress=None) -> Conversion:
    """Write ``out/manifest.jsonl`` and ``out/masks/`` for one split of one dataset.

    Image paths in the manifest point into ``images_dir`` (absolute, nothing copied); each query's
    ``kind`` is ``dataset/split``. Referents whose image or annotations are missing or cannot
    be rendered are skipped and counted in the returned :class:`Conversion`.
    """
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    refs_name, splits = DATASETS[dataset]
    if split not in splits:
        raise DatasetError(f"{dataset} has the splits {', '.join(splits)}; it has no {split!r}")
    folder, images_dir, out = Path(refer_dir) / dataset, Path(images_dir).resolve(), Path(out)
    if not folder.is_dir():
        raise DatasetError(f"no {folder}: --refer must be the folder that holds {dataset}/ (the refer layout)")
    if not images_dir.is_dir():
        raise DatasetError(f"no image folder {images_dir}: --images must be COCO's train2014 folder")
    refs = [r for r in read_refs(folder / refs_name) if r.get("split") == split]
    if not refs:
        raise DatasetError(f"{folder / refs_name} has no referents in split {split!r}")
    images, annotations = read_instances(folder / "instances.json")

    (out / "masks").mkdir(parents=True, exist_ok=True)
    result, lines = Conversion(out / "manifest.jsonl"), []
    for ref in refs:
        if progress:
            progress()
        image = images.get(int(ref.get("image_id", -1)))
        if image is None:
            result.skipped["referents whose image is not in instances.json"] += 1
            continue
        path = images_dir / image["file_name"]
        if not path.is_file():
            result.skipped["referents whose image file is missing"] += 1
            continue
        ids = _target_ids(ref)
        if any(i not in annotations for i in ids):
            result.skipped["referents naming an annotation not in instances.json"] += 1
            continue
        target = np.zeros((image["height"], image["width"]), bool)
        try:
            for i in ids:
                target |= render(annotations[i], image["height"], image["width"])
        except (ValueError, TypeError, KeyError):
            result.skipped["referents with an annotation that cannot be rendered"] += 1
            continue
        mask_rel = f"masks/{ref['ref_id']}.png"
        Image.fromarray(target.astype(np.uint8) * 255).save(out / mask_rel)
        result.referents += 1
        result.empty_targets += not ids
        for sentence in ref["sentences"]:
            text = str(sentence.get("sent", "")).strip()
            if not text:
                result.skipped["empty sentences"] += 1
                continue
            lines.append({"image": str(path), "expression": text, "mask": mask_rel, "kind": f"{dataset}/{split}",
                          "ref_id": ref["ref_id"], "sent_id": sentence.get("sent_id")})
    if not lines:
        raise DatasetError(f"nothing of {dataset}/{split} could be converted ({dict(result.skipped)}): "
                           f"do --refer and --images belong together?")
    result.queries = len(lines)
    result.manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return result
