"""A synthetic referring-segmentation domain: flat shapes, colours, and expressions about them.

Deterministic for a seed. Each scene is built around one query kind so every kind is
well represented; a scene then yields every query that is valid for it, up to a limit.
The bundled tiny models are trained on this domain and evaluated on held-out seeds.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
COLOURS = {
    "red": (220, 30, 35), "green": (40, 170, 60), "blue": (35, 75, 215),
    "yellow": (245, 210, 20), "purple": (140, 50, 180), "orange": (250, 130, 20),
}
# The shades each colour name covers, as HSV ranges (hue in degrees): a shape is drawn in any of
# them, so that a model learns the names and not six RGB triples (another generator's `orange`
# is not this one's). A shade is also nearer its own name's colour in COLOURS than any other's.
SHADES = {
    "red": ((-10, 8), (0.7, 1.0), (0.6, 1.0)), "green": ((100, 145), (0.55, 1.0), (0.45, 0.85)),
    "blue": ((200, 245), (0.6, 1.0), (0.6, 1.0)), "yellow": ((50, 62), (0.7, 1.0), (0.85, 1.0)),
    "purple": ((265, 305), (0.45, 1.0), (0.45, 0.8)), "orange": ((20, 39), (0.75, 1.0), (0.85, 1.0)),
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
    rgb: tuple[int, int, int]  # its shade of ``colour``

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


@dataclass(frozen=True)
class Domain:
    """The parameter ranges scenes are drawn from. :data:`DOMAIN` is the stated domain the
    models are trained on; :data:`SHIFTED` draws other ranges inside it, to check that a model
    learned the task rather than the generator's habits."""

    backgrounds: tuple[str, ...]  # families in BACKGROUNDS, drawn uniformly
    saturation: tuple[float, float]  # of the background colours (HSV)
    value: tuple[float, float]
    texture_period: tuple[float, float]  # stripes, checks and blotches, in pixels
    size_skew: float  # shape sizes are lo + (hi - lo) * u ** skew: 1 uniform, > 1 skewed small
    shapes: tuple[int, int]  # shapes per scene, inclusive
    noise: float  # chance of pixel noise over any background
    blur: float  # chance of a Gaussian blur
    jpeg: float  # chance of a JPEG round trip
    shades: bool = True  # shapes in any shade of their colour (SHADES), else in COLOURS' own
    # shapes' centres keep this share of their summed radii apart, drawn per scene: below 1 they
    # overlap, the shape drawn last winning
    spacing: tuple[float, float] = (0.85, 0.85)
    edge: float = 0.0  # chance that a scene's shapes may reach past the image's edge (see EDGE_INSET)


BACKGROUNDS = ("solid", "gradient", "noisy", "stripes", "checks", "blotches")
DOMAIN = Domain(backgrounds=BACKGROUNDS, saturation=(0.0, 1.0), value=(0.15, 1.0), texture_period=(8, 160),
                size_skew=1.0, shapes=(1, 8), noise=0.2, blur=0.25, jpeg=0.4, spacing=(0.45, 0.85), edge=0.25)
SHIFTED = Domain(backgrounds=("stripes", "checks", "blotches", "gradient"), saturation=(0.55, 1.0),
                 value=(0.5, 1.0), texture_period=(80, 160), size_skew=2.0, shapes=(3, 8), noise=0.4,
                 blur=0.4, jpeg=0.8)
SPLITS = {"domain": DOMAIN, "shifted": SHIFTED}
EDGE_INSET = 0.3  # a shape that may reach past the edge keeps its centre this share of its radius inside


@dataclass(frozen=True)
class Layout:
    """One scene's frame and placement rule: its size, how close two centres may come (a share
    of their summed radii) and how far inside the edge a centre stays (a share of its radius)."""

    w: int
    h: int
    spacing: float
    margin: float


# Every background colour keeps CIE76 distance MIN_DELTA_E (CIELAB, D65) from each colour of
# COLOURS and each shade drawn in its scene: more than the two closest colours of COLOURS, blue
# and purple, are apart (30), so a shape's colour is never in doubt against its background.
MIN_DELTA_E = 35.0


