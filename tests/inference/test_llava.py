"""An original-LLaVA checkpoint (the released one's layout, random weights) end to end:
conversion, the engine, loading, the command line."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from fakes import noise_image, write_original_llava
from PIL import Image
from transformers import LlavaForConditionalGeneration

from text4seg_demo.descriptors import codec
from text4seg_demo.inference.convert import convert
from text4seg_demo.inference.loading import load

LABEL = "white horse"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return write_original_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def engine(original):
    return load(str(original[0]), grid=24, log=lambda m: None)


@pytest.mark.parametrize("tower_in_checkpoint", [True, False])
def test_converted_logits_match_a_directly_built_llava(tmp_path, tower_in_checkpoint):
    ckpt, reference = write_original_llava(tmp_path, vision_in_checkpoint=tower_in_checkpoint, seed=3)
    converted = LlavaForConditionalGeneration.from_pretrained(convert(ckpt, tmp_path / "hf", log=lambda m: None))
    converted.eval()
    vocab = reference.config.text_config.vocab_size - 1
    ids = torch.tensor([[1, 319, 13563] + [reference.config.image_token_index] * 16 + [29871, 13, 3148]])
    px = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(input_ids=ids, pixel_values=px).logits[..., :vocab]
        ids[ids == reference.config.image_token_index] = converted.config.image_token_index
        got = converted(input_ids=ids, pixel_values=px).logits[..., :vocab]
    assert (want - got).abs().max().item() <= 1e-4
    assert (tmp_path / "hf" / "text4seg.json").is_file()
    assert json.loads((tmp_path / "hf" / "text4seg.json").read_text())["grid"] == 24  # from "p24" in the name


@pytest.mark.parametrize("sentencepiece", [False, True])
def test_the_converted_checkpoint_tells_a_server_its_own_prompt(tmp_path, sentencepiece):
    """What `vllm serve` reads: the chat template, rendered and tokenised in one piece as a server
    does, gives the ids LLaVA's piecewise tokenisation gives; the tower under llava-hf names."""
    from safetensors import safe_open
    from transformers import AutoProcessor

    ckpt, _ = write_original_llava(tmp_path, sentencepiece=sentencepiece)
    served = convert(ckpt, tmp_path / "hf", log=lambda m: None)
    engine = load(str(served), log=lambda m: None)
    question = engine.question(LABEL)
    before, after = engine._prompt_ids(question)
    processor = AutoProcessor.from_pretrained(served)
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    text = processor.apply_chat_template([message], add_generation_prompt=True, tokenize=False)
    assert processor.tokenizer(text, add_special_tokens=False)["input_ids"] == before + [engine.image_token_id] + after
    assert processor.patch_size == 14 and processor.vision_feature_select_strategy == "default"
    with safe_open(str(served / "model.safetensors"), "pt") as weights:
        tower = [k for k in weights.keys() if "vision_tower" in k]  # noqa: SIM118 - safe_open is not a dict
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["rrle", "full"])
@pytest.mark.parametrize("grid", [16, 24])
def test_constrained_decoding_from_random_weights_is_always_well_formed(engine, fmt, grid):
    gen = engine.generate(noise_image(grid), engine.question(LABEL), [LABEL], fmt=fmt, grid=grid, constrained=True)
    parsed = codec.parse_answer(gen.text, grid, fmt=fmt, allowed_labels=[LABEL])
    assert parsed.diagnostics == [], parsed.diagnostics
    assert parsed.grid.shape == (grid, grid)
    assert gen.constrained


@pytest.mark.slow
@pytest.mark.parametrize("grid", [16, 24])
def test_jump_forward_writes_the_plain_constrained_answer_in_fewer_steps(engine, grid):
    image, question = noise_image(10 + grid), engine.question(LABEL)
    plain = engine.generate(image, question, [LABEL], grid=grid, constrained=True)
    events = list(engine.stream(image, question, [LABEL], grid=grid, constrained=True, jump_forward=True))
    jumped = events[-1].generation
    assert jumped.text == plain.text and jumped.token_ids == plain.token_ids
    assert "".join(e.delta for e in events) == jumped.text  # streaming still shows every row
    assert [len(e.rows) for e in events][-1] == grid
    assert plain.tokens["decode_steps"] == plain.tokens["generated"] - 1
    assert jumped.tokens["decode_steps"] < plain.tokens["decode_steps"]
    with pytest.raises(ValueError, match="needs constrained decoding"):
        engine.generate(image, question, [LABEL], grid=grid, jump_forward=True)


