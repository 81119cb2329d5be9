"""How many small ground truths the task-aligned assigner leaves without a positive anchor, per epoch.

A ground truth that no anchor is assigned to adds nothing to the box loss and only negatives to the
class loss for that step: whatever a size-aware loss weighs, it cannot weigh that object. Ultralytics'
assigner can leave one out even though it enlarges tiny boxes before picking candidates: an anchor
claimed by two ground truths goes to the one it overlaps most, so a small object beside a larger one
can lose every candidate. ``AssignmentCounter`` watches every branch's assigner through a forward hook
(the assigner and the loss stay the stock objects, also for the stock loss) and adds up, over the
epoch, the ground truths and those left without a positive anchor, small ones apart. Counts stay on the
device until the epoch's statistics are read, so counting adds no host synchronisation to a step.
"""

from __future__ import annotations

import torch
from torch import nn

from yolo_sizeloss.methods.base import box_areas

SMALL_AREA = 32 * 32  # COCO's "small", in network-input pixels
COLUMNS = ("assign/small_no_pos", "assign/small_no_pos_share", "assign/no_pos_share")


def unmatched_ground_truths(fg_mask: torch.Tensor, target_gt_idx: torch.Tensor, mask_gt: torch.Tensor) -> torch.Tensor:
    """(B, G) bool: the valid ground-truth slots (``mask_gt``, (B, G, 1) or (B, G)) that no foreground anchor
    (``fg_mask`` (B, A)) is assigned to (``target_gt_idx`` (B, A), the slot each anchor's target is)."""
    positives = torch.zeros(mask_gt.shape[:2], dtype=torch.int64, device=fg_mask.device)
    positives.scatter_add_(1, target_gt_idx.long(), fg_mask.long())
    return mask_gt.reshape(positives.shape).bool() & (positives == 0)


class AssignmentCounter(nn.Module):
    """Counts of ground truths and of those the assigner left without a positive anchor, since the last read.

    ``attach(criterion)`` hooks every branch's assigner; ``detach(criterion)`` removes those hooks (from a
    copy of the criterion too, whose hooks would count into a copy of this counter). Buffer ``sums``:
    small ground truths, small ones unmatched, all ground truths, all unmatched (each summed over the
    branches of an end-to-end head, which assign separately) and training steps.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("sums", torch.zeros(5, dtype=torch.float64))

    def observe(self, gt_bboxes: torch.Tensor, mask_gt: torch.Tensor, fg_mask: torch.Tensor,
                target_gt_idx: torch.Tensor) -> None:
        """Add one assignment: ``gt_bboxes`` (B, G, 4) xyxy in network-input pixels and the assigner's outputs."""
        if gt_bboxes.shape[1] == 0:  # the assigner's early return: nothing to match
            return
        unmatched = unmatched_ground_truths(fg_mask, target_gt_idx, mask_gt)
        valid = mask_gt.reshape(unmatched.shape).bool()
        small = valid & (box_areas(gt_bboxes.float()) < SMALL_AREA)
        counts = torch.stack([small.sum(), (small & unmatched).sum(), valid.sum(), unmatched.sum()])
        self.sums[:4] += counts.to(self.sums.device, self.sums.dtype)

    def _hook(self, assigner, args, kwargs, outputs) -> None:
        # the stock loss calls the assigner with (pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt)
        names = ("pd_scores", "pd_bboxes", "anc_points", "gt_labels", "gt_bboxes", "mask_gt")
        inputs = {**dict(zip(names, args)), **kwargs}
        *_, fg_mask, target_gt_idx = outputs
        self.observe(inputs["gt_bboxes"], inputs["mask_gt"], fg_mask, target_gt_idx)

    def attach(self, assigners: list[nn.Module]) -> None:
        """Count every assignment of ``assigners`` (each branch's stock assigner)."""
        for assigner in assigners:
            assigner.register_forward_hook(self._hook, with_kwargs=True)

    @staticmethod
    def detach(assigners: list[nn.Module]) -> None:
        """Remove every counter's hook from ``assigners``."""
        for assigner in assigners:
            for key, hook in list(assigner._forward_hooks.items()):
                if isinstance(getattr(hook, "__self__", None), AssignmentCounter):
                    del assigner._forward_hooks[key]
                    assigner._forward_hooks_with_kwargs.pop(key, None)

    def end_step(self) -> None:
        self.sums[4] += 1

    def epoch_stats(self) -> dict[str, float]:
        """Small ground truths without a positive anchor per training step, their share of the small ground
        truths, and the share of all ground truths without one; the sums restart."""
        small, small_unmatched, total, unmatched, steps = self.sums.tolist()
        self.sums.zero_()
        return {
            COLUMNS[0]: small_unmatched / steps if steps else 0.0,
            COLUMNS[1]: small_unmatched / small if small else 0.0,
            COLUMNS[2]: unmatched / total if total else 0.0,
        }
