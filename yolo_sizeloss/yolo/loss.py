"""The size-aware weightings inside Ultralytics' detection loss, without repeating any of its code.

``AnchorWeighting`` translates each assignment into the methods' ``MatchedSamples`` and their weights
into per-anchor weights (the methods are ``yolo_sizeloss.methods``, the definitions in
``docs/methods.md``). ``install_size_aware_loss`` puts thin wrappers around three stable parts of each stock ``v8DetectionLoss`` (one per branch of an
``E2ELoss``): the assigner (its outputs go to the weighting), the element-wise class BCE (times the
class weight) and the box loss (its per-anchor weight, the target-score sum, times the box weight).
Everything else, including options Ultralytics adds later (``class_weights``, assigner keywords),
stays the stock code's. With every weight 1 the loss is the stock one, bit for bit: the normaliser
``target_scores_sum`` is never touched (``nwd.normaliser: ciou`` scales every term instead, and
``nwd.box_weights: ciou`` each positive's box terms, ``yolo.normaliser``). NWD (``nwd``) is not a
weight: ``MeasureBboxLoss`` mixes it (or the measure ``nwd.box_measure`` names) into the box loss's IoU
part and the overlap of ``nwd.assigner`` (``methods.overlaps``) replaces the assigner's CIoU, each only
when configured.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from ultralytics.utils import LOGGER
from ultralytics.utils.loss import E2ELoss, v8DetectionLoss
from ultralytics.utils.metrics import bbox_iou

from yolo_sizeloss.methods import REGISTRY, WEIGHT_ORDER, MatchedSamples
from yolo_sizeloss.methods.base import COCO_AREA_LIMITS, box_areas, count_per_gt
from yolo_sizeloss.methods.feedback import FeedbackBalancer
from yolo_sizeloss.methods.nwd import needs_training_boxes, resolve_nwd_auto
from yolo_sizeloss.methods.overlaps import Overlap, ResolvedNWD
from yolo_sizeloss.yolo.assignment import slot_ids
from yolo_sizeloss.yolo.normaliser import ciou_target_scores

UNRESOLVED_HINT = ("call AnchorWeighting.resolve_from_labels(dataset.labels, imgsz) before training "
                   "(SizeAwareTrainer does)")
FEEDBACK_STATE = ("r", "q", "gain", "steps")  # what a resume must restore; other feedback buffers are counters


def unweighted_iou_loss(pred_fg: torch.Tensor, target_fg: torch.Tensor, scores_fg: torch.Tensor) -> torch.Tensor:
    """The stock IoU loss of each foreground anchor before the size-aware weights: ``(1 - CIoU)`` times its
    target-score sum."""
    return (1.0 - bbox_iou(pred_fg, target_fg, xywh=False, CIoU=True).squeeze(-1)) * scores_fg.sum(-1)


@dataclass
class ForegroundLayout:
    """How the methods see a branch's foreground anchors: ``take`` turns a per-anchor (B, A, ...) tensor into
    per-sample rows, ``spread`` per-sample weights back into a (B, A) tensor with 1 off the foreground.
    ``gt_ids`` numbers each sample's ground-truth slot image by image; ``valid`` marks the foreground
    samples (None: all are)."""

    index: tuple[torch.Tensor, ...] | None  # the foreground's (image, anchor) indices; None: every anchor
    gt_ids: torch.Tensor
    valid: torch.Tensor | None

    def take(self, per_anchor: torch.Tensor) -> torch.Tensor:
        return per_anchor.flatten(0, 1) if self.index is None else per_anchor[self.index]

    def spread(self, values: torch.Tensor, fg_mask: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return torch.where(self.valid, values, 1.0).view(fg_mask.shape)
        return torch.ones(fg_mask.shape, dtype=values.dtype, device=values.device).index_put_(self.index, values)


def gathered_foreground(fg_mask: torch.Tensor, target_gt_idx: torch.Tensor, num_gt: int) -> ForegroundLayout:
    """The foreground anchors gathered (``nonzero``: its size is read by the host)."""
    index = fg_mask.nonzero(as_tuple=True)
    return ForegroundLayout(index, index[0] * num_gt + target_gt_idx[index], None)


def dense_foreground(fg_mask: torch.Tensor, target_gt_idx: torch.Tensor, num_gt: int) -> ForegroundLayout:
    """Every anchor, the foreground marked: shapes come from the inputs' shapes alone."""
    # a background anchor's slot is the assigner's 0: in range, and left out of every count by ``valid``
    return ForegroundLayout(None, slot_ids(target_gt_idx, num_gt), fg_mask.flatten())


