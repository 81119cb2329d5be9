"""NWD on the Faster R-CNN path: settings, stock equality, hand-built box terms, the RPN matcher, training, resume.

Run with YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0. Nothing is downloaded: models start from random weights.
Definitions: docs/methods.md, section 5 (NWD), Faster R-CNN part. The hand-built RPN and RoI batches
are tests/test_rcnn.py's (described there).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import box_iou

from conftest import make_subset
from test_rcnn import (
    IMGSZ,
    ROI_GT,
    ROI_MATCHED,
    ROI_PROPOSALS,
    RPN_AREAS,
    RPN_GT,
    RPN_POS_MATCHED,
    RPN_POSITIVES,
    bccd_batch,
    plb_by_hand,
    roi_box_terms,
    roi_forward,
    rpn_box_terms,
    rpn_forward,
    tiny_roi_heads,
    tiny_rpn,
)
from test_rcnn_feedback import ITERATIONS, STATE, TRAIN_FLAGS, results, resumable_copy, train_modes
from yolo_sizeloss.checkpoints import RCNN_ARCH, load_checkpoint
from yolo_sizeloss.config import LossConfigError, load_loss_config
from yolo_sizeloss.detections import ImageRecord, load_split, training_box_sizes
from yolo_sizeloss.rcnn.cli import build_parser, fill_defaults, loss_config, main
from yolo_sizeloss.rcnn.engine import stage_rpn_overlap, training_nwd_settings
from yolo_sizeloss.methods.nwd import ResolvedSettings, nwd, nwd_constant, nwd_matrix
from yolo_sizeloss.methods.overlaps import IoU, NWDOverlap, ResolvedNWD
from yolo_sizeloss.rcnn.heads import SizeBalancedRPN
from yolo_sizeloss.rcnn.model import (
    build_model,
    end_feedback_step,
    feedback_columns,
    model_from_checkpoint,
    split_feedback_state,
)
from yolo_sizeloss.rcnn.switches import LossSwitches

C = 10.0  # the NWD constant of the hand-built batches (objects of 8 to 16 pixels)


def nwd_by_hand(a: list[float], b: list[float], constant: float) -> float:
    """docs/methods.md, NWD: exp(-W2 / C), W2 = ||(cx, cy, w/2, h/2)_a - (cx, cy, w/2, h/2)_b|| (eps 1e-7 under
    the root, as methods.nwd.nwd)."""
    ga = [(a[0] + a[2]) / 2, (a[1] + a[3]) / 2, (a[2] - a[0]) / 2, (a[3] - a[1]) / 2]
    gb = [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, (b[2] - b[0]) / 2, (b[3] - b[1]) / 2]
    return math.exp(-math.sqrt(sum((x - y) ** 2 for x, y in zip(ga, gb)) + 1e-7) / constant)


def nwd_switches(constant: float | None = C, **settings) -> LossSwitches:
    """Switches of the ``nwd`` defaults with ``settings`` replaced (``feedback``/``plb`` dicts add those methods)."""
    methods = {m: settings.pop(m) for m in ("feedback", "plb") if m in settings}
    config = load_loss_config("+".join(["nwd", *methods]))
    config["nwd"].update(settings)
    for method, values in methods.items():
        config[method].update(values)
    return LossSwitches.from_config(config, ResolvedSettings(constant, None))


# ----------------------------------------------------------------------------------------------------------------
# Settings


def test_defaults_compile_to_the_rpn_box_term_and_matcher():
    s = nwd_switches(constant=None)
    assert s.terms("nwd") == ("rpn_box",) and s.nwd.ratio == 0.5 and s.nwd.assigner and s.nwd.constant is None  # auto
    assert s.rpn_active and not s.roi_active
    assert nwd_switches(constant=42.0).nwd.constant == 42.0  # auto, resolved by the engine
    fixed = LossSwitches.from_config({"nwd": {**load_loss_config("nwd")["nwd"], "constant": 12.8}},
                                     ResolvedSettings(42.0, None))
    assert fixed.nwd.constant == 12.8  # a number in the settings wins
    model = build_model("mobilenet_v3_large_fpn", 4, IMGSZ, nwd_switches(rcnn_terms=["rpn_box", "roi_box"]))
    assert isinstance(model.rpn.overlap, NWDOverlap) and model.rpn.overlap.constant == C
    assert model.rpn.box_similarity == model.rpn.overlap.pairwise and model.roi_heads.switches.roi_active
    stock_matcher = build_model("mobilenet_v3_large_fpn", 4, IMGSZ, nwd_switches(assigner=False))
    assert stock_matcher.rpn.box_similarity is box_iou  # torchvision's own


def test_rcnn_terms_errors_name_file_line_and_range(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("nwd:\n  ratio: 1\n  rcnn_terms: [rpn_cls]\n")
    with pytest.raises(LossConfigError, match=r"o\.yaml:3: nwd\.rcnn_terms = \['rpn_cls'\] .*rpn_box, roi_box \("):
        load_loss_config("nwd", path)
    path.write_text("nwd:\n  rcnn_terms: [roi_box, rpn_box]\n")
    assert load_loss_config("nwd", path)["nwd"]["rcnn_terms"] == ["roi_box", "rpn_box"]


def test_combinations_are_accepted_by_the_command_line():
    # the loss as check_args resolves it from the parsed flags: the methods in the order given
    for loss, methods in (("nwd", ["nwd"]), ("nwd+plb", ["nwd", "plb"]), ("nwd+feedback", ["nwd", "feedback"]),
                          ("nwd+scb+gradlibra", ["nwd", "scb", "gradlibra"])):
        config = loss_config(fill_defaults(build_parser().parse_args(["--loss", loss])))
        assert list(config) == methods
        assert config == load_loss_config(loss)


def test_unresolved_auto_constant_is_an_error_when_needed():
    rpn = tiny_rpn(nwd_switches(constant=None, assigner=False))
    with pytest.raises(RuntimeError, match="nwd.constant is auto but was not resolved"):
        rpn_forward(rpn)
    rpn = tiny_rpn(nwd_switches(constant=None, rcnn_terms=[]))
    with pytest.raises(RuntimeError, match="nwd.constant is auto but was not resolved"):
        rpn_forward(rpn)  # the matcher needs it too
    neutral, _, _ = rpn_forward(tiny_rpn(nwd_switches(constant=None, ratio=0, assigner=False)))  # never needed
    stock, _, _ = rpn_forward(tiny_rpn(LossSwitches()))
    assert all(torch.equal(neutral[k], stock[k]) for k in stock)  # and the neutral settings are the stock loss


def test_nwd_matrix_is_nwd_of_every_pair():
    a = torch.tensor([[0.0, 0, 4, 4], [0, 0, 100, 100], [5, 5, 5, 5]])  # the last one has zero size
    b = torch.tensor([[1.0, 0, 5, 4], [0, 0, 4, 4], [1, 0, 101, 100], [-50, -50, 150, 150]])
    matrix = nwd_matrix(a, b, 12.8)
    assert matrix.shape == (3, 4) and torch.isfinite(matrix).all()
    for i in range(3):
        for j in range(4):
            assert matrix[i, j].item() == pytest.approx(nwd_by_hand(a[i].tolist(), b[j].tolist(), 12.8), rel=1e-6)
            assert matrix[i, j] == pytest.approx(nwd(a[i], b[j], 12.8).item(), rel=1e-6)
    assert matrix[0, 0] == pytest.approx(matrix[1, 2].item(), rel=1e-6)  # a 1-pixel shift: 4x4 and 100x100 alike
    assert matrix[0, 1].item() == pytest.approx(1.0, abs=1e-4)
    assert nwd_matrix(a[:0], b, 12.8).shape == (0, 4)


# ----------------------------------------------------------------------------------------------------------------
# Neutral settings equal stock torchvision


@pytest.mark.parametrize("spec, settings", [
    ("nwd", {"ratio": 0, "assigner": False, "rcnn_terms": ["rpn_box", "roi_box"]}),
    ("nwd+feedback", {"ratio": 0, "assigner": False, "rcnn_terms": ["rpn_box", "roi_box"]}),  # with feedback's gain 1
])
def test_ratio_zero_without_the_assigner_equals_stock_torchvision_bit_for_bit(spec, settings):
    images, targets = bccd_batch(2)
    config = load_loss_config(spec)
    config["nwd"].update(settings)
    if "feedback" in config:
        config["feedback"].update(g_max=1.0, rcnn_terms=["rpn_cls", "rpn_box", "roi_cls", "roi_box"])
    switches = LossSwitches.from_config(config)  # constant auto, left unresolved: never needed
    assert switches.rpn_active and switches.roi_active  # the size-aware loss code runs, not the stock one
    torch.manual_seed(0)
    ours = build_model("mobilenet_v3_large_fpn", 4, IMGSZ, switches).train()
    stock = fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=IMGSZ, max_size=IMGSZ).train()
    stock.load_state_dict(split_feedback_state(ours.state_dict())[0])
    for step in range(2):
        torch.manual_seed(step)
        ours_losses = ours(images, targets)
        torch.manual_seed(step)
        stock_losses = stock(images, targets)
        for name in stock_losses:
            assert torch.equal(ours_losses[name], stock_losses[name]), (spec, step, name)
        end_feedback_step(ours)
    if "feedback" in config:
        assert feedback_columns(ours)["feedback/rpn/steps"] == 2  # the feedback path ran


# ----------------------------------------------------------------------------------------------------------------
# The hand-built RPN batch (tests/test_rcnn.py): positives are anchors 14 (side 8, matched g0), 29, 55, 57 (side
# 16, matched g1, g2, g2); a side-8 anchor predicts itself, a side-16 anchor a box twice as wide (same centre).


def rpn_predicted_boxes(anchors: torch.Tensor) -> list[list[float]]:
    """The decoded prediction of each positive anchor, by hand."""
    boxes = []
    for index in RPN_POSITIVES:
        x1, y1, x2, y2 = anchors[index].tolist()
        half = (x2 - x1) if index % 2 else (x2 - x1) / 2  # side 16: the width doubles around the centre
        cx = (x1 + x2) / 2
        boxes.append([cx - half, y1, cx + half, y2])
    return boxes


def rpn_nwd_by_hand(anchors: torch.Tensor) -> list[float]:
    return [nwd_by_hand(box, RPN_GT[gt].tolist(), C) for box, gt in zip(rpn_predicted_boxes(anchors), RPN_POS_MATCHED)]


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25])
def test_rpn_box_term_mixes_smooth_l1_and_nwd_by_hand(ratio):
    stock, labels, anchors = rpn_forward(tiny_rpn(LossSwitches()))
    losses, _, _ = rpn_forward(tiny_rpn(nwd_switches(ratio=ratio, assigner=False)))
    terms, similarity = rpn_box_terms(anchors), rpn_nwd_by_hand(anchors)
    assert similarity[0] == pytest.approx(math.exp(-math.sqrt(0.5) / C), rel=1e-6)  # g0 is the anchor, 1 px taller
    sampled = int((labels >= 0).sum())
    expected = ((1 - ratio) * sum(terms) + ratio * sum(1 - s for s in similarity)) / sampled
    assert losses["loss_rpn_box_reg"].item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(losses["loss_objectness"], stock["loss_objectness"])


def test_rpn_nwd_part_is_differentiated_through_the_decoded_box():
    rpn = tiny_rpn(nwd_switches(ratio=1.0, assigner=False))
    losses, _, _ = rpn_forward(rpn)
    losses["loss_rpn_box_reg"].backward()
    grad = rpn.head.bbox_pred.bias.grad.view(2, 4)  # per anchor type: dx, dy, dw, dh
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    # the side-16 anchors predict boxes twice too wide: the loss pulls their width delta down
    assert grad[1, 2] > 0


def test_size_weights_multiply_both_parts():
    _, labels, anchors = rpn_forward(tiny_rpn(LossSwitches()))
    losses, _, _ = rpn_forward(tiny_rpn(nwd_switches(ratio=0.5, assigner=False,
                                                     plb={"source": "predicted", "rcnn_terms": ["rpn_box"]})))
    weights = plb_by_hand(RPN_AREAS["predicted"][0])
    mixed = [0.5 * t + 0.5 * (1 - s) for t, s in zip(rpn_box_terms(anchors), rpn_nwd_by_hand(anchors))]
    expected = sum(w * m for w, m in zip(weights, mixed)) / int((labels >= 0).sum())
    assert losses["loss_rpn_box_reg"].item() == pytest.approx(expected, rel=1e-5)


def test_feedback_signal_stays_the_smooth_l1_share():
    rpn = tiny_rpn(nwd_switches(ratio=1.0, assigner=False, feedback={"small_area": 100.0, "rcnn_terms": ["rpn_box"]}))
    _, _, anchors = rpn_forward(rpn)
    rpn.feedback.end_step()
    terms = rpn_box_terms(anchors)
    assert rpn.feedback.state()["r"] == pytest.approx(terms[0] / sum(terms), rel=1e-5)  # g0 (72 px^2) is small


# ----------------------------------------------------------------------------------------------------------------
# The hand-built RoI batch: positives p0 (RoI [0, 0, 8, 8], class 1, predicts itself), p1 ([0, 0, 16, 16],
# class 2, predicts a box twice as wide), g0 and g1 as their own RoIs; every class logit is 0.


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_roi_box_term_mixes_smooth_l1_and_nwd_by_hand(ratio):
    stock = roi_forward(tiny_roi_heads(LossSwitches()))
    losses = roi_forward(tiny_roi_heads(nwd_switches(ratio=ratio, rcnn_terms=["roi_box"])))
    rois = torch.cat([ROI_PROPOSALS, ROI_GT]).tolist()
    similarity = []
    for roi, gt in zip(rois, ROI_MATCHED):
        if gt is not None:
            x1, y1, x2, y2 = roi
            predicted = roi if gt == 0 else [x1 - (x2 - x1) / 2, y1, x2 + (x2 - x1) / 2, y2]
            similarity.append(nwd_by_hand(predicted, ROI_GT[gt].tolist(), C))
    assert similarity[2] == pytest.approx(1.0, abs=1e-4)  # g0 as its own RoI, predicted exactly (eps: 3e-5)
    expected = ((1 - ratio) * sum(roi_box_terms()) + ratio * sum(1 - s for s in similarity)) / 5
    assert losses["loss_box_reg"].item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(losses["loss_classifier"], stock["loss_classifier"])


def test_rpn_only_default_leaves_the_roi_heads_stock():
    stock = roi_forward(tiny_roi_heads(LossSwitches()))
    losses = roi_forward(tiny_roi_heads(nwd_switches()))  # rcnn_terms [rpn_box]
    assert all(torch.equal(losses[k], stock[k]) for k in stock)


# ----------------------------------------------------------------------------------------------------------------
# The RPN matcher with NWD: a 256 x 256 image, one feature map of stride 16, square anchors of 32, 64, 128 px
# centred on multiples of 16. A small object (10 x 10, centred on an anchor centre) and a large one (120 x 120),
# C = their mean sqrt(w h) = 65 px, as nwd.constant: auto would set it. Thresholds stay torchvision's 0.7 / 0.3.

DIRECTION_ANCHORS = AnchorGenerator(((32, 64, 128),), ((1.0,),))
SMALL = [91.0, 91, 101, 101]


def direction_rpn(switches: LossSwitches) -> SizeBalancedRPN:
    return SizeBalancedRPN(DIRECTION_ANCHORS, RPNHead(1, 3), 0.7, 0.3, 256, 0.5, {"training": 100, "testing": 100},
                           {"training": 100, "testing": 100}, 0.7, switches=switches)


def test_assigner_classes_small_gives_only_the_small_class_the_measures_rpn_anchors():
    """``nwd.assigner_classes: small`` on the RPN matcher: the same 10 x 10 object, once of a small class (class
    0: measured by NWD) and once of another (class 1: IoU), in two images of one batch; each gets the anchors
    the matcher gives it under that measure alone (five under NWD, one under IoU)."""
    images = ImageList(torch.zeros(2, 1, 256, 256), [(256, 256)] * 2)
    anchors = DIRECTION_ANCHORS(images, [torch.zeros(2, 1, 16, 16)])
    gt = torch.tensor([SMALL])
    settings = {**load_loss_config("nwd")["nwd"], "assigner_classes": "small"}
    gated = LossSwitches.from_config({"nwd": settings}, ResolvedSettings(65.0, True, True, (0,)))
    positives = {}
    for name, switches in (("gated", gated), ("iou", LossSwitches()), ("nwd", LossSwitches(nwd=ResolvedNWD(
            constant=65.0, assigner=True)))):
        rpn = direction_rpn(switches)
        targets = [{"boxes": gt, "labels": torch.tensor([1])}, {"boxes": gt, "labels": torch.tensor([2])}]
        rpn.assign_targets_to_anchors(anchors, targets)
        positives[name] = [set(torch.where(m == 0)[0].tolist()) for m in rpn.proposal_matcher.recorded]
        assert rpn.box_similarity == rpn.overlap.pairwise  # the batch's gated measure is not kept
    assert len(positives["nwd"][0]) == 5 and len(positives["iou"][1]) == 1
    assert positives["gated"] == [positives["nwd"][0], positives["iou"][1]]


@pytest.mark.parametrize("offset", [0.0, 4.0, 8.0])  # the large object's shift off the anchor grid
def test_nwd_matcher_gives_the_small_object_more_positive_anchors(offset):
    images = ImageList(torch.zeros(1, 1, 256, 256), [(256, 256)])
    anchors = DIRECTION_ANCHORS(images, [torch.zeros(1, 1, 16, 16)])[0]
    large = [100 + offset, 100 + offset / 2, 220 + offset, 220 + offset / 2]
    gt = torch.tensor([SMALL, large])
    constant = nwd_constant(gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1])
    assert constant == pytest.approx(65.0)
    positives = {}
    nwd_matcher = LossSwitches(nwd=ResolvedNWD(constant=constant, assigner=True))
    for name, switches in (("iou", LossSwitches()), ("nwd", nwd_matcher)):
        rpn = direction_rpn(switches)
        labels, _ = rpn.assign_targets_to_anchors([anchors], [{"boxes": gt, "labels": torch.tensor([1, 1])}])
        (matches,) = rpn.proposal_matcher.recorded
        assert torch.equal(labels[0] == 1, matches >= 0)  # the matches are the ones the RPN trains on
        positives[name] = [set(torch.where(matches == g)[0].tolist()) for g in range(2)]
    iou, similarity = box_iou(gt, anchors), nwd_matrix(gt, anchors, constant)

    # small: IoU gives only its best anchor, a low-quality match (IoU 0.098, below the 0.3 of a negative);
    # NWD gives that one and the four side-32 anchors 16 px away, every one above the 0.7 threshold
    (best,) = positives["iou"][0]
    assert iou[0, best].item() == pytest.approx(100 / 1024, rel=1e-4)
    assert positives["nwd"][0] > positives["iou"][0] and len(positives["nwd"][0]) == 5
    assert all(similarity[0, i] >= 0.7 for i in positives["nwd"][0])
    assert all(iou[0, i] < 0.3 for i in positives["nwd"][0] - {best})  # negatives under IoU

    # large: every IoU positive stays; NWD adds at most 4 marginal anchors, each from IoU's ignored band
    assert positives["iou"][1] <= positives["nwd"][1]
    added = positives["nwd"][1] - positives["iou"][1]
    assert len(added) <= 4 and all(0.6 <= iou[1, i] < 0.7 for i in added)
    assert iou[1].argmax() == similarity[1].argmax()  # the same best anchor
    if offset == 0:
        assert positives["nwd"][1] == positives["iou"][1]


def test_the_rpn_matcher_follows_the_assigner_window():
    """``nwd.assigner_until: 0.5`` of four epochs: NWD matches in epochs 0 and 1; from epoch 2 the RPN's matcher is
    torchvision's IoU again and gives the small object of the direction check only IoU's positives.
    ``nwd.assigner_from``: IoU first, NWD after."""
    switches = nwd_switches(assigner_until=0.5)
    assert [switches.nwd.assigner_acts(epoch, 4) for epoch in range(4)] == [True, True, False, False]
    model = build_model("mobilenet_v3_large_fpn", 4, IMGSZ, switches)
    stage_rpn_overlap(model, switches, 1, 4, log=False)
    assert isinstance(model.rpn.overlap, NWDOverlap)
    stage_rpn_overlap(model, switches, 2, 4, log=False)
    assert model.rpn.box_similarity is box_iou
    # nwd.assigner_from: IoU first, NWD from a quarter of the epochs (a resumed run is staged at its epoch)
    late = nwd_switches(assigner_from=0.25)
    assert [late.nwd.assigner_acts(epoch, 4) for epoch in range(4)] == [False, True, True, True]
    stage_rpn_overlap(model, late, 0, 4, log=False)
    assert isinstance(model.rpn.overlap, IoU) and model.rpn.box_similarity is box_iou
    stage_rpn_overlap(model, late, 3, 4, log=False)
    assert isinstance(model.rpn.overlap, NWDOverlap) and model.rpn.box_similarity == model.rpn.overlap.pairwise

    images = ImageList(torch.zeros(1, 1, 256, 256), [(256, 256)])
    anchors = DIRECTION_ANCHORS(images, [torch.zeros(1, 1, 16, 16)])[0]
    gt = {"boxes": torch.tensor([SMALL]), "labels": torch.tensor([1])}
    positives = []
    for staged in (False, True):
        rpn = direction_rpn(LossSwitches(nwd=ResolvedNWD(constant=65.0, assigner=True)))
        if staged:
            rpn.use_overlap(IoU())
        rpn.assign_targets_to_anchors([anchors], [gt])
        (matches,) = rpn.proposal_matcher.recorded
        positives.append(set(torch.where(matches == 0)[0].tolist()))
    stock = direction_rpn(LossSwitches())
    stock.assign_targets_to_anchors([anchors], [gt])
    assert positives[1] == set(torch.where(stock.proposal_matcher.recorded[0] == 0)[0].tolist()) != positives[0]


# ----------------------------------------------------------------------------------------------------------------
# The constant from the training labels


def test_constant_from_the_training_labels_at_imgsz():
    records = [
        ImageRecord("a.jpg", 640, 480, np.array([[0.0, 0, 64, 48], [600, 400, 700, 520]]), np.array([0, 1])),
        ImageRecord("b.jpg", 480, 640, np.array([[10.0, 10, 10, 50]]), np.array([2])),  # empty: dropped, as in training
        ImageRecord("c.jpg", 320, 320),
    ]
    widths, heights, classes = training_box_sizes(records, 320)  # a.jpg at half size; the second box clipped to 40 x 80
    assert widths.tolist() == [32.0, 20.0] and heights.tolist() == [24.0, 40.0] and classes.tolist() == [0, 1]
    auto = load_loss_config("nwd")
    expected = (math.sqrt(32 * 24) + math.sqrt(20 * 40)) / 2
    def settings(*args, **kwargs) -> tuple:  # what training_nwd_settings resolved, without its log lines
        return training_nwd_settings(*args, **kwargs)[:4]

    assert settings(auto, records, 320, None) == (pytest.approx(expected), True, True, None)
    assert settings(auto, records, 320, {"nwd_constant": 50.0}) == (50.0, True, True, None)  # resume keeps the run's
    assert training_nwd_settings({}, records, 320, None) is None
    fixed = {"nwd": {**auto["nwd"], "constant": 12.8}}
    assert settings(fixed, records, 320, {"nwd_constant": 50.0}) == (12.8, True, True, None)
    with pytest.raises(ValueError, match="nwd: auto settings, max_small_share and assigner_classes small need boxes"):
        training_nwd_settings(auto, records[2:], 320, None)
    # assigner auto: areas 768 and 800 input px^2; both small below 1024 (IoU), neither below 700 (NWD)
    gated = {"nwd": {**fixed["nwd"], "assigner": "auto"}}
    assert settings(gated, records, 320, None) == (12.8, False, True, None)
    assert settings({"nwd": {**gated["nwd"], "small_area": 700}}, records, 320, None) == (12.8, True, True, None)
    # max_small_share: both boxes small below 1024 (a share of 1): NWD off above 0.9, on at 1; none small below 700
    capped = {"nwd": {**fixed["nwd"], "max_small_share": 0.9}}
    assert settings(capped, records, 320, None) == (12.8, False, False, None)
    assert settings({"nwd": {**capped["nwd"], "small_area": 700}}, records, 320, None) == (12.8, True, True, None)
    # assigner_classes small: both classes' one box small below 1024; below 700 none, so the stock matcher
    by_class = {"nwd": {**fixed["nwd"], "assigner": "safit", "assigner_classes": "small"}}
    assert settings(by_class, records, 320, None) == (12.8, "safit", True, (0, 1))
    assert settings({"nwd": {**by_class["nwd"], "small_area": 700}}, records, 320, None) == (12.8, False, True, ())
    off = LossSwitches.from_config(capped, training_nwd_settings(capped, records, 320, None))
    assert (off.nwd.ratio, off.nwd_mixes("rpn_box"), type(off.rpn_overlap()).__name__) == (0.0, False, "IoU")
    with pytest.raises(ValueError, match="nwd.assigner is auto but was not resolved"):
        LossSwitches.from_config(gated)
    assert LossSwitches.from_config(gated, ResolvedSettings(None, None, active=False)).nwd.assigner is False


# ----------------------------------------------------------------------------------------------------------------
# Training through the command line on real BCCD images


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_subset(tmp_path_factory.mktemp("bccd_nwd"), {"train": 4, "val": 2})


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    return train_modes(tiny_data, tmp_path_factory.mktemp("runs"), ("nwd", "nwd+feedback"))


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["nwd", "nwd+feedback"])
def test_training_leaves_checkpoints_that_stock_torchvision_loads(runs, tiny_data, loss):
    checkpoint = load_checkpoint(runs[loss] / "weights" / "last.pt", RCNN_ARCH)
    assert checkpoint["loss"] == load_loss_config(loss)  # constant stays 'auto' in the settings
    stock = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=4)
    stock.load_state_dict(checkpoint["model"])  # strict: torchvision's keys only
    expected = nwd_constant(*training_box_sizes(load_split(tiny_data, "train")[0], IMGSZ)[:2])
    assert checkpoint["nwd_constant"] == pytest.approx(expected)
    row = results(runs[loss])[0]
    # every column finite but a class's val AP, NaN where the tiny val split holds none of it
    assert all(math.isfinite(float(v)) for k, v in row.items() if not k.startswith("val/AP50-95 "))
    assert float(row["nwd/constant"]) == checkpoint["nwd_constant"]  # logged = saved
    model = model_from_checkpoint(checkpoint)
    assert model.rpn.switches.nwd.constant == checkpoint["nwd_constant"]
    assert isinstance(model.rpn.overlap, NWDOverlap) and model.rpn.box_similarity == model.rpn.overlap.pairwise
    if "feedback" in loss:
        for stage in ("rpn", "roi"):
            assert float(row[f"feedback/{stage}/steps"]) == ITERATIONS
        assert {k.split(".")[-1] for k in checkpoint["feedback"]} == set(STATE)


@pytest.mark.slow
@pytest.mark.parametrize("small_below", [None, 0.25])
def test_auto_assigner_is_decided_from_the_training_boxes_logged_and_kept_in_the_checkpoint(tiny_data, tmp_path,
                                                                                            small_below):
    """``assigner: auto`` from the boxes the run trains on: at the tests' image size nearly every box is small
    (COCO's 32 x 32), so the shipped mode keeps the stock matcher; with "small" set below a quarter of the boxes'
    areas it chooses NWD."""
    widths, heights, _ = training_box_sizes(load_split(tiny_data, "train")[0], IMGSZ)
    areas = widths * heights  # at the run's imgsz
    small_area = 1024 if small_below is None else float(areas.sort().values[int(small_below * len(areas))])
    share = float((areas < small_area).double().mean())
    assert share > 0.9 if small_below is None else share < 0.5
    variant = "assigner_auto"
    if small_below is not None:
        variant = tmp_path / "auto.yaml"
        variant.write_text(f"nwd:\n  assigner: auto\n  small_area: {small_area}\n")
    assert main(["--data", str(tiny_data), "--project", str(tmp_path), "--name", "auto", "--loss", "nwd",
                 "--loss-cfg", str(variant), *TRAIN_FLAGS]) == 0
    nwd = share < 0.5
    checkpoint = load_checkpoint(tmp_path / "auto" / "weights" / "last.pt", RCNN_ARCH)
    assert checkpoint["loss"]["nwd"]["assigner"] == "auto" and checkpoint["nwd_assigner"] is nwd
    assert float(results(tmp_path / "auto")[0]["nwd/assigner"]) == float(nwd)
    model = model_from_checkpoint(checkpoint)
    assert isinstance(model.rpn.overlap, NWDOverlap) is nwd
    apart = model.rpn.box_similarity(torch.tensor([[0.0, 0, 8, 8]]), torch.tensor([[10.0, 0, 18, 8]]))
    assert (float(apart) > 0) is nwd  # disjoint boxes: IoU 0, NWD above it


@pytest.mark.slow
@pytest.mark.parametrize("mode, acting", [("safit_sharp_auto_warmup", [1.0, 0.0]), ("safit_sharp_auto_late", [0.0, 1.0])])
def test_shipped_staged_modes_switch_the_matcher_in_training(tiny_data, tmp_path, mode, acting):
    """Over two epochs, ``--loss safit_sharp_auto_warmup`` (assigner_until 0.33) matches by SAFit in the first
    (round(0.66) = 1 epoch) and by IoU in the second; ``safit_sharp_auto_late`` (assigner_from 0.33) the
    reverse, as results.csv records. (At the tests' image size nearly every box is small, where the modes would
    train the stock loss: max_small_share 1 keeps them acting.)"""
    flags = [*TRAIN_FLAGS[:TRAIN_FLAGS.index("--epochs")], "--epochs", "2", *TRAIN_FLAGS[TRAIN_FLAGS.index("--epochs") + 2:]]
    (tmp_path / "acting.yaml").write_text("nwd:\n  max_small_share: 1.0\n")
    assert main(["--data", str(tiny_data), "--project", str(tmp_path), "--name", "staged", "--loss",
                 mode, "--loss-cfg", str(tmp_path / "acting.yaml"), *flags]) == 0
    assert [float(row["nwd/assigner"]) for row in results(tmp_path / "staged")] == acting


@pytest.mark.slow
def test_resume_keeps_the_runs_constant(runs, tmp_path):
    run = tmp_path / "run"
    last, checkpoint = resumable_copy(runs["nwd"], run, nwd_constant=33.0)  # a value the labels would not give
    # as a run saved before nwd.box_measure existed: it resumes with NWD, also when its loss is named
    for saved in (checkpoint["train_args"]["loss_config"], checkpoint["loss"]):  # one dict, or two copies
        saved["nwd"].pop("box_measure", None)
    torch.save(checkpoint, last)
    assert main(["--resume", str(last), "--loss", "nwd"]) == 0
    rows = results(run)
    assert len(rows) == 2 and float(rows[1]["nwd/constant"]) == 33.0
    assert load_checkpoint(last, RCNN_ARCH)["nwd_constant"] == 33.0
    assert load_checkpoint(last, RCNN_ARCH)["loss"]["nwd"]["box_measure"] == "nwd"


@pytest.mark.slow
def test_resume_keeps_nwd_off_where_max_small_share_turned_it_off(tiny_data, tmp_path):
    """At the tests' image size nearly every box is small: max_small_share 0.5 turns NWD off for the run,
    and its resumed epochs train with the run's switches, not the settings' own (NWD on)."""
    (tmp_path / "off.yaml").write_text("nwd:\n  max_small_share: 0.5\n")
    assert main(["--data", str(tiny_data), "--project", str(tmp_path), "--name", "off", "--loss", "nwd",
                 "--loss-cfg", str(tmp_path / "off.yaml"), *TRAIN_FLAGS]) == 0
    last, _ = resumable_copy(tmp_path / "off", tmp_path / "resumed")
    assert main(["--resume", str(last)]) == 0
    assert [float(row["nwd/active"]) for row in results(tmp_path / "resumed")] == [0.0, 0.0]
    # the resumed model's switches, as saved after its epoch: the stock matcher and box terms
    checkpoint = load_checkpoint(last, RCNN_ARCH)
    assert (checkpoint["epoch"], checkpoint["nwd_active"], checkpoint["nwd_assigner"]) == (1, False, False)
    model = model_from_checkpoint(checkpoint)
    assert isinstance(model.rpn.overlap, IoU) and model.rpn.switches.nwd.ratio == 0
