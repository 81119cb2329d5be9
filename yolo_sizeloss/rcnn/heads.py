"""PLB, SCB, feedback, Grad-Libra and NWD inside torchvision's Faster R-CNN: subclasses of ``RegionProposalNetwork`` and ``RoIHeads``.

Each head translates its stage's samples into ``MatchedSamples``, gets the weights from the methods
(``losses.stage_weights``: the methods are ``yolo_sizeloss.methods``) and computes its weighted loss
(``losses``); which methods act where is ``switches.LossSwitches``. The terms a weight can multiply
(the loss settings' ``rcnn_terms``; the PLB paper's switch names in brackets; definitions in
``docs/methods.md``):

- ``rpn_cls`` (1C): RPN objectness BCE over the sampled anchors (positives and negatives);
- ``rpn_box`` (1B): RPN box smooth-L1 over the sampled positive anchors;
- ``roi_cls`` (2C): RoI-head cross-entropy over the sampled RoIs;
- ``roi_box`` (2B): RoI-head box smooth-L1 over the positive RoIs.

Each term's PLB mean is pooled over all images of the (per-process) batch. The box that sizes a
sample depends on the size source:

- ``predicted`` (default): 1C and 1B the anchor decoded with the RPN's detached deltas (the anchor's
  proposal, not clipped to the image); 2C the RoI itself (the proposal, or a ground-truth box that
  torchvision appends to the proposals); 2B the RoI decoded with the RoI head's detached deltas for
  the ground-truth class.
- ``gt``: positives their matched ground-truth box; negatives (1C, 2C) have none and are sized by the
  box they were matched on (the anchor, the RoI).

SCB on the RPN: per image, ``M_i`` counts the anchors matched to ground truth ``i`` before sampling
(torchvision's matcher, low-quality matches included); each sampled positive anchor of ``i`` has its
objectness BCE (``rpn_cls``) and/or box term (``rpn_box``) multiplied by ``W_i``. Weights multiply.

Feedback: each stage with a configured term (RPN: ``rpn_*``, RoI heads: ``roi_*``) keeps its own
``FeedbackBalancer`` state (``methods.feedback``), measured on its own box loss: ``r`` = the small
objects' share of the unweighted smooth-L1 of the stage's positives (sampled positive anchors;
positive RoIs), ``q`` = their share of the ground truths those positives are matched to. Small = matched ground truth under
``small_area`` in the pixels of the resized image the heads see (network input). The stage's
positives of small objects get the gain on its configured terms (class terms: positives only). The
step ends once per training iteration (``end_feedback_step``, called by the engine).

Grad-Libra: ``rpn_cls`` multiplies each sampled anchor's objectness BCE by the paper's
``G = g - alpha sin g``, ``g = |sigmoid(z) - t|``; ``roi_cls`` each sampled RoI's cross-entropy by the
project's softmax form, ``g = 1 - p(true class)`` (``methods.gradlibra.gradlibra_softmax_weights``).

NWD (not a weight): on each box term in its ``rcnn_terms`` a positive's smooth-L1 becomes
``(1 - ratio) smoothL1 + ratio (1 - NWD)``, NWD between the positive's predicted box (its deltas decoded
on its anchor / RoI, differentiable) and its matched ground truth, in the resized image's pixels; the
other weights multiply both parts, the normaliser is the stock one. ``assigner``: NWD instead of IoU
as the RPN matcher's similarity (``box_similarity``, an ``Overlap``'s ``pairwise``), thresholds kept.
``ratio`` 0 is the stock term. With every switch off the stock torchvision code runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from yolo_sizeloss.assignment import AssignmentCounter
from yolo_sizeloss.methods import MatchedSamples
from yolo_sizeloss.methods.base import box_areas, count_per_gt
from yolo_sizeloss.methods.overlaps import IoU, Overlap
from yolo_sizeloss.rcnn.losses import SMOOTH_L1_BETA, stage_weights, weighted_fastrcnn_loss, weighted_rpn_loss
from yolo_sizeloss.rcnn.switches import LossSwitches


def register_states(head: torch.nn.Module, switches: LossSwitches, stage: str) -> None:
    """Give ``head`` the running states of the methods acting in ``stage`` as ``head.states``, each also a
    submodule under its method's name, which gives the checkpoint keys ``rpn.feedback.r``, ... that saved runs hold."""
    head.states = switches.new_states(stage)
    for name, state in head.states.items():
        head.add_module(name, state)


