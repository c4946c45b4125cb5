"""``text4seg eval``: a model (and optionally a refiner) on a manifest, with the reference metrics.

Each query is scored into a row of pixel counts (:func:`score`); the report is computed from
the rows alone (:func:`summarise`). So rows can stream to a JSONL file as they are done, an
interrupted run can resume from that file, and replicas in other processes can score queries.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..descriptors.codec import parse_answer
from ..images import prepare
from ..inference.engine import Engine
from ..inference.remote import RemoteModel
from ..masks import load_mask, to_grid, to_image
from ..pipeline import Request, Result, segment
from .manifest import Query, read_manifest
from .metrics import IoUMeter, counts

MASKS = ("grid", "coarse", "refined")  # the answers a row scores; "oracle" is the truth's own grid
# Target sizes in grid cells (the image's area / grid^2): under one cell a target may fall between
# the patch centres that the truth's grid samples, so it can vanish from the grid altogether.
TARGET_SIZES = {"<1": (0, 1), "1-4": (1, 4), "4-16": (4, 16), ">=16": (16, float("inf"))}


@dataclass(frozen=True)
class Replica:
    """How a worker process builds its own model and refiner (``eval --workers N``)."""

    model: str
    quant: str = "auto"
    device: str | None = None
    adapter: str | None = None
    grid: int | None = None
    refine: str = "none"
    sam_checkpoint: str | None = None
    compile: bool = False

    def build(self, ordinal: int = 0):
        """The engine and refiner of worker ``ordinal``; on a machine with several GPUs and no
        ``device`` named, worker k takes GPU k modulo their number."""
        import torch

        from ..inference.loading import load
        from ..refine import build_refiner

        device = self.device
        if device is None and torch.cuda.is_available():
            device = f"cuda:{ordinal % torch.cuda.device_count()}"
        engine = load(self.model, quant=self.quant, device=device, adapter=self.adapter, grid=self.grid,
                      compile=self.compile, log=lambda message: None)
        refiner = None if self.refine == "none" else build_refiner(self.refine, device=device,
                                                                   checkpoint=self.sam_checkpoint)
        return engine, refiner


def score(engine: Engine | None, refiner, query: Query, index: int, constrained: bool = False,
          grid: int = 16) -> dict:
    """One query's row: pixel counts of every answer mask, tokens, latency and diagnostics.

    With ``engine=None`` the coarse mask is the oracle one (the truth taken to the grid and
    back), which measures a refiner on its own; the refiner then runs twice on the image to
    time a first and a repeat query at ``grid``; a model runs at its own grid.
    """
    grid = engine.settings.grid if engine is not None else grid
    image, _ = prepare(query.image, max_side=10**6)
    truth = load_mask(query.mask)
    truth_grid = to_grid(truth.astype(np.uint8), grid).astype(bool)
    row = {"index": index, "image": str(query.image), "expression": query.expression, "grid": grid,
           "target_cells": round(float(truth.mean()) * grid * grid, 3)}
    t0 = time.perf_counter()
    if engine is None:
        result = _oracle(image, query.expression, truth_grid, refiner, grid)
        if refiner is not None:
            row["refine_first_s"] = result.timings["refine"]
            t1 = time.perf_counter()
            refiner.refine(image, result.coarse, result.labels, grid=grid)
            row["refine_repeat_s"] = time.perf_counter() - t1
    else:
        result = segment(engine, image, Request(expression=query.expression, constrained=constrained), refiner)
    row["latency_s"] = round(time.perf_counter() - t0, 4)
    row["counts"] = {"grid": counts(result.grid > 0, truth_grid), "coarse": counts(result.coarse > 0, truth),
                     "oracle": counts(to_image(truth_grid, *truth.shape), truth)}
    if result.refined is not None:
        row["counts"]["refined"] = counts(result.refined > 0, truth)
    for mask in MASKS:
        if mask in row["counts"]:
            inter, union, _ = row["counts"][mask]
            row[f"iou_{mask}"] = 1.0 if union == 0 else inter / union
    row.update(generated_tokens=result.tokens["generated"], diagnostics=[d.code for d in result.diagnostics])
    if query.kind is not None:
        row["kind"] = query.kind
    return row


def _meters(rows: list[dict]) -> dict[str, IoUMeter]:
    meters = {mask: IoUMeter() for mask in (*MASKS, "oracle")}
    for row in rows:
        for mask, kept in row["counts"].items():
            meters[mask].add_counts(*kept)
    return meters


def _target_pixels(row: dict, mask: str = "coarse") -> int:
    """The target's pixels (for ``grid``: its cells on the truth's grid), from a row's kept counts."""
    inter, union, predicted = row["counts"][mask]
    return union - predicted + inter