def training_label_sizes(labels: list[dict], imgsz: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Widths and heights (float64) of every box of an Ultralytics dataset's ``labels``, in network-input pixels,
    and their class ids (int64).

    A label holds normalised xywh ``bboxes`` and the image's original ``shape`` (h, w). Ultralytics'
    loader resizes each image so that its long side is ``imgsz`` (letterbox and rect mode alike), so
    a box is ``w * w0 * imgsz / max(h0, w0)`` input pixels wide: its size before augmentation, whose
    scale jitter moves sizes both ways.
    """
    widths, heights = [torch.zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.float64)]
    classes = [torch.zeros(0, dtype=torch.int64)]
    for label in labels:
        if not label.get("normalized", True) or label.get("bbox_format", "xywh") != "xywh":
            raise ValueError(f"{label.get('im_file', 'a label')}: expected normalised xywh boxes")
        h0, w0 = label["shape"]
        boxes = torch.as_tensor(label["bboxes"], dtype=torch.float64).reshape(-1, 4)
        scale = imgsz / max(h0, w0)
        widths.append(boxes[:, 2] * w0 * scale)
        heights.append(boxes[:, 3] * h0 * scale)
        classes.append(torch.as_tensor(label["cls"]).reshape(-1).long())
    return torch.cat(widths), torch.cat(heights), torch.cat(classes)


class AnchorWeighting(nn.Module):
    """Per-anchor weights of the configured methods, their running state and per-epoch statistics.

    ``config`` is the resolved ``{method: settings}`` dict (``yolo_sizeloss.config``). One instance
    serves every branch of a loss; ``end_step`` is called once per training step. It translates each
    branch's assignment into ``MatchedSamples`` and multiplies the terms by what the methods return
    (``yolo_sizeloss.methods``). Buffers: the methods' states (``states.feedback.*``) and the epoch's
    weight sums. ``nwd`` is NWD's state (``methods.overlaps.ResolvedNWD``): its ``auto`` settings wait for
    ``resolve_from_labels``; ``overlap_acts`` whether ``nwd.assigner``'s overlap ranks anchors now (False outside
    ``nwd.assigner_from`` .. ``assigner_until`` of the epochs: ``stage_overlap``).
    """

    def __init__(self, config: dict[str, dict[str, Any]]):
        super().__init__()
        self.config = config
        # the running state of each stateful method (feedback's balancer), by method name
        self.states = nn.ModuleDict({name: REGISTRY[name].new_state(settings) for name, settings in config.items()
                                     if REGISTRY[name].new_state is not None})
        self.nwd = ResolvedNWD.from_settings(config.get("nwd"), UNRESOLVED_HINT)
        self.overlap_acts = True
        self.register_buffer("epoch_sums", torch.zeros(6, dtype=torch.float64))  # box, cls, n: small/other
        # nwd.normaliser: ciou: the sum of each call's scale (assigned / CIoU target-score sum) and the calls;
        # a diagnostic, kept out of checkpoints
        self.register_buffer("normaliser_sums", torch.zeros(2, dtype=torch.float64), persistent=False)
        # how the methods see the foreground (forward); None: dense on a GPU, gathered elsewhere
        self.dense: bool | None = None

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
        PLB, SCB and feedback weigh foreground anchors only; Grad-Libra weighs every anchor and class.
        The methods see the foreground anchors gathered (``gathered_foreground``, the CPU: exact, and
        the fewest samples) or every anchor with the foreground marked (``dense_foreground``, a GPU:
        gathering needs the host to read how many there are, a synchronisation per step); the weights
        agree to float rounding.
        """
        target_gt_idx = target_gt_idx.long()  # float in the assigner's early return for a batch without boxes
        # a batch without any box has no slot for the background's index 0 to point at: gathered (and empty)
        dense = self.dense_on(fg_mask.device) and gt_bboxes.shape[1] > 0
        layout = (dense_foreground if dense else gathered_foreground)(fg_mask, target_gt_idx, gt_bboxes.shape[1])
        # per sample, as every weight below; float32, since mixed precision hands in halves
        target_fg, scores_fg, pred_fg = (layout.take(t).float() for t in (target_bboxes, target_scores, pred_bboxes))
        samples = MatchedSamples(
            gt_boxes=target_fg,
            pred_boxes=pred_fg,
            gt_ids=layout.gt_ids,
            box_loss=lambda: unweighted_iou_loss(pred_fg, target_fg, scores_fg),
            gt_areas=box_areas(gt_bboxes.float()).flatten(),
            gt_counts=count_per_gt(layout.gt_ids, gt_bboxes.shape[0] * gt_bboxes.shape[1], layout.valid),
            # the size weights on the class term act on the foreground anchors' rows
            cls_gt_boxes=target_fg,
            cls_pred_boxes=pred_fg,
            cls_positives=torch.arange(layout.gt_ids.shape[0], device=fg_mask.device),
            cls_probs=pred_probs,
            cls_targets=target_scores,
            valid=layout.valid,
        )
        factors = {"box": [], "cls": []}
        hardness = None
        for name in (m for m in WEIGHT_ORDER if m in self.config):
            method, settings = REGISTRY[name], self.config[name]
            state = self.states[name] if name in self.states else None
            weights = method.weights(samples, settings, method.terms(settings, "yolo"), state)
            factors["box"] += [] if weights.box is None else [weights.box]
            factors["cls"] += [] if weights.cls is None else [weights.cls]
            hardness = weights.cls_all if weights.cls_all is not None else hardness

        box_fg, cls_fg = (torch.stack(ws).prod(0) if ws else None for ws in (factors["box"], factors["cls"]))
        w_box = None if box_fg is None else layout.spread(box_fg, fg_mask)
        w_cls = None if cls_fg is None else layout.spread(cls_fg, fg_mask)[..., None]
        if hardness is not None:  # over every anchor and class (Grad-Libra)
            w_cls = hardness if w_cls is None else hardness * w_cls
            # the weight on each foreground anchor's target class
            cls_fg = layout.take(hardness).gather(-1, scores_fg.argmax(-1, keepdim=True)).squeeze(-1) * (
                1.0 if cls_fg is None else cls_fg)
        self._accumulate_epoch_stats(box_areas(target_fg), box_fg, cls_fg, layout.valid)
        return w_box, w_cls

    @property
    def assigner_measures(self) -> bool:
        """Whether the assigner ranks anchors by ``nwd.assigner``'s overlap now, not its stock CIoU."""
        return bool(self.nwd.assigner) and self.overlap_acts

    @property
    def holds_normaliser(self) -> bool:
        """Whether the losses are divided by the CIoU targets' sum (``nwd.normaliser: ciou``): only while the
        assigner measures by another overlap; with the stock one the two sums are the same."""
        return self.assigner_measures and self.nwd.settings["normaliser"] == "ciou"

    @property
    def gates_classes(self) -> bool:
        """Whether the assigner measures only some classes' ground truths by ``nwd.assigner``'s overlap
        (``nwd.assigner_classes: small``), the others by its stock CIoU."""
        return self.assigner_measures and self.nwd.gates_classes

    @property
    def holds_box_weights(self) -> bool:
        """Whether the box terms are weighed by the CIoU targets (``nwd.box_weights: ciou``): only while the
        assigner measures by another overlap; with the stock one they are the assigned targets."""
        return self.assigner_measures and self.nwd.settings["box_weights"] == "ciou"

    def stock_overlap_factors(self, assigner: nn.Module, pd_scores, pd_bboxes, target_labels, target_bboxes,
                              target_scores, fg_mask, target_gt_idx, num_slots: int
                              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the stock CIoU would make of this assignment (``yolo.normaliser``), as factors on the terms: on
        every term (0-dim), the assigned target-score sum over the CIoU targets' sum (both at least 1, as the
        stock loss clamps its own), with ``nwd.normaliser: ciou``; on each anchor's box terms (B, A), its
        CIoU target over its assigned target (0 where the assigned one is 0), with ``nwd.box_weights: ciou``.
        None where a setting keeps Ultralytics' own."""
        ciou = ciou_target_scores(assigner, pd_scores, pd_bboxes, target_labels, target_bboxes, fg_mask,
                                  target_gt_idx, num_slots)
        assigned = target_scores.sum(-1)
        scale = box = None
        if self.holds_normaliser:
            scale = assigned.sum().clamp(min=1) / ciou.sum().clamp(min=1)
            self.normaliser_sums += torch.stack([scale.detach(), torch.ones_like(scale)]).to(self.normaliser_sums)
        if self.holds_box_weights:
            box = torch.where(assigned > 0, ciou / assigned.clamp(min=torch.finfo(assigned.dtype).tiny), 0.0)
        return scale, box

    def dense_on(self, device: torch.device) -> bool:
        """Whether the methods see every anchor (``dense_foreground``) on ``device``: on a GPU, unless ``dense``
        says otherwise."""
        return self.dense if self.dense is not None else device.type == "cuda"

    @property
    def feedback(self) -> FeedbackBalancer | None:
        """The feedback balancer (None without feedback)."""
        return self.states["feedback"] if "feedback" in self.states else None

    def resolve_from_labels(self, labels: list[dict], imgsz: int) -> None:
        """Resolve the settings computed from the training labels; call once before the first loss call.

        ``nwd.constant: auto`` becomes the data's mean absolute object size, ``mean(sqrt(w * h))``
        over every box of ``labels`` (an Ultralytics dataset's, ``trainer.train_loader.dataset.labels``)
        in network-input pixels at ``imgsz`` (``training_label_sizes``), as Wang et al. set C;
        ``nwd.assigner: auto`` becomes ``methods.nwd.nwd_assigner_auto`` of the same boxes; where more than
        ``nwd.max_small_share`` of them are small, NWD is off (the stock assigner and box loss); with
        ``nwd.assigner_classes: small`` the classes whose boxes are mostly small are found. Without any of these
        settings (``needs_training_boxes``) this does nothing.
        """
        nwd_cfg = self.config.get("nwd")
        if not nwd_cfg or not needs_training_boxes(nwd_cfg):
            return
        resolved = resolve_nwd_auto(nwd_cfg, *training_label_sizes(labels, imgsz), imgsz)
        self.nwd = ResolvedNWD.from_settings(nwd_cfg, UNRESOLVED_HINT, resolved)
        for line in resolved.lines:
            LOGGER.info(line)

    def _accumulate_epoch_stats(self, gt_area, box_fg, cls_fg, valid=None):
        """Add the weights on small (< 32^2) and other foreground anchors to the epoch sums (None: 1;
        ``valid``: which samples are foreground, None: all)."""
        real = torch.ones_like(gt_area, dtype=torch.bool) if valid is None else valid
        small = ((gt_area < COCO_AREA_LIMITS[0]) & real).to(gt_area.dtype)
        other = real.to(gt_area.dtype) - small
        box = torch.ones_like(gt_area) if box_fg is None else torch.where(real, box_fg, 0.0)
        cls = torch.ones_like(gt_area) if cls_fg is None else torch.where(real, cls_fg, 0.0)
        self.epoch_sums += torch.stack(
            [box @ small, cls @ small, small.sum(), box @ other, cls @ other, other.sum()]
        ).to(self.epoch_sums)

    def end_step(self) -> None:
        """Fold the step's sums into each method's state (once per step, all branches together)."""
        for state in self.states.values():
            state.end_step()

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
        stats.update(self.nwd.epoch_columns(self.assigner_measures))  # as stage_overlap set it for the epoch
        if self.config.get("nwd", {}).get("normaliser") == "ciou":
            scale_sum, calls = self.normaliser_sums.tolist()
            stats["nwd/normaliser_scale"] = scale_sum / calls if calls else 1.0  # mean assigned / CIoU sum
            self.normaliser_sums.zero_()
        return {**stats, **self.feedback_state()}

    def feedback_state(self) -> dict[str, float]:
        """The feedback buffers as ``feedback/<name>`` floats (empty without feedback)."""
        if self.feedback is None:
            return {}
        return {f"feedback/{k}": float(v) for k, v in self.feedback.state_dict().items()}

    def load_feedback_state(self, values: dict[str, float]) -> bool:
        """Restore the feedback buffers from ``feedback_state`` floats; False if the state proper (r, q,
        gain, steps) is absent. A saved state without ``nonfinite_steps`` restarts that counter at 0."""
        if self.feedback is None or not all(f"feedback/{k}" in values for k in FEEDBACK_STATE):
            return False
        for k, buffer in self.feedback.state_dict().items():
            buffer.fill_(values.get(f"feedback/{k}", 0))
        return True


