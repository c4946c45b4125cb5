"""Text4Seg training conversations from a manifest, in the two layouts trainers read.

``llava``: LLaVA's ``[{"id", "image", "conversations": [{"from": "human"}, {"from": "gpt"}]}]``.
``swift``: ms-swift's ``[{"messages": [{"role": "user"}, {"role": "assistant"}], "images"}]``.

Each answer is a lead-in, a newline and ``<seg>BODY</seg>``: the mask taken to the grid by
nearest neighbour and written in the chosen descriptor format, exactly as the reference's data
scripts write it for the same mask, sentence and templates.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..descriptors import codec, prompts
from ..evaluation.manifest import read_manifest
from ..masks import load_mask, to_grid

STYLES = ("llava", "swift")


def answer_text(mask, expression: str, grid: int, fmt: str = "rrle", lead_in: int = 0) -> str:
    """The training answer for a binary ``mask`` (any size) and its ``expression``."""
    cells = to_grid(mask.astype("uint8"), grid).astype(bool).astype(int)
    return codec.wrap(codec.encode(cells, [codec.OTHERS, expression], fmt), prompts.lead_in(expression, lead_in))


def conversation(image: str, question: str, answer: str, style: str, index: int) -> dict:
    """One training record in ``style``."""
    if style == "llava":
        return {"id": str(index), "image": image,
                "conversations": [{"from": "human", "value": f"{prompts.IMAGE}\n{question}"},
                                  {"from": "gpt", "value": answer}]}
    if style == "swift":
        return {"messages": [{"role": "user", "content": f"{prompts.IMAGE}{question}"},
                             {"role": "assistant", "content": answer}], "images": [image]}
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


@dataclass
class Written:
    path: Path
    records: int = 0
    skipped: Counter = field(default_factory=Counter)


def write_training_json(manifest_dir: str | Path, out: str | Path, grid: int = 16, fmt: str = "rrle",
                        style: str = "llava", seed: int = 0, progress=None) -> Written:
    """One conversation per query of the manifest, question and lead-in templates drawn at
    random (seeded) like the reference's scripts draw them. Expressions the descriptor grammar
    cannot carry (a ``|`` or ``*`` in them) are skipped and counted."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    rng, written, records = random.Random(seed), Written(Path(out)), []
    for query in read_manifest(manifest_dir):
        if progress:
            progress()
        try:
            codec.check_label(query.expression)
        except ValueError:
            written.skipped["expressions holding a character the descriptors reserve"] += 1
            continue
        question = prompts.question(query.expression, template=None, rng=rng)
        answer = answer_text(load_mask(query.mask), query.expression, grid, fmt,
                             lead_in=rng.randrange(len(prompts.LEAD_INS)))
        records.append(conversation(str(query.image.resolve()), question, answer, style, len(records)))
    written.records = len(records)
    written.path.parent.mkdir(parents=True, exist_ok=True)
    written.path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    return written
