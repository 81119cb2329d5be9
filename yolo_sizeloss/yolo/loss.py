"""The size-aware weightings inside Ultralytics' detection loss.

``AnchorWeighting`` turns the configured methods into per-anchor weights (the formulas are in
``yolo_sizeloss.weights``); ``SizeAwareDetectionLoss`` is ``v8DetectionLoss`` with those weights on
the box term (IoU and DFL, or L1) and on the class BCE; ``SizeAwareE2ELoss`` is ``E2ELoss`` (YOLOv10,
YOLO26) with a size-aware loss in each branch. With every weight 1 the loss is the stock one, bit
for bit: the normaliser ``target_scores_sum`` is never touched.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from ultralytics.utils.loss import E2ELoss, v8DetectionLoss
from ultralytics.utils.metrics import bbox_iou
from ultralytics.utils.tal import make_anchors

from yolo_sizeloss.weights import FeedbackBalancer, box_areas, gradlibra_weights, plb_weights, scb_weights

COCO_SMALL_AREA = 32 * 32  # the 'small' of the per-epoch statistics, in network-input pixels


def matched_counts(fg_mask: torch.Tensor, target_gt_idx: torch.Tensor, num_gt: int) -> torch.Tensor:
    """Number of foreground anchors matched to each ground-truth slot, per image: (B, num_gt)."""
    counts = torch.zeros(fg_mask.shape[0], max(num_gt, 1), device=fg_mask.device)
    return counts.scatter_add_(1, target_gt_idx, fg_mask.float())


def scatter_foreground(fg_mask: torch.Tensor, fg: tuple[torch.Tensor, ...], values: torch.Tensor) -> torch.Tensor:
    """A (B, A) tensor holding ``values`` at the foreground anchors ``fg`` and 1 elsewhere."""
    return torch.ones(fg_mask.shape, dtype=values.dtype, device=values.device).index_put_(fg, values)


class AnchorWeighting(nn.Module):
    """Per-anchor weights of the configured methods, their running state and per-epoch statistics.

    ``config`` is the resolved ``{method: settings}`` dict (``yolo_sizeloss.config``). One instance
    serves every branch of a loss; ``end_step`` is called once per training step. Buffers: the
    feedback state (``feedback.*``), the current step's feedback sums and the epoch's weight sums.
    """

    def __init__(self, config: dict[str, dict[str, Any]]):
        super().__init__()
        self.config = config
        fb = config.get("feedback")
        self.feedback = FeedbackBalancer(fb["momentum"], fb["g_max"]) if fb else None
        self.register_buffer("step_sums", torch.zeros(4, dtype=torch.float64))  # small/total loss, count
        self.register_buffer("epoch_sums", torch.zeros(6, dtype=torch.float64))  # box, cls, n: small/other

    @torch.no_grad()
    def forward(
        self,
        fg_mask: torch.Tensor,
        target_gt_idx: torch.Tensor,
        target_bboxes: torch.Tensor,
        target_scores: torch.Tensor,
        pred_bboxes: torch.Tensor,
        pred_probs: torch.Tensor,
        gt_bboxes: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return the box weight (B, A) and the class weight (B, A, C or 1), each None if untouched.

        Boxes are xyxy in network-input pixels: ``target_bboxes`` and ``pred_bboxes`` per anchor
        (B, A, 4), ``gt_bboxes`` per ground-truth slot (B, G, 4); ``pred_probs`` are class probabilities.
        PLB, SCB and feedback weigh foreground anchors only, so they are computed on those alone
        and scattered into a tensor of ones; Grad-Libra weighs every anchor and class.
        """
        fg = fg_mask.nonzero(as_tuple=True)
        target_fg, scores_fg = target_bboxes[fg], target_scores[fg]  # per foreground anchor, as every weight below
        gt_area = box_areas(target_fg)
        factors = {"box": [], "cls": []}

        if "plb" in self.config:
            area = gt_area if self.config["plb"]["source"] == "gt" else box_areas(pred_bboxes[fg])
            for term in self.config["plb"]["terms"]:
                factors[term].append(plb_weights(area))
        if "scb" in self.config or self.feedback is not None:
            counts = matched_counts(fg_mask, target_gt_idx, gt_bboxes.shape[1])
        if "scb" in self.config:
            scb = self.config["scb"]
            w = scb_weights(counts, scb["alpha"], scb["beta"])[fg[0], target_gt_idx[fg]]
            for term in scb["terms"]:
                factors[term].append(w)
        if self.feedback is not None:
            small = gt_area < self.config["feedback"]["small_area"]
            w = torch.where(small, self.feedback.gain.to(gt_area.dtype), 1.0)
            for term in self.config["feedback"]["terms"]:
                factors[term].append(w)
            self._observe_feedback(small, counts, gt_bboxes, target_fg, scores_fg, pred_bboxes[fg])

        box_fg, cls_fg = (torch.stack(ws).prod(0) if ws else None for ws in (factors["box"], factors["cls"]))
        w_box = None if box_fg is None else scatter_foreground(fg_mask, fg, box_fg)
        w_cls = None if cls_fg is None else scatter_foreground(fg_mask, fg, cls_fg)[..., None]
        if "gradlibra" in self.config:
            g = gradlibra_weights(pred_probs, target_scores, **self.config["gradlibra"])
            w_cls = g if w_cls is None else g * w_cls
            # the weight on each foreground anchor's target class
            cls_fg = g[fg].gather(-1, scores_fg.argmax(-1, keepdim=True)).squeeze(-1) * (
                1.0 if cls_fg is None else cls_fg)
        self._accumulate_epoch_stats(gt_area, box_fg, cls_fg)
        return w_box, w_cls

    def _observe_feedback(self, small, counts, gt_bboxes, target_fg, scores_fg, pred_fg):
        """Add this branch's unweighted per-anchor box loss and matched instances to the step sums
        (``*_fg``: the foreground anchors' target boxes, target scores and predicted boxes)."""
        iou = bbox_iou(pred_fg, target_fg, xywh=False, CIoU=True).squeeze(-1)
        anchor_loss = (1.0 - iou) * scores_fg.sum(-1)
        matched = counts > 0
        small_gt = matched & (box_areas(gt_bboxes) < self.config["feedback"]["small_area"])
        self.step_sums += torch.stack(
            [(anchor_loss * small).sum(), anchor_loss.sum(), small_gt.sum(), matched.sum()]
        ).to(self.step_sums)

    def _accumulate_epoch_stats(self, gt_area, box_fg, cls_fg):
        """Add the weights on small (< 32^2) and other foreground anchors to the epoch sums (None: 1)."""
        small = (gt_area < COCO_SMALL_AREA).to(gt_area.dtype)
        other = 1.0 - small
        box = torch.ones_like(gt_area) if box_fg is None else box_fg
        cls = torch.ones_like(gt_area) if cls_fg is None else cls_fg
        self.epoch_sums += torch.stack(
            [box @ small, cls @ small, small.sum(), box @ other, cls @ other, other.sum()]
        ).to(self.epoch_sums)

    def end_step(self) -> None:
        """Fold the step's feedback sums into the balancer (once per step, all branches together)."""
        if self.feedback is not None:
            self.feedback.update(*self.step_sums)
            self.step_sums.zero_()

    def epoch_stats(self) -> dict[str, float]:
        """Mean weights on small (< 32^2 input px) and other foreground anchors since the last call,
        and the feedback state; the sums restart."""
        s = self.epoch_sums.tolist()
        stats = {
            "sizeloss/box_w_small": s[0] / s[2] if s[2] else 1.0,
            "sizeloss/cls_w_small": s[1] / s[2] if s[2] else 1.0,
            "sizeloss/box_w_other": s[3] / s[5] if s[5] else 1.0,
            "sizeloss/cls_w_other": s[4] / s[5] if s[5] else 1.0,
        }
        self.epoch_sums.zero_()
        return {**stats, **self.feedback_state()}

    def feedback_state(self) -> dict[str, float]:
        """The feedback buffers as ``feedback/<name>`` floats (empty without feedback)."""
        if self.feedback is None:
            return {}
        return {f"feedback/{k}": float(v) for k, v in self.feedback.state_dict().items()}

    def load_feedback_state(self, values: dict[str, float]) -> bool:
        """Restore the feedback buffers from ``feedback_state`` floats; False if they are absent."""
        if self.feedback is None or not all(f"feedback/{k}" in values for k in self.feedback.state_dict()):
            return False
        for k, buffer in self.feedback.state_dict().items():
            buffer.fill_(values[f"feedback/{k}"])
        return True


