"""Overlap measures an assigner or matcher takes as an object (as MMDetection's assigners take an ``iou_calculator``).

An ``Overlap`` measures boxes two ways: ``pairwise`` every box of one set against every box of the other
(a matcher's quality matrix: torchvision's RPN ``box_similarity``), and ``elementwise`` the pairs of
two aligned sets (the candidate pairs of Ultralytics' ``TaskAlignedAssigner.iou_calculation``). Each
family hands the configured measure to its stock assigner or matcher in place of the stock one; a new
measure is its formula's module (``methods.nwd``, ``methods.safit``, ``methods.simd``) and one new class
here; ``box_similarity`` names the same measures for a box loss. ``ResolvedNWD`` is a run's ``nwd``
settings as it trains with them: the one reading of them for both families, which hands out the
assigner's overlap and the box loss's similarity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
from torch import Tensor
from torchvision.ops import box_iou

from yolo_sizeloss.methods.base import elementwise_iou
from yolo_sizeloss.methods.nwd import (
    ResolvedSettings,
    assigner_decided_in_training,
    assigner_window,
    gates_by_class,
    nwd,
    nwd_matrix,
)
from yolo_sizeloss.methods.safit import SAFIT_SIZE, safit, safit_matrix
from yolo_sizeloss.methods.simd import SIMD_RELEASED_NORMALISERS, simd, simd_matrix


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


def _known_constant(constant: Optional[float], unresolved_hint: str) -> float:
    """NWD's constant; None, an ``auto`` one not yet resolved, is a RuntimeError that says what to do: the
    caller's family's ``unresolved_hint``, or a number in the settings."""
    if constant is None:
        raise RuntimeError(f"nwd.constant is auto but was not resolved: {unresolved_hint}, or set a number")
    return constant


class NWDOverlap:
    """NWD (``methods.nwd``) with constant ``C`` (network-input pixels), in (0, 1] as IoU is in [0, 1].

    ``constant`` None is an ``auto`` setting not yet resolved: measuring, not building, raises
    (``_known_constant``, with ``unresolved_hint``), so that a model built before the labels are read is fine.
    """

    def __init__(self, constant: Optional[float], unresolved_hint: str):
        self.constant, self.unresolved_hint = constant, unresolved_hint

    def pairwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        return nwd_matrix(boxes_a, boxes_b, _known_constant(self.constant, self.unresolved_hint))

    def elementwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        """Computed in float32 (mixed precision hands in halves), returned in ``boxes_b``'s dtype."""
        constant = _known_constant(self.constant, self.unresolved_hint)
        return nwd(boxes_a.float(), boxes_b.float(), constant).to(boxes_b.dtype)


class SAFitOverlap:
    """SAFit (``methods.safit.safit``): IoU for large ground truths, NWD (constant ``nwd_constant``) for
    tiny ones, blended per box at size ``size`` over ``spread`` pixels (``methods.safit.safit_blend_weight``).
    ``elementwise`` takes (ground truths, boxes), as the task-aligned assigner passes them; its IoU member
    is ``stock_elementwise`` of the same pairs where given (the assigner's own overlap, Ultralytics'
    clamped CIoU, so that large ground truths are ranked and scored as the stock assigner does), else
    plain IoU. ``pairwise`` (a matcher's) always uses plain IoU, torchvision's RPN matcher's own."""

    def __init__(self, nwd_constant: float, size: float = SAFIT_SIZE, spread: float | None = None,
                 stock_elementwise: Optional[Callable[[Tensor, Tensor], Tensor]] = None):
        self.nwd_constant, self.size, self.spread = nwd_constant, size, spread
        self.stock_elementwise = stock_elementwise

    def pairwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        return safit_matrix(boxes_a, boxes_b, self.nwd_constant, self.size, self.spread)

    def elementwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        """Computed in float32, returned in ``boxes_b``'s dtype."""
        iou = None if self.stock_elementwise is None else self.stock_elementwise(boxes_a, boxes_b).float()
        return safit(boxes_b.float(), boxes_a.float(), self.nwd_constant, self.size, iou=iou,
                     spread=self.spread).to(boxes_b.dtype)


