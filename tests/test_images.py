import numpy as np
import pytest
from PIL import Image

from text4seg_demo.images import BadImage, prepare


def test_a_16_bit_upload_is_named_for_its_own_depth(tmp_path):
    deep = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    image, notes = prepare(tmp_path / "deep.png")
    assert image.mode == "RGB" and image.size == (64, 48)
    assert any("16" in n and "rescaled" in n for n in notes) and not any("float" in n for n in notes), notes
    assert np.asarray(image)[-1, -1, 0] == round(int(deep[-1, -1]) / 65535 * 255)


def test_an_array_keeps_its_dtype_in_the_note():
    _, notes = prepare(np.full((8, 8, 3), 0.5, np.float32))
    assert notes == ["float32 pixel values rescaled to 8 bits"]


def test_a_decompression_bomb_is_refused_with_a_message(tmp_path, monkeypatch):
    Image.new("L", (400, 300)).save(tmp_path / "bomb.png")
    with pytest.raises(BadImage, match="120000 pixels|0.1 million"):
        prepare(tmp_path / "bomb.png", max_pixels=100_000)  # refused from the header
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own guard, far below this image
    with pytest.raises(BadImage, match="too many pixels"):
        prepare(tmp_path / "bomb.png")
