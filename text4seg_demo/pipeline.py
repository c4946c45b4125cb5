"""The one path from (image, expression, settings) to a typed result.

image + expression -> prompt -> generate (streamed, optionally constrained) -> parse ->
patch grid -> refine -> result. The app, the CLI, ``eval`` and ``bench`` all call
:func:`segment_stream` or :func:`segment`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .descriptors import codec
from .inference.engine import Engine, StreamEvent
from .masks import to_image

MAX_EXPRESSION_CHARS = 200


@dataclass
class Request:
    """What to segment and how. ``classes`` switches to a multi-class question."""

    expression: str = ""
    classes: Sequence[str] | None = None
    fmt: str | None = None
    grid: int | None = None
    constrained: bool = False
    jump_forward: bool = False  # with constrained: forced text rides along, same answer, fewer steps
    max_new_tokens: int | None = None
    sam_points: int = 10
    seed: int = 0

    def labels(self) -> list[str]:
        """The foreground labels the answer may use; raises ValueError with a clear message."""
        names = [c.strip() for c in self.classes if c.strip()] if self.classes else [self.expression.strip()]
        names = [n for n in names if n != codec.OTHERS]
        if not names or not all(names):
            raise ValueError("the expression is empty: type what to segment, e.g. 'the red circle'")
        for name in names:
            if len(name) > MAX_EXPRESSION_CHARS:
                raise ValueError(f"the expression is {len(name)} characters long; keep it under "
                                 f"{MAX_EXPRESSION_CHARS}")
            codec.check_label(name)
        return names


@dataclass
class Result:
    """Everything one request produced: answer, grid, masks, accounting."""

    text: str
    grid: np.ndarray
    labels: list[str]
    diagnostics: list[codec.Diagnostic]
    coarse: np.ndarray  # label map at the image's size
    refined: np.ndarray | None
    tokens: dict
    timings: dict
    model: str
    quant: str
    device: str
    fmt: str
    constrained: bool
    refine: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "grid": self.grid.tolist(), "labels": self.labels, "text": self.text,
            "diagnostics": [d.to_dict() for d in self.diagnostics], "tokens": self.tokens,
            "timings": {k: round(v, 5) for k, v in self.timings.items()}, "model": self.model,
            "quant": self.quant, "device": self.device, "format": self.fmt, "constrained": self.constrained,
            "refine": self.refine, "notes": self.notes,
        }


def descriptor_costs(engine: Engine, grid: np.ndarray, labels: list[str]) -> dict:
    """What this grid costs as R-RLE and as full-length descriptors under the model's tokenizer."""
    rrle = engine.count_tokens(codec.encode(grid, labels, "rrle"))
    full = engine.count_tokens(codec.encode(grid, labels, "full"))
    return {"rrle": rrle, "full": full, "reduction": round(1 - rrle / full, 4)}


def segment_stream(engine: Engine, image: Image.Image, request: Request,
                   refiner=None) -> Iterator[StreamEvent | Result]:
    """Stream the answer (``StreamEvent``s), then yield the finished :class:`Result`."""
    labels = request.labels()
    fmt = request.fmt or engine.settings.fmt
    grid_size = request.grid or engine.settings.grid
    question = engine.question(labels[0], request.classes)
    generation = None
    for event in engine.stream(image, question, labels, fmt=fmt, grid=grid_size,
                               max_new_tokens=request.max_new_tokens, constrained=request.constrained,
                               jump_forward=request.jump_forward):
        yield event
        generation = event.generation
    parsed = codec.parse_answer(generation.text, grid_size, fmt=fmt, allowed_labels=labels)
    coarse = to_image(parsed.grid, image.height, image.width)
    timings = dict(generation.timings)
    refined, refine_info = None, {"refiner": "none"}
    if refiner is not None:
        t0 = time.perf_counter()
        outcome = refiner.refine(image, coarse, parsed.labels, grid=grid_size, points=request.sam_points,
                                 seed=request.seed)
        timings["refine"] = time.perf_counter() - t0
        refined, refine_info = outcome.mask, outcome.info
        timings["total"] += timings["refine"]
    tokens = dict(generation.tokens, descriptor=engine.count_tokens(parsed.body),
                  **descriptor_costs(engine, parsed.grid, parsed.labels))
    if timings.get("decode"):
        tokens["per_second"] = round(generation.tokens["generated"] / timings["decode"], 2)
    yield Result(text=generation.text, grid=parsed.grid, labels=parsed.labels, diagnostics=parsed.diagnostics,
                 coarse=coarse, refined=refined, tokens=tokens, timings=timings, model=engine.name,
                 quant=engine.quant, device=str(engine.device), fmt=fmt, constrained=request.constrained,
                 refine=refine_info, notes=list(engine.notes))


def segment(engine: Engine, image: Image.Image, request: Request, refiner=None) -> Result:
    """:func:`segment_stream` without the stream."""
    for item in segment_stream(engine, image, request, refiner):
        if isinstance(item, Result):
            return item
    raise RuntimeError("the pipeline ended without a result")
