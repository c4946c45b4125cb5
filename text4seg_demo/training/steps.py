"""Step-indexed training batches and the optimiser step every training stage shares.

Batch ``k`` of a run is drawn from its own seed ``(run seed, k)``: the stream is the same with
any number of loader workers, after a resume, and on a GPU or a CPU, so a run made on one
reproduces on the other from the same command (up to floating-point rounding).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

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
