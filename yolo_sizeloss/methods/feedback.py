"""Feedback-driven loss (this project's definition after Liu, Han, Rong, IVC 111, 2021): the gain of small objects.

One ``FeedbackBalancer`` per stage that feedback weighs (a YOLO loss, each Faster R-CNN stage) keeps the
running state; ``weights`` gathers a step's sums from the stage's ``MatchedSamples`` and hands the gain
of the steps before to the small objects' positives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from yolo_sizeloss.methods.base import FAMILY_TERMS, MatchedSamples, Method, TermWeights, count_per_gt, number


def feedback_gain(r: Tensor, q: Tensor, g_max: float) -> Tensor:
    """Feedback-driven gain (this project's definition after Liu, Han, Rong, IVC 111, 2021).

    ``G = clip(q / r, 1, g_max)``: ``r`` is the small objects' share of the box loss, ``q`` their
    share of the matched instances. ``r == 0`` with ``q > 0`` gives ``g_max``; ``q == 0`` gives 1.
    """
    ratio = torch.where(r > 0, q / r.clamp(min=torch.finfo(r.dtype).tiny), g_max)
    return torch.where(q > 0, ratio.clamp(1.0, g_max), 1.0)


class FeedbackBalancer(nn.Module):
    """Running state of the feedback-driven loss: EMAs of ``r`` and ``q``, the next step's gain, the step's sums.

    ``observe`` adds a loss call's sums to the step's (``step_sums``): the unweighted box loss of the
    positives of small objects (matched ground truth below ``small_area``) and of all positives, and the
    count of small and of all matched ground truths. ``end_step`` folds them into the state once per
    training step (``update``). The step sums are not persistent: ``state_dict`` holds ``r``, ``q``,
    ``gain``, ``steps`` and ``nonfinite_steps``.

    ``update`` takes the step's sums (summed across processes when ``torch.distributed`` is
    initialised, so every rank holds the same state). Then ``r = small_loss / total_loss``,
    ``q = small_count / total_count``, ``ema <- momentum * ema + (1 - momentum) * value`` (the first
    update sets the EMA directly; momentum 0 keeps only the last step, as in Stitcher), and
    ``gain = feedback_gain(r_ema, q_ema)``. A step with no small object, or with no box loss at all
    (r = 0/0), leaves the EMAs as they were and sets the gain for the next step to 1. A step whose sums
    are not all finite (a NaN or inf loss anywhere, on any process) leaves the whole state as it was,
    gain included, and is counted in ``nonfinite_steps``: one such step would otherwise hold ``r`` at
    NaN for good.
    """

    def __init__(self, momentum: float, g_max: float, small_area: float):
        super().__init__()
        self.momentum = momentum
        self.g_max = g_max
        self.small_area = small_area
        self.register_buffer("r", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("q", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("gain", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("nonfinite_steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("step_sums", torch.zeros(4, dtype=torch.float64), persistent=False)

    @classmethod
    def from_settings(cls, settings: dict) -> "FeedbackBalancer":
        """The state of the resolved ``feedback`` section."""
        return cls(settings["momentum"], settings["g_max"], settings["small_area"])

    @torch.no_grad()
    def observe(self, samples: MatchedSamples) -> Tensor:
        """Add a loss call's sums to the step's; return which positives belong to small objects.

        The box-loss sums are taken in ``samples.box_loss()``'s dtype, then kept in the state's (float64, float32
        where the device holds no float64: ``yolo.trainer.running_sums_dtype``).
        """
        gt_small = samples.gt_areas < self.small_area
        small = gt_small[samples.gt_ids]
        matched = count_per_gt(samples.gt_ids, gt_small.shape[0], samples.valid) > 0
        loss = samples.box_loss()
        if samples.valid is not None:  # padding samples: neither small nor any loss
            small = small & samples.valid
            loss = torch.where(samples.valid, loss, 0.0)
        self.step_sums += torch.stack(
            [(loss * small).sum(), loss.sum(), (matched & gt_small).sum(), matched.sum()]
        ).to(self.step_sums)
        return small

    @torch.no_grad()
    def update(self, small_loss: Tensor, total_loss: Tensor, small_count: Tensor, total_count: Tensor) -> Tensor:
        """Fold one step's sums into the running state; return the gain for the next step.

        Branch-free on the tensors, so a GPU step does not wait for the host.
        """
        sums = torch.stack([torch.as_tensor(v, dtype=self.r.dtype, device=self.r.device) for v in
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

    def end_step(self) -> None:
        """Fold this step's sums into the running state (once per training step, every loss call together)."""
        self.update(*self.step_sums)
        self.step_sums.zero_()

    def state(self) -> dict[str, float]:
        """The persistent state as floats."""
        return {k: float(v) for k, v in self.state_dict().items()}


def weights(samples: MatchedSamples, settings: dict, kinds: tuple[str, ...], state: FeedbackBalancer) -> TermWeights:
    """Observe the stage's positives; those of small objects get the gain of the steps before, the others 1
    (a class term's negatives 1)."""
    w = torch.where(state.observe(samples), state.gain.float(), 1.0)
    return TermWeights(box=w if "box" in kinds else None, cls=samples.on_class_samples(w) if "cls" in kinds else None)


METHOD = Method(
    name="feedback",
    settings={
        "small_area": number(lambda v: v >= 0, "a number >= 0 (network-input pixels squared)"),
        "momentum": number(lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "g_max": number(lambda v: v >= 1, "a number >= 1"),
    },
    # Faster R-CNN: a stage's gain is measured on its own box loss (rpn_box, roi_box)
    family_terms={family: all_terms for family, (_, all_terms) in FAMILY_TERMS.items()},
    weights=weights,
    new_state=FeedbackBalancer.from_settings,
)