class SimDOverlap:
    """SimD (``methods.simd.simd``) with normalisers ``m_x``, ``m_y``."""

    def __init__(self, m_x: float = SIMD_RELEASED_NORMALISERS[0], m_y: float = SIMD_RELEASED_NORMALISERS[1]):
        self.m_x, self.m_y = m_x, m_y

    def pairwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        return simd_matrix(boxes_a, boxes_b, self.m_x, self.m_y)

    def elementwise(self, boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
        """Computed in float32, returned in ``boxes_b``'s dtype."""
        return simd(boxes_a.float(), boxes_b.float(), self.m_x, self.m_y).to(boxes_b.dtype)


def box_similarity(measure: str, pred_boxes: Tensor, gt_boxes: Tensor, nwd_constant: float | None,
                   iou: Tensor | None = None, safit_spread: float | None = None) -> Tensor:
    """The similarity ``nwd.box_measure`` names, of aligned predicted and ground-truth boxes, for a box loss
    that mixes in ``1 - similarity`` (both families): ``nwd`` (``methods.nwd.nwd``), ``safit`` (``iou``
    as its IoU member: the detector's own overlap, Ultralytics' CIoU, so that large boxes keep the stock
    term; plain IoU when None; its blend's ``safit_spread``) or ``simd`` (no constant). ``nwd_constant``
    may be None for ``simd`` only."""
    if measure == "simd":
        return simd(pred_boxes, gt_boxes)
    if nwd_constant is None:
        raise ValueError(f"box measure {measure} needs NWD's constant")
    if measure == "nwd":
        return nwd(pred_boxes, gt_boxes, nwd_constant)
    if measure == "safit":
        return safit(pred_boxes, gt_boxes, nwd_constant, iou=iou, spread=safit_spread)
    raise ValueError(f"unknown box measure {measure!r}")


@dataclass(frozen=True)
class ResolvedNWD:
    """``nwd``'s settings as a run trains with them; both families measure through it (YOLO's
    ``AnchorWeighting.nwd``, Faster R-CNN's ``LossSwitches.nwd``): the constant, the assigner's overlap, the
    classes it measures and the box loss's similarity.

    ``settings`` is the resolved settings dict (None: no ``nwd``). ``constant`` is NWD's C in network-input
    pixels and ``assigner`` the ``nwd.assigner`` decision, each None while an ``auto`` one waits for the
    training boxes (``methods.nwd.resolve_nwd_auto``); ``active`` is False where ``nwd.max_small_share``
    turned NWD off, the assigner then False too (the stock loss trains). ``classes`` are the classes whose
    ground truths the assigner measures by its overlap (``nwd.assigner_classes: small``), every other one by the
    stock overlap; None: every class. ``unresolved_hint`` says what the holder's family does to resolve them,
    for the errors measuring raises meanwhile.
    """

    settings: Optional[dict[str, Any]] = None
    constant: Optional[float] = None
    assigner: bool | str | None = False
    active: bool = True
    unresolved_hint: str = ""
    classes: Optional[tuple[int, ...]] = None
    # ``classes`` as a tensor on each device ``measured_gts`` was asked about, made on the first call there: a
    # tensor built from a tuple on every step is a host-to-device copy, which makes the host wait for the GPU
    class_ids: dict[torch.device, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: Optional[dict[str, Any]], unresolved_hint: str,
                      resolved: Optional[ResolvedSettings] = None) -> "ResolvedNWD":
        """The state of ``settings`` (None: no ``nwd``): the constant and assigner they set, else (``auto``)
        those of ``resolved``, what ``resolve_nwd_auto`` made of them (None: not yet resolved); the assigner
        False where ``resolved`` says NWD is not active, and where ``nwd.assigner_classes: small`` found no
        class (its ``classes`` empty)."""
        constant, assigner, active, classes, _ = resolved or ResolvedSettings(None, None)
        if settings is None:
            return cls(active=active, unresolved_hint=unresolved_hint)
        if settings["constant"] != "auto":
            constant = float(settings["constant"])
        if settings["assigner"] != "auto":
            assigner = settings["assigner"]
        if not gates_by_class(settings):
            classes = None
        elif classes is not None:
            classes = tuple(int(c) for c in classes)
            assigner = assigner if classes else False
        return cls(settings, constant, assigner if active else False, active, unresolved_hint, classes)

    @property
    def ratio(self) -> float:
        """NWD's share of a box term it mixes into (``nwd.ratio``); 0 without NWD or where it is off."""
        return self.settings["ratio"] if self.settings is not None and self.active else 0.0

    def assigner_acts(self, epoch: int, epochs: int) -> bool:
        """Whether the assigner or matcher measures by ``nwd.assigner``'s overlap in ``epoch`` (from 0) of
        ``epochs``: where it does at all, from ``nwd.assigner_from`` to ``nwd.assigner_until`` of them
        (``assigner_window``)."""
        if not self.assigner:
            return False
        first, end = assigner_window(self.settings, epochs)
        return first <= epoch < end

    def overlap(self, stock_elementwise: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> Optional[Overlap]:
        """The overlap the assigner or matcher measures for ``nwd.assigner``: NWD (true), SAFit (over
        ``nwd.safit_spread`` pixels) or SimD (by name), or None (false: the detector's stock measure).
        ``stock_elementwise`` is the assigner's own element-wise overlap (YOLO's CIoU), SAFit's IoU member
        where ``nwd.safit_assigner_iou`` is ``stock``."""
        if self.assigner is None:
            raise RuntimeError(f"nwd.assigner is auto but was not resolved: {self.unresolved_hint}, "
                               "or set true or false")
        if self.assigner is True:
            return NWDOverlap(self.constant, self.unresolved_hint)
        if self.assigner == "safit":
            stock = stock_elementwise if self.settings["safit_assigner_iou"] == "stock" else None
            return SAFitOverlap(_known_constant(self.constant, self.unresolved_hint),
                                spread=self.settings["safit_spread"], stock_elementwise=stock)
        if self.assigner == "simd":
            return SimDOverlap()
        return None

    @property
    def gates_classes(self) -> bool:
        """Whether the assigner measures only some classes' ground truths by ``nwd.assigner``'s overlap
        (``nwd.assigner_classes: small``), the others by the stock overlap."""
        return self.settings is not None and gates_by_class(self.settings)

    def measured_gts(self, gt_classes: Tensor) -> Tensor:
        """Bool, ``gt_classes``' shape: which ground truths (by class id) the assigner measures by
        ``nwd.assigner``'s overlap, where it ``gates_classes``."""
        if self.classes is None:
            raise RuntimeError(f"nwd.assigner_classes is small but was not resolved: {self.unresolved_hint}")
        ids = self.class_ids.get(gt_classes.device)
        if ids is None:
            ids = self.class_ids[gt_classes.device] = torch.tensor(self.classes, dtype=torch.long,
                                                                   device=gt_classes.device)
        return torch.isin(gt_classes.long(), ids)

    def box_similarity(self, pred_boxes: Tensor, gt_boxes: Tensor, iou: Optional[Tensor] = None) -> Tensor:
        """Element-wise ``nwd.box_measure`` (``box_similarity``) of predicted boxes and their ground
        truths, float32; ``iou``, the pairs' overlap by the detector's own measure, is SAFit's IoU member
        (None: plain IoU)."""
        measure = self.settings["box_measure"]
        # SimD has no constant: an unresolved one is no error there
        constant = self.constant if measure == "simd" else _known_constant(self.constant, self.unresolved_hint)
        return box_similarity(measure, pred_boxes.float(), gt_boxes.float(), constant,
                              None if iou is None else iou.float(), self.settings["safit_spread"])

    def epoch_columns(self, assigner_acts: bool) -> dict[str, float]:
        """NWD's results.csv columns of an epoch, each only where it says something: ``nwd/constant``, the C
        trained with (also when it was ``auto``); ``nwd/assigner`` where the assigner's measure is decided
        in training (``assigner_decided_in_training``), 1 while ``assigner_acts``; ``nwd/active`` with a
        ``max_small_share`` below 1, 0 where the stock loss trained."""
        settings = self.settings or {}
        columns = {} if self.constant is None else {"nwd/constant": self.constant}
        if assigner_decided_in_training(settings):
            columns["nwd/assigner"] = float(assigner_acts)
        if settings.get("max_small_share", 1) < 1:
            columns["nwd/active"] = float(self.active)
        return columns
