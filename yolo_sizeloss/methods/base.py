"""What every method module shares: its description (``Method``), the settings validators its schema is
written with, the description of a batch's matched samples it computes from (``MatchedSamples``), and
the per-term weights it returns (``TermWeights``).

A method never sees a detector: each family (``yolo_sizeloss.yolo``, ``yolo_sizeloss.rcnn``) translates
its own tensors into a ``MatchedSamples`` and multiplies its loss terms by the returned weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

Validator = Callable[[Any], tuple[bool, str]]  # value -> (allowed, what is allowed, for the error message)

FAMILY_TERMS = {  # the loss terms of each detector family, and the setting that lists a method's terms there
    "yolo": ("terms", ("box", "cls")),  # box = IoU + DFL (or L1), cls = element-wise class BCE
    "faster_rcnn": ("rcnn_terms", ("rpn_cls", "rpn_box", "roi_cls", "roi_box")),  # RPN objectness/box, RoI class/box
}

# COCO's small / medium / large limits on a box's area, here in network-input pixels (what a detector sees)
COCO_AREA_LIMITS = (32.0**2, 96.0**2)


def box_areas(boxes: Tensor) -> Tensor:
    """Areas of xyxy boxes ``(..., 4)`` (widths and heights below zero count as zero)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def elementwise_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """IoU of aligned xyxy boxes (0 where both are empty: no overlap to speak of)."""
    lt = torch.max(boxes_a[..., :2], boxes_b[..., :2])
    rb = torch.min(boxes_a[..., 2:], boxes_b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (boxes_a[..., 2:] - boxes_a[..., :2]).clamp(min=0).prod(-1)
    area_b = (boxes_b[..., 2:] - boxes_b[..., :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def count_per_gt(gt_ids: Tensor, num_gt: int, counted: Tensor | None = None) -> Tensor:
    """(num_gt,) int64: how many of ``gt_ids`` (indices into the ground truths) name each one, only those
    where ``counted`` is True if given (an index there must still be in range). ``torch.bincount`` would
    give the same counts but reads the largest index back to the host first, a synchronisation on a GPU."""
    ones = torch.ones_like(gt_ids, dtype=torch.int64) if counted is None else counted.long()
    return torch.zeros(num_gt, dtype=torch.int64, device=gt_ids.device).scatter_add_(0, gt_ids, ones)


def number(check: Callable[[float], bool], allowed: str) -> Validator:
    """A finite int or float (not a bool) for which ``check`` holds."""

    def validate(value: Any) -> tuple[bool, str]:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False, allowed
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int too large for a float
            return False, allowed
        return finite and check(value), allowed

    return validate


def choice(*options: str) -> Validator:
    """One of ``options``."""

    def validate(value: Any) -> tuple[bool, str]:
        return value in options, f"one of {', '.join(options)}"

    return validate


def terms(*allowed: str) -> Validator:
    """A list of distinct terms from ``allowed`` (empty allowed)."""

    def validate(value: Any) -> tuple[bool, str]:
        ok = isinstance(value, list) and all(t in allowed for t in value) and len(set(value)) == len(value)
        return ok, f"a list of distinct terms from {', '.join(allowed)} (may be empty)"

    return validate


@dataclass
class MatchedSamples:
    """A batch's samples in one stage of a detector (a YOLO loss branch, the RPN, the RoI heads), as a method sees them.

    Positives (the samples matched to a ground truth; the box term ranges over them), in one order:
    ``gt_boxes`` and ``pred_boxes`` (P, 4) their matched ground-truth box and their detached predicted
    box (xyxy, network-input pixels), ``gt_ids`` (P,) the index of that ground truth among the batch's
    ground truths (image by image), ``box_loss()`` (P,) the unweighted box loss of each, computed when a
    method asks for it (feedback; its dtype is the one the sums are taken in). Ground truths of the
    batch: ``gt_areas`` (G,) and ``gt_counts`` (G,), the samples matched to each as the stage counts
    them (SCB's M_i).

    The class term: a size weight acts on its sized samples, ``cls_gt_boxes`` and ``cls_pred_boxes``
    (S, 4) the box sizing each under either source; the positives are ``cls_positives`` (P,) among them.
    Its hardness inputs cover every element of the term: ``cls_probs`` and ``cls_targets`` for a sigmoid
    classifier (probabilities and targets of one shape), or ``cls_logits`` (S, K) and ``cls_labels`` (S,)
    for a softmax one (class 0 the background, as torchvision's heads number them).

    ``valid`` (P,) bool marks the real positives where a detector keeps its samples dense instead (YOLO on
    a GPU passes every anchor, foreground marked, so that no shape depends on the data and nothing waits
    for the host); its class samples are then the same anchors. A method leaves the others out of every
    mean and sum; their weights are discarded. None: every positive is real.
    """

    gt_boxes: Tensor
    pred_boxes: Tensor
    gt_ids: Tensor
    box_loss: Callable[[], Tensor]
    gt_areas: Tensor
    gt_counts: Tensor
    cls_gt_boxes: Tensor
    cls_pred_boxes: Tensor
    cls_positives: Tensor
    cls_probs: Optional[Tensor] = None
    cls_targets: Optional[Tensor] = None
    cls_logits: Optional[Tensor] = None
    cls_labels: Optional[Tensor] = None
    valid: Optional[Tensor] = None

    def on_class_samples(self, positive_weights: Tensor) -> Tensor:
        """Weights of the positives spread over the class term's sized samples, 1 on the others."""
        ones = torch.ones(self.cls_gt_boxes.shape[0], dtype=positive_weights.dtype, device=positive_weights.device)
        return ones.index_put((self.cls_positives,), positive_weights)


@dataclass
class TermWeights:
    """What a method returns for one stage: ``box`` (P,) per positive, ``cls`` (S,) per sized class-term sample,
    ``cls_all`` in the shape of the class term's hardness inputs (every sample and class); None: untouched."""

    box: Optional[Tensor] = None
    cls: Optional[Tensor] = None
    cls_all: Optional[Tensor] = None


@dataclass(frozen=True)
class Method:
    """A size-aware method: its settings schema, the terms it may act on in each family, and its weights.

    ``settings`` maps each of its own settings to a validator (the defaults are ``cfg/losses/<name>.yaml``).
    ``family_terms`` maps a family (``FAMILY_TERMS``) to the terms it may act on there; the settings list
    the ones it does (``terms``, ``rcnn_terms``), except in the families of ``fixed_terms``, where it acts
    on all of them. ``weights(samples, settings, kinds, state)`` returns the ``TermWeights`` of one stage,
    ``kinds`` the kinds of term (``box``, ``cls``) configured there; None: the method is not a weight (NWD).
    ``new_state(settings)`` builds the running state each stage it weighs keeps (None: stateless).
    ``check(settings)`` says what its settings, each allowed alone, may not hold together: the settings to
    blame and a sentence, or None (no check: any combination).
    """

    name: str
    settings: dict[str, Validator]
    family_terms: dict[str, tuple[str, ...]]
    fixed_terms: frozenset[str] = frozenset()
    weights: Optional[Callable[..., TermWeights]] = None
    new_state: Optional[Callable[[dict], Any]] = None
    check: Optional[Callable[[dict], Optional[tuple[tuple[str, ...], str]]]] = None

    @property
    def schema(self) -> dict[str, Validator]:
        """Every setting of the method's section with its validator: its own, then the term lists."""
        lists = {FAMILY_TERMS[f][0]: terms(*allowed) for f, allowed in self.family_terms.items()
                 if f not in self.fixed_terms}
        return {**self.settings, **lists}

    def terms(self, settings: dict, family: str) -> tuple[str, ...]:
        """The terms ``settings`` (the method's resolved section) make it act on in ``family``."""
        if family in self.fixed_terms:
            return self.family_terms[family]
        return tuple(settings[FAMILY_TERMS[family][0]])
