import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from text4seg_demo.descriptors import codec
from text4seg_demo.evaluation import bench as bench_module
from text4seg_demo.evaluation.bench import bench
from text4seg_demo.inference.devices import native_bf16
from text4seg_demo.inference.hub import PRESETS
from text4seg_demo.inference.loading import load
from text4seg_demo.pipeline import segment
from text4seg_demo.training.tiny import fixed_grid_ciou, fixed_queries

TOLERANCE = 0.02  # the card's figure was measured on another machine; greedy decoding may flip a token


@pytest.mark.parametrize("name", ["tiny-rrle", "tiny-full"])
def test_bundled_model_is_complete_and_small(name):
    root = Path(PRESETS[name].source)
    for file in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json", "text4seg.json",
                 "README.md"):
        assert (root / file).is_file(), f"{name} lacks {file}"
    assert sum(f.stat().st_size for f in root.iterdir()) <= 30 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-rrle", "tiny-full"])
def test_bundled_model_reaches_its_cards_grid_ciou(name):
    engine = load(name, log=lambda m: None)
    card = json.loads((Path(PRESETS[name].source) / "text4seg.json").read_text())
    assert engine.settings.fmt == card["format"] and engine.settings.grid == 16
    assert engine.settings.positions == card.get("positions", "natural")
    assert fixed_grid_ciou(engine) == pytest.approx(card["metrics"]["fixed20_grid_ciou"], abs=TOLERANCE)


def test_bundled_rrle_model_speaks_the_format():
    engine = load("tiny-rrle", log=lambda m: None)
    image, expression, _ = fixed_queries()[0]
    text = engine.generate(image, engine.question(expression), [expression]).text
    assert re.match(r"^ Sure, here is the segmentation mask for '[^'\n]+':\n<seg>", text) and text.endswith("</seg>")
    assert codec.parse_answer(text, 16).diagnostics == []


@pytest.mark.slow
def test_bench_sets_the_bundled_models_side_by_side(tmp_path, monkeypatch):
    # two 224 x 224 queries: an absent target, and a 4 x 8-cell block in rows 4-7 of the 16 x 16 grid
    Image.new("RGB", (224, 224), "white").save(tmp_path / "x.png")
    Image.fromarray(np.zeros((224, 224), np.uint8)).save(tmp_path / "none.png")
    block = np.zeros((224, 224), np.uint8)
    block[56:112, 28:140] = 255
    Image.fromarray(block).save(tmp_path / "block.png")
    (tmp_path / "manifest.jsonl").write_text(
        '{"image": "x.png", "expression": "the red circle", "mask": "none.png"}\n'
        '{"image": "x.png", "expression": "the red circle", "mask": "block.png"}\n')

    calls = []

    def recording(engine, image, request, refiner=None):
        calls.append((engine.name, request.constrained))
        return segment(engine, image, request, refiner)

    monkeypatch.setattr(bench_module, "segment", recording)
    report = bench(str(tmp_path), log=lambda m: None)

    # after one warm-up each, the two models take turns to go first on the queries
    assert [name for name, _ in calls[:6]] == ["tiny-rrle", "tiny-full", "tiny-rrle", "tiny-full", "tiny-full",
                                               "tiny-rrle"]
    # and so do constrained and free decoding, timed against each other
    assert calls[6:10] == [("tiny-rrle", True), ("tiny-rrle", False), ("tiny-rrle", False), ("tiny-rrle", True)]
    assert report["n"] == 2 and report["models"] == {"rrle": "tiny-rrle", "full": "tiny-full"}
    rrle, full = report["rrle"]["mean_generated_tokens"], report["full"]["mean_generated_tokens"]
    assert report["token_reduction"] == pytest.approx(1 - rrle / full) and full >= 256 > rrle
    # the tiny tokenizer spells the label in words (`the`, ` red`, ` circle`) and writes `others`, and a
    # count with the separator after it, as one token each: an `others` run is 2 tokens and a `the red
    # circle` run 4, so an empty grid is 16 x 2 + 1 (the last row ends in a bare count and `\n`) and the
    # block's 4 x 8 + 12 x 2 + 1; full-length writes an `others| ` cell as one token and a label cell as
    # 4: 256 + 1, and 224 + 32 x 4 + 1
    own = report["ground_truth_own"]["descriptors"]
    assert (own["mean_tokens_rrle"], own["mean_tokens_full"]) == ((33 + 57) / 2, (257 + 353) / 2)
    assert own["token_reduction"] == pytest.approx(1 - 45 / 305)
    # whole answers add the same lead-in and tags to both formats, so they save less
    whole = report["ground_truth_own"]["answers"]
    lead = whole["mean_tokens_full"] - 305
    assert lead > 10 and whole["mean_tokens_rrle"] == 45 + lead
    assert whole["token_reduction"] < own["token_reduction"]
    # LLaMA writes an `others| ` cell as two tokens (`▁others`, `|`) and a count in several, where the tiny
    # tokenizer spends one: it spends more in both formats
    llama = report["ground_truth_llama"]["descriptors"]
    assert (llama["mean_tokens_rrle"], llama["mean_tokens_full"]) == ((80 + 116) / 2, (512 + 576) / 2)
    for part in ("answers", "descriptors"):
        llama, own = report["ground_truth_llama"][part], report["ground_truth_own"][part]
        assert llama["mean_tokens_full"] > own["mean_tokens_full"] + 200
        assert llama["mean_tokens_rrle"] > own["mean_tokens_rrle"]
        assert report["answers_llama"][part]["mean_tokens_full"] > report["answers_llama"][part]["mean_tokens_rrle"]
    assert report["constrained"]["malformed_rate"] == 0
    assert set(report["prefix_cache"]) == {"n", "question_first", "llava_v1"}
    for side in report["loop_overhead"].values():  # per-token costs of the loop and of its bare forward passes
        assert side["n"] == 2 and side["overhead"] == side["loop_s_per_token"] / side["forward_s_per_token"]
    for side in report["jump_forward"].values():  # the same answers in fewer forward passes
        assert side["same_text"] == 1.0 and side["mean_decode_steps"] < side["mean_decode_steps_plain"]
    for grid, side in report["jump_forward_llama"].items():  # LLaMA splits counts into digits: more is forced
        assert side["steps_ratio"] >= 1.5 and side["mean_tokens"] == side["mean_decode_steps_plain"] + 1
    streaming = report["app_streaming"]  # the page's run and an unstreamed one write the same answer
    assert streaming["n"] == 2 and streaming["same_text"] == 1.0
    assert streaming["overhead"] == streaming["mean_decode_s_streamed"] / streaming["mean_decode_s"]
    compare = report["app_compare"]  # the page's Compare both on the same queries, by the partner model
    assert compare["n"] == 2 and compare["sources"] == ["written by tiny-full"]
    assert compare["ratio"] == compare["decode_speedup_app"] / compare["decode_speedup_bench"]
    assert compare["decode_speedup_app"] > 1.5  # the full-length side writes about four times the tokens
    steps = report["decode_steps"]  # the CPU's decode steps, every way taking turns on the same queries
    assert steps["n"] == 2 and {"transformers", "fp32"} <= set(steps["decode_tokens_per_s"])
    assert steps["same_text"]["transformers"] == 1.0  # the project's fp32 steps: transformers' own logits
    for way, rate in steps["decode_tokens_per_s"].items():
        assert steps["speedup"][way] == rate / steps["decode_tokens_per_s"]["transformers"]
        assert steps["same_text"][way] == 1.0
    if native_bf16():  # the int8 kernel's bf16 activations
        assert "int8" in steps["same_text"]
