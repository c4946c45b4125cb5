"""``text4seg eval``'s aggregation."""


import numpy as np
import pytest
from PIL import Image

from text4seg_demo.descriptors.codec import Diagnostic
from text4seg_demo.evaluation import evaluate as evaluate_module
from text4seg_demo.pipeline import Result


def test_eval_aggregates_like_the_reference(tmp_path, monkeypatch):
    # three 32 x 32 queries: a half-image target predicted exactly, an empty target predicted
    # empty, and the half-image target again predicted empty
    (tmp_path / "i").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "i" / "x.png")
    half = np.zeros((32, 32), np.uint8)
    half[:16] = 255
    Image.fromarray(half).save(tmp_path / "i" / "half.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "i" / "none.png")
    (tmp_path / "manifest.jsonl").write_text(
        '{"image": "i/x.png", "expression": "top", "mask": "i/half.png", "kind": "side"}\n'
        '{"image": "i/x.png", "expression": "nothing", "mask": "i/none.png", "kind": "absent"}\n'
        '{"image": "i/x.png", "expression": "upper", "mask": "i/half.png", "kind": "side"}\n')
    answers = iter([half > 0, np.zeros((32, 32), bool), np.zeros((32, 32), bool)])

    def fake_segment(engine, image, request, refiner=None):
        coarse = next(answers).astype(np.int32)
        return Result(text="", grid=coarse[::2, ::2], labels=["others", request.expression],
                      diagnostics=[Diagnostic("padded", 1, "")] if request.expression == "top" else [],
                      coarse=coarse, refined=None, tokens={"generated": 10}, timings={"total": 0.1}, model="m",
                      quant="fp32", device="cpu", fmt="rrle", constrained=False)

    monkeypatch.setattr(evaluate_module, "segment", fake_segment)

    class Engine:
        name, settings = "fake", type("S", (), {"grid": 16})()

    report = evaluate_module.evaluate(Engine(), str(tmp_path), progress=False)
    assert report["n"] == 3
    # cIoU sums over queries: 512 target pixels found of 1024 in the union
    assert report["ciou"] == {"coarse": 0.5, "refined": None}
    assert report["giou"] == {"coarse": pytest.approx(2 / 3), "refined": None}  # empty/empty counts 1
    assert report["grid_ciou"] == 0.5 and report["oracle_ciou"] == 1.0
    assert report["grid_prec50"] == pytest.approx(2 / 3)  # the target found in two queries of three
    assert report["malformed_rate"] == pytest.approx(1 / 3) and report["mean_generated_tokens"] == 10
    assert report["by_kind"] == {
        "absent": {"n": 1, "grid_ciou": 1.0, "grid_giou": 1.0, "grid_prec50": 1.0, "coarse_ciou": 1.0},
        "side": {"n": 2, "grid_ciou": 0.5, "grid_giou": 0.5, "grid_prec50": 0.5, "coarse_ciou": 0.5}}
    assert [q["kind"] for q in report["queries"]] == ["side", "absent", "side"]
