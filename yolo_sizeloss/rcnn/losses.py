"""Faster R-CNN's two losses with per-sample weights, and the weights of a stage from the configured methods.

``stage_weights`` runs the methods acting in a stage on its ``MatchedSamples`` and multiplies what they
return, in ``WEIGHT_ORDER``; ``weighted_rpn_loss`` and ``weighted_fastrcnn_loss`` are torchvision's
losses with those weights (all ones: the stock values, bit for bit). Weights come from detached
tensors; torchvision's normalisers are kept (the BCE and cross-entropy means over the sampled
anchors/RoIs, the smooth-L1 sums divided by the number of sampled anchors/RoIs).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from yolo_sizeloss.methods import REGISTRY, MatchedSamples
from yolo_sizeloss.rcnn.switches import LossSwitches

SMOOTH_L1_BETA = 1 / 9  # torchvision's beta for both box terms


def stage_weights(
    switches: LossSwitches, stage: str, samples: MatchedSamples, states: dict[str, nn.Module]
) -> tuple[Tensor, Tensor]:
    """The weights of ``stage``'s class term (per sized sample, ``samples.cls_gt_boxes``' order) and box term
    (per positive): the product of every method acting there (``states``: the stage's running states)."""
    cls_weights = torch.ones(samples.cls_gt_boxes.shape[0], device=samples.cls_gt_boxes.device)
    box_weights = torch.ones(samples.gt_boxes.shape[0], device=samples.gt_boxes.device)
    for name, settings, kinds in switches.stage_weights(stage):
        weights = REGISTRY[name].weights(samples, settings, kinds, states.get(name))
        for part in (weights.cls, weights.cls_all):
            cls_weights = cls_weights if part is None else cls_weights * part
        box_weights = box_weights if weights.box is None else box_weights * weights.box
    return cls_weights, box_weights


def box_term(
    deltas: Tensor, targets: Tensor, box_weights: Tensor, normaliser: int,
    positive_similarity: Optional[Tensor] = None, nwd_ratio: float = 0.0,
) -> Tensor:
    """A box term over the positives: ``sum_k w_k L_k / normaliser`` with torchvision's smooth-L1 ``L_k``
    of the encoded deltas (summed over the four), or with ``positive_similarity`` (NWD, or ``nwd.box_measure``'s
    measure, of each positive's decoded box and its ground truth) ``L_k = (1 - ratio) smoothL1_k +
    ratio (1 - similarity_k)``.

    Without ``positive_similarity`` the sum runs as torchvision's does, so unit weights give its value bit for bit.
    """
    weighted = F.smooth_l1_loss(deltas, targets, beta=SMOOTH_L1_BETA, reduction="none") * box_weights[:, None]
    if positive_similarity is None:
        return weighted.sum() / normaliser
    return ((1 - nwd_ratio) * weighted.sum() + nwd_ratio * (box_weights * (1 - positive_similarity)).sum()) / normaliser


def weighted_rpn_loss(
    objectness: Tensor,
    pred_bbox_deltas: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    pos_inds: Tensor,
    neg_inds: Tensor,
    objectness_weights: Tensor,
    box_weights: Tensor,
    positive_similarity: Optional[Tensor] = None,
    nwd_ratio: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """``RegionProposalNetwork.compute_loss`` with per-sample weights (all ones: the stock values, bit for bit).

    Inputs are the flattened batch tensors; ``objectness_weights`` follows ``cat([pos_inds, neg_inds])``,
    ``box_weights`` and ``positive_similarity`` (None: no NWD part, see ``box_term``) follow ``pos_inds``.
    """
    sampled_inds = torch.cat([pos_inds, neg_inds], dim=0)
    box_loss = box_term(pred_bbox_deltas[pos_inds], regression_targets[pos_inds], box_weights, sampled_inds.numel(),
                        positive_similarity, nwd_ratio)
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
    positive_similarity: Optional[Tensor] = None,
    nwd_ratio: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """torchvision's ``fastrcnn_loss`` with per-RoI weights (all ones: the stock values, bit for bit).

    ``labels``/``regression_targets`` are concatenated over the batch; ``class_weights`` has one
    entry per RoI, ``box_weights`` and ``positive_similarity`` (None: no NWD part, see ``box_term``) one per
    positive RoI (``labels > 0``, in order). The weighted
    cross-entropy is ``nll_loss`` of the weighted log-probabilities, which is how torch computes the
    stock cross-entropy, so the mean's rounding is the same.
    """
    classification_loss = F.nll_loss(F.log_softmax(class_logits, dim=1) * class_weights[:, None], labels)
    pos_inds = torch.where(labels > 0)[0]
    labels_pos = labels[pos_inds]
    box_regression = box_regression.reshape(class_logits.shape[0], box_regression.size(-1) // 4, 4)
    box_loss = box_term(box_regression[pos_inds, labels_pos], regression_targets[pos_inds], box_weights,
                        labels.numel(), positive_similarity, nwd_ratio)
    return classification_loss, box_loss


