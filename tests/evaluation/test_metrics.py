"""The reference metrics."""


import numpy as np
import pytest

from text4seg_demo.evaluation.metrics import IoUMeter


def test_iou_meter_matches_hand_computed_values():
    meter = IoUMeter()
    a = np.zeros((4, 4), bool)
    b = a.copy()
    a[0, :2] = True           # predicted 2 cells
    b[0, 1:4] = True          # true 3 cells: intersection 1, union 4
    meter.add(a, b)
    meter.add(np.zeros((4, 4)), np.zeros((4, 4)))  # empty on empty: IoU 1, adds nothing to cIoU
    full = np.ones((4, 4), bool)
    meter.add(full, full)                          # intersection 16, union 16
    assert meter.ciou == pytest.approx((1 + 16) / (4 + 16))
    assert meter.giou == pytest.approx((0.25 + 1 + 1) / 3)
