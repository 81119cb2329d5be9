"""The assignment counts (``yolo_sizeloss.assignment``) of Ultralytics' task-aligned assigner.

The assigner can leave a small object without a positive anchor even though it enlarges tiny boxes
to ``stride_val`` before it picks candidates: an anchor claimed by two ground truths goes to the one
its prediction overlaps most, so a small object beside or inside a larger one can lose every
candidate. ``attach_counter`` watches each branch's stock assigner through a forward hook, so the
assigner and the loss stay the stock objects, also for the stock loss.
"""

from __future__ import annotations

import torch
from torch import nn

from yolo_sizeloss.assignment import AssignmentCounter
from yolo_sizeloss.methods.base import count_per_gt


def slot_ids(target_gt_idx: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(B * A,) int64: each anchor's ground-truth slot (``target_gt_idx`` (B, A)) numbered over the batch,
    image by image (image ``b``'s slots are ``b * num_slots`` onwards)."""
    images = torch.arange(target_gt_idx.shape[0], device=target_gt_idx.device)[:, None]
    return (images * num_slots + target_gt_idx.long()).flatten()


def positives_per_slot(fg_mask: torch.Tensor, target_gt_idx: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(B, G) int64: the foreground anchors (``fg_mask`` (B, A)) assigned to each ground-truth slot
    (``target_gt_idx`` (B, A), the slot each anchor's target is)."""
    slots = slot_ids(target_gt_idx, num_slots)
    return count_per_gt(slots, fg_mask.shape[0] * num_slots, fg_mask.flatten()).view(-1, num_slots)


def _observe(counter: AssignmentCounter, args, kwargs, outputs) -> None:
    # the stock loss calls the assigner with (pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt)
    names = ("pd_scores", "pd_bboxes", "anc_points", "gt_labels", "gt_bboxes", "mask_gt")
    inputs = {**dict(zip(names, args)), **kwargs}
    gt_bboxes, mask_gt = inputs["gt_bboxes"], inputs["mask_gt"]
    if gt_bboxes.shape[1] == 0:  # the assigner's early return: nothing to match
        return
    *_, fg_mask, target_gt_idx = outputs
    positives = positives_per_slot(fg_mask, target_gt_idx, gt_bboxes.shape[1])
    counter.add(positives, gt_bboxes, mask_gt.reshape(gt_bboxes.shape[:2]))


class AssignerHook:
    """The forward hook ``attach_counter`` registers: it feeds one counter."""

    def __init__(self, counter: AssignmentCounter):
        self.counter = counter

    def __call__(self, assigner, args, kwargs, outputs) -> None:
        _observe(self.counter, args, kwargs, outputs)


def attach_counter(counter: AssignmentCounter, assigners: list[nn.Module]) -> None:
    """Count every assignment of ``assigners`` (each branch's stock assigner) into ``counter``."""
    for assigner in assigners:
        assigner.register_forward_hook(AssignerHook(counter), with_kwargs=True)


def detach_counters(assigners: list[nn.Module]) -> None:
    """Remove every counter's hook from ``assigners`` (also from a copy of a criterion, whose hooks would
    count into a copy of the counter)."""
    for assigner in assigners:
        for key, hook in list(assigner._forward_hooks.items()):
            if isinstance(hook, AssignerHook):
                del assigner._forward_hooks[key]
                assigner._forward_hooks_with_kwargs.pop(key, None)
