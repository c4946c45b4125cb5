"""Transformers-native VLMs through their chat templates, and PEFT adapters."""

import pytest
import torch
from fakes import noise_image, write_tiny_qwen2_vl
from transformers import AutoModelForImageTextToText, AutoProcessor

from text4seg_demo.descriptors import codec
from text4seg_demo.inference.engine import ChatTemplateModel
from text4seg_demo.inference.loading import load

LABEL = "the red circle"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return write_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2vl"))


@pytest.fixture(scope="module")
def engine(qwen_dir):
    return load(str(qwen_dir), grid=16, log=lambda m: None)


def first_token_logits(model, processor, image, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0, -1].float(), inputs


def test_qwen2_vl_loads_through_the_auto_classes_and_its_chat_template(engine, qwen_dir):
    assert isinstance(engine, ChatTemplateModel) and engine.settings.prompt_style == "chat"
    image, question = noise_image(0, (90, 60)), engine.question(LABEL)
    reference = AutoModelForImageTextToText.from_pretrained(qwen_dir).eval()
    expected, inputs = first_token_logits(reference, AutoProcessor.from_pretrained(qwen_dir), image, question)
    got, _, counts = engine._prefill(image, question, {})
    assert torch.allclose(got[0], expected, atol=1e-4)
    assert counts["prompt"] == inputs["input_ids"].shape[1]
    assert counts["image"] == int((inputs["input_ids"] == engine.image_token_id).sum()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["rrle", "full"])
def test_qwen2_vl_constrained_answers_are_well_formed_and_stream_the_same_text(engine, fmt):
    image = noise_image(1, (60, 120))
    question = engine.question(LABEL)
    events = list(engine.stream(image, question, [LABEL], fmt=fmt, constrained=True))
    final = events[-1].generation
    assert "".join(e.delta for e in events) == final.text
    parsed = codec.parse_answer(final.text, 16, fmt=fmt, allowed_labels=[LABEL])
    assert parsed.grid.shape == (16, 16) and parsed.diagnostics == [], parsed.diagnostics
    assert engine.generate(image, question, [LABEL], fmt=fmt, constrained=True).text == final.text
    assert final.tokens["image"] > 0 and final.timings["decode"] > 0


@pytest.mark.slow
def test_a_peft_adapter_is_merged_on_load(qwen_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForImageTextToText.from_pretrained(qwen_dir).eval()
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    processor = AutoProcessor.from_pretrained(qwen_dir)
    image, question = noise_image(2, (90, 60)), "Please segment only the the red circle in the image."
    with_adapter, _ = first_token_logits(lora.eval(), processor, image, question)
    with lora.disable_adapter():
        without, _ = first_token_logits(lora, processor, image, question)

    merged = load(str(qwen_dir), adapter=str(tmp_path / "adapter"), log=lambda m: None)
    got, _, _ = merged._prefill(image, question, {})
    assert (with_adapter - without).abs().max() > 1e-3  # the adapter matters
    assert torch.allclose(got[0], with_adapter, atol=1e-4)


def test_a_text_only_checkpoint_is_refused_with_a_clear_message(tmp_path):
    from transformers import LlamaConfig

    from text4seg_demo.inference.hub import ModelUnavailable

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(ModelUnavailable, match="'llama' model.*image-text-to-text"):
        load(str(tmp_path), log=lambda m: None)