@dataclass
class PendingWeights:
    """The weights of one branch's current loss call: set by its assigner, taken by its BCE and box loss."""

    box: torch.Tensor | None = None
    cls: torch.Tensor | None = None


class ObservedAssigner(nn.Module):
    """The stock assigner; its assignment also feeds the weighting, whose weights wait in ``pending``.

    The stock loss hands the assigner the detached class probabilities and predicted boxes in
    network-input pixels, which are exactly what the weighting needs, so nothing is computed twice.
    """

    def __init__(self, assigner: nn.Module, weighting: AnchorWeighting, pending: PendingWeights):
        super().__init__()
        self.assigner, self.weighting, self.pending = assigner, weighting, pending

    def forward(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, *args, **kwargs):
        if self.weighting.gates_classes:  # for the ClassGatedPairs that _set_overlap installed
            kwargs["measured_gts"] = self.weighting.nwd.measured_gts(gt_labels[..., 0])
        assignment = self.assigner(pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, *args, **kwargs)
        target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx = assignment
        box, cls = self.weighting(fg_mask, target_gt_idx, target_bboxes, target_scores, pd_bboxes, pd_scores, gt_bboxes)
        if self.weighting.holds_normaliser or self.weighting.holds_box_weights:
            scale, stock_box = self.weighting.stock_overlap_factors(
                self.assigner, pd_scores, pd_bboxes, target_labels, target_bboxes, target_scores, fg_mask,
                target_gt_idx, gt_bboxes.shape[1])
            if stock_box is not None:  # each anchor's box terms weighed by its CIoU target, not its assigned one
                box = stock_box if box is None else box * stock_box
            if scale is not None:  # every term of both losses times assigned / CIoU sum: divided by the CIoU sum
                box = scale.expand(fg_mask.shape) if box is None else box * scale
                cls = scale.view(1, 1, 1) if cls is None else cls * scale
        self.pending.box, self.pending.cls = box, cls
        return assignment


