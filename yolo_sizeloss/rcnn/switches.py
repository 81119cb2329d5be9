"""The resolved loss settings as Faster R-CNN applies them: which methods act in which stage, on which terms.

Nothing here repeats a method's settings or defaults: ``LossSwitches`` holds the resolved settings dict
(``yolo_sizeloss.config``) and reads each method's Faster R-CNN terms through the registry
(``yolo_sizeloss.methods``), plus NWD's state (``methods.overlaps.ResolvedNWD``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from yolo_sizeloss.methods import REGISTRY, WEIGHT_ORDER
from yolo_sizeloss.methods.nwd import ResolvedSettings
from yolo_sizeloss.methods.overlaps import IoU, Overlap, ResolvedNWD

FAMILY = "faster_rcnn"
UNRESOLVED_HINT = "pass LossSwitches.from_config the training_nwd_settings of the training labels (the engine does)"


@dataclass(frozen=True)
class LossSwitches:
    """Which Faster R-CNN terms the size-aware methods act on (no method: the stock loss).

    ``config`` is the resolved ``{method: settings}`` dict shared with YOLO, whose ``rcnn_terms`` name the
    terms: ``rpn_cls``, ``rpn_box``, ``roi_cls``, ``roi_box``. ``nwd`` is NWD's state: its constant, and its
    ``nwd.assigner`` decision, whether the RPN matcher measures overlap by NWD (or, by name, by SAFit or SimD).
    """

    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    nwd: ResolvedNWD = field(default_factory=ResolvedNWD)

    @classmethod
    def from_config(cls, config: dict, nwd_resolved: Optional[ResolvedSettings] = None) -> "LossSwitches":
        """The switches of a resolved loss config.

        ``nwd_resolved`` is what ``nwd.constant: auto``, ``nwd.assigner: auto``, ``nwd.max_small_share`` and
        ``nwd.assigner_classes: small`` resolved to (``training_nwd_settings``, computed by the engine from the
        training labels, or a checkpoint's record of it); a value in the settings wins, except that NWD turned
        off keeps the stock matcher.
        """
        nwd = ResolvedNWD.from_settings(config.get("nwd"), UNRESOLVED_HINT, nwd_resolved)
        if nwd.assigner is None:  # here, not when measuring: the model's RPN takes its matcher's overlap when built
            raise ValueError("nwd.assigner is auto but was not resolved: pass training_nwd_settings' decision")
        return cls(config, nwd)

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

    def nwd_mixes(self, term: str) -> bool:
        """True when ``term``'s box loss mixes in NWD or ``nwd.box_measure``'s measure (listed, with a ratio
        above 0: ratio 0 is the stock term)."""
        return term in self.terms("nwd") and self.nwd.ratio > 0

    def rpn_overlap(self) -> Overlap:
        """The overlap the RPN's matcher measures: ``nwd.assigner``'s (NWD, or SAFit or SimD by name), else
        torchvision's IoU."""
        return self.nwd.overlap() or IoU()
