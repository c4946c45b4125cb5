"""The bundled examples carry their truth, and both bundled models answer every one of them."""

from pathlib import Path

import numpy as np
import pytest

from text4seg_demo.descriptors import codec
from text4seg_demo.evaluation.manifest import read_manifest
from text4seg_demo.evaluation.metrics import iou
from text4seg_demo.images import prepare
from text4seg_demo.inference.loading import load
from text4seg_demo.masks import load_mask, to_grid
from text4seg_demo.pipeline import Request, segment
from text4seg_demo.training import synth

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "synthetic"


def test_examples_cover_every_query_kind_with_masks():
    queries = read_manifest(EXAMPLES)
    assert len(queries) >= 8 and {q.kind for q in queries} == set(synth.KINDS)
    for q in queries:
        image, mask = prepare(q.image)[0], load_mask(q.mask)
        assert mask.shape == (image.height, image.width)
        assert mask.any() == (q.kind != "absent")


def cases():
    for name in ("tiny-rrle", "tiny-full"):
        for q in read_manifest(EXAMPLES):
            yield pytest.param(name, q, id=f"{name}-{q.image.stem}")


@pytest.mark.slow
@pytest.mark.parametrize("name, q", cases())
@pytest.mark.parametrize("constrained", [False, True])  # free: the model alone; constrained: the app's default
def test_bundled_model_answers_the_example(name, q, constrained):
    result = segment(load(name, log=lambda m: None), prepare(q.image)[0],
                     Request(expression=q.expression, constrained=constrained))
    assert result.diagnostics == [], [d.code for d in result.diagnostics]
    if q.kind == "absent":
        assert not result.grid.any(), f"marks cells for the absent {q.expression!r}"
        return
    assert result.labels == [codec.OTHERS, q.expression], result.labels
    truth = to_grid(load_mask(q.mask).astype(np.uint8), 16).astype(bool)
    assert iou(result.grid > 0, truth) >= 0.5