def _no_target(rows: list[dict]) -> dict | None:
    """gRefCOCO's accuracies, for each kind of answer: of the queries without a target (no
    target pixel), the share answered with an empty mask (N-acc); of the others, the share
    answered with a non-empty one (T-acc). None when every query has a target."""
    empty = [r for r in rows if _target_pixels(r) == 0]
    present = [r for r in rows if _target_pixels(r) > 0]

    def share(group, answered_empty: bool, mask: str):
        kept = [(r["counts"][mask][2] == 0) == answered_empty for r in group if mask in r["counts"]]
        return float(np.mean(kept)) if kept else None

    if not empty:
        return None
    return {"n": len(empty), "n_acc": {mask: share(empty, True, mask) for mask in MASKS},
            "t_acc": {mask: share(present, False, mask) for mask in MASKS}}


def _grid_losses(rows: list[dict]) -> dict[str, float] | None:
    """Where the grid answers' summed union goes that the intersection does not cover, as shares of
    that union: they add up to ``1 - grid_ciou``. An answer that meets its target loses ``extra``
    cells beside it and ``missing`` ones of it; one that does not (another shape, or empty) loses
    its whole union (``missed``); where the truth's grid is empty, every marked cell is lost, on a
    query without a target (``marked_absent``) or on one whose target lies between the patch
    centres that the grid samples (``marked_between_centres``)."""
    lost = dict.fromkeys(("extra", "missing", "missed", "marked_absent", "marked_between_centres"), 0)
    total = 0
    for row in rows:
        inter, union, predicted = row["counts"]["grid"]
        truth = _target_pixels(row, "grid")
        total += union
        if truth == 0:
            lost["marked_absent" if _target_pixels(row) == 0 else "marked_between_centres"] += predicted
        elif inter == 0:
            lost["missed"] += union
        else:
            lost["extra"] += predicted - inter
            lost["missing"] += truth - inter
    return {name: cells / total for name, cells in lost.items()} if total else None


def _group(rows: list[dict]) -> dict:
    """The grid and pixel metrics of a group of queries (a kind, a target size)."""
    m = _meters(rows)
    entry = {"n": len(rows), "grid_ciou": m["grid"].ciou, "grid_giou": m["grid"].giou, "grid_prec50": m["grid"].prec50,
             "coarse_ciou": m["coarse"].ciou, "coarse_giou": m["coarse"].giou}
    if m["refined"].ious:
        entry.update(refined_ciou=m["refined"].ciou, refined_giou=m["refined"].giou)
    return entry


