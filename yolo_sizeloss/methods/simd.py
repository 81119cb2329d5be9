"""SimD (Shi et al., arXiv 2407.02394): a similarity of boxes whose offsets are measured against the pair's size.

Not a weight: an overlap measure a detector's box loss or label assignment can take in place of its own
(``overlaps.SimDOverlap``; the ``nwd`` method's settings choose where). Pure functions of xyxy boxes,
element-wise and pair-wise, as ``methods.safit``'s. Definition: docs/methods.md section 6.
"""

from __future__ import annotations

import torch
from torch import Tensor

SIMD_RELEASED_NORMALISERS = (6.13, 4.59)  # m_x, m_y hard-coded in the authors' code (cszzshi/SimD)
SIMD_EPS = 1e-6  # added to centres and sides, and the floor of the similarity, as the authors' code does
SIMD_SQRT_EPS = 1e-12  # under SimD's square roots, so that identical boxes have a gradient (0) instead of NaN


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x = (boxes[..., 0] + boxes[..., 2]) / 2 + SIMD_EPS
    y = (boxes[..., 1] + boxes[..., 3]) / 2 + SIMD_EPS
    return x, y, boxes[..., 2] - boxes[..., 0] + SIMD_EPS, boxes[..., 3] - boxes[..., 1] + SIMD_EPS


def _simd(a: tuple[Tensor, ...], b: tuple[Tensor, ...], m_x: float, m_y: float) -> Tensor:
    (x1, y1, w1, h1), (x2, y2, w2, h2) = a, b
    scale_x, scale_y = (w1 + w2) / m_x, (h1 + h2) / m_y
    location = torch.sqrt(((x1 - x2) / scale_x) ** 2 + ((y1 - y2) / scale_y) ** 2 + SIMD_SQRT_EPS)
    shape = torch.sqrt(((w1 - w2) / scale_x) ** 2 + ((h1 - h2) / scale_y) ** 2 + SIMD_SQRT_EPS)
    return torch.exp(-(location + shape)).clamp(min=SIMD_EPS)


def simd(boxes_a: Tensor, boxes_b: Tensor, m_x: float = SIMD_RELEASED_NORMALISERS[0],
         m_y: float = SIMD_RELEASED_NORMALISERS[1]) -> Tensor:
    """SimD of aligned boxes (Shi et al., arXiv 2407.02394): ``exp(-(D_loc + D_shape))``.

    ``D_loc`` is the distance of the centres and ``D_shape`` that of the sides, each axis divided by the
    pair's summed sides over its normaliser (``(w_a + w_b) / m_x``, ``(h_a + h_b) / m_y``): offsets are
    measured relative to the pair's own size, so one similarity serves tiny and large boxes without a
    data-set constant like NWD's C. Identical boxes give 1, far or mis-shaped ones tend to the floor
    ``SIMD_EPS``; zero-size boxes are finite (``SIMD_EPS`` is added to every side, as the authors' code
    does). Symmetric and scale-invariant up to that epsilon. Differentiable (``SIMD_SQRT_EPS`` under the
    square roots keeps the gradient of identical boxes finite; it moves the value by at most 2e-6): use
    ``1 - simd`` in a box loss.
    """
    return _simd(_centre_size(boxes_a), _centre_size(boxes_b), m_x, m_y)


@torch.no_grad()
def simd_matrix(boxes_a: Tensor, boxes_b: Tensor, m_x: float = SIMD_RELEASED_NORMALISERS[0],
                m_y: float = SIMD_RELEASED_NORMALISERS[1]) -> Tensor:
    """SimD of every pair, (M, N) for (M, 4) and (N, 4) boxes (a matcher's quality matrix)."""
    a = tuple(t[:, None] for t in _centre_size(boxes_a.float()))
    b = tuple(t[None, :] for t in _centre_size(boxes_b.float()))
    return _simd(a, b, m_x, m_y)
