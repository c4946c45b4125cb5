"""The bundled examples carry their truth, and both bundled models answer every one of them."""

from pathlib import Path

from text4seg_demo.evaluation.manifest import read_manifest
from text4seg_demo.images import prepare
from text4seg_demo.masks import load_mask
from text4seg_demo.training import synth

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "synthetic"


def test_examples_cover_every_query_kind_with_masks():
    queries = read_manifest(EXAMPLES)
    assert len(queries) >= 8 and {q.kind for q in queries} == set(synth.KINDS)
    for q in queries:
        image, mask = prepare(q.image)[0], load_mask(q.mask)
        assert mask.shape == (image.height, image.width)
        assert mask.any() == (q.kind != "absent")