def summarise(rows: list[dict], model: str, grid: int, refiner: str, constrained: bool) -> dict:
    """The report of a run from its rows; the fields are documented in docs/evaluation.md."""
    meters, n = _meters(rows), len(rows)
    report = {
        "model": model, "grid": grid, "n": n, "refiner": refiner, "constrained": constrained,
        "ciou": {"coarse": meters["coarse"].ciou, "refined": meters["refined"].ciou},
        "giou": {"coarse": meters["coarse"].giou, "refined": meters["refined"].giou},
        "grid_ciou": meters["grid"].ciou, "grid_losses": _grid_losses(rows), "grid_prec50": meters["grid"].prec50,
        "oracle_ciou": meters["oracle"].ciou,
        "malformed_rate": sum(bool(r["diagnostics"]) for r in rows) / n if n else None,
        "mean_generated_tokens": float(np.mean([r["generated_tokens"] for r in rows])) if n else None,
        "mean_latency_s": float(np.mean([r["latency_s"] for r in rows])) if n else None,
    }
    no_target = _no_target(rows)
    if no_target:
        report["no_target"] = no_target
    kinds = sorted({r["kind"] for r in rows if "kind" in r})
    if kinds:
        report["by_kind"] = {}
        for kind in kinds:
            kind_rows = [r for r in rows if r.get("kind") == kind]
            entry = _group(kind_rows)
            kind_no_target = _no_target(kind_rows)
            if kind_no_target:
                entry["n_acc"] = kind_no_target["n_acc"]
            report["by_kind"][kind] = entry
    sized = [r for r in rows if "target_cells" in r and _target_pixels(r)]  # rows files of old runs lack the size
    if sized:
        report["by_target_size"] = {name: _group([r for r in sized if lo <= r["target_cells"] < hi])
                                    for name, (lo, hi) in TARGET_SIZES.items()}
    repeat = [r["refine_repeat_s"] for r in rows if "refine_repeat_s" in r]
    if repeat:
        report["refine_first_s"] = float(np.mean([r["refine_first_s"] for r in rows]))
        report["refine_repeat_s"] = float(np.mean(repeat))
    report["queries"] = rows
    return report


class RowsFile:
    """Per-query rows as JSON lines, appended as they are done; on resume, the rows already
    there (a last line cut off by an interruption is dropped)."""

    def __init__(self, path: str | Path, queries: list[Query], model: str, resume: bool):
        self.path = Path(path)
        self.done: dict[int, dict] = {}
        if self.path.exists() and self.path.stat().st_size and not resume:
            raise FileExistsError(f"{self.path} already holds rows: pass --resume to continue that run, "
                                  "or remove the file to start over")
        if resume and self.path.exists():
            lines = self.path.read_text().splitlines()
            for number, line in enumerate(lines, start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):  # cut off mid-write
                        self.path.write_text("".join(f"{kept}\n" for kept in lines[:-1]))
                        break
                    raise ValueError(f"{self.path}:{number} is not a JSON row") from None
                self._check(row, queries, model, number)
                self.done[row["index"]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _check(self, row: dict, queries: list[Query], model: str, number: int) -> None:
        index = row.get("index")
        if row.get("model") != model:
            raise ValueError(f"{self.path}:{number} was written by {row.get('model')!r}, not {model!r}: "
                             "resume with the same model, or write the rows to another file")
        if not isinstance(index, int) or not 0 <= index < len(queries) or (
                row.get("expression") != queries[index].expression):
            raise ValueError(f"{self.path}:{number} does not match query {index} of this manifest: "
                             "resume with the same --data and --limit, or write the rows to another file")

    def write(self, row: dict) -> None:
        """Append one row, on disk when this returns (the file is opened for each row)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


_WORKER = None  # (engine, refiner) of a worker process


def _start_worker(replica: Replica, ordinals, threads: int) -> None:
    global _WORKER
    import torch

    torch.set_num_threads(threads)
    _WORKER = replica.build(ordinals.get())


def _score_in_worker(query: Query, index: int, constrained: bool, grid: int) -> dict:
    engine, refiner = _WORKER
    return score(engine, refiner, query, index, constrained, grid)


def _in_workers(replica: Replica, workers: int, jobs: list[tuple[int, Query]], constrained: bool, grid: int):
    """Rows of ``jobs`` as they come from ``workers`` processes, each with its own replica (CPU
    threads shared out among them, so that they do not oversubscribe the cores)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ordinals = context.Queue()
    for k in range(workers):
        ordinals.put(k)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(replica, ordinals, threads)) as pool:
        futures = [pool.submit(_score_in_worker, query, index, constrained, grid) for index, query in jobs]
        for future in as_completed(futures):
            yield future.result()


