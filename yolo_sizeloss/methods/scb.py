"""Scale-balanced loss (Shuang et al., Pattern Recognition 117, 2021): a weight from the samples matched per object."""

from __future__ import annotations

import torch
from torch import Tensor

from yolo_sizeloss.methods.base import FAMILY_TERMS, MatchedSamples, Method, TermWeights, number


def scb_weights(counts: Tensor, alpha: float = 1.0, beta: float = 3.0) -> Tensor:
    """Scale-balanced weight (Shuang et al., Pattern Recognition 117, 2021).

    ``W_i = beta * (ln(M_i) + alpha) / M_i`` for an object matched by ``M_i`` positive anchors in its
    image (natural log). With alpha 1, beta 3: M=1 gives 3.0, 2 gives 2.54, 5 gives 1.57, 10 gives
    0.99. Counts below 1 (objects no anchor matched) are clamped to 1, so weights stay finite; a
    non-finite count carries no information and gets 1.
    """
    m = counts.detach().float()
    finite = torch.isfinite(m)
    m = torch.where(finite, m, 1.0).clamp(min=1.0)
    return torch.where(finite, beta * (torch.log(m) + alpha) / m, 1.0)


def weights(samples: MatchedSamples, settings: dict, kinds: tuple[str, ...], state: None = None) -> TermWeights:
    """Each positive takes ``W_i`` of its ground truth (``samples.gt_counts``); negatives of a class term 1."""
    w = scb_weights(samples.gt_counts, settings["alpha"], settings["beta"])[samples.gt_ids]
    return TermWeights(box=w if "box" in kinds else None, cls=samples.on_class_samples(w) if "cls" in kinds else None)


METHOD = Method(
    name="scb",
    settings={"alpha": number(lambda v: v > 0, "a number > 0"), "beta": number(lambda v: v > 0, "a number > 0")},
    # Faster R-CNN: SCB counts anchors per object, the RPN's matching
    family_terms={"yolo": FAMILY_TERMS["yolo"][1], "faster_rcnn": ("rpn_cls", "rpn_box")},
    weights=weights,
)
