"""Normalized Gaussian Wasserstein Distance (Wang, Xu, Yang, Yu, arXiv 2110.13389): not a weight.

NWD replaces part of a box term (each family mixes ``1 - nwd`` into its box loss) and, optionally, the
overlap its assigner or matcher measures (``overlaps.NWDOverlap``). Here: the similarity, its settings,
and the resolution of the settings that are ``auto`` from the training boxes; what a run trains with once
they are resolved is ``overlaps.ResolvedNWD``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from yolo_sizeloss.methods.base import Method, choice, number

NWD_EPS = 1e-7  # under NWD's square root, as in the authors' code (github.com/jwwangchn/NWD)


def _gaussian_vector(boxes: torch.Tensor) -> torch.Tensor:
    """``(cx, cy, w/2, h/2)`` of xyxy boxes: the mean and standard deviations of NWD's Gaussian."""
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, (boxes[..., 2:] - boxes[..., :2]) / 2], -1)


def nwd(boxes_a: torch.Tensor, boxes_b: torch.Tensor, constant: float, eps: float = NWD_EPS) -> torch.Tensor:
    """Normalized Gaussian Wasserstein Distance (Wang, Xu, Yang, Yu, arXiv 2110.13389), element-wise.

    ``boxes_a`` and ``boxes_b`` are (N, 4) xyxy boxes (or any (..., 4) of one shape); returns (N,). A box (cx, cy, w, h) is the
    Gaussian N((cx, cy), diag(w^2/4, h^2/4)); between two such Gaussians the squared 2-Wasserstein
    distance is ``W2^2 = ||(cx_a, cy_a, w_a/2, h_a/2) - (cx_b, cy_b, w_b/2, h_b/2)||^2`` and
    ``NWD = exp(-sqrt(W2^2) / C)`` with ``C = constant`` (see ``nwd_constant``). NWD is 1 for
    identical boxes, in (0, 1] always, symmetric, and depends on the absolute offset only: a 1-pixel
    shift costs a 4x4 box what it costs a 100x100 box, where IoU would punish the small one far more.
    ``eps`` is added under the square root, as in the authors' code, so the gradient of identical
    boxes is 0 instead of NaN (sqrt has an infinite slope at 0); identical boxes then give
    ``exp(-sqrt(eps) / C)``, 1 to within 3.2e-4 / C. Zero-size boxes are finite Gaussians (points).
    Differentiable: use it in a box loss as ``1 - nwd``.
    """
    w2_squared = ((_gaussian_vector(boxes_a) - _gaussian_vector(boxes_b)) ** 2).sum(-1)
    return torch.exp(-torch.sqrt(w2_squared + eps) / constant)


@torch.no_grad()
def nwd_matrix(boxes_a: torch.Tensor, boxes_b: torch.Tensor, constant: float, eps: float = NWD_EPS) -> torch.Tensor:
    """NWD of every pair: (M, N) for (M, 4) and (N, 4) xyxy boxes, entry [i, j] = ``nwd(boxes_a[i], boxes_b[j])``.

    For a matcher (Faster R-CNN's RPN compares every ground truth with every anchor, as ``box_iou``
    does), so not differentiated. The distances come from ``torch.cdist`` without its matrix-product
    shortcut, which would lose the small distances of near-identical boxes to cancellation, and
    without an (M, N, 4) intermediate, so memory stays that of ``box_iou``'s (M, N) result.
    """
    w2 = torch.cdist(_gaussian_vector(boxes_a.float()), _gaussian_vector(boxes_b.float()),
                     compute_mode="donot_use_mm_for_euclid_dist")
    return torch.exp(-torch.sqrt(w2.square() + eps) / constant)


NWD_ASSIGNER_MAX_SMALL_SHARE = 0.5  # nwd.assigner: auto ranks anchors by NWD while small boxes are a minority


