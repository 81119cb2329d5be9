"""The resolved loss settings as Faster R-CNN applies them: which methods act in which stage, on which terms.

Nothing here repeats a method's settings or defaults: ``LossSwitches`` holds the resolved settings dict
(``yolo_sizeloss.config``) and reads each method's Faster R-CNN terms through the registry
(``yolo_sizeloss.methods``), plus what NWD's ``auto`` settings resolved to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor, nn

from yolo_sizeloss.methods import REGISTRY, WEIGHT_ORDER
from yolo_sizeloss.methods.measures import box_similarity
from yolo_sizeloss.methods.nwd import assigner_epochs
from yolo_sizeloss.methods.overlaps import IoU, Overlap, assigner_overlap

FAMILY = "faster_rcnn"
UNRESOLVED_HINT = ("pass LossSwitches.from_config the training_nwd_settings of the training labels (the engine does), "
                   "or set a number")


@dataclass(frozen=True)
class LossSwitches:
    """Which Faster R-CNN terms the size-aware methods act on (no method: the stock loss).

    ``config`` is the resolved ``{method: settings}`` dict shared with YOLO, whose ``rcnn_terms`` name the
    terms: ``rpn_cls``, ``rpn_box``, ``roi_cls``, ``roi_box``. ``nwd_constant`` is NWD's C in
    network-input pixels (None: ``auto`` not yet resolved), ``nwd_assigner`` the resolved ``nwd.assigner``:
    whether the RPN matcher measures overlap by NWD (or, by name, by SAFit or SimD).
    """

    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    nwd_constant: Optional[float] = None
    nwd_assigner: bool | str = False
    nwd_active: bool = True  # False: nwd.max_small_share turned NWD off, the stock terms train

    @classmethod
    def from_config(
        cls, config: dict, nwd_constant: Optional[float] = None, nwd_assigner: Optional[bool | str] = None,
        nwd_active: bool = True,
    ) -> "LossSwitches":
        """The switches of a resolved loss config.

        ``nwd_constant``, ``nwd_assigner`` and ``nwd_active`` are what ``nwd.constant: auto``,
        ``nwd.assigner: auto`` and ``nwd.max_small_share`` resolved to (``training_nwd_settings``,
        computed by the engine from the training labels); a value in the settings wins, except that
        NWD turned off keeps the stock matcher.
        """
        nw = config.get("nwd")
        if nw and nw["constant"] != "auto":
            nwd_constant = float(nw["constant"])
        if nw and nw["assigner"] != "auto":
            nwd_assigner = nw["assigner"]
        elif nw and nwd_assigner is None:
            raise ValueError("nwd.assigner is auto but was not resolved: pass training_nwd_settings' decision")
        return cls(config, nwd_constant if nw else None, nwd_assigner if nw and nwd_active else False, nwd_active)

    def terms(self, method: str) -> tuple[str, ...]:
        """The terms ``method`` acts on (empty when it is not configured)."""
        return REGISTRY[method].terms(self.config[method], FAMILY) if method in self.config else ()

    def stage_terms(self, stage: str) -> tuple[str, ...]:
        """Every configured term of ``stage`` (``rpn`` or ``roi``), over all methods (repeats kept)."""
        return tuple(t for method in self.config for t in self.terms(method) if t.startswith(stage + "_"))

    @property
    def rpn_active(self) -> bool:
        """True when any method acts on a first-stage term."""
        return bool(self.stage_terms("rpn"))

    @property
    def roi_active(self) -> bool:
        """True when any method acts on a second-stage term."""
        return bool(self.stage_terms("roi"))

    def stage_weights(self, stage: str) -> list[tuple[str, dict, tuple[str, ...]]]:
        """The weight methods acting in ``stage``, in ``WEIGHT_ORDER``: (name, settings, the kinds of term,
        ``box`` and/or ``cls``, they act on there)."""
        found = []
        for name in (m for m in WEIGHT_ORDER if m in self.config):
            kinds = tuple(t.removeprefix(stage + "_") for t in self.terms(name) if t.startswith(stage + "_"))
            if kinds:
                found.append((name, self.config[name], kinds))
        return found

    def new_states(self, stage: str) -> dict[str, nn.Module]:
        """A fresh running state for each stateful method acting in ``stage`` (feedback's), by method name."""
        return {name: REGISTRY[name].new_state(settings) for name, settings, _ in self.stage_weights(stage)
                if REGISTRY[name].new_state is not None}

    @property
    def nwd_ratio(self) -> float:
        """NWD's share of a box term it mixes into (0 without NWD)."""
        return self.config["nwd"]["ratio"] if "nwd" in self.config and self.nwd_active else 0.0

    def nwd_mixes(self, term: str) -> bool:
        """True when ``term``'s box loss mixes in NWD or ``nwd.box_measure``'s measure (listed, with a ratio
        above 0: ratio 0 is the stock term)."""
        return term in self.terms("nwd") and self.nwd_ratio > 0

    def box_similarity(self, pred_boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        """Element-wise ``nwd.box_measure`` (NWD by default; SAFit with plain IoU, the smooth-L1 terms having
        none of their own) of predicted boxes and their ground truths, float32; raises while an ``auto``
        constant the measure needs is unresolved."""
        measure = self.config["nwd"]["box_measure"]
        if self.nwd_constant is None and measure != "simd":
            raise RuntimeError(f"nwd.constant is auto but was not resolved: {UNRESOLVED_HINT}")
        return box_similarity(measure, pred_boxes.float(), gt_boxes.float(), self.nwd_constant,
                              safit_spread=self.config["nwd"]["safit_spread"])

    def assigner_acts(self, epoch: int, epochs: int) -> bool:
        """Whether the RPN's matcher measures by ``nwd.assigner``'s overlap in ``epoch`` (from 0) of ``epochs``:
        while NWD acts, for its first ``nwd.assigner_until`` of them (``methods.nwd.assigner_epochs``)."""
        return bool(self.nwd_assigner) and epoch < assigner_epochs(self.config["nwd"], epochs)

    def rpn_overlap(self) -> Overlap:
        """The overlap the RPN's matcher measures: ``nwd.assigner``'s (NWD, or SAFit or SimD by name), else
        torchvision's IoU."""
        spread = self.config["nwd"]["safit_spread"] if "nwd" in self.config else None
        return assigner_overlap(self.nwd_assigner, self.nwd_constant, UNRESOLVED_HINT, spread) or IoU()
