"""Step-indexed training batches and the optimiser step every training stage shares.

Batch ``k`` of a run is drawn from its own seed ``(run seed, k)``: the stream is the same with
any number of loader workers, after a resume, and on a GPU or a CPU, so a run made on one
reproduces on the other from the same command (up to floating-point rounding).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class StepBatches(Dataset):
    """``make(numpy_rng, python_rng)`` called with step ``k``'s own generators."""

    def __init__(self, make: Callable, seed: int):
        self.make, self.seed = make, seed

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, step: int):
        return self.make(np.random.default_rng([self.seed, step]), random.Random(self.seed * 2**32 + step))


def batches(make: Callable, seed: int, start: int, stop: int | None, workers: int = 0):
    """Batches ``start, start + 1, ...`` (up to ``stop``, exclusive; endless if None), built by
    ``workers`` background processes (0: in this process, the fastest on a 2-core CPU)."""
    steps = range(start, stop) if stop is not None else itertools.count(start)
    return DataLoader(StepBatches(make, seed), batch_size=None, sampler=steps, num_workers=workers,
                      prefetch_factor=4 if workers else None)


def descend(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor, max_norm: float = 1.0) -> None:
    """One optimiser step on ``loss``, gradients clipped to ``max_norm``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()


class Run:
    """A training stage's folder and clock, shared by the tower and LLaVA stages: the checkpoint it
    resumes from (``OUT/checkpoint.pt``), the evaluations it appends to (``OUT/log.jsonl``), and the
    wall-clock budget it stops at. Time spent in earlier sessions of a resumed run counts."""

    def __init__(self, out: str | Path, resume: bool = False):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint = self.out / "checkpoint.pt"
        self.state = (torch.load(self.checkpoint, weights_only=False, map_location="cpu")
                      if resume and self.checkpoint.exists() else None)
        self.step = self.state["step"] if self.state else 0
        self._start = time.time() - (self.state["elapsed"] if self.state else 0.0)

    def minutes(self) -> float:
        return (time.time() - self._start) / 60

    def save(self, **payload) -> None:
        """Write the checkpoint: ``payload`` (weights, optimiser, config) with the step and clock."""
        torch.save({**payload, "step": self.step, "elapsed": time.time() - self._start}, self.checkpoint)

    def record(self, metrics: dict, log=print) -> None:
        """Append one evaluation, stamped with the step and minutes, to ``log.jsonl``."""
        line = json.dumps({"step": self.step, "minutes": round(self.minutes(), 2), **metrics})
        with open(self.out / "log.jsonl", "a") as f:
            f.write(line + "\n")
        log(line)

    def batches(self, make: Callable, seed: int, stop: int | None, workers: int, minutes: float | None,
                eval_every_min: float, checkpoint: Callable[[], None]):
        """The stage's batches from the current step on, counting steps; ``checkpoint()`` (save and
        evaluate) runs every ``eval_every_min`` minutes and once at the end, also when the
        ``minutes`` budget runs out first."""
        last = self.minutes()
        for batch in batches(make, seed, self.step, stop, workers):
            if minutes is not None and self.minutes() >= minutes:
                break
            yield batch
            self.step += 1
            if self.minutes() - last >= eval_every_min:
                checkpoint()
                last = self.minutes()
        checkpoint()


def cosine(step: int, warmup: int, total: int) -> float:
    """The share of the full learning rate at ``step``: a linear warm-up over ``warmup`` steps, then
    half a cosine down to a tenth at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
