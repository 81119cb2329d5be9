"""What the stock overlap would make of an assignment by another one: YOLO's normaliser (``nwd.normaliser:
ciou``) and box weights (``nwd.box_weights: ciou``).

Ultralytics divides the class and box losses by the sum of the assignment's target scores, and weighs
each positive anchor's box terms (IoU and DFL) by its own target score. The task-aligned assigner
scores a positive anchor by its alignment ``s^alpha * o^beta``, rescaled so that each ground truth's
best anchor scores that ground truth's best overlap ``o``. An overlap lenient to small boxes (NWD,
SAFit) raises the small objects' target scores: as class targets, that is how it teaches the detector
to find and trust them; as box weights, it gives their box terms a larger share of every step (on BCCD
at imgsz 416 small objects hold 0.6% of the target scores under the stock CIoU as training starts,
10-14% under NWD or SAFit; ``bench/assignment.py``, docs/results.md section 10); and the larger sum
lowers every other term's weight in absolute terms (1.4 to 2.3 times the stock sum as training starts,
about 1.1 times at its end).

``ciou_target_scores`` gives each positive the score the assigner's own CIoU would give it, whatever
measure chose it. Dividing by their sum (``normaliser: ciou``) changes only the loss's overall scale,
not any term's share: an SGD step grows with it, while AdamW (Ultralytics' ``optimizer: auto`` for
short runs) cancels a constant scale and sees only its drift over training. Weighing the box terms by
them (``box_weights: ciou``) gives every object's box terms the share the stock loss gives them, while
the lenient measure still picks the positives and sets the class targets.
"""

from __future__ import annotations

import torch
from torch import nn

from yolo_sizeloss.yolo.assignment import slot_ids


@torch.no_grad()
def ciou_target_scores(
    assigner: nn.Module,
    pd_scores: torch.Tensor,
    pd_bboxes: torch.Tensor,
    target_labels: torch.Tensor,
    target_bboxes: torch.Tensor,
    fg_mask: torch.Tensor,
    target_gt_idx: torch.Tensor,
    num_slots: int,
) -> torch.Tensor:
    """The target score (B, A) a task-aligned ``assigner`` would give each of this assignment's positives if it
    measured overlap by its class's own ``iou_calculation`` (Ultralytics': CIoU), whatever measure chose
    them; 0 off the foreground.

    Per positive anchor ``k`` of ground truth ``g``: ``a_k = s_k^alpha * o_k^beta``, ``s_k`` the predicted
    probability of ``g``'s class, ``o_k`` the overlap of its predicted box with ``g``; its target score
    ``a_k * max_j o_j / (max_j a_j + eps)`` over ``g``'s positives ``j``. Shapes as the assigner's inputs
    and outputs: ``pd_scores`` (B, A, C) probabilities, ``pd_bboxes`` and ``target_bboxes`` (B, A, 4) xyxy
    in input pixels, ``target_labels``, ``fg_mask`` and ``target_gt_idx`` (B, A), ``num_slots`` the
    ground-truth slots per image. For an
    assignment by the stock overlap these are the stock ``target_scores.sum(-1)`` (to float rounding,
    tests/test_normaliser.py). Masks and scatters only: no host synchronisation.
    """
    # The assigner's own get_box_metrics is not called: it indexes by a boolean mask (a host
    # synchronisation on a GPU) over (B, ground truths, A) tensors, and the rescaling is inline in its
    # _forward. The parts the formula takes from the assigner are its class's iou_calculation, alpha,
    # beta and eps, so a change to those reaches this function.
    if num_slots == 0:  # the assigner's early return: no positive anywhere
        return pd_scores.new_zeros(fg_mask.shape)
    overlaps = type(assigner).iou_calculation(assigner, target_bboxes, pd_bboxes)  # the class's, not the instance's
    # a background anchor's target box may be a padding slot's zeros, whose CIoU is not finite: masked, not multiplied
    overlaps = torch.where(fg_mask, overlaps, 0.0)
    scores = pd_scores.gather(-1, target_labels.long().unsqueeze(-1)).squeeze(-1)
    align = torch.where(fg_mask, scores.pow(assigner.alpha) * overlaps.pow(assigner.beta), 0.0).flatten()
    slots = slot_ids(target_gt_idx, num_slots)
    best = align.new_zeros(2, fg_mask.shape[0] * num_slots)
    best[0].scatter_reduce_(0, slots, align, "amax")
    best[1].scatter_reduce_(0, slots, overlaps.flatten().to(align.dtype), "amax")
    return (align * best[1][slots] / (best[0][slots] + assigner.eps)).view(fg_mask.shape)
