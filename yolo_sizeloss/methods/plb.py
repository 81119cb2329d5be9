"""Pixel Level Balancing (Hu et al., Frontiers in Physiology 2022): a weight from each sample's box area."""

from __future__ import annotations

import torch
from torch import Tensor

from yolo_sizeloss.methods.base import FAMILY_TERMS, MatchedSamples, Method, TermWeights, box_areas, choice

PLB_EPS = 1e-6  # keeps the PLB mean away from zero for an all-zero batch


def plb_weights(areas: Tensor, eps: float = PLB_EPS, valid: Tensor | None = None) -> Tensor:
    """Pixel Level Balancing (Hu et al., Frontiers in Physiology 2022).

    ``PLB_i = 2*m / (a_i + m)`` with ``m`` the mean of all finite ``areas`` passed in (pool them over
    the whole batch before calling). An average-sized box gets 1, a box of area -> 0 tends to 2, a
    lone box gets 1; the range is ``[2/(n+1), 2)``. ``eps`` is added to every area, so zero areas
    give finite weights (all-zero areas are all average-sized: 1 each). A non-finite area (a NaN or
    inf predicted box) gets 1 and stays out of ``m``, so one bad box cannot poison the others; so does
    an area ``valid`` marks False (a padding sample).
    """
    areas = areas.detach().float()
    finite = torch.isfinite(areas) if valid is None else torch.isfinite(areas) & valid
    areas = torch.where(finite, areas, 0.0) + eps
    mean = (areas * finite).sum() / finite.sum().clamp(min=1)
    return torch.where(finite, 2 * mean / (areas + mean), 1.0)


def weights(samples: MatchedSamples, settings: dict, kinds: tuple[str, ...], state: None = None) -> TermWeights:
    """PLB on each configured term, its mean pooled over the term's samples, sized by ``settings['source']``:
    the matched ground truth (negatives of a class term: the box they were matched on) or the prediction."""
    gt = settings["source"] == "gt"
    return TermWeights(
        box=plb_weights(box_areas(samples.gt_boxes if gt else samples.pred_boxes), valid=samples.valid)
        if "box" in kinds else None,
        cls=plb_weights(box_areas(samples.cls_gt_boxes if gt else samples.cls_pred_boxes), valid=samples.valid)
        if "cls" in kinds else None,
    )


METHOD = Method(
    name="plb",
    settings={"source": choice("predicted", "gt")},
    family_terms={family: all_terms for family, (_, all_terms) in FAMILY_TERMS.items()},
    weights=weights,
)