def _lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB of sRGB colours (..., 3) in 0..255."""
    return cv2.cvtColor(np.asarray(rgb, np.float32).reshape(-1, 1, 3) / 255, cv2.COLOR_RGB2LAB).reshape(-1, 3)


SHAPE_LAB = _lab(np.array(list(COLOURS.values())))


def shade(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    """A shade of ``colour`` drawn from :data:`SHADES`, nearer to ``COLOURS[colour]`` than to any
    other colour of :data:`COLOURS`."""
    own = list(COLOURS).index(colour)
    while True:
        hue, saturation, value = (rng.uniform(lo, hi) for lo, hi in SHADES[colour])
        rgb = np.round(np.array(colorsys.hsv_to_rgb(hue % 360 / 360, saturation, value)) * 255)
        if np.linalg.norm(_lab(rgb) - SHAPE_LAB, axis=-1).argmin() == own:
            return tuple(int(c) for c in rgb)


def clear_of_shapes(rgb: np.ndarray, avoid: np.ndarray) -> bool:
    """Whether every colour in ``rgb`` (..., 3) keeps :data:`MIN_DELTA_E` from every CIELAB colour
    in ``avoid`` (n, 3): those of :data:`COLOURS`, and a scene's shades."""
    return bool(np.linalg.norm(_lab(rgb)[:, None] - avoid[None], axis=-1).min() >= MIN_DELTA_E)


