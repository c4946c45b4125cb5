"""How a checkpoint speaks (:class:`Settings`), and ``text4seg.json``, the file beside its weights
that records it: the only reader and writer of that file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .attention import SCHEMES as ATTENTION_SCHEMES

SETTINGS_FILE = "text4seg.json"


@dataclass
class Settings:
    """How a checkpoint speaks: its grid, its descriptor format, its prompt template, how its
    answer tokens are positioned (:mod:`text4seg_demo.inference.positions`) and what its image tokens
    attend to (:mod:`text4seg_demo.inference.attention`)."""

    grid: int = 16
    fmt: str = "rrle"
    prompt_style: str = "llava_v1"
    question_template: int = 0
    positions: str = "natural"
    image_attention: str = "causal"

    def __post_init__(self):
        if self.image_attention not in ATTENTION_SCHEMES:
            raise ValueError(f"image_attention must be one of {ATTENTION_SCHEMES}, not {self.image_attention!r}")

    def to_dict(self) -> dict:
        return {"grid": self.grid, "format": self.fmt, "prompt_style": self.prompt_style,
                "question_template": self.question_template, "positions": self.positions,
                "image_attention": self.image_attention}

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        return cls(data.get("grid", 16), data.get("format", "rrle"), data.get("prompt_style", "llava_v1"),
                   data.get("question_template", 0), data.get("positions", "natural"),
                   data.get("image_attention", "causal"))

    @classmethod
    def read(cls, directory: str | Path) -> Settings | None:
        """The settings of a model directory's ``text4seg.json``; None when it has none."""
        record = read_record(directory)
        return None if record is None else cls.from_dict(record)

    def write(self, directory: str | Path, **extra) -> Path:
        """``text4seg.json`` of a model directory: these settings and ``extra`` records
        (``training``, ``metrics``, ``converted_from``)."""
        return write_record(directory, {**self.to_dict(), **extra})


def read_record(directory: str | Path) -> dict | None:
    """The whole ``text4seg.json`` of ``directory`` (settings and any training record), or None."""
    path = Path(directory) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(directory: str | Path, record: dict) -> Path:
    """Write ``record`` as ``directory``'s ``text4seg.json``; return the file."""
    path = Path(directory) / SETTINGS_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def grid_from_name(name: str) -> int | None:
    """The grid a checkpoint's name states (``...-p24`` is 24 x 24), if it states one."""
    match = re.search(r"p(\d{2})(?!\d)", name)
    return int(match.group(1)) if match else None