def nwd_assigner_auto(widths: torch.Tensor, heights: torch.Tensor, small_area: float) -> tuple[bool, str]:
    """``nwd.assigner: auto``: whether the assigner measures overlap by NWD, from the training boxes.

    NWD as the assigner's overlap raises the target scores of small objects, whose CIoU with an
    early prediction is low. Where small objects are a minority among larger ones, those low
    targets are what holds them back (on BCCD the NWD assigner is what raises platelet AP); where
    nearly every object is small there is nothing to rebalance and the raised confidence reaches
    unlabelled objects too (BCCD's platelets alone lost AP with it, not without it). So: NWD while
    small boxes (``w * h < small_area``) are fewer than half of the finite boxes, CIoU otherwise. A
    rule of this project, measured on those two data sets (docs/results.md), not the paper's.
    Returns the decision and a sentence for the log.
    """
    share, count = small_share(widths, heights, small_area, "nwd_assigner_auto")
    use = share < NWD_ASSIGNER_MAX_SMALL_SHARE
    reason = (f"{share:.1%} of {count} training boxes are small, below {small_area:g} input pixels; "
              f"NWD ranks anchors only where fewer than {NWD_ASSIGNER_MAX_SMALL_SHARE:.0%} are")
    return use, reason


def small_share(widths: torch.Tensor, heights: torch.Tensor, small_area: float, caller: str) -> tuple[float, int]:
    """The share of the finite boxes that are small (``w * h < small_area``), and how many boxes counted."""
    areas = finite_box_areas(widths, heights, caller)
    return float((areas < small_area).double().mean()), areas.numel()


def needs_training_boxes(settings: dict[str, Any]) -> bool:
    """Whether resolving ``nwd``'s ``settings`` reads the training boxes (``resolve_nwd_auto``)."""
    return ("auto" in (settings["constant"], settings["assigner"]) or settings["max_small_share"] < 1
            or gates_by_class(settings))


def gates_by_class(settings: dict[str, Any]) -> bool:
    """Whether ``nwd.assigner_classes`` is ``small`` (settings saved before the setting existed: ``all``)."""
    return settings.get("assigner_classes", "all") == "small"


def small_classes(widths: torch.Tensor, heights: torch.Tensor, classes: torch.Tensor, small_area: float,
                  caller: str) -> tuple[int, ...]:
    """The classes more than half of whose finite training boxes are small (``w * h < small_area``), ascending;
    a ValueError naming ``caller`` when no box is finite.

    A class's boxes at the size Ultralytics loads them (before augmentation): its median box is small. Scale
    jitter makes some boxes of every class small in a training batch (on the control set 1.5% of the boxes
    are small as loaded, 14% in augmented batches; docs/results.md), and those are not the objects a user's
    small class holds.
    """
    areas, finite = areas_and_finite(widths, heights, caller)
    areas, classes = areas[finite], classes.long()[finite]
    found = []
    for value in classes.unique().tolist():
        mine = areas[classes == value]
        if float((mine < small_area).double().mean()) > 0.5:
            found.append(int(value))
    return tuple(found)


class ResolvedSettings(NamedTuple):
    """What ``resolve_nwd_auto`` made of ``nwd``'s settings for one run (also what a checkpoint recorded of them;
    ``overlaps.ResolvedNWD.from_settings`` takes it)."""

    constant: float | None  # None: a record without one (no nwd)
    assigner: bool | str | None
    active: bool = True  # False: nwd.max_small_share turned NWD off
    classes: tuple[int, ...] | None = None  # the classes the assigner measures by nwd.assigner's overlap; None: all
    lines: tuple[str, ...] = ()  # a log line for each setting resolved


