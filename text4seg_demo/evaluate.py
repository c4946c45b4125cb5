"""``text4seg eval``: a model (and optionally a refiner) on a manifest, with the reference metrics."""

from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from .backend import Text4SegModel
from .dataset import read_manifest
from .images import prepare
from .masks import load_mask, to_grid, to_image
from .metrics import IoUMeter
from .pipeline import Request, segment


def evaluate(engine: Text4SegModel, data: str, refiner=None, constrained: bool = False, limit: int | None = None,
             progress: bool = True) -> dict:
    """Score every query of ``data``; the JSON fields are documented in the README."""
    queries = read_manifest(data, limit)
    coarse, refined, grid_meter, oracle = IoUMeter(), IoUMeter(), IoUMeter(), IoUMeter()
    rows, malformed, tokens, latency = [], 0, [], []
    grid = engine.settings.grid
    for q in tqdm(queries, desc=f"eval {engine.name}", disable=not progress, unit="query"):
        image, _ = prepare(q.image, max_side=10**6)
        truth = load_mask(q.mask)
        t0 = time.perf_counter()
        result = segment(engine, image, Request(expression=q.expression, constrained=constrained), refiner)
        latency.append(time.perf_counter() - t0)
        truth_grid = to_grid(truth.astype(np.uint8), grid).astype(bool)
        row = {"image": str(q.image), "expression": q.expression,
               "iou_coarse": coarse.add(result.coarse > 0, truth),
               "iou_grid": grid_meter.add(result.grid > 0, truth_grid),
               "generated_tokens": result.tokens["generated"], "latency_s": round(latency[-1], 4),
               "diagnostics": [d.code for d in result.diagnostics]}
        oracle.add(to_image(truth_grid, *truth.shape), truth)
        if result.refined is not None:
            row["iou_refined"] = refined.add(result.refined > 0, truth)
        malformed += bool(result.diagnostics)
        tokens.append(result.tokens["generated"])
        rows.append(row)
    n = len(rows)
    return {
        "model": engine.name, "n": n, "refiner": getattr(refiner, "name", "none"), "constrained": constrained,
        "ciou": {"coarse": coarse.ciou, "refined": refined.ciou},
        "giou": {"coarse": coarse.giou, "refined": refined.giou},
        "grid_ciou": grid_meter.ciou, "oracle_ciou": oracle.ciou,
        "malformed_rate": malformed / n if n else None,
        "mean_generated_tokens": float(np.mean(tokens)) if n else None,
        "mean_latency_s": float(np.mean(latency)) if n else None,
        "queries": rows,
    }
