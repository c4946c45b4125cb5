import numpy as np
import pytest
import torch
from PIL import Image

from text4seg_demo.descriptors import codec, prompts
from text4seg_demo.inference.attention import image_block_mask
from text4seg_demo.inference.engine import Text4SegModel
from text4seg_demo.inference.settings import Settings
from text4seg_demo.training import tiny

LABEL = "the red circle"


def test_the_image_block_sees_itself_and_the_text_stays_causal():
    allowed = image_block_mask(8, [2, 0], 3, torch.float32)[:, 0] == 0
    assert allowed.shape == (2, 8, 8)
    first = allowed[0]
    assert first[2, 4] and first[4, 2]  # image tokens 2..4 see one another both ways
    assert not first[1, 2] and not first[4, 5]  # the text before cannot see the image, nor the image what follows
    assert first[7, :8].all() and not first[5, 6]  # after the image: causal
    assert allowed[1, 0, 2] and not allowed[1, 0, 3]  # each row has its own block
    causal = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    assert torch.equal(image_block_mask(8, [2], 0, torch.float32)[0, 0] == 0, causal)


def test_decoding_sees_the_attention_training_uses():
    """The backend's cached prefill and steps under ``bidirectional`` equal one pass over prompt
    and answer with the trainer's mask; the causal model differs, so the mask really applies."""
    tokenizer = tiny.build_tokenizer(tiny.training_corpus())
    model = tiny.build_model(tokenizer, text_layers=2, seed=1).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    grid = np.zeros((16, 16), int)
    grid[5:8, 3:9] = 1
    answer = prompts.answer(LABEL, codec.encode(grid, [codec.OTHERS, LABEL], "rrle"))
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]

    def stepped(image_attention):
        engine = Text4SegModel(model, tokenizer, tiny.build_image_processor(),
                               Settings(16, "rrle", "question_first", image_attention=image_attention),
                               cache_images=0)
        question = engine.question(LABEL)
        with torch.no_grad():
            first, cache, counts = engine._prefill(image, question, {})
            logits = torch.cat([first] + [engine._forward([t], cache) for t in ids[:-1]])
        before, after = engine._prompt_ids(question)
        prompt = before + [engine.image_token_id] * counts["image"] + after
        return logits, engine, prompt, len(before)

    bidirectional, engine, prompt, image_start = stepped("bidirectional")
    full_ids = torch.tensor([prompt + ids])
    mask = image_block_mask(full_ids.shape[1], [image_start], 256, torch.float32)
    with torch.no_grad():
        forced = model(input_ids=full_ids, pixel_values=engine.pixel_values(image), attention_mask=mask)
    forced = forced.logits[0, len(prompt) - 1:-1].float()
    causal, *_ = stepped("causal")
    assert (bidirectional - forced).abs().max() < 1e-3
    assert (bidirectional - causal).abs().max() > 1e-2


def test_a_misspelt_setting_is_refused():
    with pytest.raises(ValueError, match="image_attention must be one of"):
        Settings(16, "rrle", "question_first", image_attention="full")
