"""PLB, SCB, feedback, Grad-Libra and NWD inside torchvision's Faster R-CNN: subclasses of ``RegionProposalNetwork`` and ``RoIHeads``.

The terms a weight can multiply (the loss settings' ``rcnn_terms``; the PLB paper's switch names in
brackets; formulas in ``yolo_sizeloss.weights``, definitions in ``docs/methods.md``):

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
``StageFeedback`` state, measured on its own box loss: ``r`` = the small objects' share of the
unweighted smooth-L1 of the stage's positives (sampled positive anchors; positive RoIs), ``q`` = their
share of the ground truths those positives are matched to. Small = matched ground truth under
``small_area`` in the pixels of the resized image the heads see (network input). The stage's
positives of small objects get the gain on its configured terms (class terms: positives only). The
step ends once per training iteration (``end_feedback_step``, called by the engine).

Grad-Libra: ``rpn_cls`` multiplies each sampled anchor's objectness BCE by the paper's
``G = g - alpha sin g``, ``g = |sigmoid(z) - t|``; ``roi_cls`` each sampled RoI's cross-entropy by the
project's softmax form, ``g = 1 - p(true class)`` (``yolo_sizeloss.weights.gradlibra_softmax_weights``).

NWD (not a weight): on each box term in its ``rcnn_terms`` a positive's smooth-L1 becomes
``(1 - ratio) smoothL1 + ratio (1 - NWD)``, NWD between the positive's predicted box (its deltas decoded
on its anchor / RoI, differentiable) and its matched ground truth, in the resized image's pixels; the
other weights multiply both parts, the normaliser is the stock one. ``assigner``: NWD instead of IoU
as the RPN matcher's similarity (``box_similarity``), thresholds kept. ``ratio`` 0 is the stock term.

Weights come from detached tensors; torchvision's normalisers are kept (the BCE and cross-entropy
means over the sampled anchors/RoIs, the smooth-L1 sums divided by the number of sampled
anchors/RoIs). With every switch off the stock torchvision code runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from yolo_sizeloss.weights import (
    FeedbackBalancer,
    box_areas,
    gradlibra_softmax_weights,
    gradlibra_weights,
    nwd,
    nwd_matrix,
    plb_weights,
    scb_weights,
)

PLB_SHORTHANDS = {"1C": "rpn_cls", "1B": "rpn_box", "2C": "roi_cls", "2B": "roi_box"}  # the paper's names
SMOOTH_L1_BETA = 1 / 9  # torchvision's beta for both box terms


@dataclass(frozen=True)
class LossSwitches:
    """Which Faster R-CNN terms the size-aware weights multiply (all empty: the stock loss).

    Compiled from the loss settings shared with YOLO (``yolo_sizeloss.config``), whose ``rcnn_terms``
    name the terms: ``rpn_cls``, ``rpn_box``, ``roi_cls``, ``roi_box``.
    """

    plb: tuple[str, ...] = ()
    plb_source: str = "predicted"
    scb: tuple[str, ...] = ()
    scb_alpha: float = 1.0
    scb_beta: float = 3.0
    feedback: tuple[str, ...] = ()
    feedback_small_area: float = 1024.0
    feedback_momentum: float = 0.9
    feedback_g_max: float = 4.0
    gradlibra: tuple[str, ...] = ()
    gradlibra_alpha_pos: float = 0.8
    gradlibra_alpha_neg: float = 0.8
    nwd: tuple[str, ...] = ()  # box terms mixed with 1 - NWD
    nwd_ratio: float = 0.5
    nwd_constant: Optional[float] = None  # C in network-input pixels; None: 'auto' not yet resolved
    nwd_assigner: bool = False  # NWD as the RPN matcher's similarity

    @classmethod
    def from_config(
        cls, config: dict, nwd_constant: Optional[float] = None, nwd_assigner: Optional[bool] = None
    ) -> "LossSwitches":
        """The switches of a resolved loss config (methods without a section are off).

        ``nwd_constant`` and ``nwd_assigner`` are what ``nwd.constant: auto`` and ``nwd.assigner:
        auto`` resolved to (``training_nwd_settings``, computed by the engine from the training
        labels); a value in the settings wins.
        """
        plb, scb, fb, gl, nw = (config.get(m) for m in ("plb", "scb", "feedback", "gradlibra", "nwd"))
        defaults = cls()
        if nw and nw["constant"] != "auto":
            nwd_constant = float(nw["constant"])
        if nw and nw["assigner"] != "auto":
            nwd_assigner = nw["assigner"]
        elif nw and nwd_assigner is None:
            raise ValueError("nwd.assigner is auto but was not resolved: pass training_nwd_settings' decision")
        return cls(
            plb=tuple(plb["rcnn_terms"]) if plb else (),
            plb_source=plb["source"] if plb else defaults.plb_source,
            scb=tuple(scb["rcnn_terms"]) if scb else (),
            scb_alpha=scb["alpha"] if scb else defaults.scb_alpha,
            scb_beta=scb["beta"] if scb else defaults.scb_beta,
            feedback=tuple(fb["rcnn_terms"]) if fb else (),
            feedback_small_area=fb["small_area"] if fb else defaults.feedback_small_area,
            feedback_momentum=fb["momentum"] if fb else defaults.feedback_momentum,
            feedback_g_max=fb["g_max"] if fb else defaults.feedback_g_max,
            gradlibra=tuple(gl["rcnn_terms"]) if gl else (),
            gradlibra_alpha_pos=gl["alpha_pos"] if gl else defaults.gradlibra_alpha_pos,
            gradlibra_alpha_neg=gl["alpha_neg"] if gl else defaults.gradlibra_alpha_neg,
            nwd=tuple(nw["rcnn_terms"]) if nw else (),
            nwd_ratio=nw["ratio"] if nw else defaults.nwd_ratio,
            nwd_constant=nwd_constant if nw else None,
            nwd_assigner=bool(nw and nwd_assigner),
        )

    def stage_terms(self, stage: str) -> tuple[str, ...]:
        """Every configured term of ``stage`` (``rpn`` or ``roi``), over all methods (repeats kept)."""
        terms = (*self.plb, *self.scb, *self.feedback, *self.gradlibra, *self.nwd)
        return tuple(t for t in terms if t.startswith(stage + "_"))

    @property
    def rpn_active(self) -> bool:
        """True when any method acts on a first-stage term."""
        return bool(self.stage_terms("rpn"))

    @property
    def roi_active(self) -> bool:
        """True when any method acts on a second-stage term."""
        return bool(self.stage_terms("roi"))

    def nwd_mixes(self, term: str) -> bool:
        """True when ``term``'s box loss mixes in NWD (listed, with a ratio above 0: ratio 0 is the stock term)."""
        return term in self.nwd and self.nwd_ratio > 0

    def nwd_c(self) -> float:
        """The NWD constant; a RuntimeError while ``auto`` is unresolved."""
        if self.nwd_constant is None:
            raise RuntimeError("nwd.constant is auto but was not resolved: pass LossSwitches.from_config the "
                               "training_nwd_settings of the training labels (the engine does), or set a number")
        return self.nwd_constant

    def stage_feedback(self, stage: str) -> Optional["StageFeedback"]:
        """A fresh feedback state for ``stage`` when feedback weighs one of its terms, else None."""
        if not any(t.startswith(stage + "_") for t in self.feedback):
            return None
        return StageFeedback(self.feedback_small_area, self.feedback_momentum, self.feedback_g_max)