def resolve_nwd_auto(
    settings: dict[str, Any], widths: torch.Tensor, heights: torch.Tensor, classes: torch.Tensor, imgsz: int,
) -> ResolvedSettings:
    """``nwd``'s settings as a run trains with them, from its training boxes (``widths``, ``heights`` in
    network-input pixels at ``imgsz``, ``classes`` their class ids): the constant (``auto``:
    ``nwd_constant``), the assigner (``auto``: ``nwd_assigner_auto``), whether NWD acts at all
    (``max_small_share``: not where a larger share of the boxes is small; then the assigner is the stock one
    and the box loss the stock one), the classes whose ground truths the assigner measures by its overlap
    (``assigner_classes: small``: ``small_classes``; none of them, the stock assigner), and a log line for
    each one resolved. Both detector families call this once when training starts; no finite box with a
    setting that needs boxes raises ValueError."""
    constant, assigner = settings["constant"], settings["assigner"]
    lines, active, measured = [], True, None
    try:
        if settings["max_small_share"] < 1:
            share, count = small_share(widths, heights, settings["small_area"], "nwd.max_small_share")
            active = share <= settings["max_small_share"]
            lines.append(f"nwd {'acts' if active else 'is off, the stock loss trains'} ({share:.1%} of {count} "
                         f"training boxes are small, below {settings['small_area']:g} input pixels; "
                         f"nwd.max_small_share {settings['max_small_share']:g})")
        if constant == "auto":
            constant = nwd_constant(widths, heights)
            lines.append(f"nwd.constant auto = {constant:.2f} input pixels "
                         f"(mean sqrt(w*h) of {widths.numel()} training boxes at imgsz {imgsz})")
        if assigner == "auto":
            assigner, reason = nwd_assigner_auto(widths, heights, settings["small_area"])
            lines.append(f"nwd.assigner auto = {str(assigner).lower()} ({reason})")
        if gates_by_class(settings):
            measured = small_classes(widths, heights, classes, settings["small_area"], "nwd.assigner_classes")
            if not measured:
                assigner = False
            lines.append(f"nwd.assigner_classes small = {list(measured)} (classes more than half of whose training "
                         f"boxes are below {settings['small_area']:g} input pixels"
                         + ("; none: the stock assigner ranks every ground truth)" if not measured else ")"))
    except ValueError:
        raise ValueError("nwd: auto settings, max_small_share and assigner_classes small need boxes, and the "
                         "training labels hold none: set nwd.constant to a number, nwd.assigner to true or false, "
                         "nwd.max_small_share to 1 and nwd.assigner_classes to all") from None
    return ResolvedSettings(float(constant), assigner if active else False, active, measured, tuple(lines))


def nwd_constant(widths: torch.Tensor, heights: torch.Tensor) -> float:
    """The NWD constant ``C`` of a data set: its mean absolute object size, ``mean(sqrt(w * h))``.

    Wang et al. set C to the average absolute object size of their data set (AI-TOD; the authors'
    code, github.com/jwwangchn/NWD, defaults to 12.8 pixels). Pass every training box's width and
    height in the pixels the loss sees. Boxes with a non-finite size are left out; no finite box at
    all raises ValueError.
    """
    return float(finite_box_areas(widths, heights, "nwd_constant").sqrt().mean())


def areas_and_finite(widths: torch.Tensor, heights: torch.Tensor, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``w * h`` (float64, sides below zero as zero) of every box, and which of them are finite; a ValueError
    naming ``caller`` when none is."""
    areas = widths.detach().double().clamp(min=0) * heights.detach().double().clamp(min=0)
    finite = torch.isfinite(areas)
    if not finite.any():
        raise ValueError(f"{caller}: no box with a finite width and height")
    return areas, finite


def finite_box_areas(widths: torch.Tensor, heights: torch.Tensor, caller: str) -> torch.Tensor:
    """``w * h`` (float64, sides below zero as zero) of the boxes whose area is finite; a ValueError
    naming ``caller`` when none is."""
    areas, finite = areas_and_finite(widths, heights, caller)
    return areas[finite]


def assigner_window(settings: dict[str, Any], epochs: int) -> tuple[int, int]:
    """The epochs of a run of ``epochs`` in which the assigner measures by ``nwd.assigner``'s overlap, as
    ``range(first, end)`` (epochs from 0): from ``nwd.assigner_from`` of them to ``nwd.assigner_until`` of them,
    each share of ``epochs`` rounded half up (not Python's half to even), at least one epoch; the detector's
    stock overlap ranks anchors before and after.

    A lenient overlap matters most while predictions are poor: an untrained model's CIoU with a small
    object is near 0, and so are the object's target scores (on BCCD 0.07 per object under the stock
    assigner, 2.3-2.8 under NWD-family ones), while a trained model's stock targets reach a third to half
    of the lenient ones (docs/results.md section 10). Handing assignment back to the stock measure after
    a warm-up (``assigner_until``) follows PP-YOLOE, which ranks by a static assigner (ATSS) for the first
    third of its epochs and by the task-aligned one after (``static_assigner_epoch``: 100 of 300). The
    reverse (``assigner_from``) keeps the stock assignment while the model learns the larger objects: where
    small objects are many, lenient targets from the first step hand them a large share of the loss before
    they can be localised (docs/results.md section 10, aerial cars).
    """
    first = min(epochs - 1, math.floor(settings["assigner_from"] * epochs + 0.5))
    return first, max(first + 1, math.floor(settings["assigner_until"] * epochs + 0.5))


def assigner_decided_in_training(settings: dict[str, Any]) -> bool:
    """Whether a run's assigner measure is decided while it trains (``assigner: auto`` from the labels,
    ``assigner_from`` above 0 or ``assigner_until`` below 1 by the epoch), so that results.csv records it as
    ``nwd/assigner``; runs without any keep the columns they had, and older runs resume into them."""
    return (settings.get("assigner") == "auto" or settings.get("assigner_from", 0) > 0
            or settings.get("assigner_until", 1) < 1)


def check_settings(settings: dict[str, Any]) -> tuple[tuple[str, ...], str] | None:
    """What ``nwd``'s settings may not hold together (``Method.check``): an empty assigner window."""
    start, until = settings["assigner_from"], settings["assigner_until"]
    if start >= until:
        return ("assigner_from", "assigner_until"), (
            f"nwd.assigner_from ({start:g}) must be below nwd.assigner_until ({until:g}): the assigner measures by "
            "nwd.assigner's overlap between them")
    return None


