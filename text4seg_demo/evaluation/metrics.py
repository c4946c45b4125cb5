"""Referring-segmentation metrics as the reference defines them (cIoU, gIoU)."""

from __future__ import annotations

import numpy as np


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground IoU of two binary masks; an empty prediction of an empty target scores 1."""
    inter, union, _ = counts(pred, truth)
    return 1.0 if union == 0 else inter / union


def counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """(intersection, union, predicted) pixels: all any metric here needs of one query, and
    small enough to keep per query (the truth's size is ``union - predicted + intersection``)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    return int(np.logical_and(pred, truth).sum()), int(np.logical_or(pred, truth).sum()), int(pred.sum())


class IoUMeter:
    """Accumulates cIoU (summed intersections over summed unions) and gIoU (mean per-query IoU),
    from masks or from kept :func:`counts`."""

    def __init__(self):
        self.inter = self.union = 0
        self.ious: list[float] = []

    def add(self, pred: np.ndarray, truth: np.ndarray) -> float:
        return self.add_counts(*counts(pred, truth))

    def add_counts(self, inter: int, union: int, predicted: int) -> float:
        self.inter += inter
        self.union += union
        self.ious.append(1.0 if union == 0 else inter / union)
        return self.ious[-1]

    @property
    def ciou(self) -> float | None:
        if not self.ious:
            return None
        return self.inter / self.union if self.union else 1.0

    @property
    def giou(self) -> float | None:
        return float(np.mean(self.ious)) if self.ious else None

    @property
    def prec50(self) -> float | None:
        """Share of queries with IoU >= 0.5: how often the referred object was found at all."""
        return float(np.mean(np.asarray(self.ious) >= 0.5)) if self.ious else None
