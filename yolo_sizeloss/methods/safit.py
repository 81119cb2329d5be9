"""SAFit (Ying et al., arXiv 2406.14482): IoU for large boxes, NWD for tiny ones, blended box by box.

Not a weight: an overlap measure a detector's box loss or label assignment can take in place of its own
(``overlaps.SAFitOverlap``; the ``nwd`` method's settings choose where). Pure functions of xyxy boxes in
network-input pixels, element-wise (aligned pairs: a box loss, the task-aligned assigner's candidate pairs)
and pair-wise (a matcher's quality matrix). Definition and settings: docs/methods.md section 6.
"""

from __future__ import annotations

import torch
from torch import Tensor

from yolo_sizeloss.methods.base import elementwise_iou
from yolo_sizeloss.methods.nwd import nwd, nwd_matrix

SAFIT_SIZE = 32.0  # C of SAFit's blend, in pixels: COCO's small threshold, as the public code sets it


def safit_blend_weight(gt_boxes: Tensor, size: float = SAFIT_SIZE, spread: float | None = None) -> Tensor:
    """SAFit's weight on IoU for each ground truth: ``sigmoid((sqrt(A) - C) / s)``, A its area, C ``size``,
    ``s`` = ``spread`` (SAFit's own: ``C``, the default).

    1 for boxes far above C, 0.5 at ``sqrt(A) = C``, ``sigmoid(-C / s)`` for a box of area 0
    (``sigmoid(-1)`` = 0.269 with SAFit's spread): the blend moves from mostly NWD for tiny boxes to
    IoU for large ones, box by box; a smaller spread makes the move sharper (``sigmoid(+-1)`` at
    ``C +- s`` pixels), so that boxes well below C are measured almost wholly by NWD and boxes well
    above it almost wholly by IoU.
    """
    side = ((gt_boxes[..., 2:] - gt_boxes[..., :2]).clamp(min=0).prod(-1)).sqrt()
    return torch.sigmoid((side - size) / (size if spread is None else spread))


def safit(pred_boxes: Tensor, gt_boxes: Tensor, nwd_constant: float, size: float = SAFIT_SIZE,
          iou: Tensor | None = None, spread: float | None = None) -> Tensor:
    """SAFit of aligned boxes (Ying et al., arXiv 2406.14482): ``w * IoU + (1 - w) * NWD``, ``w`` from
    each ground truth's size (``safit_blend_weight`` with ``size`` and ``spread``), NWD with
    ``nwd_constant`` (``methods.nwd``).

    NWD is taken between the boxes' centres and half sizes, as the formula says (the public
    ``safit_loss`` uses the top-left corners). ``iou`` replaces the plain IoU with the detector's own
    overlap where it has one (Ultralytics' CIoU), so that large boxes keep exactly the stock term.
    In [0, 1] with plain IoU; differentiable: use ``1 - safit`` in a box loss.
    """
    w = safit_blend_weight(gt_boxes, size, spread)
    overlap = elementwise_iou(pred_boxes, gt_boxes) if iou is None else iou
    return w * overlap + (1 - w) * nwd(pred_boxes, gt_boxes, nwd_constant)


@torch.no_grad()
def safit_matrix(gt_boxes: Tensor, boxes: Tensor, nwd_constant: float, size: float = SAFIT_SIZE,
                 spread: float | None = None) -> Tensor:
    """SAFit of every pair, (M, N) for M ground truths and N boxes (a matcher's quality matrix)."""
    w = safit_blend_weight(gt_boxes.float(), size, spread)[:, None]
    iou = elementwise_iou(gt_boxes.float()[:, None, :], boxes.float()[None, :, :])
    return w * iou + (1 - w) * nwd_matrix(gt_boxes, boxes, nwd_constant)
