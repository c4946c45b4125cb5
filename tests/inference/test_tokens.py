"""Token counts under the released checkpoint's LLaMA vocabulary."""


import numpy as np
import pytest

from text4seg_demo.descriptors import codec
from text4seg_demo.inference.tokens import count_tokens, load_tokenizer

HORSE = ["others", "white horse"]


def spec_grid():
    grid = np.zeros((16, 16), dtype=int)
    grid[5:11, 4:10] = 1
    return grid


@pytest.fixture(scope="module")
def llama():
    return load_tokenizer("llama")


def test_spec_example_token_counts_under_llama_vocabulary(llama):
    # "others *16\n" is 5 pieces (▁others ▁* 1 6 <0x0A>); a target row is 13:
    # ▁others ▁* 4 | ▁white ▁horse ▁* 6 | ▁others ▁* 6 <0x0A>
    assert llama.tokenize(" others *16\n") == ["▁others", "▁*", "1", "6", "<0x0A>"]
    assert count_tokens(llama, codec.encode(spec_grid(), HORSE, "rrle")) == 10 * 5 + 6 * 13
    # full length: each label is its words plus "|" (the space joins the next word), the last
    # label is followed by "\n" instead: 220 x (▁others |) + 36 x (▁white ▁horse |)
    assert count_tokens(llama, codec.encode(spec_grid(), HORSE, "full")) == 220 * 2 + 36 * 3


def test_the_released_checkpoints_tokenizer_format_counts_like_the_bundled_vocabulary(llama, tmp_path):
    # the released checkpoint ships its vocabulary as a SentencePiece tokenizer.model; read through
    # transformers it must split answers exactly as the bundled GGUF vocabulary does
    from fakes import write_sentencepiece_tokenizer
    from transformers import AutoTokenizer

    released = AutoTokenizer.from_pretrained(write_sentencepiece_tokenizer(tmp_path))
    answer = codec.wrap(codec.encode(spec_grid(), HORSE, "rrle"), "Sure, here is the segmentation mask for 'white horse':")
    for text in [answer, *(codec.encode(spec_grid(), HORSE, fmt) for fmt in ("rrle", "full", "irle"))]:
        assert released(text)["input_ids"] == llama(text)["input_ids"]
    assert [count_tokens(released, codec.encode(spec_grid(), HORSE, fmt)) for fmt in ("rrle", "full", "irle")] == \
        [128, 548, 65]


def test_full_length_count_matches_the_vocabulary_notice(llama):
    # the shared vocabulary's notice measured 568 tokens for 200 others + 56 white horse
    body = "| ".join(["others"] * 200 + ["white horse"] * 56)
    assert len(llama(body)["input_ids"]) == 568


@pytest.mark.parametrize("text", ["Sure, here is the mask for 'white horse':\n<seg>others *16\n others *4| white horse *6"
                                  "| others *6\n</seg>", " café ☕ 白馬 *3| ünïcödé\n others| others| 😀 horse"])
def test_incremental_decoding_gives_the_whole_decode_piece_by_piece(llama, text):
    from text4seg_demo.inference.tokens import IncrementalDecoder
    from text4seg_demo.training import tiny

    for tokenizer in (llama, tiny.build_tokenizer(tiny.training_corpus(), label_tokens="words")):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        decoder = IncrementalDecoder(tokenizer)
        deltas = [decoder.add(token) for token in ids]
        assert "".join(deltas) == decoder.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert all("\ufffd" not in d for d in deltas)  # a split character waits until it is whole
