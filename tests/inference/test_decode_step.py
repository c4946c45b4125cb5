"""The project's decode steps on the CPU: transformers' own logits in fp32, and the fp32 model's
answers written from a quarter of the bytes in int8."""

import copy

import pytest
import torch
from fakes import noise_image, write_tiny_qwen2_vl

from text4seg_demo.evaluation.manifest import read_manifest
from text4seg_demo.inference.devices import native_bf16
from text4seg_demo.images import prepare
from text4seg_demo.inference.decode_step import DecodeStep, Int8Linear
from text4seg_demo.inference.loading import load
from text4seg_demo.pipeline import Request, segment

needs_bf16 = pytest.mark.skipif(not native_bf16(),
                                reason="the int8 kernel takes bf16 activations: needs bf16 instructions")


@pytest.fixture(scope="module")
def models():
    return load("tiny-rrle", log=lambda m: None), load("tiny-rrle", quant="8bit", log=lambda m: None)


def test_fp32_steps_are_transformers_own_logits_from_the_same_weights(models):
    full, _ = models
    step, model = full.decode_step, full.model
    assert step.weights == "fp32"
    attn = model.model.language_model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == step.layers[0]["qkv"].weight.data_ptr()  # a view: nothing stored twice
    _, cache, _ = full._prefill(noise_image(3), full.question("the red circle"), {})
    ours, theirs = copy.deepcopy(cache), copy.deepcopy(cache)
    for tokens, positions in (([7], [300]), ([5, 9, 13, 2], [301, 302, 305, 309]), ([11], [310])):
        mine = step(tokens, ours, positions)
        own = model(input_ids=torch.tensor([tokens]), position_ids=torch.tensor([positions]), cache=theirs,
                    use_cache=True).logits[0].float()
        assert torch.allclose(mine, own, rtol=0, atol=1e-5), (mine - own).abs().max()
    assert ours.get_seq_length() == theirs.get_seq_length() == cache.get_seq_length() + 6


@needs_bf16
def test_an_int8_projection_is_within_its_rounding_of_fp32():
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64), torch.randn(3, 64)
    linear = Int8Linear(weight)
    assert linear.weight.dtype == torch.int8 and linear.weight.shape == weight.shape
    error = (linear(x.bfloat16()).float() - x @ weight.T).norm() / (x @ weight.T).norm()
    assert error < 0.02


@needs_bf16
def test_the_bundled_model_writes_its_fp32_answers_on_every_example(models):
    full, int8 = models
    assert int8.quant == "8bit" and int8.decode_step.weights == "int8" and full.decode_step.weights == "fp32"
    for k, query in enumerate(read_manifest("examples/synthetic")):
        image = prepare(query.image)[0]
        jump = k % 2 == 1  # every other one through the grammar with jump-forward (several tokens a step)
        request = Request(expression=query.expression, constrained=jump, jump_forward=jump)
        assert segment(int8, image, request).text == segment(full, image, request).text, query.expression


@needs_bf16
def test_several_tokens_in_one_step_are_those_tokens_one_by_one(models):
    _, int8 = models
    _, cache, _ = int8._prefill(noise_image(2), int8.question("the red circle"), {})
    together, apart = copy.deepcopy(cache), copy.deepcopy(cache)
    tokens, positions = [5, 9, 13, 2], [200, 201, 203, 206]  # grid positions skip, as R-RLE's do
    many = int8.decode_step(tokens, together, positions)
    one_by_one = torch.cat([int8.decode_step([t], apart, [p]) for t, p in zip(tokens, positions)])
    # the same sums, grouped differently by the kernel for 4 rows than for 1: equal to bf16's rounding
    assert torch.equal(many.argmax(-1), one_by_one.argmax(-1)) and (many - one_by_one).abs().max() < 0.1
    assert together.get_seq_length() == apart.get_seq_length() == cache.get_seq_length() + 4


def test_other_architectures_decode_in_fp32_and_say_so(tmp_path):
    engine = load(str(write_tiny_qwen2_vl(tmp_path / "qwen")), quant="8bit", log=lambda m: None)
    assert engine.quant == "fp32" and engine.decode_step is None
    assert any("not a LLaVA with a LLaMA language model" in note for note in engine.notes)
    assert DecodeStep.unsupported(engine.model) is not None
