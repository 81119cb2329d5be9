"""The losses' normaliser as the stock overlap would set it (``nwd.normaliser: ciou``).

Ultralytics divides the class and box losses by the sum of the assignment's target scores. The
task-aligned assigner scores a positive anchor by its alignment ``s^alpha * o^beta``, rescaled so that
each ground truth's best anchor scores that ground truth's best overlap ``o``. An overlap lenient to
small boxes (NWD, SAFit) raises the small objects' target scores, which is how it teaches the detector
to find and trust them, but it also raises the sum, and so lowers the weight of every other object's
terms without changing their assignment. On BCCD at imgsz 416 the sum is 1.4 (SAFit with a 4 px
spread) to 2.3 times (NWD) the stock one at the start of training, and about 1.1 times at its end
(``bench/assignment.py``, docs/results.md section 10). Dividing by the sum that the stock overlap gives
the same positives keeps the other objects' weight where the stock loss puts it in absolute terms, while
the small objects keep their raised targets. Every term is still divided by one number, so no term's
share of a step changes, only the loss's scale: an SGD step grows with it, while AdamW (Ultralytics'
``optimizer: auto`` for short runs) cancels a constant scale and sees only its drift over training.
"""

from __future__ import annotations

import torch
from torch import nn

from yolo_sizeloss.yolo.assignment import slot_ids


@torch.no_grad()
def ciou_target_sum(
    assigner: nn.Module,
    pd_scores: torch.Tensor,
    pd_bboxes: torch.Tensor,
    target_labels: torch.Tensor,
    target_bboxes: torch.Tensor,
    fg_mask: torch.Tensor,
    target_gt_idx: torch.Tensor,
    num_slots: int,
) -> torch.Tensor:
    """The sum of the target scores a task-aligned ``assigner`` would give this assignment's positives if
    it measured overlap by its class's own ``iou_calculation`` (Ultralytics': CIoU), whatever measure chose them.

    Per positive anchor ``k`` of ground truth ``g``: ``a_k = s_k^alpha * o_k^beta``, ``s_k`` the predicted
    probability of ``g``'s class, ``o_k`` the overlap of its predicted box with ``g``; its target score
    ``a_k * max_j o_j / (max_j a_j + eps)`` over ``g``'s positives ``j``; the scalar returned is the sum
    over the positives. Shapes as the assigner's inputs and outputs: ``pd_scores`` (B, A, C)
    probabilities, ``pd_bboxes`` and ``target_bboxes`` (B, A, 4) xyxy in input pixels, ``target_labels``,
    ``fg_mask`` and ``target_gt_idx`` (B, A), ``num_slots`` the ground-truth slots per image. For an
    assignment by the stock overlap this is the stock ``target_scores.sum()`` (to float rounding).
    Masks and scatters only: no host synchronisation.
    """
    if num_slots == 0:  # the assigner's early return: no positive anywhere
        return pd_scores.new_zeros(())
    overlaps = type(assigner).iou_calculation(assigner, target_bboxes, pd_bboxes)  # the class's, not the instance's
    # a background anchor's target box may be a padding slot's zeros, whose CIoU is not finite: masked, not multiplied
    overlaps = torch.where(fg_mask, overlaps, 0.0)
    scores = pd_scores.gather(-1, target_labels.long().unsqueeze(-1)).squeeze(-1)
    align = torch.where(fg_mask, scores.pow(assigner.alpha) * overlaps.pow(assigner.beta), 0.0).flatten()
    slots = slot_ids(target_gt_idx, num_slots)
    best = align.new_zeros(2, fg_mask.shape[0] * num_slots)
    best[0].scatter_reduce_(0, slots, align, "amax")
    best[1].scatter_reduce_(0, slots, overlaps.flatten().to(align.dtype), "amax")
    return (align * best[1][slots] / (best[0][slots] + assigner.eps)).sum()