class WeightedBCE(nn.Module):
    """The stock element-wise class BCE, times the pending class weight (B, A, C or 1)."""

    def __init__(self, bce: nn.Module, pending: PendingWeights):
        super().__init__()
        self.bce, self.pending = bce, pending

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.bce(pred, target)
        weight, self.pending.cls = self.pending.cls, None
        return loss if weight is None else loss * weight.to(loss.dtype)


class WeightedBboxLoss(nn.Module):
    """The stock box loss (IoU and DFL, or L1) with each foreground anchor's weight times the pending box weight.

    ``BboxLoss`` weighs anchor ``i`` by ``target_scores[i].sum()``; scaling its target-score row by
    ``w_i`` scales that weight and nothing else (the normaliser is a separate argument).
    """

    def __init__(self, bbox_loss: nn.Module, pending: PendingWeights):
        super().__init__()
        self.bbox_loss, self.pending = bbox_loss, pending

    def forward(self, pred_dist, pred_bboxes, anchor_points, target_bboxes, target_scores, *args, **kwargs):
        weight, self.pending.box = self.pending.box, None
        if weight is not None:
            target_scores = target_scores * weight[..., None]
        return self.bbox_loss(pred_dist, pred_bboxes, anchor_points, target_bboxes, target_scores, *args, **kwargs)


