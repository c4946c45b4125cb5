"""A synthetic referring-segmentation domain: flat shapes, colours, and expressions about them.

Deterministic for a seed. Each scene is built around one query kind so every kind is
well represented; a scene then yields every query that is valid for it, up to a limit.
The bundled tiny models are trained on this domain and evaluated on held-out seeds.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
COLOURS = {
    "red": (220, 30, 35), "green": (40, 170, 60), "blue": (35, 75, 215),
    "yellow": (245, 210, 20), "purple": (140, 50, 180), "orange": (250, 130, 20),
}
SIDES = {"on the left": (0, -1), "on the right": (0, 1), "at the top": (1, -1), "at the bottom": (1, 1)}
KINDS = ("colour_shape", "shape", "side", "size", "all_colour", "all_shape", "absent")


@dataclass
class Shape:
    kind: str
    colour: str
    cx: float
    cy: float
    size: float  # diameter / side, in pixels
    angle: float

    def polygon(self) -> list[tuple[float, float]]:
        r = self.size / 2
        if self.kind == "circle":
            n, radii = 48, [r]
        elif self.kind == "square":
            n, radii, r = 4, [r * math.sqrt(2)], r
        elif self.kind == "triangle":
            n, radii = 3, [r * 1.15]
        else:
            n, radii = 10, [r * 1.15, r * 0.48]
        points = []
        for i in range(n):
            rad = radii[i % len(radii)]
            a = self.angle + 2 * math.pi * i / n + (math.pi / 4 if self.kind == "square" else 0)
            points.append((self.cx + rad * math.cos(a), self.cy + rad * math.sin(a)))
        return points


@dataclass
class Query:
    expression: str
    targets: list[int]  # indices into the scene's shapes
    kind: str

    def mask(self, visible: np.ndarray) -> np.ndarray:
        """The target's pixels in a scene's label map (0 = background, i = ``shapes[i - 1]``)."""
        return np.isin(visible, [t + 1 for t in self.targets])


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Solid, gradient or noisy, in low-saturation colours that no shape colour resembles."""

    def dull():
        r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.18), rng.uniform(0.35, 0.95))
        return np.array([r, g, b]) * 255

    style = rng.choice(["solid", "gradient", "noisy"])
    base = np.broadcast_to(dull(), (h, w, 3)).astype(np.float32)
    if style == "gradient":
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        t = t[None, :, None] if t.size == w else t[:, None, None]
        base = base * (1 - t) + dull().astype(np.float32) * t
    elif style == "noisy":
        base = base + rng.normal(0, rng.uniform(6, 20), (h, w, 1)).astype(np.float32)
    return np.clip(base, 0, 255).astype(np.uint8)


