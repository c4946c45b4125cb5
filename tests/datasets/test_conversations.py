"""``text4seg data train-json``: training conversations whose answers match the reference's."""

import itertools
import json

import numpy as np
from PIL import Image

from text4seg_demo.cli import main
from text4seg_demo.datasets.conversations import write_training_json
from text4seg_demo.datasets.refer import convert
from text4seg_demo.descriptors.prompts import LEAD_INS, QUESTIONS


def reference_answer(mask_path, sentence: str, grid: int, lead_in: str, fmt: str) -> str:
    """The answer the reference's data scripts write: the mask resized to the grid by PIL's
    NEAREST, each row run-length encoded (or every cell listed), then wrapped after the lead-in."""
    cells = np.array(Image.open(mask_path).convert("L").point(lambda v: v > 0).resize((grid, grid), Image.NEAREST))
    labels = [[sentence if c else "others" for c in row] for row in cells]
    if fmt == "rrle":
        body = "\n ".join("| ".join(f"{k} *{len(list(g))}" for k, g in itertools.groupby(row)) for row in labels) + "\n"
    else:
        body = "| ".join(itertools.chain(*labels)) + "\n"
    return lead_in.replace("[class_name]", sentence) + f"\n<seg>{body}</seg>"


def test_llava_conversations_carry_the_reference_answer(refer, tmp_path):
    convert(refer.root, refer.images, "grefcoco", "val", tmp_path / "m")
    out = tmp_path / "train.json"
    written = write_training_json(tmp_path / "m", out, grid=16, fmt="rrle", style="llava", seed=3)
    records = json.loads(out.read_text())
    manifest = [json.loads(line) for line in (tmp_path / "m" / "manifest.jsonl").read_text().splitlines()]
    assert written.records == len(records) == len(manifest) == 4
    empty_seen = False
    for record, row in zip(records, manifest):
        human, gpt = record["conversations"]
        sentence = row["expression"]
        assert record["image"] == row["image"] and human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n")
        assert human["value"][len("<image>\n"):] in [q.replace("[class_name]", sentence) for q in QUESTIONS]
        lead = next(t for t in LEAD_INS if gpt["value"].startswith(t.replace("[class_name]", sentence) + "\n"))
        assert gpt["value"] == reference_answer(tmp_path / "m" / row["mask"], sentence, 16, lead, "rrle")
        empty_seen |= gpt["value"].endswith("<seg>" + "\n ".join(["others *16"] * 16) + "\n</seg>")
    assert empty_seen  # the no-target sentence: every patch is others
    # the draws are seeded: the same seed writes the same file
    again = tmp_path / "again.json"
    write_training_json(tmp_path / "m", again, grid=16, fmt="rrle", style="llava", seed=3)
    assert again.read_text() == out.read_text()


def test_swift_messages_full_length_at_24_and_reserved_labels_skipped(refer, tmp_path, capsys):
    convert(refer.root, refer.images, "refcoco", "val", tmp_path / "m")
    manifest = tmp_path / "m" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows.append({**rows[0], "expression": "cat | dog"})  # '|' would break the descriptor grammar
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "swift.json"
    assert main(["data", "train-json", "--manifest", str(tmp_path / "m"), "--grid", "24", "--format", "full",
                 "--style", "swift", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "4 swift conversations" in err and "skipped 1 expressions holding a character" in err
    records = json.loads(out.read_text())
    assert len(records) == 4
    first = records[0]
    user, assistant = first["messages"]
    assert user["role"] == "user" and user["content"].startswith("<image>") and first["images"] == [rows[0]["image"]]
    lead = next(t for t in LEAD_INS if assistant["content"].startswith(t.replace("[class_name]", "left cat") + "\n"))
    assert assistant["content"] == reference_answer(tmp_path / "m" / rows[0]["mask"], "left cat", 24, lead, "full")
    assert assistant["content"].count("| ") == 24 * 24 - 1
