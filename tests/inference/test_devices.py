"""Precision requests the machine cannot serve fall back, and say so."""

import sys

import pytest
import torch

from text4seg_demo.inference import devices
from text4seg_demo.inference.devices import plan_precision


def test_precision_fallbacks_explain_themselves(monkeypatch):
    cpu, mps = torch.device("cpu"), torch.device("mps")
    assert plan_precision("auto", cpu) == ("fp32", "")
    assert plan_precision("auto", torch.device("cuda")) == ("4bit", "")
    assert plan_precision("8bit", cpu) == ("8bit", "")  # the int8 decode steps (test_int8_decode.py)
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