class SceneMaker:
    """Draws scenes and their queries from one random stream."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def _size(self, short: int) -> float:
        return float(self.rng.uniform(0.05, 0.40) * short)

    def _place(self, shapes: list[Shape], shape: Shape, w: int, h: int, region=None) -> bool:
        """Move ``shape`` to a spot inside the image that overlaps others only a little."""
        r = shape.size / 2
        for _ in range(60):
            x0, x1, y0, y1 = region or (0, 1, 0, 1)
            shape.cx = float(self.rng.uniform(max(r, x0 * w), max(r + 1, min(w - r, x1 * w))))
            shape.cy = float(self.rng.uniform(max(r, y0 * h), max(r + 1, min(h - r, y1 * h))))
            if all(math.hypot(shape.cx - s.cx, shape.cy - s.cy) > 0.85 * (r + s.size / 2) for s in shapes):
                shapes.append(shape)
                return True
        return False

    def _new(self, short: int, kind=None, colour=None, size=None) -> Shape:
        return Shape(kind or str(self.rng.choice(SHAPES)), colour or str(self.rng.choice(list(COLOURS))),
                     0.0, 0.0, size or self._size(short), float(self.rng.uniform(0, 2 * math.pi)))

    def scene(self, focus: str, colour_rivals: bool = False):
        """An image, its label map (0 = background, i = ``shapes[i - 1]``) and its shapes.

        With ``colour_rivals``, a colour-and-shape or absent scene holds two shapes of one kind in
        different colours and a third of another kind sharing a colour with one of them, so that
        `the red circle`, `the blue circle` and an absent `the blue square` each hinge on a word
        that the shape kind alone does not give."""
        rng = self.rng
        short = int(rng.integers(128, 641))
        aspect = float(np.exp(rng.uniform(math.log(0.5), math.log(2.0))))
        w, h = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
        shapes: list[Shape] = []
        kind = None  # the focus shape kind, kept unique to the focus pair
        if focus == "side":
            kind, axis = str(rng.choice(SHAPES)), int(rng.integers(0, 2))
            for lo, hi in ((0.0, 0.42), (0.58, 1.0)):
                region = (lo, hi, 0, 1) if axis == 0 else (0, 1, lo, hi)
                self._place(shapes, self._new(short, kind, size=rng.uniform(0.06, 0.3) * short), w, h, region)
        elif focus == "size":
            kind, small = str(rng.choice(SHAPES)), rng.uniform(0.05, 0.18)
            for frac in (small, rng.uniform(max(small * 1.7, 0.2), 0.4)):
                self._place(shapes, self._new(short, kind, size=frac * short), w, h)
        elif focus in ("all_colour", "all_shape"):
            colour, kind = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
            for _ in range(int(rng.integers(2, 4))):
                self._place(shapes, self._new(short, kind if focus == "all_shape" else None,
                                              colour if focus == "all_colour" else None,
                                              size=rng.uniform(0.05, 0.28) * short), w, h)
        elif focus in ("colour_shape", "absent") and colour_rivals:
            twin, other = (str(k) for k in rng.choice(SHAPES, 2, replace=False))
            first, second = (str(c) for c in rng.choice(list(COLOURS), 2, replace=False))
            for k, c in ((twin, first), (twin, second), (other, first)):
                self._place(shapes, self._new(short, k, c, size=rng.uniform(0.06, 0.3) * short), w, h)
        others = [k for k in SHAPES if focus not in ("side", "size") or k != kind]
        for _ in range(int(rng.integers(1, 7)) - len(shapes)):
            extra = self._new(short, str(rng.choice(others)), size=rng.uniform(0.05, 0.3 if shapes else 0.4) * short)
            self._place(shapes, extra, w, h)
        order = rng.permutation(len(shapes))
        shapes = [shapes[i] for i in order]

        image = Image.fromarray(_background(rng, w, h))
        labels = Image.new("I", (w, h), 0)
        draw, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
        for i, s in enumerate(shapes, start=1):  # later shapes lie on top
            draw.polygon(s.polygon(), fill=COLOURS[s.colour])
            draw_labels.polygon(s.polygon(), fill=i)
        if rng.random() < 0.25:
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.5))))
        return image, np.asarray(labels), shapes

    def candidates(self, shapes: list[Shape], visible: np.ndarray) -> dict[str, list[Query]]:
        """Every valid query for the scene, by kind."""
        # a shape can be a target only if enough of it shows (15% of its disc's area)
        ids = [i for i in range(len(shapes)) if (visible == i + 1).sum() > 0.15 * math.pi * (shapes[i].size / 2) ** 2]
        out: dict[str, list[Query]] = {k: [] for k in KINDS}
        for colour in COLOURS:
            for kind in SHAPES:
                match = [i for i in range(len(shapes)) if shapes[i].kind == kind and shapes[i].colour == colour]
                if len(match) == 1 and match[0] in ids:
                    out["colour_shape"].append(Query(f"the {colour} {kind}", match, "colour_shape"))
                elif not match:
                    out["absent"].append(Query(f"the {colour} {kind}", [], "absent"))
        for kind in SHAPES:
            same = [i for i in range(len(shapes)) if shapes[i].kind == kind]
            if len(same) == 1 and same[0] in ids:
                out["shape"].append(Query(f"the {kind}", same, "shape"))
            if len(same) == 2 and all(i in ids for i in same):
                a, b = (shapes[i] for i in same)
                for side, (axis, sign) in SIDES.items():
                    ca, cb = (a.cx, b.cx) if axis == 0 else (a.cy, b.cy)
                    extent = visible.shape[1 - axis]
                    if abs(ca - cb) > 0.2 * extent and abs(ca - cb) > (a.size + b.size) / 2:
                        winner = same[0] if (ca - cb) * sign > 0 else same[1]
                        out["side"].append(Query(f"the {kind} {side}", [winner], "side"))
                big, small = (same[0], same[1]) if a.size > b.size else (same[1], same[0])
                if shapes[big].size >= 1.5 * shapes[small].size:
                    out["size"].append(Query(f"the large {kind}", [big], "size"))
                    out["size"].append(Query(f"the small {kind}", [small], "size"))
            if len(same) >= 2:
                out["all_shape"].append(Query(f"all {PLURALS[kind]}", same, "all_shape"))
        for colour in COLOURS:
            same = [i for i in range(len(shapes)) if shapes[i].colour == colour]
            if len(same) >= 2:
                out["all_colour"].append(Query(f"all {colour} shapes", same, "all_colour"))
        return out

    def choose(self, candidates: dict[str, list[Query]], focus: str) -> list[Query]:
        """One of the scene's ``candidates`` of each kind it has, the ``focus`` kind first."""
        chosen = []
        for kind in (focus, *[k for k in KINDS if k != focus]):
            if candidates[kind]:
                chosen.append(candidates[kind][int(self.rng.integers(len(candidates[kind])))])
        return chosen


