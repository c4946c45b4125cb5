"""The project's decode steps on the CPU: transformers' own logits in fp32, and the fp32 model's
answers written from a quarter of the bytes in int8."""

import copy

import pytest
import torch
from fakes import noise_image, write_tiny_qwen2_vl

from text4seg_demo.evaluation.manifest import read_manifest
from text4seg_demo.images import prepare
from text4seg_demo.inference.decode_step import DecodeStep, Int8Linear, KVBuffers
from text4seg_demo.inference.devices import native_bf16
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
    transformers_forward = copy.copy(full)
    transformers_forward.decode_step = None
    _, theirs, _ = transformers_forward._prefill(noise_image(3), full.question("the red circle"), {})
    ours = KVBuffers(theirs, spare=2)  # the four-token step below makes the buffers grow
    prompt = theirs.get_seq_length()
    for tokens, positions in (([7], [300]), ([5, 9, 13, 2], [301, 302, 305, 309]), ([11], [310])):
        mine = step(tokens, ours, positions)
        own = model(input_ids=torch.tensor([tokens]), position_ids=torch.tensor([positions]), cache=theirs,
                    use_cache=True).logits[0].float()
        assert torch.allclose(mine, own, rtol=0, atol=1e-5), (mine - own).abs().max()
    assert ours.get_seq_length() == theirs.get_seq_length() == prompt + 6
    for layer, keys, values in zip(theirs.layers, ours.keys, ours.values):
        written = slice(0, ours.length)
        assert torch.equal(keys[:, :, written], layer.keys) and torch.equal(values[:, :, written], layer.values)
    ours.crop(-4)  # jump-forward takes back the drafted tokens the model did not write
    assert ours.get_seq_length() == prompt + 2


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
    engine = load(str(write_tiny_qwen2_vl(tmp_path / "qwen")), quant="8bit", compile=True, log=lambda m: None)
    assert engine.quant == "fp32" and engine.decode_step is None
    assert any("not a LLaVA with a LLaMA language model" in note for note in engine.notes)
    assert any(note.startswith("--compile is for the decode steps of a LLaMA-LLaVA") for note in engine.notes)
    assert DecodeStep.unsupported(engine.model) is not None


@needs_bf16
@pytest.mark.slow
def test_compiled_steps_write_the_uncompiled_answers_from_one_graph(models):
    _, int8 = models
    compiled = load("tiny-rrle", quant="8bit", compile=True, log=lambda m: None)  # compiles here, once
    assert compiled.decode_step.compiled and not compiled.notes
    with torch._dynamo.config.patch(error_on_recompile=True):  # answers of any length reuse the graph
        for query in read_manifest("examples/synthetic")[:3]:
            image = prepare(query.image)[0]
            for request in (Request(expression=query.expression),  # one token a step: the compiled graph
                            Request(expression=query.expression, constrained=True, jump_forward=True)):
                assert segment(compiled, image, request).text == segment(int8, image, request).text
        _, cache, _ = compiled._prefill(noise_image(4), compiled.question("the blue star"), {})
        eager, grown = copy.deepcopy(cache), copy.deepcopy(cache)
        grown.reserve(1000)  # a longer buffer
        for token, where in ((7, 300), (8, 301)):
            assert torch.equal(compiled._forward([token], grown, [where]).argmax(-1),
                               int8._forward([token], eager, [where]).argmax(-1))