ASSIGNER_MEASURES = ("safit", "simd")  # nwd.assigner may name another measure (methods.safit, methods.simd) instead of NWD
# SAFit's IoU member in an assigner (nwd.assigner: safit): plain IoU (the paper's), or the stock assigner's own
# overlap (YOLO: its CIoU; Faster R-CNN's RPN matcher: IoU, the same as plain), so that large ground truths are
# assigned as the stock loss assigns them
SAFIT_ASSIGNER_IOUS = ("iou", "stock")
# which ground truths the assigner measures by nwd.assigner's overlap: every one (the paper's), or those of the
# classes whose boxes are mostly small as loaded (small_classes), the others by the stock overlap
ASSIGNER_CLASSES = ("all", "small")
BOX_MEASURES = ("nwd", "safit", "simd")  # what nwd.box_measure may mix into the box loss (methods.overlaps.box_similarity)
# what YOLO's losses divide by: the assignment's own target-score sum (Ultralytics'), or the sum the stock CIoU
# would give the same positives (yolo.normaliser); Faster R-CNN's RPN divides by its sampled anchors, a count
# no overlap changes, so both train the same loss there
NORMALISERS = ("assigned", "ciou")
# what weighs each positive anchor's box terms in YOLO's box loss: its assigned target score (Ultralytics'), or the
# one the stock CIoU would give it (yolo.normaliser); Faster R-CNN's RPN weighs its sampled positives alike
BOX_WEIGHTS = ("assigned", "ciou")


def _flag_auto_or_measure(value: Any) -> tuple[bool, str]:
    # 'auto': decided from the training labels when training starts (nwd_assigner_auto); a measure's name:
    # the assigner measures overlap by that one (overlaps.ResolvedNWD.overlap), the box loss keeps NWD
    allowed = f"true, false, auto or a measure: {', '.join(ASSIGNER_MEASURES)}"
    return isinstance(value, bool) or value == "auto" or value in ASSIGNER_MEASURES, allowed


def _positive_or_auto(value: Any) -> tuple[bool, str]:
    # 'auto': resolved from the training labels when training starts (resolve_nwd_auto)
    allowed = "a number > 0 (network-input pixels) or auto"
    return value == "auto" or number(lambda v: v > 0, allowed)(value)[0], allowed


METHOD = Method(
    name="nwd",
    settings={
        "ratio": number(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "constant": _positive_or_auto,
        "assigner": _flag_auto_or_measure,
        "assigner_from": number(lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "assigner_until": number(lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "assigner_classes": choice(*ASSIGNER_CLASSES),
        "box_measure": choice(*BOX_MEASURES),
        "safit_spread": number(lambda v: v > 0, "a number > 0 (network-input pixels)"),
        "safit_assigner_iou": choice(*SAFIT_ASSIGNER_IOUS),
        "small_area": number(lambda v: v > 0, "a number > 0 (network-input pixels squared)"),
        "max_small_share": number(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "normaliser": choice(*NORMALISERS),
        "box_weights": choice(*BOX_WEIGHTS),
    },
    # YOLO: always its box loss; Faster R-CNN: NWD replaces part of a box term, of the two listed
    family_terms={"yolo": ("box",), "faster_rcnn": ("rpn_box", "roi_box")},
    fixed_terms=frozenset({"yolo"}),
    check=check_settings,
)
