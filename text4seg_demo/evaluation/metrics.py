"""Referring-segmentation metrics as the reference defines them (cIoU, gIoU)."""

from __future__ import annotations

import numpy as np


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground IoU of two binary masks; an empty prediction of an empty target scores 1."""
    inter = np.logical_and(pred, truth).sum()
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(inter / union)


class IoUMeter:
    """Accumulates cIoU (summed intersections over summed unions) and gIoU (mean per-query IoU)."""

    def __init__(self):
        self.inter = self.union = 0
        self.ious: list[float] = []

    def add(self, pred: np.ndarray, truth: np.ndarray) -> float:
        pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
        self.inter += int(np.logical_and(pred, truth).sum())
        self.union += int(np.logical_or(pred, truth).sum())
        self.ious.append(iou(pred, truth))
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