class MeasureBboxLoss(nn.Module):
    """The stock box loss with a measure mixed into its IoU part: ``(1 - ratio) L_iou + ratio L_m`` (``nwd.ratio``).

    ``L_m = sum_k w_k (1 - m_k) / S`` over the foreground anchors, ``m`` the similarity ``nwd.box_measure``
    names (NWD by default; ``ResolvedNWD.box_similarity``), with the weights ``w_k`` (the anchor's
    target-score sum; this wrapper sits inside ``WeightedBboxLoss``, so times the size-aware box
    weight) and the normaliser ``S`` of the stock ``L_iou``. ``BboxLoss`` receives boxes in stride
    units; NWD is not scale-invariant, so both are scaled back by each anchor's ``stride`` to the
    network-input pixels its constant is measured in. DFL (or L1) is the stock value; ratio 0 returns
    the stock tensors themselves, ratio 1 the measure's term alone (NWD's paper's loss).
    """

    def __init__(self, bbox_loss: nn.Module, weighting: AnchorWeighting):
        super().__init__()
        self.bbox_loss, self.weighting = bbox_loss, weighting

    def forward(self, pred_dist, pred_bboxes, anchor_points, target_bboxes, target_scores, target_scores_sum,
                fg_mask, imgsz, stride):
        loss_iou, loss_dfl = self.bbox_loss(pred_dist, pred_bboxes, anchor_points, target_bboxes, target_scores,
                                            target_scores_sum, fg_mask, imgsz, stride)
        ratio = self.weighting.nwd.ratio
        if ratio == 0:
            return loss_iou, loss_dfl
        if self.weighting.dense_on(fg_mask.device):  # every anchor, the background's term masked out: no sync
            fg = fg_mask[..., None]
            unit = pred_bboxes.new_tensor([0.0, 0.0, 1.0, 1.0])  # a finite pair for the background (no NaN to mask)
            pred_fg = torch.where(fg, pred_bboxes * stride, unit).flatten(0, 1)
            target_fg = torch.where(fg, target_bboxes * stride, unit).flatten(0, 1)
            weight = torch.where(fg_mask, target_scores.sum(-1), 0.0).flatten()
        else:
            index = fg_mask.nonzero(as_tuple=True)
            scale = stride[index[1]]  # (n, 1): the stride of each foreground anchor's level
            pred_fg, target_fg = pred_bboxes[index] * scale, target_bboxes[index] * scale
            weight = target_scores[index].sum(-1)
        # CIoU as the stock term computes it; only SAFit reads it, so that its large boxes keep the stock term
        ciou = (bbox_iou(pred_fg, target_fg, xywh=False, CIoU=True).squeeze(-1)
                if self.weighting.nwd.settings["box_measure"] == "safit" else None)
        similarity = self.weighting.nwd.box_similarity(pred_fg, target_fg, ciou)
        loss_measure = ((1.0 - similarity) * weight).sum() / target_scores_sum
        if ratio == 1:
            return loss_measure, loss_dfl
        return (1.0 - ratio) * loss_iou + ratio * loss_measure, loss_dfl