def make_dataset(out: str | Path, n_images: int, seed: int, queries_per_image: int = 2, progress=None) -> Path:
    """Write ``n_images`` scenes with their queries under ``out`` and a ``manifest.jsonl``."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    maker = SceneMaker(seed)
    lines = []
    for n in range(n_images):
        focus = KINDS[n % len(KINDS)]
        image, visible, shapes = maker.scene(focus)
        image_rel = f"images/{n:06d}.png"
        image.save(out / image_rel)
        queries = maker.choose(maker.candidates(shapes, visible), focus)
        queries = [queries[0]] + [queries[i] for i in maker.rng.permutation(len(queries) - 1)[: queries_per_image - 1] + 1]
        for k, q in enumerate(queries):
            mask = q.mask(visible)
            mask_rel = f"masks/{n:06d}_{k}.png"
            Image.fromarray((mask * 255).astype(np.uint8)).save(out / mask_rel)
            lines.append({"image": image_rel, "expression": q.expression, "mask": mask_rel, "kind": q.kind})
        if progress:
            progress(n + 1)
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def sample(maker: SceneMaker, focus: str | None = None):
    """One (image, expression, mask) triple straight from the generator, for training."""
    return samples(maker, focus)[0]


def samples(maker: SceneMaker, focus: str | None = None, contrast: bool = False, colour_rivals: bool = False):
    """(image, expression, mask) triples from one scene: its focus query and, with ``contrast``,
    another query of the same kind with other targets where the scene has one (`the small
    square` beside `the large square`; an absent `the purple star` beside a present `the red
    circle`), so that only the words tell the two answers apart. With ``colour_rivals``,
    colour-and-shape and absent queries come from :meth:`SceneMaker.scene`'s rival scenes, are
    those that the shape kind alone cannot answer, and pair with a query sharing a word."""
    focus = focus or KINDS[int(maker.rng.integers(len(KINDS)))]
    image, visible, shapes = maker.scene(focus, colour_rivals)
    candidates = maker.candidates(shapes, visible)
    if colour_rivals and focus in ("colour_shape", "absent"):
        candidates[focus] = [q for q in candidates[focus] if _hinges_on_colour(q, shapes)] or candidates[focus]
    query = maker.choose(candidates, focus)[0]
    chosen = [query]
    if contrast:
        kind = "colour_shape" if query.kind == "absent" else query.kind
        rivals = [q for q in candidates[kind] if q.targets != query.targets]
        if colour_rivals and kind == "colour_shape":
            words = set(query.expression.split()) - {"the"}
            rivals = [q for q in rivals if words & set(q.expression.split())] or rivals
        if rivals:
            chosen.append(rivals[int(maker.rng.integers(len(rivals)))])
    return [(image, q.expression, q.mask(visible)) for q in chosen]


def _hinges_on_colour(query: Query, shapes: list[Shape]) -> bool:
    """Whether `the <colour> <kind>` names a kind that the scene also has in another colour, and a
    colour that it has: the kind alone then cannot tell the target, or tell that there is none."""
    _, colour, kind = query.expression.split()
    return (any(s.kind == kind and s.colour != colour for s in shapes)
            and any(s.colour == colour for s in shapes))


def expressions() -> list[str]:
    """Every expression the generator can write (the tiny models' label vocabulary)."""
    out = [f"the {c} {s}" for c in COLOURS for s in SHAPES] + [f"the {s}" for s in SHAPES]
    out += [f"the {s} {side}" for s in SHAPES for side in SIDES]
    out += [f"the {size} {s}" for size in ("large", "small") for s in SHAPES]
    out += [f"all {c} shapes" for c in COLOURS] + [f"all {PLURALS[s]}" for s in SHAPES]
    return out
