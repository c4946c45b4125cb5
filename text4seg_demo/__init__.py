"""text4seg-demo: Text4Seg segmentation as text generation, from codec to web demo.

The public names load lazily, so that ``import text4seg_demo`` and the text format (``encode``,
``parse_answer``) cost no torch import; the first use of ``load`` or ``segment`` brings it in.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "encode": "descriptors.codec", "parse_answer": "descriptors.codec",
    "load": "inference.loading",
    "Request": "pipeline", "Result": "pipeline", "segment": "pipeline", "segment_stream": "pipeline",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'text4seg_demo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
