"""``text4seg eval``: a model (and optionally a refiner) on a manifest, with the reference metrics."""

from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from ..descriptors.codec import parse_answer
from ..images import prepare
from ..inference.engine import Text4SegModel
from ..masks import load_mask, to_grid, to_image
from ..pipeline import Request, Result, segment
from .manifest import read_manifest
from .metrics import IoUMeter


def evaluate(engine: Text4SegModel | None, data: str, refiner=None, constrained: bool = False,
             limit: int | None = None, progress: bool = True, grid: int = 16) -> dict:
    """Score every query of ``data``; the JSON fields are documented in docs/evaluation.md.

    With ``engine=None`` the coarse mask is the oracle one (the truth taken to the grid and
    back), which measures a refiner on its own; each refine then runs twice on its image to
    time a first and a repeat query.
    """
    queries = read_manifest(data, limit)
    coarse, refined, grid_meter, oracle = IoUMeter(), IoUMeter(), IoUMeter(), IoUMeter()
    rows, malformed, tokens, latency, first, repeat = [], 0, [], [], [], []
    by_kind: dict[str, tuple[IoUMeter, IoUMeter]] = {}  # kind -> (grid, coarse)
    grid = engine.settings.grid if engine is not None else grid
    name = engine.name if engine is not None else "oracle"
    for q in tqdm(queries, desc=f"eval {name}", disable=not progress, unit="query"):
        image, _ = prepare(q.image, max_side=10**6)
        truth = load_mask(q.mask)
        truth_grid = to_grid(truth.astype(np.uint8), grid).astype(bool)
        t0 = time.perf_counter()
        if engine is None:
            result = _oracle(image, q.expression, truth_grid, refiner, grid)
            if refiner is not None:
                first.append(result.timings["refine"])
                t1 = time.perf_counter()
                refiner.refine(image, result.coarse, result.labels, grid=grid)
                repeat.append(time.perf_counter() - t1)
        else:
            result = segment(engine, image, Request(expression=q.expression, constrained=constrained), refiner)
        latency.append(time.perf_counter() - t0)
        row = {"image": str(q.image), "expression": q.expression,
               "iou_coarse": coarse.add(result.coarse > 0, truth),
               "iou_grid": grid_meter.add(result.grid > 0, truth_grid),
               "generated_tokens": result.tokens["generated"], "latency_s": round(latency[-1], 4),
               "diagnostics": [d.code for d in result.diagnostics]}
        oracle.add(to_image(truth_grid, *truth.shape), truth)
        if q.kind is not None:
            row["kind"] = q.kind
            kind_grid, kind_coarse = by_kind.setdefault(q.kind, (IoUMeter(), IoUMeter()))
            kind_grid.add(result.grid > 0, truth_grid)
            kind_coarse.add(result.coarse > 0, truth)
        if result.refined is not None:
            row["iou_refined"] = refined.add(result.refined > 0, truth)
        malformed += bool(result.diagnostics)
        tokens.append(result.tokens["generated"])
        rows.append(row)
    n = len(rows)
    report = {
        "model": name, "grid": grid, "n": n, "refiner": getattr(refiner, "name", "none"), "constrained": constrained,
        "ciou": {"coarse": coarse.ciou, "refined": refined.ciou},
        "giou": {"coarse": coarse.giou, "refined": refined.giou},
        "grid_ciou": grid_meter.ciou, "grid_prec50": grid_meter.prec50, "oracle_ciou": oracle.ciou,
        "malformed_rate": malformed / n if n else None,
        "mean_generated_tokens": float(np.mean(tokens)) if n else None,
        "mean_latency_s": float(np.mean(latency)) if n else None,
        "queries": rows,
    }
    if by_kind:
        report["by_kind"] = {kind: {"n": len(g.ious), "grid_ciou": g.ciou, "grid_giou": g.giou,
                                    "grid_prec50": g.prec50, "coarse_ciou": c.ciou}
                             for kind, (g, c) in sorted(by_kind.items())}
    if repeat:
        report["refine_first_s"] = float(np.mean(first))
        report["refine_repeat_s"] = float(np.mean(repeat))
    return report


def grid_answers(engine: Text4SegModel, queries) -> list:
    """Greedy answers to (image, expression, mask) triples, parsed on the model's grid."""
    grid, fmt = engine.settings.grid, engine.settings.fmt
    return [parse_answer(engine.generate(image, engine.question(expression), [expression]).text, grid, fmt=fmt)
            for image, expression, _ in queries]


def grid_scores(engine: Text4SegModel, queries) -> dict:
    """Greedy answers to (image, expression, mask) triples, scored on the grid alone."""
    meter, grid = IoUMeter(), engine.settings.grid
    answers = grid_answers(engine, queries)
    for parsed, (_, _, mask) in zip(answers, queries):
        meter.add(parsed.mask(), to_grid(np.asarray(mask, np.uint8), grid).astype(bool))
    return {"grid_ciou": meter.ciou, "malformed_rate": sum(bool(a.diagnostics) for a in answers) / len(queries)}


def _oracle(image, expression: str, truth_grid: np.ndarray, refiner, grid: int) -> Result:
    """A result whose answer is the ground truth on the grid, refined like a model's would be."""
    labels = ["others", expression]
    coarse = to_image(truth_grid.astype(np.int32), image.height, image.width)
    timings, refined, info = {"total": 0.0}, None, {"refiner": "none"}
    if refiner is not None:
        t0 = time.perf_counter()
        outcome = refiner.refine(image, coarse, labels, grid=grid)
        timings["refine"] = timings["total"] = time.perf_counter() - t0
        refined, info = outcome.mask, outcome.info
    return Result(text="", grid=truth_grid.astype(np.int32), labels=labels, diagnostics=[], coarse=coarse,
                  refined=refined, tokens={"generated": 0}, timings=timings, model="oracle", quant="-", device="cpu",
                  fmt="rrle", constrained=False, refine=info)
