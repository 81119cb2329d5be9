"""Scale-adaptive overlap measures beyond NWD: SAFit's per-box blend and SimD's scale-normalised similarity.

Pure functions of xyxy boxes in network-input pixels, element-wise (aligned pairs, for a box loss and
the task-aligned assigner's candidate pairs) and pair-wise (every ground truth against every box, for
a matcher). Neither is a weight: each replaces the overlap a detector measures, in its box loss or its
label assignment (``overlaps.SAFitOverlap``, ``overlaps.SimDOverlap``). Definitions and sources:
docs/methods.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from yolo_sizeloss.methods.nwd import nwd, nwd_matrix

SAFIT_SIZE = 32.0  # C of SAFit's blend, in pixels: COCO's small threshold, as the public code sets it
SIMD_RELEASED_NORMALISERS = (6.13, 4.59)  # m_x, m_y hard-coded in the authors' code (cszzshi/SimD)
SIMD_EPS = 1e-6  # added to centres and sides, and the floor of the similarity, as the authors' code does
SIMD_SQRT_EPS = 1e-12  # under SimD's square roots, so that identical boxes have a gradient (0) instead of NaN


def elementwise_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """IoU of aligned xyxy boxes (0 where both are empty: no overlap to speak of)."""
    lt = torch.max(boxes_a[..., :2], boxes_b[..., :2])
    rb = torch.min(boxes_a[..., 2:], boxes_b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (boxes_a[..., 2:] - boxes_a[..., :2]).clamp(min=0).prod(-1)
    area_b = (boxes_b[..., 2:] - boxes_b[..., :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


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


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x = (boxes[..., 0] + boxes[..., 2]) / 2 + SIMD_EPS
    y = (boxes[..., 1] + boxes[..., 3]) / 2 + SIMD_EPS
    return x, y, boxes[..., 2] - boxes[..., 0] + SIMD_EPS, boxes[..., 3] - boxes[..., 1] + SIMD_EPS


def _simd(a: tuple[Tensor, ...], b: tuple[Tensor, ...], m_x: float, m_y: float) -> Tensor:
    (x1, y1, w1, h1), (x2, y2, w2, h2) = a, b
    scale_x, scale_y = (w1 + w2) / m_x, (h1 + h2) / m_y
    location = torch.sqrt(((x1 - x2) / scale_x) ** 2 + ((y1 - y2) / scale_y) ** 2 + SIMD_SQRT_EPS)
    shape = torch.sqrt(((w1 - w2) / scale_x) ** 2 + ((h1 - h2) / scale_y) ** 2 + SIMD_SQRT_EPS)
    return torch.exp(-(location + shape)).clamp(min=SIMD_EPS)


def simd(boxes_a: Tensor, boxes_b: Tensor, m_x: float = SIMD_RELEASED_NORMALISERS[0],
         m_y: float = SIMD_RELEASED_NORMALISERS[1]) -> Tensor:
    """SimD of aligned boxes (Shi et al., arXiv 2407.02394): ``exp(-(D_loc + D_shape))``.

    ``D_loc`` is the distance of the centres and ``D_shape`` that of the sides, each axis divided by the
    pair's summed sides over its normaliser (``(w_a + w_b) / m_x``, ``(h_a + h_b) / m_y``): offsets are
    measured relative to the pair's own size, so one similarity serves tiny and large boxes without a
    data-set constant like NWD's C. Identical boxes give 1, far or mis-shaped ones tend to the floor
    ``SIMD_EPS``; zero-size boxes are finite (``SIMD_EPS`` is added to every side, as the authors' code
    does). Symmetric and scale-invariant up to that epsilon. Differentiable (``SIMD_SQRT_EPS`` under the
    square roots keeps the gradient of identical boxes finite; it moves the value by at most 2e-6): use
    ``1 - simd`` in a box loss.
    """
    return _simd(_centre_size(boxes_a), _centre_size(boxes_b), m_x, m_y)


@torch.no_grad()
def simd_matrix(boxes_a: Tensor, boxes_b: Tensor, m_x: float = SIMD_RELEASED_NORMALISERS[0],
                m_y: float = SIMD_RELEASED_NORMALISERS[1]) -> Tensor:
    """SimD of every pair, (M, N) for (M, 4) and (N, 4) boxes (a matcher's quality matrix)."""
    a = tuple(t[:, None] for t in _centre_size(boxes_a.float()))
    b = tuple(t[None, :] for t in _centre_size(boxes_b.float()))
    return _simd(a, b, m_x, m_y)


def box_similarity(measure: str, pred_boxes: Tensor, gt_boxes: Tensor, nwd_constant: float | None,
                   iou: Tensor | None = None, safit_spread: float | None = None) -> Tensor:
    """The similarity ``nwd.box_measure`` names, of aligned predicted and ground-truth boxes, for a box loss
    that mixes in ``1 - similarity`` (both families): ``nwd`` (``methods.nwd.nwd``), ``safit`` (``iou``
    as its IoU member: the detector's own overlap, Ultralytics' CIoU, so that large boxes keep the stock
    term; plain IoU when None; its blend's ``safit_spread``) or ``simd`` (no constant). ``nwd_constant``
    may be None for ``simd`` only."""
    if measure == "simd":
        return simd(pred_boxes, gt_boxes)
    if nwd_constant is None:
        raise ValueError(f"box measure {measure} needs NWD's constant")
    if measure == "nwd":
        return nwd(pred_boxes, gt_boxes, nwd_constant)
    if measure == "safit":
        return safit(pred_boxes, gt_boxes, nwd_constant, iou=iou, spread=safit_spread)
    raise ValueError(f"unknown box measure {measure!r}")
