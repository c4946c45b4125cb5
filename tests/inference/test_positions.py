import re

import numpy as np
import pytest
import torch
from PIL import Image

from text4seg_demo.descriptors import codec, prompts
from text4seg_demo.inference.engine import Text4SegModel
from text4seg_demo.inference.positions import AnswerPositions, cells_covered
from text4seg_demo.inference.settings import Settings
from text4seg_demo.training import tiny

LABEL = "the red circle"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer(tiny.training_corpus())


def random_grid(seed, size=16):
    rng = np.random.default_rng(seed)
    grid = np.zeros((size, size), int)
    y, x = rng.integers(0, size - 5, 2)
    grid[y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = 1
    return grid


def answer_for(grid, fmt):
    return prompts.answer(LABEL, codec.encode(grid, [codec.OTHERS, LABEL], fmt))


def positions_of(tokenizer, answer, fmt, scheme="grid", start=100):
    enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    track = AnswerPositions(start, 16, fmt, scheme)
    return enc["input_ids"], [track.advance(answer[:end]) for _, end in enc["offset_mapping"]]


def test_cells_covered_counts_finished_runs_and_rows():
    assert cells_covered("others *16\n others *4| x *3", 16, 16, "rrle") == 16 + 7
    assert cells_covered("others *16\n others *4| x", 16, 16, "rrle") == 16 + 4
    assert cells_covered("others *40", 16, 16, "rrle") == 16  # an overlong row stays in its row
    assert cells_covered("others *16\n" * 20, 16, 16, "rrle") == 256
    assert cells_covered("others| x| others| ", 16, 16, "full") == 3
    with pytest.raises(ValueError):
        cells_covered("others *3", 4, 4, "irle")


def label_starts(answer):
    """Character offsets where the answer's labels begin: the body's start and after each separator."""
    body = answer.index(codec.OPEN_TAG) + len(codec.OPEN_TAG)
    return [body] + [m.end() for m in re.finditer(r"\| |\n ", answer) if m.end() < answer.index(codec.CLOSE_TAG)]


def predictor_positions(tokenizer, answer, fmt, scheme):
    """Position of the token that predicts each label's first token, and of ``<seg>``."""
    ids, pos = positions_of(tokenizer, answer, fmt, scheme)
    starts = [a for a, _ in tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    first = [starts.index(c) for c in label_starts(answer)]
    seg = ids.index(tokenizer.convert_tokens_to_ids(codec.OPEN_TAG))
    assert pos[:seg + 1] == list(range(100, 101 + seg))
    return [pos[i - 1] for i in first], pos[seg]


@pytest.mark.parametrize("label_tokens", tiny.LABEL_TOKENS)
@pytest.mark.parametrize("seed", range(5))
def test_grid_positions_put_every_run_at_its_first_cell(label_tokens, seed):
    tokenizer = tiny.build_tokenizer(tiny.training_corpus(), label_tokens=label_tokens)
    grid = random_grid(seed)
    flat = grid.flatten()
    starts = [0] + [k for k in range(1, flat.size) if flat[k] != flat[k - 1] or k % 16 == 0]

    # R-RLE, grid positions: the token that predicts the label of the run starting at cell k sits at <seg> + k
    rrle, seg = predictor_positions(tokenizer, answer_for(grid, "rrle"), "rrle", "grid")
    assert rrle == [seg + k for k in starts]
    # so does the token that predicts cell k in a full-length answer with grid positions
    full, seg = predictor_positions(tokenizer, answer_for(grid, "full"), "full", "grid")
    assert full == [seg + k for k in range(256)]
    # with whole-label tokens, natural positions already put cell k there: one token per cell
    natural, seg = predictor_positions(tokenizer, answer_for(grid, "full"), "full", "natural")
    assert (natural == full) == (label_tokens == "whole")
    for fmt in ("rrle", "full"):  # and the tokens decode to the codec's text, character for character
        answer = answer_for(grid, fmt)
        assert tokenizer.decode(tokenizer(answer, add_special_tokens=False)["input_ids"]) == answer


def test_streamed_decoding_sees_the_positions_training_uses(tokenizer):
    """Step-by-step decoding with a cache equals one teacher-forced pass with the same position
    ids (what training computes), and differs from natural positions: the scheme is really applied."""
    model = tiny.build_model(tokenizer, text_layers=2, seed=1).eval()
    engine = Text4SegModel(model, tokenizer, tiny.build_image_processor(),
                           Settings(16, "rrle", "question_first", positions="grid"), cache_images=0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    question = engine.question(LABEL)
    answer = answer_for(random_grid(3), "rrle")
    ids, grid_pos = positions_of(tokenizer, answer, "rrle", start=0)

    with torch.no_grad():
        first, cache, counts = engine._prefill(image, question, {})
        n_prompt = counts["prompt"]
        track = AnswerPositions(n_prompt, 16, "rrle", "grid")
        stepped = [first] + [engine._forward([t], cache, [track.advance(tokenizer.decode(ids[:i + 1]))])
                             for i, t in enumerate(ids[:-1])]
        stepped = torch.cat(stepped)

        before, after = engine._prompt_ids(question)
        prompt_ids = before + [engine.image_token_id] * counts["image"] + after
        full_ids = torch.tensor([prompt_ids + ids])

        def forced(answer_positions):
            position_ids = torch.tensor([list(range(n_prompt)) + answer_positions])
            out = model(input_ids=full_ids, pixel_values=engine.pixel_values(image), position_ids=position_ids,
                        attention_mask=torch.ones_like(full_ids))
            return out.logits[0, n_prompt - 1:-1].float()

        aligned = forced([n_prompt + p for p in grid_pos])
        natural = forced(list(range(n_prompt, n_prompt + len(ids))))
    assert (stepped - aligned).abs().max() < 1e-3
    assert (stepped - natural).abs().max() > 1e-2
