"""Models that cannot be had name themselves and say what to do."""

import pytest

from text4seg_demo.inference.hub import ModelUnavailable, resolve


def test_missing_hub_model_offline_names_it_and_says_what_to_do():
    with pytest.raises(ModelUnavailable) as err:
        resolve("lmc22/text4seg-llava-7b-p24")
    message = str(err.value)
    assert "lmc22/text4seg-llava-7b-p24" in message and "huggingface-cli download" in message
    assert "--model tiny-rrle" in message
    with pytest.raises(ModelUnavailable, match="neither a local directory"):
        resolve("/no/such/dir")
