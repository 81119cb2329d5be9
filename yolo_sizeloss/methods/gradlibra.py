"""Grad-Libra (Liu et al., MICCAI 2022, arXiv 2208.03779): a hardness weight on a classifier's loss."""

from __future__ import annotations

import torch
from torch import Tensor

from yolo_sizeloss.methods.base import MatchedSamples, Method, TermWeights, number


def gradlibra_weights(probs: Tensor, targets: Tensor, alpha_pos: float = 0.8, alpha_neg: float = 0.8) -> Tensor:
    """Grad-Libra hardness weight (Liu et al., MICCAI 2022, arXiv 2208.03779).

    With ``g = |p - t|`` (the gradient of BCE with respect to the logit), ``G = g - alpha*sin(g)``
    element-wise, ``alpha = alpha_pos`` where ``t > 0`` (soft targets count as positive) and
    ``alpha_neg`` where ``t == 0``. Multiply the element-wise BCE by ``G``.
    """
    g = (probs.detach().float() - targets.detach().float()).abs()
    alpha = alpha_pos if alpha_pos == alpha_neg else torch.where(targets > 0, alpha_pos, alpha_neg)
    return g - alpha * torch.sin(g)


def gradlibra_softmax_weights(
    logits: Tensor, labels: Tensor, alpha_pos: float = 0.8, alpha_neg: float = 0.8, background: int = 0
) -> Tensor:
    """Grad-Libra for a softmax cross-entropy classifier: this project's definition (docs/methods.md).

    ``logits`` (N, K), ``labels`` (N,) the true classes. For ``L = -log p_y`` with ``p = softmax(z)``,
    ``dL/dz_c = p_c - [c = y]``: the true logit's gradient has magnitude ``g = 1 - p_y``, which is also
    the largest of the K (the others are ``p_c`` and sum to ``1 - p_y``); with two classes the
    cross-entropy is the BCE of ``z_1 - z_0`` and ``g`` is that BCE's ``|p - t|``, so the form reduces to
    the paper's. ``G = g - alpha*sin(g)`` per sample, ``alpha = alpha_neg`` where the true class is
    ``background`` (the sigmoid form's target 0) and ``alpha_pos`` elsewhere. Multiply each sample's
    cross-entropy by ``G``.
    """
    probs = torch.softmax(logits.detach().float(), dim=-1)
    g = 1.0 - probs.gather(-1, labels[..., None].long()).squeeze(-1)
    alpha = alpha_pos if alpha_pos == alpha_neg else torch.where(labels != background, alpha_pos, alpha_neg)
    return g - alpha * torch.sin(g)


def weights(samples: MatchedSamples, settings: dict, kinds: tuple[str, ...], state: None = None) -> TermWeights:
    """``G`` on every element of the class term: the paper's sigmoid form, or the softmax form where the
    samples carry logits and labels."""
    if "cls" not in kinds:
        return TermWeights()
    alpha_pos, alpha_neg = settings["alpha_pos"], settings["alpha_neg"]
    if samples.cls_logits is not None:
        return TermWeights(cls_all=gradlibra_softmax_weights(
            samples.cls_logits, samples.cls_labels, alpha_pos, alpha_neg))
    return TermWeights(cls_all=gradlibra_weights(samples.cls_probs, samples.cls_targets, alpha_pos, alpha_neg))


METHOD = Method(
    name="gradlibra",
    settings={
        "alpha_pos": number(lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "alpha_neg": number(lambda v: 0 < v <= 1, "a number in (0, 1]"),
    },
    # a hardness weight on a classifier: YOLO's every class output, Faster R-CNN's two class terms
    family_terms={"yolo": ("cls",), "faster_rcnn": ("rpn_cls", "roi_cls")},
    fixed_terms=frozenset({"yolo"}),
    weights=weights,
)