def test_unconstrained_random_model_output_is_reported_not_hidden(engine):
    gen = engine.generate(noise_image(1), engine.question(LABEL), [LABEL], max_new_tokens=20)
    assert gen.tokens["generated"] <= 20
    parsed = codec.parse_answer(gen.text, 24)
    assert parsed.grid.shape == (24, 24) and parsed.diagnostics


def test_streaming_yields_rows_and_the_same_text(engine):
    image = noise_image(2)
    events = list(engine.stream(image, engine.question(LABEL), [LABEL], constrained=True, grid=16))
    final = events[-1]
    assert final.done and final.generation is not None
    assert "".join(e.delta for e in events) == final.text
    assert final.text == engine.generate(image, engine.question(LABEL), [LABEL], constrained=True, grid=16).text
    counts = [len(e.rows) for e in events]
    assert counts == sorted(counts) and counts[-1] == 16


def test_second_question_on_the_same_image_reuses_the_image_prefix(original):
    warm = load(str(original[0]), grid=24, log=lambda m: None)
    image = noise_image(4)
    warm.generate(image, warm.question("a dog"), ["a dog"], max_new_tokens=5)
    hits = dict(warm.stats)
    second = warm.generate(image, warm.question(LABEL), [LABEL], max_new_tokens=30)
    assert warm.stats["prefix_hits"] == hits["prefix_hits"] + 1
    assert warm.stats["feature_hits"] == hits["feature_hits"] + 1
    cold = load(str(original[0]), grid=24, log=lambda m: None)
    assert cold.generate(image, cold.question(LABEL), [LABEL], max_new_tokens=30).token_ids == second.token_ids


def test_replay_force_decodes_the_given_text(engine):
    body = codec.encode(np.zeros((16, 16), int), ["others"], "full")
    answer = codec.wrap(body, "Sure:")
    gen = engine.replay(noise_image(5), engine.question(LABEL), answer)
    assert gen.replayed and gen.text == answer
    assert gen.tokens["generated"] == engine.count_tokens(answer)
    assert gen.timings["decode"] > 0


@pytest.mark.slow
def test_four_bit_on_cpu_loads_and_generates(original):
    pytest.importorskip("bitsandbytes")
    small = load(str(original[0]), quant="4bit", device="cpu", grid=16, log=lambda m: None)
    assert small.quant == "4bit"
    linear = small.model.model.language_model.layers[0].self_attn.q_proj
    assert "4bit" in type(linear).__name__.lower()
    gen = small.generate(noise_image(6), small.question(LABEL), [LABEL], constrained=True, grid=16)
    assert codec.parse_answer(gen.text, 16).diagnostics == []


@pytest.fixture(scope="module")
def sentencepiece_original(tmp_path_factory):
    return write_original_llava(tmp_path_factory.mktemp("llava-spm"), sentencepiece=True)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["original", "sentencepiece_original"])
def test_cli_segment_on_an_original_llava_checkpoint(checkpoint, request, tmp_path):
    original = request.getfixturevalue(checkpoint)
    noise_image(7, (120, 90)).save(tmp_path / "in.png")
    out = subprocess.run([sys.executable, "-m", "text4seg_demo", "segment", str(tmp_path / "in.png"), LABEL,
                          "--model", str(original[0]), "--grid", "24", "--constrained", "--json",
                          str(tmp_path / "r.json"), "--mask", str(tmp_path / "m.png")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["diagnostics"] == []
    assert len(doc["grid"]) == 24 and all(len(row) == 24 for row in doc["grid"])
    assert doc["labels"][0] == "others" and doc["text"].count("<seg>") == 1
    assert doc["tokens"]["generated"] > 0 and doc["tokens"]["image"] == 16
    assert {"prefill", "decode", "total", "ttft"} <= set(doc["timings"])
    assert doc["quant"] == "fp32" and doc["device"] == "cpu" and doc["model"] == str(original[0])
    assert Image.open(tmp_path / "m.png").size == (120, 90)


@pytest.mark.slow
def test_eval_runs_a_p24_checkpoint_at_its_own_grid(original, tmp_path, capsys):
    from text4seg_demo.cli import main

    noise_image(size=(48, 48)).save(tmp_path / "x.png")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "none.png")
    (tmp_path / "manifest.jsonl").write_text('{"image": "x.png", "expression": "white horse", "mask": "none.png"}\n')
    assert main(["eval", "--data", str(tmp_path), "--model", str(original[0]), "--constrained",
                 "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["grid"] == 24 and report["malformed_rate"] == 0.0
    assert main(["eval", "--data", str(tmp_path), "--oracle", "--json", str(tmp_path / "oracle.json")]) == 0
    assert json.loads((tmp_path / "oracle.json").read_text())["grid"] == 16
