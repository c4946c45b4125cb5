import numpy as np
from PIL import Image

from text4seg_demo.images import prepare


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
