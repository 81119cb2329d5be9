"""How many ground truths, small ones apart, a training step's label assignment left without a positive sample.

A ground truth without a positive anchor adds nothing to the box loss and only negatives to the class
loss for that step: whatever a size-aware loss weighs, it cannot weigh that object. Both families count
it for every mode, the stock loss's too (YOLO: ``yolo.assignment``, each branch's task-aligned
assigner; Faster R-CNN: the RPN's matcher, ``rcnn.heads``), and write the epoch's counts to
results.csv. Counts stay on the device until the epoch's statistics are read, so counting adds no host
synchronisation to a step.
"""

from __future__ import annotations

import torch
from torch import nn

from yolo_sizeloss.methods.base import COCO_AREA_LIMITS, box_areas

COLUMNS = ("assign/small_no_pos", "assign/small_no_pos_share", "assign/no_pos_share")


class AssignmentCounter(nn.Module):
    """Counts of ground truths and of those left without a positive sample, since the last read.

    Buffer ``sums``: small ground truths, small ones without a positive, all ground truths, all without
    one (summed over every assignment of a step: both branches of an end-to-end head assign separately)
    and training steps. Not persistent: a diagnostic, kept out of checkpoints (a Faster R-CNN
    checkpoint's weights stay torchvision's keys). Each process counts its own batches; the first
    process's counts are what results.csv shows.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("sums", torch.zeros(5, dtype=torch.float64), persistent=False)

    def add(self, positives: torch.Tensor, gt_boxes: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add one assignment: ``positives`` (...) the positive samples each ground truth received, ``gt_boxes``
        (..., 4) the ground truths, xyxy in network-input pixels; ``valid`` (...) bool, False for padding
        slots (None: all valid). A mask, not an index, so that no shape depends on the data."""
        valid = torch.ones_like(positives, dtype=torch.bool) if valid is None else valid.bool()
        small = valid & (box_areas(gt_boxes.float()) < COCO_AREA_LIMITS[0])
        unmatched = valid & (positives == 0)
        counts = torch.stack([small.sum(), (small & unmatched).sum(), valid.sum(), unmatched.sum()])
        self.sums[:4] += counts.to(self.sums.device, self.sums.dtype)

    def end_step(self) -> None:
        self.sums[4] += 1

    def epoch_stats(self) -> dict[str, float]:
        """Small ground truths without a positive per training step, their share of the small ground truths,
        and the share of all ground truths without one; the sums restart."""
        small, small_unmatched, total, unmatched, steps = self.sums.tolist()
        self.sums.zero_()
        return {
            COLUMNS[0]: small_unmatched / steps if steps else 0.0,
            COLUMNS[1]: small_unmatched / small if small else 0.0,
            COLUMNS[2]: unmatched / total if total else 0.0,
        }