class StageFeedback(FeedbackBalancer):
    """The feedback state of one Faster R-CNN stage: a ``FeedbackBalancer`` plus the step's sums.

    ``weights`` is called by the stage's loss with the unweighted box loss of each positive and the
    ground truth it is matched to: it returns the positives' weights (the gain of the steps before on
    small objects, 1 elsewhere) and adds the step's four sums. ``end_step`` folds the sums into the
    balancer (summed across processes there). The sums are a non-persistent buffer: the checkpoint
    holds the balancer's state only (``r``, ``q``, ``gain``, ``steps``, ``nonfinite_steps``).
    """

    def __init__(self, small_area: float, momentum: float, g_max: float):
        super().__init__(momentum, g_max)
        self.small_area = small_area
        self.register_buffer("step_sums", torch.zeros(4, dtype=torch.float64), persistent=False)

    @torch.no_grad()
    def weights(self, sample_loss: Tensor, sample_gt: Tensor, gt_areas: Tensor) -> Tensor:
        """Weights of the positives (``sample_gt``: index of each one's ground truth in ``gt_areas``,
        the areas of the batch's ground truths in network-input pixels)."""
        gt_small = gt_areas < self.small_area
        small = gt_small[sample_gt]
        matched = torch.zeros_like(gt_small)
        matched[sample_gt] = True
        sample_loss = sample_loss.detach().double()
        self.step_sums += torch.stack([(sample_loss * small).sum(), sample_loss.sum(),
                                       (matched & gt_small).sum().double(), matched.sum().double()])
        return torch.where(small, self.gain.float(), 1.0)

    def end_step(self) -> None:
        """Fold this step's sums into the running state (once per training iteration)."""
        self.update(*self.step_sums)
        self.step_sums.zero_()

    def state(self) -> dict[str, float]:
        """The balancer's state as floats."""
        return {k: float(v) for k, v in self.state_dict().items()}


