"""``text4seg eval``: aggregation, gRefCOCO's accuracies, rows streamed to disk and resume."""

import json

import numpy as np
import pytest
from PIL import Image

from text4seg_demo.descriptors.codec import Diagnostic
from text4seg_demo.evaluation import evaluate as evaluate_module
from text4seg_demo.pipeline import Result


class Engine:
    name, settings = "fake", type("S", (), {"grid": 16})()


def _answering(monkeypatch, answers, calls=None):
    """``segment`` replaced by one that returns the next of ``answers`` (32 x 32 masks), or
    raises it if it is an exception."""
    answers = iter(answers)

    def fake_segment(engine, image, request, refiner=None):
        if calls is not None:
            calls.append(request.expression)
        answer = next(answers)
        if isinstance(answer, BaseException):
            raise answer
        coarse = answer.astype(np.int32)
        return Result(text="", grid=coarse[::2, ::2], labels=["others", request.expression],
                      diagnostics=[Diagnostic("padded", 1, "")] if request.expression == "top" else [],
                      coarse=coarse, refined=coarse if request.expression != "top" else None,
                      tokens={"generated": 10}, timings={"total": 0.1}, model="m", quant="fp32", device="cpu",
                      fmt="rrle", constrained=False)

    monkeypatch.setattr(evaluate_module, "segment", fake_segment)