def _colour_pair(rng: np.random.Generator, domain: Domain, avoid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two background colours such that every mix of them is clear of the shape colours."""

    def one():
        while True:
            rgb = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*domain.saturation),
                                               rng.uniform(*domain.value))) * 255
            if clear_of_shapes(rgb, avoid):
                return rgb

    first = one()
    while True:
        second = one()
        mixes = first[None] + np.linspace(0, 1, 9)[:, None] * (second - first)[None]
        if clear_of_shapes(mixes, avoid):
            return first, second


def _background(rng: np.random.Generator, w: int, h: int, domain: Domain = DOMAIN,
                shades: list[tuple[int, int, int]] = ()) -> np.ndarray:
    """A background of one of ``domain.backgrounds``: solid, a linear gradient at any angle,
    noise, stripes or checks at any angle, or smooth blotches; all colours clear of the shapes'
    (COLOURS and the scene's ``shades``)."""
    style = str(rng.choice(domain.backgrounds))
    avoid = np.concatenate([SHAPE_LAB, _lab(np.array(shades))]) if len(shades) else SHAPE_LAB
    first, second = _colour_pair(rng, domain, avoid)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    period = rng.uniform(*domain.texture_period)
    if style == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    elif style == "stripes":
        t = ((u / period + rng.random()) % 1.0 < rng.uniform(0.3, 0.7)).astype(np.float32)
    elif style == "checks":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif style == "blotches":
        coarse = rng.normal(0, 1, (max(2, int(h / period)), max(2, int(w / period)))).astype(np.float32)
        field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
        t = 1 / (1 + np.exp(-3 * field))
    else:  # solid, noisy
        t = np.zeros((h, w), np.float32)
    base = first[None, None].astype(np.float32) + t[..., None] * (second - first)[None, None].astype(np.float32)
    if style == "noisy" or rng.random() < domain.noise:
        base = base + rng.normal(0, rng.uniform(4, 16), (h, w, 1)).astype(np.float32)
    return np.clip(base, 0, 255).astype(np.uint8)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    """``image`` after a JPEG round trip at ``quality``: the artefacts of a shared photo."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


class SceneMaker:
    """Draws scenes and their queries from one random stream."""

    def __init__(self, seed: int, domain: Domain = DOMAIN):
        self.rng = np.random.default_rng(seed)
        self.domain = domain

    def _fraction(self, lo: float, hi: float) -> float:
        """A size in ``lo..hi`` (a share of the short side), skewed as the domain says."""
        return lo + (hi - lo) * float(self.rng.random()) ** self.domain.size_skew

    def _place(self, shapes: list[Shape], shape: Shape, layout: Layout, region=None) -> bool:
        """Move ``shape`` to a spot that keeps the layout's spacing from the others and its centre
        the layout's margin (a share of its radius) inside the image's edges."""
        w, h = layout.w, layout.h
        r, inset = shape.size / 2, layout.margin * shape.size / 2
        x0, x1, y0, y1 = region or (0, 1, 0, 1)
        for _ in range(60):
            shape.cx = float(self.rng.uniform(max(inset, x0 * w), max(inset + 1, min(w - inset, x1 * w))))
            shape.cy = float(self.rng.uniform(max(inset, y0 * h), max(inset + 1, min(h - inset, y1 * h))))
            if all(math.hypot(shape.cx - s.cx, shape.cy - s.cy) > layout.spacing * (r + s.size / 2) for s in shapes):
                shapes.append(shape)
                return True
        return False

    def _new(self, short: int, kind=None, colour=None, size=None) -> Shape:
        colour = colour or str(self.rng.choice(list(COLOURS)))
        return Shape(kind or str(self.rng.choice(SHAPES)), colour, 0.0, 0.0, size or self._fraction(0.05, 0.40) * short,
                     float(self.rng.uniform(0, 2 * math.pi)),
                     shade(self.rng, colour) if self.domain.shades else COLOURS[colour])

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
        # a fixed range or a zero chance draws nothing, so such a domain's scenes stay as they were
        lo, hi = self.domain.spacing
        layout = Layout(w, h, float(rng.uniform(lo, hi)) if hi > lo else lo,
                        EDGE_INSET if self.domain.edge and rng.random() < self.domain.edge else 1.0)
        shapes: list[Shape] = []
        kind = None  # the focus shape kind, kept unique to the focus pair
        if focus == "side":
            kind, axis = str(rng.choice(SHAPES)), int(rng.integers(0, 2))
            for lo, hi in ((0.0, 0.42), (0.58, 1.0)):
                region = (lo, hi, 0, 1) if axis == 0 else (0, 1, lo, hi)
                self._place(shapes, self._new(short, kind, size=self._fraction(0.05, 0.3) * short), layout, region)
        elif focus == "size":
            kind, small = str(rng.choice(SHAPES)), self._fraction(0.05, 0.18)
            for frac in (small, rng.uniform(max(small * 1.7, 0.2), 0.4)):
                self._place(shapes, self._new(short, kind, size=frac * short), layout)
        elif focus in ("all_colour", "all_shape"):
            colour, kind = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
            for _ in range(int(rng.integers(2, 4))):
                self._place(shapes, self._new(short, kind if focus == "all_shape" else None,
                                              colour if focus == "all_colour" else None,
                                              size=self._fraction(0.05, 0.28) * short), layout)
        elif focus in ("colour_shape", "absent") and colour_rivals:
            twin, other = (str(k) for k in rng.choice(SHAPES, 2, replace=False))
            first, second = (str(c) for c in rng.choice(list(COLOURS), 2, replace=False))
            for k, c in ((twin, first), (twin, second), (other, first)):
                self._place(shapes, self._new(short, k, c, size=self._fraction(0.05, 0.3) * short), layout)
        others = [k for k in SHAPES if focus not in ("side", "size") or k != kind]
        for _ in range(int(rng.integers(self.domain.shapes[0], self.domain.shapes[1] + 1)) - len(shapes)):
            extra = self._new(short, str(rng.choice(others)), size=self._fraction(0.05, 0.3 if shapes else 0.4) * short)
            self._place(shapes, extra, layout)
        order = rng.permutation(len(shapes))
        shapes = [shapes[i] for i in order]

        image = Image.fromarray(_background(rng, w, h, self.domain, [s.rgb for s in shapes]))
        labels = Image.new("I", (w, h), 0)
        draw, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
        for i, s in enumerate(shapes, start=1):  # later shapes lie on top
            draw.polygon(s.polygon(), fill=s.rgb)
            draw_labels.polygon(s.polygon(), fill=i)
        if rng.random() < self.domain.blur:
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.5))))
        if rng.random() < self.domain.jpeg:
            image = _jpeg(image, int(rng.integers(60, 96)))
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


def make_dataset(out: str | Path, n_images: int, seed: int, queries_per_image: int = 2, progress=None,
                 domain: Domain = DOMAIN, kinds: tuple[str, ...] = KINDS) -> Path:
    """Write ``n_images`` scenes with their queries under ``out`` and a ``manifest.jsonl``.

    Scenes are made for each of ``kinds`` in turn, each scene's first query of that kind where
    the scene has one: with one query per image, a set that measures those kinds on many more
    queries than a mixed set gives them."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    maker = SceneMaker(seed, domain)
    lines = []
    for n in range(n_images):
        focus = kinds[n % len(kinds)]
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
    for _ in range(8):  # a busy scene can hide what the focus kind needs: draw another
        image, visible, shapes = maker.scene(focus, colour_rivals)
        candidates = maker.candidates(shapes, visible)
        if candidates[focus]:
            break
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