def parse_plb(text: str) -> list[str]:
    """The ``rcnn_terms`` of the paper's PLB switch list (``1C,1B``; case-insensitive); ValueError naming the flag."""
    switches = [s.strip().upper() for s in text.split(",") if s.strip()]
    unknown = [s for s in switches if s not in PLB_SHORTHANDS]
    if unknown or len(set(switches)) != len(switches):
        raise ValueError(f"--plb {text}: expected distinct switches from {', '.join(PLB_SHORTHANDS)}")
    return [PLB_SHORTHANDS[s] for s in switches]


def anchor_scb_weights(matched_idxs: Tensor, num_gt: int, alpha: float = 1.0, beta: float = 3.0) -> Tensor:
    """SCB weight of every anchor of one image: ``W_i`` of its ground truth if positive, else 1.

    ``matched_idxs`` is torchvision's matcher output (ground-truth index, or -1/-2 for negatives and
    ignored anchors); ``M_i`` counts the anchors matched to ``i``.
    """
    positive = matched_idxs >= 0
    counts = torch.bincount(matched_idxs[positive], minlength=num_gt)
    weights = torch.ones(matched_idxs.shape, dtype=torch.float32, device=matched_idxs.device)
    weights[positive] = scb_weights(counts, alpha, beta)[matched_idxs[positive]]
    return weights


