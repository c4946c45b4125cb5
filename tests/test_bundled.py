import json
import re
from pathlib import Path

import pytest

from text4seg_demo import codec
from text4seg_demo.loading import PRESETS, load
from text4seg_demo.tiny import fixed_grid_ciou, fixed_queries

TOLERANCE = 0.02  # the card's figure was measured on another machine; greedy decoding may flip a token


@pytest.mark.parametrize("name", ["tiny-rrle", "tiny-full"])
def test_bundled_model_is_complete_and_small(name):
    root = Path(PRESETS[name].source)
    for file in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json", "text4seg.json",
                 "README.md"):
        assert (root / file).is_file(), f"{name} lacks {file}"
    assert sum(f.stat().st_size for f in root.iterdir()) <= 30 * 2**20


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