def _manifest(root, lines):
    (root / "i").mkdir(exist_ok=True)
    Image.new("RGB", (32, 32)).save(root / "i" / "x.png")
    half = np.zeros((32, 32), np.uint8)
    half[:16] = 255
    Image.fromarray(half).save(root / "i" / "half.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "i" / "none.png")
    dot = np.zeros((32, 32), np.uint8)
    dot[0, 0] = 255  # a one-pixel target that the 16 x 16 grid does not see
    Image.fromarray(dot).save(root / "i" / "dot.png")
    (root / "manifest.jsonl").write_text("".join(
        json.dumps({"image": "i/x.png", "expression": e, "mask": f"i/{m}.png", "kind": k}) + "\n" for e, m, k in lines))
    return half > 0


def test_eval_aggregates_like_the_reference(tmp_path, monkeypatch):
    # three 32 x 32 queries: a half-image target predicted exactly, an empty target predicted
    # empty, and the half-image target again predicted empty
    half = _manifest(tmp_path, [("top", "half", "side"), ("nothing", "none", "absent"), ("upper", "half", "side")])
    _answering(monkeypatch, [half, np.zeros((32, 32), bool), np.zeros((32, 32), bool)])
    report = evaluate_module.evaluate(Engine(), str(tmp_path), progress=False)
    assert report["n"] == 3
    # cIoU sums over queries: 512 target pixels found of 1024 in the union
    assert report["ciou"] == {"coarse": 0.5, "refined": 0.0}  # refined only on the two queries answered empty
    assert report["giou"] == {"coarse": pytest.approx(2 / 3), "refined": 0.5}  # empty/empty counts 1
    assert report["grid_ciou"] == 0.5 and report["oracle_ciou"] == 1.0
    assert report["grid_prec50"] == pytest.approx(2 / 3)  # the target found in two queries of three
    assert report["malformed_rate"] == pytest.approx(1 / 3) and report["mean_generated_tokens"] == 10
    assert report["by_kind"]["side"] == {"n": 2, "grid_ciou": 0.5, "grid_giou": 0.5, "grid_prec50": 0.5,
                                         "coarse_ciou": 0.5, "coarse_giou": 0.5, "refined_ciou": 0.0,
                                         "refined_giou": 0.0}
    assert report["by_kind"]["absent"]["n_acc"] == {"grid": 1.0, "coarse": 1.0, "refined": 1.0}
    # half of a 32 x 32 image is 128 cells of the 16 x 16 grid; the absent query has no size
    assert report["by_target_size"][">=16"] == report["by_kind"]["side"]
    assert [report["by_target_size"][size]["n"] for size in ("<1", "1-4", "4-16")] == [0, 0, 0]
    assert [q["kind"] for q in report["queries"]] == ["side", "absent", "side"]
    assert report["grid_losses"] == {"extra": 0.0, "missing": 0.0, "missed": 0.5, "marked_absent": 0.0,
                                     "marked_between_centres": 0.0}  # the target answered empty: its 128 cells


def test_grid_losses_say_where_the_union_goes_and_add_up_to_what_grid_ciou_lacks(tmp_path, monkeypatch):
    # the half-image target answered with the top three quarters (64 cells too many) and with the
    # top quarter (64 too few); the one-pixel target, which lies between the grid's sampled patch
    # centres, answered with the cell it lies in
    _manifest(tmp_path, [("over", "half", "k"), ("under", "half", "k"), ("dot", "dot", "k")])
    over, under, corner = np.zeros((32, 32), bool), np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    over[:24], under[:8], corner[:2, :2] = True, True, True
    _answering(monkeypatch, [over, under, corner])
    report = evaluate_module.evaluate(Engine(), str(tmp_path), progress=False)
    union = 192 + 128 + 1
    assert report["grid_losses"] == pytest.approx({"extra": 64 / union, "missing": 64 / union, "missed": 0.0,
                                                   "marked_absent": 0.0, "marked_between_centres": 1 / union})
    assert sum(report["grid_losses"].values()) == pytest.approx(1 - report["grid_ciou"])


def test_no_target_and_target_accuracies_as_grefcoco_defines_them(tmp_path, monkeypatch):
    # two no-target queries (one answered empty, one not) and four with a target (two found; a
    # one-pixel target answered empty is a target missed, although the grid cannot show it)
    half = _manifest(tmp_path, [("a", "none", "g"), ("b", "none", "g"), ("c", "half", "g"), ("d", "half", "g"),
                                ("e", "half", "g"), ("f", "dot", "g")])
    nothing, corner = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    corner[30:, 30:] = True  # a wrong, non-empty answer: counts as "there is a target"
    _answering(monkeypatch, [nothing, corner, half, corner, nothing, nothing])
    report = evaluate_module.evaluate(Engine(), str(tmp_path), progress=False)
    assert report["no_target"]["n"] == 2
    assert report["no_target"]["n_acc"] == {"grid": 0.5, "coarse": 0.5, "refined": 0.5}
    assert report["no_target"]["t_acc"]["coarse"] == report["no_target"]["t_acc"]["grid"] == 0.5
    # gIoU: the empty answer on no target scores 1, the corner on no target 0; cIoU ignores the first
    assert report["giou"]["coarse"] == pytest.approx((1 + 0 + 1 + 0 + 0 + 0) / 6)
    # the one-pixel target is a quarter of a cell: missed in pixels, and absent from its own truth grid
    dot = report["by_target_size"]["<1"]
    assert dot["n"] == 1 and dot["coarse_ciou"] == 0.0 and dot["grid_giou"] == 1.0
    assert report["by_target_size"][">=16"]["n"] == 3
    # the corner cell on no target, then the corner (129 cells of union) and nothing (128) on the half
    assert report["grid_losses"] == pytest.approx({"extra": 0.0, "missing": 0.0, "missed": 257 / 386,
                                                   "marked_absent": 1 / 386, "marked_between_centres": 0.0})


def test_rows_stream_to_disk_and_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    half = _manifest(tmp_path, [(e, "half", "k") for e in "abcde"])
    answers = [half, np.zeros((32, 32), bool), half, half, np.zeros((32, 32), bool)]
    _answering(monkeypatch, answers)
    whole = evaluate_module.evaluate(Engine(), str(tmp_path), progress=False, rows=tmp_path / "whole.jsonl")

    calls = []
    _answering(monkeypatch, answers[:2] + [KeyboardInterrupt()], calls)  # Ctrl-C at the third query
    rows = tmp_path / "rows.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate_module.evaluate(Engine(), str(tmp_path), progress=False, rows=rows)
    assert len(rows.read_text().splitlines()) == 2  # what was done is on disk
    with open(rows, "a") as f:
        f.write('{"index": 2, "model": "fa')  # a row cut off mid-write
    with pytest.raises(FileExistsError, match="--resume"):  # never overwritten by accident
        evaluate_module.evaluate(Engine(), str(tmp_path), progress=False, rows=rows)

    calls.clear()
    _answering(monkeypatch, answers[2:], calls)
    resumed = evaluate_module.evaluate(Engine(), str(tmp_path), progress=False, rows=rows, resume=True)
    assert calls == ["c", "d", "e"]  # only what was missing
    assert len(rows.read_text().splitlines()) == 5
    for key in ("ciou", "giou", "grid_ciou", "by_kind", "malformed_rate"):
        assert resumed[key] == whole[key]

    other = tmp_path / "other"
    other.mkdir()
    _manifest(other, [(e, "half", "k") for e in "vwxyz"])
    with pytest.raises(ValueError, match="does not match query 0 of this manifest"):
        evaluate_module.evaluate(Engine(), str(other), progress=False, rows=rows, resume=True)
