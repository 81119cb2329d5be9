"""The size-aware formulas as pure functions (definitions, sources and choices: docs/methods.md).

The weight functions take detached tensors and return weights that scale a loss; none of them is
ever differentiated. ``nwd`` is the exception: a similarity meant to be differentiated inside a box
loss. The detector glue (``yolo_sizeloss.yolo.loss`` for Ultralytics, ``yolo_sizeloss.rcnn`` for
torchvision) decides which boxes or anchors enter and which loss terms the weights multiply.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

PLB_EPS = 1e-6  # keeps the PLB mean away from zero for an all-zero batch
NWD_EPS = 1e-7  # under NWD's square root, as in the authors' code (github.com/jwwangchn/NWD)


def box_areas(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of xyxy boxes ``(..., 4)`` (widths and heights below zero count as zero)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def plb_weights(areas: torch.Tensor, eps: float = PLB_EPS) -> torch.Tensor:
    """Pixel Level Balancing (Hu et al., Frontiers in Physiology 2022).

    ``PLB_i = 2*m / (a_i + m)`` with ``m`` the mean of all finite ``areas`` passed in (pool them over
    the whole batch before calling). An average-sized box gets 1, a box of area -> 0 tends to 2, a
    lone box gets 1; the range is ``[2/(n+1), 2)``. ``eps`` is added to every area, so zero areas
    give finite weights (all-zero areas are all average-sized: 1 each). A non-finite area (a NaN or
    inf predicted box) gets 1 and stays out of ``m``, so one bad box cannot poison the others.
    """
    areas = areas.detach().float()
    finite = torch.isfinite(areas)
    areas = torch.where(finite, areas, 0.0) + eps
    mean = (areas * finite).sum() / finite.sum().clamp(min=1)
    return torch.where(finite, 2 * mean / (areas + mean), 1.0)


def scb_weights(counts: torch.Tensor, alpha: float = 1.0, beta: float = 3.0) -> torch.Tensor:
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


def gradlibra_weights(
    probs: torch.Tensor, targets: torch.Tensor, alpha_pos: float = 0.8, alpha_neg: float = 0.8
) -> torch.Tensor:
    """Grad-Libra hardness weight (Liu et al., MICCAI 2022, arXiv 2208.03779).

    With ``g = |p - t|`` (the gradient of BCE with respect to the logit), ``G = g - alpha*sin(g)``
    element-wise, ``alpha = alpha_pos`` where ``t > 0`` (soft targets count as positive) and
    ``alpha_neg`` where ``t == 0``. Multiply the element-wise BCE by ``G``.
    """
    g = (probs.detach().float() - targets.detach().float()).abs()
    alpha = alpha_pos if alpha_pos == alpha_neg else torch.where(targets > 0, alpha_pos, alpha_neg)
    return g - alpha * torch.sin(g)


def gradlibra_softmax_weights(
    logits: torch.Tensor, labels: torch.Tensor, alpha_pos: float = 0.8, alpha_neg: float = 0.8, background: int = 0
) -> torch.Tensor:
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


def feedback_gain(r: torch.Tensor, q: torch.Tensor, g_max: float) -> torch.Tensor:
    """Feedback-driven gain (this project's definition after Liu, Han, Rong, IVC 111, 2021).

    ``G = clip(q / r, 1, g_max)``: ``r`` is the small objects' share of the box loss, ``q`` their
    share of the matched instances. ``r == 0`` with ``q > 0`` gives ``g_max``; ``q == 0`` gives 1.
    """
    ratio = torch.where(r > 0, q / r.clamp(min=torch.finfo(r.dtype).tiny), g_max)
    return torch.where(q > 0, ratio.clamp(1.0, g_max), 1.0)


class FeedbackBalancer(nn.Module):
    """Running state of the feedback-driven loss: EMAs of ``r`` and ``q`` and the next step's gain.

    After each step, ``update`` takes the step's detached sums: the box loss of small objects and of
    all objects, and the count of small and of all matched instances (summed across processes when
    ``torch.distributed`` is initialised, so every rank holds the same state). Then
    ``r = small_loss / total_loss``, ``q = small_count / total_count``,
    ``ema <- momentum * ema + (1 - momentum) * value`` (the first update sets the EMA directly;
    momentum 0 keeps only the last step, as in Stitcher), and ``gain = feedback_gain(r_ema, q_ema)``.
    A step with no small object, or with no box loss at all (r = 0/0), leaves the EMAs as they were
    and sets the gain for the next step to 1. A step whose sums are not all finite (a NaN or inf
    loss anywhere, on any process) leaves the whole state as it was, gain included, and is counted
    in ``nonfinite_steps``: one such step would otherwise hold ``r`` at NaN for good. The buffers
    travel with ``state_dict``.
    """

    def __init__(self, momentum: float = 0.9, g_max: float = 4.0):
        super().__init__()
        self.momentum = momentum
        self.g_max = g_max
        self.register_buffer("r", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("q", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("gain", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("nonfinite_steps", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def update(
        self, small_loss: torch.Tensor, total_loss: torch.Tensor, small_count: torch.Tensor, total_count: torch.Tensor
    ) -> torch.Tensor:
        """Fold one step's sums into the running state; return the gain for the next step.

        Branch-free on the tensors, so a GPU step does not wait for the host.
        """
        sums = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.r.device) for v in
                            (small_loss, total_loss, small_count, total_count)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        small_loss, total_loss, small_count, total_count = sums
        finite = torch.isfinite(sums).all()
        informative = finite & (small_count > 0) & (total_loss > 0)
        keep = torch.where(self.steps > 0, self.momentum, 0.0).to(self.r)
        r = keep * self.r + (1 - keep) * small_loss / total_loss.clamp(min=torch.finfo(sums.dtype).tiny)
        q = keep * self.q + (1 - keep) * small_count / total_count.clamp(min=1.0)
        self.r.copy_(torch.where(informative, r, self.r))
        self.q.copy_(torch.where(informative, q, self.q))
        self.steps += informative.long()
        self.nonfinite_steps += (~finite).long()
        gain = torch.where(informative, feedback_gain(self.r, self.q, self.g_max), 1.0)
        self.gain.copy_(torch.where(finite, gain, self.gain))
        return self.gain


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
    areas = finite_box_areas(widths, heights, "nwd_assigner_auto")
    share = float((areas < small_area).double().mean())
    use = share < NWD_ASSIGNER_MAX_SMALL_SHARE
    reason = (f"{share:.1%} of {areas.numel()} training boxes are small, below {small_area:g} input pixels; "
              f"NWD ranks anchors only where fewer than {NWD_ASSIGNER_MAX_SMALL_SHARE:.0%} are")
    return use, reason


def resolve_nwd_auto(
    constant: float | str, assigner: bool | str, small_area: float, widths: torch.Tensor, heights: torch.Tensor,
    imgsz: int,
) -> tuple[float, bool, list[str]]:
    """NWD's ``constant`` and ``assigner`` settings with each ``auto`` resolved from the training boxes
    (``widths``, ``heights`` in network-input pixels at ``imgsz``: ``nwd_constant`` and
    ``nwd_assigner_auto``), and a log line for each one resolved. Both detector families call this
    once when training starts; no finite box with an ``auto`` setting raises ValueError."""
    lines = []
    try:
        if constant == "auto":
            constant = nwd_constant(widths, heights)
            lines.append(f"nwd.constant auto = {constant:.2f} input pixels "
                         f"(mean sqrt(w*h) of {widths.numel()} training boxes at imgsz {imgsz})")
        if assigner == "auto":
            assigner, reason = nwd_assigner_auto(widths, heights, small_area)
            lines.append(f"nwd.assigner auto = {str(assigner).lower()} ({reason})")
    except ValueError:
        raise ValueError("nwd: auto settings need boxes, and the training labels hold none: "
                         "set nwd.constant to a number and nwd.assigner to true or false") from None
    return float(constant), assigner, lines


def nwd_constant(widths: torch.Tensor, heights: torch.Tensor) -> float:
    """The NWD constant ``C`` of a data set: its mean absolute object size, ``mean(sqrt(w * h))``.

    Wang et al. set C to the average absolute object size of their data set (AI-TOD; the authors'
    code, github.com/jwwangchn/NWD, defaults to 12.8 pixels). Pass every training box's width and
    height in the pixels the loss sees. Boxes with a non-finite size are left out; no finite box at
    all raises ValueError.
    """
    return float(finite_box_areas(widths, heights, "nwd_constant").sqrt().mean())


def finite_box_areas(widths: torch.Tensor, heights: torch.Tensor, caller: str) -> torch.Tensor:
    """``w * h`` (float64, sides below zero as zero) of the boxes whose area is finite; a ValueError
    naming ``caller`` when none is."""
    areas = widths.detach().double().clamp(min=0) * heights.detach().double().clamp(min=0)
    areas = areas[torch.isfinite(areas)]
    if areas.numel() == 0:
        raise ValueError(f"{caller}: no box with a finite width and height")
    return areas