def rpn_loss_weights(
    switches: LossSwitches, pos_boxes: Tensor, neg_boxes: Tensor, pos_scb: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """Weights of the RPN terms: (objectness over [positives, negatives], box over positives).

    ``pos_boxes``/``neg_boxes`` size the sampled positive/negative anchors of the whole batch;
    ``pos_scb`` is the SCB weight of each sampled positive (None: SCB off).
    """
    num_pos = pos_boxes.shape[0]
    objectness = torch.ones(num_pos + neg_boxes.shape[0], device=pos_boxes.device)
    box = torch.ones(num_pos, device=pos_boxes.device)
    if "rpn_cls" in switches.plb:
        objectness = objectness * plb_weights(box_areas(torch.cat([pos_boxes, neg_boxes])))
    if "rpn_box" in switches.plb:
        box = box * plb_weights(box_areas(pos_boxes))
    if "rpn_cls" in switches.scb:
        objectness = objectness * torch.cat([pos_scb, objectness.new_ones(neg_boxes.shape[0])])
    if "rpn_box" in switches.scb:
        box = box * pos_scb
    return objectness, box


def roi_loss_weights(switches: LossSwitches, sampled_boxes: Tensor, pos_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Weights of the RoI-head terms: (cross-entropy over the sampled RoIs, box over the positives)."""
    classifier = torch.ones(sampled_boxes.shape[0], device=sampled_boxes.device)
    box = torch.ones(pos_boxes.shape[0], device=pos_boxes.device)
    if "roi_cls" in switches.plb:
        classifier = classifier * plb_weights(box_areas(sampled_boxes))
    if "roi_box" in switches.plb:
        box = box * plb_weights(box_areas(pos_boxes))
    return classifier, box


def box_term(
    deltas: Tensor, targets: Tensor, box_weights: Tensor, normaliser: int,
    box_nwd: Optional[Tensor] = None, nwd_ratio: float = 0.0,
) -> Tensor:
    """A box term over the positives: ``sum_k w_k L_k / normaliser`` with torchvision's smooth-L1 ``L_k``
    of the encoded deltas (summed over the four), or with ``box_nwd`` (the NWD of each positive's decoded
    box and its ground truth) ``L_k = (1 - ratio) smoothL1_k + ratio (1 - NWD_k)``.

    Without ``box_nwd`` the sum runs as torchvision's does, so unit weights give its value bit for bit.
    """
    weighted = F.smooth_l1_loss(deltas, targets, beta=SMOOTH_L1_BETA, reduction="none") * box_weights[:, None]
    if box_nwd is None:
        return weighted.sum() / normaliser
    return ((1 - nwd_ratio) * weighted.sum() + nwd_ratio * (box_weights * (1 - box_nwd)).sum()) / normaliser


def weighted_rpn_loss(
    objectness: Tensor,
    pred_bbox_deltas: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    pos_inds: Tensor,
    neg_inds: Tensor,
    objectness_weights: Tensor,
    box_weights: Tensor,
    box_nwd: Optional[Tensor] = None,
    nwd_ratio: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """``RegionProposalNetwork.compute_loss`` with per-sample weights (all ones: the stock values, bit for bit).

    Inputs are the flattened batch tensors; ``objectness_weights`` follows ``cat([pos_inds, neg_inds])``,
    ``box_weights`` and ``box_nwd`` (None: no NWD part, see ``box_term``) follow ``pos_inds``.
    """
    sampled_inds = torch.cat([pos_inds, neg_inds], dim=0)
    box_loss = box_term(pred_bbox_deltas[pos_inds], regression_targets[pos_inds], box_weights, sampled_inds.numel(),
                        box_nwd, nwd_ratio)
    objectness_loss = F.binary_cross_entropy_with_logits(
        objectness[sampled_inds], labels[sampled_inds], weight=objectness_weights
    )
    return objectness_loss, box_loss


def weighted_fastrcnn_loss(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    class_weights: Tensor,
    box_weights: Tensor,
    box_nwd: Optional[Tensor] = None,
    nwd_ratio: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """torchvision's ``fastrcnn_loss`` with per-RoI weights (all ones: the stock values, bit for bit).

    ``labels``/``regression_targets`` are concatenated over the batch; ``class_weights`` has one
    entry per RoI, ``box_weights`` and ``box_nwd`` (None: no NWD part, see ``box_term``) one per
    positive RoI (``labels > 0``, in order). The weighted
    cross-entropy is ``nll_loss`` of the weighted log-probabilities, which is how torch computes the
    stock cross-entropy, so the mean's rounding is the same.
    """
    classification_loss = F.nll_loss(F.log_softmax(class_logits, dim=1) * class_weights[:, None], labels)
    pos_inds = torch.where(labels > 0)[0]
    labels_pos = labels[pos_inds]
    box_regression = box_regression.reshape(class_logits.shape[0], box_regression.size(-1) // 4, 4)
    box_loss = box_term(box_regression[pos_inds, labels_pos], regression_targets[pos_inds], box_weights,
                        labels.numel(), box_nwd, nwd_ratio)
    return classification_loss, box_loss


@dataclass
class AnchorTargets:
    """What the RPN loss needs beyond torchvision's arguments, concatenated over the batch."""

    anchors: Tensor
    matched_gt_boxes: Tensor
    scb: Optional[Tensor]  # per-anchor SCB weight, None when SCB is off
    gt_ids: Optional[Tensor]  # per anchor: its ground truth's index in gt_areas, -1 if none; None when feedback is off
    gt_areas: Optional[Tensor]  # areas of the batch's ground truths (network-input pixels); None when feedback is off


class SizeBalancedRPN(RegionProposalNetwork):
    """``RegionProposalNetwork`` whose loss applies PLB1C, PLB1B, SCB, feedback, Grad-Libra and NWD (module docstring).

    With ``nwd.assigner`` the instance's ``box_similarity`` (stock: ``box_iou``) is NWD. Overrides two stock methods: ``assign_targets_to_anchors`` (calls the stock one and keeps the
    anchors, matched boxes, SCB weights and matched ground truths of this forward pass) and
    ``compute_loss`` (stock when no first-stage switch is on; otherwise the same sampling, with
    weights). ``feedback`` holds the stage's feedback state (None without feedback on an RPN term).
    """

    def __init__(self, *args, switches: LossSwitches, **kwargs):
        super().__init__(*args, **kwargs)
        self.switches = switches
        self.feedback = switches.stage_feedback("rpn")
        self._anchor_targets: Optional[AnchorTargets] = None
        if switches.nwd_assigner:
            # the one piece of the stock matching that measures overlap (box_iou, set in the stock __init__):
            # the matcher and its thresholds stay, and SCB and feedback see the matches the RPN trains on
            self.box_similarity = self.nwd_similarity

    def nwd_similarity(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """NWD of every ground truth (rows) with every anchor, in the resized image's pixels (``nwd.assigner``)."""
        return nwd_matrix(gt_boxes, anchors, self.switches.nwd_c())

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
        labels, matched_gt_boxes = super().assign_targets_to_anchors(anchors, targets)
        if self.switches.rpn_active:
            scb = gt_ids = gt_areas = None
            if self.switches.scb or self.feedback is not None:
                matches = [self.image_matches(a, t["boxes"]) for a, t in zip(anchors, targets)]
            if self.switches.scb:
                scb = torch.cat([self.image_scb_weights(m, t["boxes"]) for m, t in zip(matches, targets)])
            if self.feedback is not None:
                gt_boxes = [t["boxes"] for t in targets]
                gt_ids = batch_gt_ids(matches, gt_boxes)
                gt_areas = box_areas(torch.cat(gt_boxes).float())
            self._anchor_targets = AnchorTargets(torch.cat(anchors), torch.cat(matched_gt_boxes), scb, gt_ids, gt_areas)
        return labels, matched_gt_boxes

    def image_matches(self, anchors: Tensor, gt_boxes: Tensor) -> Tensor:
        """The stock matcher's ground-truth index per anchor of one image (-1/-2: none; all -1 without ground truth)."""
        if gt_boxes.numel() == 0:
            return torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device)
        return self.proposal_matcher(self.box_similarity(gt_boxes, anchors))

    def image_scb_weights(self, matched_idxs: Tensor, gt_boxes: Tensor) -> Tensor:
        """Per-anchor SCB weights of one image, from the stock matcher's assignment (all 1 without ground truth)."""
        return anchor_scb_weights(matched_idxs, gt_boxes.shape[0], self.switches.scb_alpha, self.switches.scb_beta)

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
        objectness_weights, box_weights = rpn_loss_weights(
            self.switches,
            self.sizing_boxes(targets, pred_bbox_deltas, pos_inds, positive=True),
            self.sizing_boxes(targets, pred_bbox_deltas, neg_inds, positive=False),
            None if targets.scb is None else targets.scb[pos_inds],
        )
        labels, regression_targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
        box_nwd = None
        if self.switches.nwd_mixes("rpn_box"):  # the positives' proposals (not clipped) against their ground truth
            proposals = self.box_coder.decode_single(pred_bbox_deltas[pos_inds], targets.anchors[pos_inds])
            box_nwd = nwd(proposals.float(), targets.matched_gt_boxes[pos_inds].float(), self.switches.nwd_c())
        if self.feedback is not None:
            box_loss = F.smooth_l1_loss(pred_bbox_deltas.detach()[pos_inds], regression_targets[pos_inds],
                                        beta=SMOOTH_L1_BETA, reduction="none").sum(-1)
            w = self.feedback.weights(box_loss, targets.gt_ids[pos_inds], targets.gt_areas)
            if "rpn_cls" in self.switches.feedback:
                objectness_weights = objectness_weights * torch.cat([w, w.new_ones(neg_inds.shape[0])])
            if "rpn_box" in self.switches.feedback:
                box_weights = box_weights * w
        if "rpn_cls" in self.switches.gradlibra:
            sampled = torch.cat([pos_inds, neg_inds])
            objectness_weights = objectness_weights * gradlibra_weights(
                objectness.detach().flatten()[sampled].float().sigmoid(), labels[sampled],
                self.switches.gradlibra_alpha_pos, self.switches.gradlibra_alpha_neg)
        return weighted_rpn_loss(
            objectness.flatten(),
            pred_bbox_deltas,
            labels,
            regression_targets,
            pos_inds,
            neg_inds,
            objectness_weights,
            box_weights,
            box_nwd,
            self.switches.nwd_ratio,
        )

    def sizing_boxes(self, targets: AnchorTargets, pred_bbox_deltas: Tensor, inds: Tensor, positive: bool) -> Tensor:
        """The boxes whose areas feed PLB for the anchors ``inds`` (see the module docstring)."""
        if self.switches.plb_source == "predicted":
            return self.box_coder.decode_single(pred_bbox_deltas.detach()[inds], targets.anchors[inds])
        return (targets.matched_gt_boxes if positive else targets.anchors)[inds]


class SizeBalancedRoIHeads(RoIHeads):
    """``RoIHeads`` (boxes only) whose training loss applies PLB2C, PLB2B, feedback, Grad-Libra and NWD (module docstring).

    Overrides ``forward``: stock unless training with a second-stage switch on; then the stock
    sampling, RoI pooling, box head and predictor, and the weighted ``fastrcnn_loss``. ``feedback``
    holds the stage's feedback state (None without feedback on a RoI term).
    """

    def __init__(self, *args, switches: LossSwitches, **kwargs):
        super().__init__(*args, **kwargs)
        self.switches = switches
        self.feedback = switches.stage_feedback("roi")

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
        class_weights, box_weights = self.loss_weights(proposals, matched_idxs, labels, gt_boxes, box_regression)
        all_labels, all_targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
        if self.feedback is not None:
            class_weights, box_weights = self.feedback_weights(
                class_weights, box_weights, matched_idxs, all_labels, all_targets, gt_boxes, box_regression)
        if "roi_cls" in self.switches.gradlibra:
            class_weights = class_weights * gradlibra_softmax_weights(
                class_logits, all_labels, self.switches.gradlibra_alpha_pos, self.switches.gradlibra_alpha_neg)
        box_nwd = None
        if self.switches.nwd_mixes("roi_box"):  # differentiable predicted boxes against their ground truth
            pos_inds, predicted = self.positive_boxes(proposals, labels, box_regression)
            matched = torch.cat([matched_or_own(*image) for image in zip(proposals, matched_idxs, labels, gt_boxes)])
            box_nwd = nwd(predicted.float(), matched[pos_inds].float(), self.switches.nwd_c())
        loss_classifier, loss_box_reg = weighted_fastrcnn_loss(
            class_logits,
            box_regression,
            all_labels,
            all_targets,
            class_weights,
            box_weights,
            box_nwd,
            self.switches.nwd_ratio,
        )
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

    def positive_boxes(self, proposals: list[Tensor], labels: list[Tensor], box_regression: Tensor) -> tuple[Tensor, Tensor]:
        """The batch indices of the positive RoIs (``labels > 0``) and their predicted boxes: the deltas for
        the ground-truth class decoded on the RoI (differentiable when ``box_regression`` is)."""
        rois = torch.cat(proposals, dim=0)
        all_labels = torch.cat(labels, dim=0)
        pos_inds = torch.where(all_labels > 0)[0]
        deltas = box_regression.reshape(rois.shape[0], -1, 4)[pos_inds, all_labels[pos_inds]]
        return pos_inds, self.box_coder.decode_single(deltas, rois[pos_inds])

    def feedback_weights(
        self,
        class_weights: Tensor,
        box_weights: Tensor,
        matched_idxs: list[Tensor],
        labels: Tensor,
        regression_targets: Tensor,
        gt_boxes: list[Tensor],
        box_regression: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The class and box weights times the feedback weights of the positive RoIs (``labels > 0``);
        observes each positive's unweighted smooth-L1 for the stage's feedback state."""
        pos_inds = torch.where(labels > 0)[0]
        gt_ids = batch_gt_ids(matched_idxs, gt_boxes)[pos_inds]
        deltas = box_regression.detach().reshape(labels.shape[0], -1, 4)[pos_inds, labels[pos_inds]]
        box_loss = F.smooth_l1_loss(deltas, regression_targets[pos_inds], beta=SMOOTH_L1_BETA, reduction="none").sum(-1)
        w = self.feedback.weights(box_loss, gt_ids, box_areas(torch.cat(gt_boxes).float()))
        if "roi_cls" in self.switches.feedback:
            class_weights = class_weights.index_put((pos_inds,), class_weights[pos_inds] * w)
        if "roi_box" in self.switches.feedback:
            box_weights = box_weights * w
        return class_weights, box_weights

    def loss_weights(
        self,
        proposals: list[Tensor],
        matched_idxs: list[Tensor],
        labels: list[Tensor],
        gt_boxes: list[Tensor],
        box_regression: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """PLB2C/PLB2B weights of the sampled RoIs of the batch (from ``select_training_samples``' outputs)."""
        if self.switches.plb_source == "gt":
            pos_inds = torch.where(torch.cat(labels, dim=0) > 0)[0]
            sized = torch.cat(
                [matched_or_own(p, m, lab, g) for p, m, lab, g in zip(proposals, matched_idxs, labels, gt_boxes)]
            )
            return roi_loss_weights(self.switches, sized, sized[pos_inds])
        _, predicted = self.positive_boxes(proposals, labels, box_regression.detach())
        return roi_loss_weights(self.switches, torch.cat(proposals, dim=0), predicted)


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


def feedback_stages(model: nn.Module) -> dict[str, StageFeedback]:
    """The feedback states of a Faster R-CNN's stages, by stage name (``rpn``, ``roi``; empty without feedback)."""
    heads = {"rpn": getattr(model, "rpn", None), "roi": getattr(model, "roi_heads", None)}
    return {name: head.feedback for name, head in heads.items() if getattr(head, "feedback", None) is not None}


def end_feedback_step(model: nn.Module) -> None:
    """End a training iteration: every stage folds its step's feedback sums into its state."""
    for stage in feedback_stages(model).values():
        stage.end_step()


def feedback_columns(model: nn.Module) -> dict[str, float]:
    """The feedback state of every stage as ``feedback/<stage>/<name>`` floats (results.csv columns)."""
    return {f"feedback/{name}/{k}": v for name, stage in feedback_stages(model).items() for k, v in stage.state().items()}
