"""The size-aware methods, one module each, and the registry that config validation and both detector families read.

A method module holds its formula (pure functions of tensors), its settings schema (the defaults are
``cfg/losses/<name>.yaml``), the terms it may act on in each family, and ``weights``: what it computes
from a batch's ``MatchedSamples``. The overlap measures beyond NWD have their formula modules
too (``safit``, ``simd``) and are chosen through ``nwd``'s settings, not registered; the objects an assigner or
matcher takes are in ``overlaps``.
"""

from yolo_sizeloss.methods import feedback, gradlibra, nwd, plb, scb
from yolo_sizeloss.methods.base import FAMILY_TERMS, MatchedSamples, Method, TermWeights

# every method by name, in the order messages list them
REGISTRY: dict[str, Method] = {m.name: m for m in (feedback.METHOD, scb.METHOD, plb.METHOD, gradlibra.METHOD,
                                                    nwd.METHOD)}
# the order weights multiply in on a term: float products depend on it, so a saved run retrains bit for bit only in it
WEIGHT_ORDER = ("plb", "scb", "feedback", "gradlibra")

__all__ = ["FAMILY_TERMS", "REGISTRY", "WEIGHT_ORDER", "MatchedSamples", "Method", "TermWeights"]
