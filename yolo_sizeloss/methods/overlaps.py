"""Overlap measures an assigner or matcher takes as an object (as MMDetection's assigners take an ``iou_calculator``).

An ``Overlap`` measures boxes two ways: ``pairwise`` every box of one set against every box of the other
(a matcher's quality matrix: torchvision's RPN ``box_similarity``), and ``elementwise`` the pairs of
two aligned sets (the candidate pairs of Ultralytics' ``TaskAlignedAssigner.iou_calculation``). Each
family hands the configured measure to its stock assigner or matcher in place of the stock one; a new
measure is one new class here.
"""

from __future__ import annotations

from typing import Optional, Protocol

from torch import Tensor
from torchvision.ops import box_iou

from yolo_sizeloss.methods.measures import (
    SAFIT_SIZE, SIMD_RELEASED_NORMALISERS, elementwise_iou, safit, safit_matrix, simd, simd_matrix)
from yolo_sizeloss.methods.nwd import nwd, nwd_matrix


class Overlap(Protocol):
    """A similarity of xyxy boxes: higher is closer."""

    def pairwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        """(M, N) for (M, 4) and (N, 4) boxes: entry [i, j] compares ``boxes_a[i]`` with ``boxes_b[j]``."""

    def elementwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        """(N,) for two (N, 4) sets: entry i compares ``boxes_a[i]`` with ``boxes_b[i]``."""


class IoU:
    """Intersection over union: torchvision's ``box_iou`` itself as ``pairwise`` (the RPN matcher's stock measure)."""

    pairwise = staticmethod(box_iou)
    elementwise = staticmethod(elementwise_iou)


class NWDOverlap:
    """NWD (``methods.nwd``) with constant ``C`` (network-input pixels), in (0, 1] as IoU is in [0, 1].

    ``constant`` None is an ``auto`` setting not yet resolved: measuring raises a RuntimeError whose
    message ends with ``unresolved_hint`` (what the caller's family does to resolve it).
    """

    def __init__(self, constant: Optional[float], unresolved_hint: str):
        self.constant, self.unresolved_hint = constant, unresolved_hint

    def _c(self) -> float:
        if self.constant is None:
            raise RuntimeError(f"nwd.constant is auto but was not resolved: {self.unresolved_hint}")
        return self.constant

    def pairwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        return nwd_matrix(boxes_a, boxes_b, self._c())

    def elementwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        """Computed in float32 (mixed precision hands in halves), returned in ``boxes_b``'s dtype."""
        return nwd(boxes_a.float(), boxes_b.float(), self._c()).to(boxes_b.dtype)


class SAFitOverlap:
    """SAFit (``methods.measures.safit``): IoU for large ground truths, NWD (constant ``nwd_constant``) for
    tiny ones, blended per box at size ``size`` over ``spread`` pixels (``measures.safit_blend_weight``).
    ``elementwise`` takes (ground truths, boxes), as the task-aligned assigner passes them."""

    def __init__(self, nwd_constant: float, size: float = SAFIT_SIZE, spread: float | None = None):
        self.nwd_constant, self.size, self.spread = nwd_constant, size, spread

    def pairwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        return safit_matrix(boxes_a, boxes_b, self.nwd_constant, self.size, self.spread)

    def elementwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        """Computed in float32, returned in ``boxes_b``'s dtype."""
        return safit(boxes_b.float(), boxes_a.float(), self.nwd_constant, self.size,
                     spread=self.spread).to(boxes_b.dtype)


class SimDOverlap:
    """SimD (``methods.measures.simd``) with normalisers ``m_x``, ``m_y``."""

    def __init__(self, m_x: float = SIMD_RELEASED_NORMALISERS[0], m_y: float = SIMD_RELEASED_NORMALISERS[1]):
        self.m_x, self.m_y = m_x, m_y

    def pairwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        return simd_matrix(boxes_a, boxes_b, self.m_x, self.m_y)

    def elementwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        """Computed in float32, returned in ``boxes_b``'s dtype."""
        return simd(boxes_a.float(), boxes_b.float(), self.m_x, self.m_y).to(boxes_b.dtype)


def assigner_overlap(assigner: bool | str, nwd_constant: Optional[float], unresolved_hint: str,
                     safit_spread: Optional[float] = None) -> Optional[Overlap]:
    """The overlap an assigner or matcher measures for a resolved ``nwd.assigner`` setting: NWD (true),
    SAFit (its blend over ``safit_spread`` pixels) or SimD (by name), or None (false: the detector's
    stock measure). The one reading of the setting for both families."""
    if assigner is True:
        return NWDOverlap(nwd_constant, unresolved_hint)
    if assigner == "safit":
        if nwd_constant is None:
            raise RuntimeError(f"nwd.constant is auto but was not resolved: {unresolved_hint}")
        return SAFitOverlap(nwd_constant, spread=safit_spread)
    if assigner == "simd":
        return SimDOverlap()
    return None
