"""Precision requests the machine cannot serve fall back, and say so."""

import sys

import pytest
import torch
from PIL import Image

from text4seg_demo.inference import devices
from text4seg_demo.inference.devices import plan_precision


def test_precision_fallbacks_explain_themselves(monkeypatch):
    cpu, mps = torch.device("cpu"), torch.device("mps")
    assert plan_precision("auto", cpu) == ("fp32", "")
    assert plan_precision("auto", torch.device("cuda")) == ("4bit", "")
    assert plan_precision("8bit", cpu) == ("8bit", "")  # the int8 decode steps (test_decode_step.py)
    assert plan_precision("4bit", mps) == ("fp16", "bitsandbytes has no 4bit kernels for Apple MPS")
    monkeypatch.setattr(devices, "native_bf16", lambda: True)
    assert plan_precision("fp16", cpu) == ("bf16", "fp16 matrix products are slow or missing on CPU")
    assert plan_precision("bf16", cpu) == ("bf16", "")
    monkeypatch.setattr(devices, "native_bf16", lambda: False)
    assert plan_precision("bf16", cpu)[1].startswith("this CPU has no bf16 instructions, so bf16 is emulated")
    assert plan_precision("fp16", cpu)[1].count(";") == 1
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    assert plan_precision("4bit", cpu) == ("fp32", "4bit needs bitsandbytes (pip install bitsandbytes)")
    with pytest.raises(ValueError, match="unknown --quant"):
        plan_precision("int3", cpu)


def test_small_models_decode_on_one_thread_and_leave_the_setting_as_it_was(monkeypatch):
    from text4seg_demo import load

    model = load("tiny-rrle")
    assert model.decode_threads == 1  # 256-wide projections: a second thread only waits
    big = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1025))
    assert devices.decode_threads(big) is None  # a product over 2^20 weights keeps torch's setting

    seen = []
    forward, step = model.model.forward, model.decode_step

    def spy_forward(*args, **kwargs):  # transformers' forward: the prompt
        seen.append(("prompt", torch.get_num_threads()))
        return forward(*args, **kwargs)

    def spy_step(*args):
        seen.append(("step", torch.get_num_threads()))
        return step(*args)

    monkeypatch.setattr(model.model, "forward", spy_forward)
    monkeypatch.setattr(model, "decode_step", spy_step)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model.generate(Image.new("RGB", (64, 64), "red"), model.question("the red square"), ["the red square"],
                       max_new_tokens=5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert {threads for kind, threads in seen if kind == "step"} == {1}
    assert {threads for kind, threads in seen if kind == "prompt"} == {2}  # the prompt's wide products use both