def _in_flight(engines: list[Engine], refiner, concurrency: int, jobs: list[tuple[int, Query]], constrained: bool,
               grid: int):
    """Rows of ``jobs`` as they come, ``concurrency`` requests in flight, the k-th job on engine k
    modulo their number (servers batch what is in flight); refinement runs one at a time."""
    shared = _Serialised(refiner, threading.Lock()) if refiner else None

    def run(k: int, index: int, query: Query) -> dict:
        return score(engines[k % len(engines)], shared, query, index, constrained, grid)

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(run, k, index, query) for k, (index, query) in enumerate(jobs)]
        for future in as_completed(futures):
            yield future.result()


@dataclass
class _Serialised:
    """A refiner shared by threads, one refinement at a time."""

    refiner: object
    lock: threading.Lock

    @property
    def name(self) -> str:
        return self.refiner.name

    def refine(self, *args, **kwargs):
        with self.lock:
            return self.refiner.refine(*args, **kwargs)


def evaluate(engine: Engine | list[Engine] | None, data: str, refiner=None, constrained: bool = False,
             limit: int | None = None, progress: bool = True, grid: int = 16, rows: str | Path | None = None,
             resume: bool = False, replica: Replica | None = None, workers: int = 1, concurrency: int = 1) -> dict:
    """Score every query of ``data`` and report (see :func:`summarise`).

    ``engine=None`` and no ``replica``: the oracle (see :func:`score`). ``rows``: a JSONL file
    that gets each query's row as soon as it is done; with ``resume`` the rows already there
    are kept and their queries skipped. ``workers`` > 1 scores queries in that many processes,
    each building ``replica`` (a model on each GPU in turn, or CPU threads shared out).
    ``concurrency`` > 1 keeps that many queries in flight on ``engine`` (served models: a list
    of them, one per server, queries spread over them).
    """
    queries = read_manifest(data, limit)
    engines = engine if isinstance(engine, list) else [engine]
    engine = engines[0]
    if workers > 1 and replica is None:
        raise ValueError("--workers needs a model for each worker (it does not apply to --oracle)")
    if replica is not None and workers <= 1:
        raise ValueError("a replica is built in each worker process: pass the loaded engine for one worker")
    if (concurrency > 1 or len(engines) > 1) and not all(isinstance(e, RemoteModel) for e in engines):
        raise ValueError("concurrent queries need served models (--server); a local model answers one at a time")
    name = replica.model if replica is not None else (engine.name if engine is not None else "oracle")
    store = RowsFile(rows, queries, name, resume) if rows else None
    done = dict(store.done) if store else {}
    jobs = [(i, q) for i, q in enumerate(queries) if i not in done]
    if workers > 1:
        fresh = _in_workers(replica, workers, jobs, constrained, grid)
    elif concurrency > 1 or len(engines) > 1:
        fresh = _in_flight(engines, refiner, max(concurrency, len(engines)), jobs, constrained, grid)
    else:
        fresh = (score(engine, refiner, q, i, constrained, grid) for i, q in jobs)
    t0 = time.perf_counter()
    for row in tqdm(fresh, total=len(jobs), desc=f"eval {name}", disable=not progress, unit="query"):
        row["model"] = name
        done[row["index"]] = row
        if store:
            store.write(row)
    seconds = time.perf_counter() - t0
    refiner_name = replica.refine if engine is None and replica else getattr(refiner, "name", "none")
    rows_done = [done[i] for i in sorted(done)]
    grid = rows_done[0]["grid"] if rows_done else grid
    report = summarise(rows_done, name, grid, refiner_name, constrained)
    report["throughput"] = {"queries": len(jobs), "seconds": round(seconds, 3),
                            "queries_per_s": round(len(jobs) / seconds, 3) if jobs and seconds else None}
    return report


def grid_answers(engine: Engine, queries) -> list:
    """Greedy answers to (image, expression, mask) triples, parsed on the model's grid."""
    grid, fmt = engine.settings.grid, engine.settings.fmt
    return [parse_answer(engine.generate(image, engine.question(expression), [expression]).text, grid, fmt=fmt)
            for image, expression, _ in queries]


def grid_scores(engine: Engine, queries) -> dict:
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