@dataclass
class AnchorTargets:
    """What the RPN loss needs beyond torchvision's arguments, concatenated over the batch."""

    anchors: Tensor
    matched_gt_boxes: Tensor
    gt_ids: Tensor  # per anchor: its ground truth's index in gt_areas, -1 if none
    gt_areas: Tensor  # areas of the batch's ground truths (network-input pixels)
    gt_counts: Tensor  # anchors matched to each of the batch's ground truths, before sampling


class RecordingMatcher(Matcher):
    """torchvision's ``Matcher`` (same thresholds and low-quality rule) that keeps what each call returned in
    ``recorded``: the ground-truth index per anchor of each image the RPN matched."""

    recorded: list[Tensor]

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        matches = super().__call__(match_quality_matrix)
        self.recorded.append(matches)
        return matches


class SizeBalancedRPN(RegionProposalNetwork):
    """``RegionProposalNetwork`` whose loss applies PLB1C, PLB1B, SCB, feedback, Grad-Libra and NWD (module docstring).

    The instance's ``box_similarity`` (stock: ``box_iou``) is the ``pairwise`` of ``switches.rpn_overlap()``
    (NWD with ``nwd.assigner``), its ``proposal_matcher`` a ``RecordingMatcher`` with the stock settings.
    Overrides two stock methods: ``assign_targets_to_anchors`` (calls the stock one, counts the ground
    truths left without a positive anchor in ``assignments``, and keeps the anchors, matched boxes and
    matched ground truths of this forward pass) and
    ``compute_loss`` (stock when no first-stage switch is on; otherwise the same sampling, with
    weights). ``states`` holds the stage's running states by method (feedback's, when it weighs an RPN term).
    """

    def __init__(self, *args, switches: LossSwitches, **kwargs):
        super().__init__(*args, **kwargs)
        self.switches = switches
        register_states(self, switches, "rpn")
        self.assignments = AssignmentCounter()  # ground truths the matcher left without a positive anchor
        self._anchor_targets: Optional[AnchorTargets] = None
        stock = self.proposal_matcher
        self.proposal_matcher = RecordingMatcher(stock.high_threshold, stock.low_threshold,
                                                 stock.allow_low_quality_matches)
        # the one piece of the stock matching that measures overlap (box_iou, set in the stock __init__):
        # the matcher and its thresholds stay, and the methods see the matches the RPN trains on
        self.use_overlap(switches.rpn_overlap())

    def use_overlap(self, overlap: Overlap) -> None:
        """From now on the matcher measures by ``overlap`` (``nwd.assigner_from`` .. ``assigner_until``)."""
        self.overlap = overlap
        self.box_similarity = overlap.pairwise

    def class_gated_similarity(self, targets: list[dict[str, Tensor]]) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
        """With ``nwd.assigner_classes: small`` while the matcher measures by ``nwd.assigner``'s overlap: a
        ``box_similarity`` for this batch that measures the rows of those classes' ground truths by it and
        every other row by IoU; None otherwise. The stock code calls it once per image with boxes, in order."""
        if isinstance(self.overlap, IoU) or not self.switches.nwd.gates_classes:
            return None
        # torchvision's labels are the class ids + 1 (rcnn.data)
        rows = iter([self.switches.nwd.measured_gts(t["labels"] - 1) for t in targets if t["boxes"].numel()])

        def similarity(gt_boxes: Tensor, anchors: Tensor) -> Tensor:
            return torch.where(next(rows)[:, None], self.overlap.pairwise(gt_boxes, anchors), box_iou(gt_boxes, anchors))
        return similarity

    @classmethod
    def from_stock(cls, rpn: RegionProposalNetwork, switches: LossSwitches) -> "SizeBalancedRPN":
        """The same RPN (shared head and anchor generator, same settings) with the size-aware loss."""
        return cls(
            rpn.anchor_generator,
            rpn.head,
            rpn.proposal_matcher.high_threshold,
            rpn.proposal_matcher.low_threshold,
            rpn.fg_bg_sampler.batch_size_per_image,
            rpn.fg_bg_sampler.positive_fraction,
            dict(rpn._pre_nms_top_n),
            dict(rpn._post_nms_top_n),
            rpn.nms_thresh,
            rpn.score_thresh,
            switches=switches,
        )

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        self.proposal_matcher.recorded = []
        self.box_similarity = self.class_gated_similarity(targets) or self.overlap.pairwise
        try:
            labels, matched_gt_boxes = super().assign_targets_to_anchors(anchors, targets)
        finally:
            self.box_similarity = self.overlap.pairwise
        gt_boxes = [t["boxes"] for t in targets]
        # the stock code returns labels only; the counts (every mode, the stock loss's too) and the methods
        # need each anchor's ground truth: the matches it made, recorded (it skips images without boxes)
        recorded = iter(self.proposal_matcher.recorded)
        matches = [next(recorded) if g.numel() else torch.full((a.shape[0],), -1, dtype=torch.long, device=a.device)
                   for a, g in zip(anchors, gt_boxes)]
        counts = [positives_per_gt(m, g.shape[0]) for m, g in zip(matches, gt_boxes)]
        self.assignments.add(torch.cat(counts), torch.cat(gt_boxes))
        if self.switches.rpn_active:
            self._anchor_targets = AnchorTargets(
                torch.cat(anchors), torch.cat(matched_gt_boxes), batch_gt_ids(matches, gt_boxes),
                box_areas(torch.cat(gt_boxes).float()), torch.cat(counts))
        return labels, matched_gt_boxes

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        if not self.switches.rpn_active:
            return super().compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
        targets, self._anchor_targets = self._anchor_targets, None
        if targets is None:
            raise RuntimeError("SizeBalancedRPN.compute_loss needs assign_targets_to_anchors of the same forward pass")
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        pos_inds = torch.where(torch.cat(sampled_pos, dim=0))[0]
        neg_inds = torch.where(torch.cat(sampled_neg, dim=0))[0]
        sampled = torch.cat([pos_inds, neg_inds])
        labels, regression_targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
        detached = pred_bbox_deltas.detach()
        # each sampled anchor's proposal: its anchor decoded with the detached deltas, not clipped to the image
        pos_pred = self.box_coder.decode_single(detached[pos_inds], targets.anchors[pos_inds])
        neg_pred = self.box_coder.decode_single(detached[neg_inds], targets.anchors[neg_inds])
        pos_gt = targets.matched_gt_boxes[pos_inds]
        samples = MatchedSamples(
            gt_boxes=pos_gt,
            pred_boxes=pos_pred,
            gt_ids=targets.gt_ids[pos_inds],
            box_loss=lambda: F.smooth_l1_loss(detached[pos_inds], regression_targets[pos_inds], beta=SMOOTH_L1_BETA,
                                              reduction="none").sum(-1).double(),
            gt_areas=targets.gt_areas,
            gt_counts=targets.gt_counts,
            # the objectness term: the sampled positives, then the negatives (sized by their anchor for gt)
            cls_gt_boxes=torch.cat([pos_gt, targets.anchors[neg_inds]]),
            cls_pred_boxes=torch.cat([pos_pred, neg_pred]),
            cls_positives=torch.arange(pos_inds.shape[0], device=pos_inds.device),
            cls_probs=objectness.detach().flatten()[sampled].float().sigmoid(),
            cls_targets=labels[sampled],
        )
        objectness_weights, box_weights = stage_weights(self.switches, "rpn", samples, self.states)
        positive_similarity = None
        if self.switches.nwd_mixes("rpn_box"):  # the positives' proposals (not clipped) against their ground truth
            proposals = self.box_coder.decode_single(pred_bbox_deltas[pos_inds], targets.anchors[pos_inds])
            positive_similarity = self.switches.nwd.box_similarity(proposals, pos_gt)
        return weighted_rpn_loss(
            objectness.flatten(),
            pred_bbox_deltas,
            labels,
            regression_targets,
            pos_inds,
            neg_inds,
            objectness_weights,
            box_weights,
            positive_similarity,
            self.switches.nwd.ratio,
        )