class SizeAwareDetectionLoss(v8DetectionLoss):
    """``v8DetectionLoss`` whose box and class terms carry the ``AnchorWeighting`` weights."""

    def __init__(self, model: nn.Module, weighting: AnchorWeighting, tal_topk: int = 10, tal_topk2: int | None = None):
        super().__init__(model, tal_topk=tal_topk, tal_topk2=tal_topk2)
        self.weighting = weighting

    def __call__(self, preds: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stock call, then the end of one training step for the feedback state."""
        result = super().__call__(preds, batch)
        self.weighting.end_step()
        return result

    def get_assigned_targets_and_loss(self, preds: dict[str, torch.Tensor], batch: dict[str, Any], **assign_kwargs):
        """Ultralytics 8.4's method, with the weights applied where METHODS.md says (marked below)."""
        loss = torch.zeros(3, device=self.device)  # box, cls, dfl
        pred_distri, pred_scores = (
            preds["boxes"].permute(0, 2, 1).contiguous(),
            preds["scores"].permute(0, 2, 1).contiguous(),
        )
        anchor_points, stride_tensor = make_anchors(preds["feats"], self.stride, 0.5)
        dtype = pred_scores.dtype
        batch_size = pred_scores.shape[0]
        imgsz = torch.tensor(preds["feats"][0].shape[2:], device=self.device, dtype=dtype) * self.stride[0]

        targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1)
        targets = self.preprocess(targets.to(self.device), batch_size, scale_tensor=imgsz[[1, 0, 1, 0]])
        gt_labels, gt_bboxes = targets.split((1, 4), 2)  # cls, xyxy
        mask_gt = gt_bboxes.sum(2, keepdim=True).gt_(0.0)
        pred_bboxes = self.bbox_decode(anchor_points, pred_distri)  # xyxy, (b, h*w, 4)
        pred_pixels = pred_bboxes.detach() * stride_tensor  # size-aware: shared with the weighting below
        pred_probs = pred_scores.detach().sigmoid()  # size-aware: likewise
        _, target_bboxes, target_scores, fg_mask, target_gt_idx = self.assigner(
            pred_probs,
            pred_pixels.type(gt_bboxes.dtype),
            anchor_points * stride_tensor,
            gt_labels,
            gt_bboxes,
            mask_gt,
            **assign_kwargs,
        )
        target_scores_sum = target_scores.sum().clamp_(min=1)

        # size-aware: per-anchor weights from the assignment (all detached)
        w_box, w_cls = self.weighting(
            fg_mask, target_gt_idx, target_bboxes, target_scores, pred_pixels, pred_probs, gt_bboxes,
        )

        bce_loss = self.bce(pred_scores, target_scores.to(dtype))  # (bs, num_anchors, nc)
        if self.class_weights is not None:
            bce_loss *= self.class_weights
        if w_cls is not None:  # size-aware: class term
            bce_loss = bce_loss * w_cls.to(dtype)
        loss[1] = bce_loss.sum() / target_scores_sum

        # size-aware: BboxLoss weighs each foreground anchor by target_scores.sum(-1); scale that by w_box
        box_scores = target_scores if w_box is None else target_scores * w_box[..., None]
        loss[0], loss[2] = self.bbox_loss(
            pred_distri,
            pred_bboxes,
            anchor_points,
            target_bboxes / stride_tensor,
            box_scores,
            target_scores_sum,
            fg_mask,
            imgsz,
            stride_tensor,
        )

        loss[0] *= self.hyp.box
        loss[1] *= self.hyp.cls
        loss[2] *= self.hyp.dfl
        return (
            (fg_mask, target_gt_idx, target_bboxes, anchor_points, stride_tensor),
            loss,
            dict(zip(self.loss_names, loss.detach())),
        )


class SizeAwareE2ELoss(E2ELoss):
    """``E2ELoss`` (one-to-many and one-to-one branches) with a size-aware loss in each branch.

    Each branch weights its anchors from its own assignment; the branches share one
    ``AnchorWeighting``, whose feedback state is updated once per step from both.
    """

    def __init__(self, model: nn.Module, weighting: AnchorWeighting):
        super().__init__(model, loss_fn=partial(SizeAwareDetectionLoss, weighting=weighting))
        self.weighting = weighting

    def __call__(self, preds: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stock call, then the end of one training step for the feedback state."""
        result = super().__call__(preds, batch)
        self.weighting.end_step()
        return result


def build_size_aware_loss(model: nn.Module, weighting: AnchorWeighting) -> v8DetectionLoss | E2ELoss:
    """The size-aware counterpart of ``model.init_criterion()`` (end-to-end heads get the E2E loss)."""
    if getattr(model.model[-1], "one2one_cv2", None) is not None:
        return SizeAwareE2ELoss(model, weighting)
    return SizeAwareDetectionLoss(model, weighting)