def loss_branches(criterion: v8DetectionLoss | E2ELoss) -> tuple[v8DetectionLoss, ...]:
    """The ``v8DetectionLoss`` instances of a detection criterion (both branches of an end-to-end one)."""
    return (criterion.one2many, criterion.one2one) if isinstance(criterion, E2ELoss) else (criterion,)


def stock_assigners(criterion: v8DetectionLoss | E2ELoss) -> list[nn.Module]:
    """Each branch's stock assigner, inside the size-aware wrapper where there is one."""
    return [branch.assigner.assigner if isinstance(branch.assigner, ObservedAssigner) else branch.assigner
            for branch in loss_branches(criterion)]


def install_size_aware_loss(criterion: v8DetectionLoss | E2ELoss, weighting: AnchorWeighting):
    """Wrap the assigner, BCE and box loss of every branch of a stock ``criterion`` in place; return it.

    The branches of an end-to-end loss share ``weighting``: each weighs its anchors from its own
    assignment, and the feedback state sees both. Call ``weighting.end_step()`` once per training
    step (``SizeAwareTrainer`` does, at each batch end). With ``nwd`` configured, each branch's box
    loss also mixes in NWD (or ``nwd.box_measure``'s measure), and with ``nwd.assigner`` its assigner
    measures overlap by NWD (or the measure it names).
    """
    nwd_cfg = weighting.config.get("nwd")
    for branch in loss_branches(criterion):
        if isinstance(branch.assigner, ObservedAssigner):
            raise ValueError("this criterion already carries the size-aware loss")
        pending = PendingWeights()
        if weighting.nwd.overlap() is not None and not hasattr(branch.assigner, "iou_calculation"):
            raise TypeError(f"nwd.assigner: {type(branch.assigner).__name__} has no iou_calculation to replace")
        _set_overlap(branch.assigner, weighting)
        branch.assigner = ObservedAssigner(branch.assigner, weighting, pending)
        branch.bce = WeightedBCE(branch.bce, pending)
        bbox_loss = MeasureBboxLoss(branch.bbox_loss, weighting) if nwd_cfg else branch.bbox_loss
        branch.bbox_loss = WeightedBboxLoss(bbox_loss, pending)
    return criterion