class SizeBalancedRoIHeads(RoIHeads):
    """``RoIHeads`` (boxes only) whose training loss applies PLB2C, PLB2B, feedback, Grad-Libra and NWD (module docstring).

    Overrides ``forward``: stock unless training with a second-stage switch on; then the stock
    sampling, RoI pooling, box head and predictor, and the weighted ``fastrcnn_loss``. ``states``
    holds the stage's running states by method (feedback's, when it weighs a RoI term).
    """

    def __init__(self, *args, switches: LossSwitches, **kwargs):
        super().__init__(*args, **kwargs)
        self.switches = switches
        register_states(self, switches, "roi")

    @classmethod
    def from_stock(cls, heads: RoIHeads, switches: LossSwitches) -> "SizeBalancedRoIHeads":
        """The same box RoI heads (shared modules, same settings) with the size-aware loss."""
        if heads.has_mask() or heads.has_keypoint():
            raise ValueError("SizeBalancedRoIHeads supports box detection only (no mask or keypoint head)")
        return cls(
            heads.box_roi_pool,
            heads.box_head,
            heads.box_predictor,
            heads.proposal_matcher.high_threshold,
            heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image,
            heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights,
            heads.score_thresh,
            heads.nms_thresh,
            heads.detections_per_img,
            switches=switches,
        )

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not (self.training and self.switches.roi_active):
            return super().forward(features, proposals, image_shapes, targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        all_labels, all_targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
        pos_inds, deltas, predicted = self.positive_boxes(proposals, labels, box_regression.detach())
        # each sampled RoI's matched ground truth if positive, else the RoI itself
        sized = torch.cat([matched_or_own(*image) for image in zip(proposals, matched_idxs, labels, gt_boxes)])
        gt_ids = batch_gt_ids(matched_idxs, gt_boxes)[pos_inds]
        samples = MatchedSamples(
            gt_boxes=sized[pos_inds],
            pred_boxes=predicted,
            gt_ids=gt_ids,
            box_loss=lambda: F.smooth_l1_loss(deltas, all_targets[pos_inds], beta=SMOOTH_L1_BETA,
                                              reduction="none").sum(-1).double(),
            gt_areas=box_areas(torch.cat(gt_boxes).float()),
            gt_counts=count_per_gt(gt_ids, sum(len(g) for g in gt_boxes)),
            # the classifier term: every sampled RoI, sized by the RoI itself for the predicted source
            cls_gt_boxes=sized,
            cls_pred_boxes=torch.cat(proposals, dim=0),
            cls_positives=pos_inds,
            cls_logits=class_logits,
            cls_labels=all_labels,
        )
        class_weights, box_weights = stage_weights(self.switches, "roi", samples, self.states)
        positive_similarity = None
        if self.switches.nwd_mixes("roi_box"):  # differentiable predicted boxes against their ground truth
            *_, predicted = self.positive_boxes(proposals, labels, box_regression)
            positive_similarity = self.switches.nwd.box_similarity(predicted, sized[pos_inds])
        loss_classifier, loss_box_reg = weighted_fastrcnn_loss(
            class_logits,
            box_regression,
            all_labels,
            all_targets,
            class_weights,
            box_weights,
            positive_similarity,
            self.switches.nwd.ratio,
        )
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

    def positive_boxes(self, proposals: list[Tensor], labels: list[Tensor],
                       box_regression: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The batch indices of the positive RoIs (``labels > 0``), their deltas for the ground-truth class
        and those deltas decoded on the RoI: their predicted boxes (differentiable when ``box_regression`` is)."""
        rois = torch.cat(proposals, dim=0)
        all_labels = torch.cat(labels, dim=0)
        pos_inds = torch.where(all_labels > 0)[0]
        deltas = box_regression.reshape(rois.shape[0], -1, 4)[pos_inds, all_labels[pos_inds]]
        return pos_inds, deltas, self.box_coder.decode_single(deltas, rois[pos_inds])


def positives_per_gt(matches: Tensor, num_gt: int) -> Tensor:
    """The anchors matched to each of an image's ``num_gt`` ground truths (``matches``: the matcher's index per
    anchor, negative for none), counted without a data-dependent shape (no host synchronisation)."""
    if num_gt == 0:  # an image without boxes: every match is negative, nothing to count into
        return torch.zeros(0, dtype=torch.int64, device=matches.device)
    return count_per_gt(matches.clamp(min=0), num_gt, matches >= 0)


def batch_gt_ids(matches: list[Tensor], gt_boxes: list[Tensor]) -> Tensor:
    """Per sample of the batch (anchors or RoIs, image by image): the index of its matched ground truth
    among the batch's ``torch.cat(gt_boxes)``, -1 where it has none (a negative match index)."""
    offsets = torch.tensor([0, *(len(b) for b in gt_boxes)], device=matches[0].device).cumsum(0)
    return torch.cat([torch.where(m >= 0, m + offset, -1) for m, offset in zip(matches, offsets)])


def matched_or_own(rois: Tensor, matched_idxs: Tensor, labels: Tensor, gt_boxes: Tensor) -> Tensor:
    """Per sampled RoI of one image: its matched ground-truth box if positive, else the RoI itself."""
    if gt_boxes.numel() == 0:
        return rois
    return torch.where((labels > 0)[:, None], gt_boxes[matched_idxs], rois)
