"""The ``text4seg`` command line: descriptors in and out, errors as messages."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from text4seg_demo.descriptors import codec

HORSE = ["others", "white horse"]


def spec_grid():
    grid = np.zeros((16, 16), dtype=int)
    grid[5:11, 4:10] = 1
    return grid


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "text4seg_demo", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_cli_encode_prints_the_exact_body(tmp_path):
    mask = np.zeros((160, 160), np.uint8)
    mask[50:110, 40:100] = 200
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = run_cli("descriptors", "encode", str(tmp_path / "m.png"), "--grid", "16", "--label", "white horse")
    assert out.returncode == 0, out.stderr
    assert out.stdout == codec.encode(spec_grid(), HORSE)
    wrapped = run_cli("descriptors", "encode", str(tmp_path / "m.png"), "--label", "white horse", "--wrap")
    assert wrapped.stdout == codec.wrap(out.stdout)


def test_cli_encode_jsonl_with_tokens(tmp_path):
    paths = []
    for i in range(2):
        mask = np.zeros((64, 64), np.uint8)
        mask[: 16 * (i + 1)] = 255
        Image.fromarray(mask).save(tmp_path / f"m{i}.png")
        paths.append(str(tmp_path / f"m{i}.png"))
    out = run_cli("descriptors", "encode", *paths, "--grid", "8", "--format", "full", "--label", "sky",
                  "--jsonl", "--tokenizer", "llama")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["mask"] for r in lines] == paths
    assert lines[0]["text"].count("sky") == 16 and lines[1]["text"].count("sky") == 32
    assert all(r["tokens"] > 60 for r in lines)


def test_cli_decode_reports_and_writes_mask(tmp_path):
    body = codec.encode(spec_grid(), HORSE)
    answer = "Sure, here is the mask:\n<seg>" + body[:-40]  # cut off, no closing tag
    out = run_cli("descriptors", "decode", "--grid", "16", "--out", str(tmp_path / "o.png"), "--size", "64x32",
                  "--tokenizer", "llama", stdin=answer)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert len(doc["grid"]) == 16 and all(len(r) == 16 for r in doc["grid"])
    assert doc["labels"] == HORSE
    assert {"unclosed_tag", "padded"} <= {d["code"] for d in doc["diagnostics"]}
    assert doc["tokens"] > 50
    assert Image.open(tmp_path / "o.png").size == (64, 32)


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    out = run_cli("descriptors", "encode", str(tmp_path / "missing.png"), "--label", "cat")
    assert out.returncode == 2 and "error" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("descriptors", "encode", str(tmp_path / "missing.png"), "--label", "a|b")
    assert out.returncode == 2 and "reserves" in out.stderr