def _set_overlap(assigner: nn.Module, weighting: AnchorWeighting) -> None:
    """The stock ``assigner`` measures its candidate pairs by ``nwd.assigner``'s overlap while
    ``weighting.assigner_measures`` (those of ``nwd.assigner_classes``' ground truths only: ``ClassGatedPairs``),
    else by its class's CIoU."""
    _restore_stock_overlap(assigner)
    if not weighting.assigner_measures:
        return
    # the piece of the stock assigner that measures the candidate pairs' overlap; this instance only, the
    # class stays stock, and its CIoU is what SAFit may blend with (nwd.safit_assigner_iou: stock)
    stock_overlap = functools.partial(type(assigner).iou_calculation, assigner)
    overlap = weighting.nwd.overlap(stock_overlap)
    if weighting.gates_classes:
        assigner.pair_overlaps = ClassGatedPairs(assigner, overlap)
    else:
        assigner.iou_calculation = overlap.elementwise


def _restore_stock_overlap(assigner: nn.Module) -> None:
    for name in ("iou_calculation", "pair_overlaps"):  # only _set_overlap sets them on the instance
        if name in vars(assigner):
            delattr(assigner, name)  # the class's own is back


class ClassGatedPairs:
    """A task-aligned assigner's ``pair_overlaps`` (``nwd.assigner_classes: small``): the candidate pairs of the
    ground truths ``measured_gts`` (B, G) marks by ``overlap``, the others by the assigner's class's own (CIoU).

    ``ObservedAssigner`` passes ``measured_gts`` through the assigner's batch-first extras, the way
    Ultralytics' pose and segmentation assigners hand their own pair measures keypoints and masks.
    """

    def __init__(self, assigner: nn.Module, overlap: Overlap):
        self.assigner, self.overlap = assigner, overlap

    def __call__(self, indices, gt_bboxes: torch.Tensor, pd_bboxes: torch.Tensor, measured_gts: torch.Tensor):
        stock = type(self.assigner).pair_overlaps(self.assigner, indices, gt_bboxes, pd_bboxes)
        images, gts, anchors = indices
        measured = self.overlap.elementwise(gt_bboxes[images, gts], pd_bboxes[images, anchors])
        return torch.where(measured_gts[images, gts], measured.to(stock.dtype), stock)


def stage_overlap(criterion: v8DetectionLoss | E2ELoss, weighting: AnchorWeighting, acts: bool) -> None:
    """From now on every branch's assigner of a criterion carrying the size-aware loss ranks anchors by
    ``nwd.assigner``'s overlap (``acts``) or by its stock CIoU (outside ``nwd.assigner_from`` ..
    ``assigner_until`` of the epochs); the weights, box loss and normaliser follow ``weighting``, which is
    told the same."""
    weighting.overlap_acts = acts
    for assigner in stock_assigners(criterion):
        _set_overlap(assigner, weighting)


def remove_size_aware_loss(criterion: v8DetectionLoss | E2ELoss) -> v8DetectionLoss | E2ELoss:
    """Undo ``install_size_aware_loss`` in place: every branch gets its stock assigner, BCE and box loss
    back, and keeps the rest of its state (an end-to-end loss its branch gains); return it. A stock
    criterion is returned as it is."""
    for branch in loss_branches(criterion):
        if not isinstance(branch.assigner, ObservedAssigner):
            continue
        branch.assigner = branch.assigner.assigner
        _restore_stock_overlap(branch.assigner)
        branch.bce = branch.bce.bce
        bbox_loss = branch.bbox_loss.bbox_loss
        branch.bbox_loss = bbox_loss.bbox_loss if isinstance(bbox_loss, MeasureBboxLoss) else bbox_loss
    return criterion


def build_size_aware_loss(model: nn.Module, weighting: AnchorWeighting) -> v8DetectionLoss | E2ELoss:
    """The model's stock criterion (``model.init_criterion()``) carrying the size-aware weights."""
    return install_size_aware_loss(model.init_criterion(), weighting)
