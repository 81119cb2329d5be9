"""NWD in YOLO: stock equality when off, a hand-computed mixed box loss, the assigner's direction on a
hand-built batch, the settings, and real training that leaves stock checkpoints."""

import copy
import math
import subprocess
import sys

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from ultralytics.utils.loss import BboxLoss, E2ELoss, v8DetectionLoss
from ultralytics.utils.tal import TaskAlignedAssigner, make_anchors

from yolo_sizeloss.config import LossConfigError, load_loss_config
from yolo_sizeloss.methods.nwd import ResolvedSettings, assigner_window, small_classes
from yolo_sizeloss.methods.overlaps import ResolvedNWD
from yolo_sizeloss.yolo.loss import (
    AnchorWeighting,
    MeasureBboxLoss,
    PendingWeights,
    WeightedBboxLoss,
    build_size_aware_loss,
    install_size_aware_loss,
    stage_overlap,
    training_label_sizes,
)

from test_loss import bccd_batch, build_model, same_items
from test_train import IMGSZ as TRAIN_IMGSZ, STOCK_ONLY  # validates in a process where yolo_sizeloss cannot load


def nwd_config(spec="nwd", **settings) -> dict:
    cfg = load_loss_config(spec)
    cfg["nwd"].update(settings)
    return cfg


# --- settings -----------------------------------------------------------------------------------

def test_defaults_and_combination_with_a_weighting():
    assert load_loss_config("nwd") == {"nwd": {"ratio": 0.5, "constant": "auto", "assigner": True, "assigner_from": 0.0, "assigner_until": 1.0, "assigner_classes": "all",
                                               "box_measure": "nwd", "safit_spread": 32, "safit_assigner_iou": "iou", "small_area": 1024, "max_small_share": 1.0,
                                               "normaliser": "assigned", "box_weights": "assigned",
                                               "rcnn_terms": ["rpn_box"]}}  # rcnn_terms: Faster R-CNN's
    cfg = load_loss_config("nwd+feedback")
    assert list(cfg) == ["nwd", "feedback"] and cfg["feedback"] == load_loss_config("feedback")["feedback"]


def test_constant_takes_a_positive_number_or_auto(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("nwd:\n  constant: 12.8\n  ratio: 1\n  assigner: false\n")
    assert load_loss_config("nwd", path)["nwd"] == {"ratio": 1, "constant": 12.8, "assigner": False,
                                                    "assigner_from": 0.0, "assigner_until": 1.0, "assigner_classes": "all", "box_measure": "nwd", "safit_spread": 32, "safit_assigner_iou": "iou", "small_area": 1024,
                                                    "max_small_share": 1.0, "normaliser": "assigned",
                                                    "box_weights": "assigned", "rcnn_terms": ["rpn_box"]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("nwd:\n  ratio: 1.5\n", r"o\.yaml:2: nwd\.ratio = 1\.5 is out of range: must be a number in \[0, 1\]"),
        ("nwd:\n  ratio: -0.1\n", r"o\.yaml:2: nwd\.ratio = -0\.1 .*\[0, 1\]"),
        ("nwd:\n  constant: 0\n", r"o\.yaml:2: nwd\.constant = 0 .*a number > 0 \(network-input pixels\) or auto"),
        ("nwd:\n  ratio: 0.5\n  constant: mean\n", r"o\.yaml:3: nwd\.constant = 'mean' .*or auto"),
        ("nwd:\n  constant: .inf\n", r"o\.yaml:2: nwd\.constant = inf .*> 0"),
        ("nwd:\n  safit_spread: 0\n", r"o\.yaml:2: nwd\.safit_spread = 0 .*a number > 0 \(network-input pixels\)"),
        ("nwd:\n  assigner: 1\n", r"o\.yaml:2: nwd\.assigner = 1 .*true, false, auto or a measure: safit, simd"),
        ("nwd:\n  small_area: 0\n", r"o\.yaml:2: nwd\.small_area = 0 .*a number > 0"),
        ("nwd:\n  assigner_until: 0\n", r"o\.yaml:2: nwd\.assigner_until = 0 .*a number in \(0, 1\]"),
        ("nwd:\n  assigner_from: 1\n", r"o\.yaml:2: nwd\.assigner_from = 1 .*a number in \[0, 1\)"),
        # each allowed alone, not together: the line of the setting the file gives
        ("nwd:\n  ratio: 1\n  assigner_from: 0.5\n  assigner_until: 0.5\n",
         r"o\.yaml:3: nwd\.assigner_from \(0\.5\) must be below nwd\.assigner_until \(0\.5\)"),
        ("nwd:\n  terms: [box]\n",
         r"o\.yaml:2: unknown key 'nwd\.terms' \(known: ratio, constant, assigner, assigner_from, assigner_until, assigner_classes, box_measure, safit_spread, safit_assigner_iou, small_area, max_small_share, normaliser, box_weights, rcnn_terms\)"),
        ("nwd:\n  box_measure: giou\n", r"o\.yaml:2: nwd\.box_measure = 'giou' .*one of nwd, safit, simd"),
        ("nwd:\n  safit_assigner_iou: ciou\n", r"o\.yaml:2: nwd\.safit_assigner_iou = 'ciou' .*one of iou, stock"),
    ],
)
def test_bad_settings_name_file_line_and_range(tmp_path, text, message):
    path = tmp_path / "o.yaml"
    path.write_text(text)
    with pytest.raises(LossConfigError, match=message):
        load_loss_config("nwd", path)


def test_an_empty_assigner_window_is_refused_after_every_file_is_merged(tmp_path):
    """The shipped late mode starts SAFit at a third of the epochs; a settings file that ends it before that
    is refused on its own line, though either value is allowed alone."""
    path = tmp_path / "o.yaml"
    path.write_text("nwd:\n  ratio: 1\n  assigner_until: 0.3\n")
    with pytest.raises(LossConfigError, match=r"o\.yaml:3: nwd\.assigner_from \(0\.33\) must be below "
                                              r"nwd\.assigner_until \(0\.3\)"):
        load_loss_config("safit_sharp_auto_late", path)
    assert load_loss_config("safit_sharp_auto_late")["nwd"]["assigner_from"] == 0.33


def test_auto_constant_is_the_mean_absolute_size_in_input_pixels():
    # a 640 x 480 image at imgsz 320 (scale 1/2): a 0.1 x 0.2 box is 32 x 48 px, a 0.5 x 0.5 box 160 x 120 px
    labels = [{"shape": (480, 640), "bboxes": [[0.5, 0.5, 0.1, 0.2], [0.3, 0.3, 0.5, 0.5]], "cls": [[2.0], [0.0]],
               "normalized": True, "bbox_format": "xywh"},
              {"shape": (100, 50), "bboxes": [[0.5, 0.5, 1.0, 0.5]], "cls": [[1.0]]}]  # scale 3.2: 160 x 160 px
    widths, heights, classes = training_label_sizes(labels, 320)
    assert torch.allclose(widths, torch.tensor([32.0, 160.0, 160.0], dtype=torch.float64))
    assert torch.allclose(heights, torch.tensor([48.0, 120.0, 160.0], dtype=torch.float64))
    assert classes.tolist() == [2, 0, 1]
    weighting = AnchorWeighting(nwd_config())
    assert weighting.nwd.constant is None  # auto waits for the labels
    weighting.resolve_from_labels(labels, 320)
    assert weighting.nwd.constant == pytest.approx((math.sqrt(32 * 48) + math.sqrt(160 * 120) + 160) / 3)
    assert weighting.epoch_stats()["nwd/constant"] == weighting.nwd.constant  # recorded in results.csv
    fixed = AnchorWeighting(nwd_config(constant=12.8))
    fixed.resolve_from_labels(labels, 320)  # a number stays as configured
    assert fixed.nwd.constant == 12.8
    with pytest.raises(ValueError, match="hold none"):
        AnchorWeighting(nwd_config()).resolve_from_labels([{"shape": (10, 10), "bboxes": [], "cls": []}], 320)


def test_auto_assigner_uses_nwd_while_small_training_boxes_are_fewer_than_half():
    # at imgsz 320 a 640 x 480 image is halved: 0.1 x 0.1 of it is 32 x 24 = 768 px^2 (small), 0.5 x 0.5 is 19200
    def labels(small: int, other: int) -> list[dict]:
        return [{"shape": (480, 640), "bboxes": [[0.5, 0.5, 0.1, 0.1]] * small + [[0.5, 0.5, 0.5, 0.5]] * other,
                 "cls": [[0.0]] * (small + other)}]

    for small, other, uses_nwd in ((1, 2, True), (1, 1, False), (2, 1, False), (0, 3, True)):
        weighting = AnchorWeighting(nwd_config(assigner="auto", constant=40.0))
        assert weighting.nwd.assigner is None  # auto waits for the labels
        weighting.resolve_from_labels(labels(small, other), 320)
        assert weighting.nwd.assigner is uses_nwd, (small, other)
        assert weighting.epoch_stats()["nwd/assigner"] == float(uses_nwd)  # recorded in results.csv
    gated = AnchorWeighting(nwd_config(assigner="auto", constant=40.0, small_area=700))  # 768 is no longer small
    gated.resolve_from_labels(labels(2, 1), 320)
    assert gated.nwd.assigner is True
    assert "nwd/assigner" not in AnchorWeighting(nwd_config(constant=40.0)).epoch_stats()  # a column only for auto


@pytest.mark.parametrize("decision", [True, False])
def test_auto_assigner_is_the_explicit_setting_it_resolves_to_bit_for_bit(decision):
    model = build_model("yolov8n.yaml")
    batch = bccd_batch()
    preds = model(batch["img"])
    explicit = build_size_aware_loss(model, AnchorWeighting(nwd_config(assigner=decision, constant=40.0)))
    weighting = AnchorWeighting(nwd_config(assigner="auto", constant=40.0))
    one_box = [[0.5, 0.5, 0.5, 0.5] if decision else [0.5, 0.5, 0.01, 0.01]]  # not small / small at imgsz 320
    weighting.resolve_from_labels([{"shape": (480, 640), "bboxes": one_box, "cls": [[0.0]]}], 320)
    auto = build_size_aware_loss(model, weighting)
    expected_loss, expected_items = explicit(preds, batch)
    loss, items = auto(preds, batch)
    assert torch.equal(loss, expected_loss) and same_items(items, expected_items)


def stock_loss_check():
    """A function of (loss config, Ultralytics labels) that resolves the config on those labels at imgsz 320 and
    returns its ``AnchorWeighting`` and whether its loss of a yolov8n's predictions for a BCCD batch is the
    stock loss's, bit for bit."""
    model = build_model("yolov8n.yaml")
    batch = bccd_batch()
    preds = model(batch["img"])
    expected_loss, expected_items = model.init_criterion()(preds, batch)

    def check(config: dict, labels: list[dict]) -> tuple[AnchorWeighting, bool]:
        weighting = AnchorWeighting(config)
        weighting.resolve_from_labels(labels, 320)
        loss, items = build_size_aware_loss(model, weighting)(preds, batch)
        return weighting, torch.equal(loss, expected_loss) and same_items(items, expected_items)
    return check


def test_max_small_share_turns_nwd_off_for_mostly_small_data_bit_for_bit():
    """A loss that measures by SAFit in both places (``safit_sharp``) with ``max_small_share`` 0.5: on labels
    two thirds small it is the stock loss bit for bit (recorded as nwd/active 0); on labels one third
    small it acts."""
    check = stock_loss_check()
    config = load_loss_config("safit_sharp")
    config["nwd"].update(max_small_share=0.5, constant=40.0)

    def labels(small: int, other: int) -> list[dict]:  # 768 px^2 (small) and 19200 px^2 at imgsz 320
        return [{"shape": (480, 640), "bboxes": [[0.5, 0.5, 0.1, 0.1]] * small + [[0.5, 0.5, 0.5, 0.5]] * other,
                 "cls": [[0.0]] * (small + other)}]

    for small, other, active in ((2, 1, False), (1, 2, True)):
        weighting, same = check(config, labels(small, other))
        assert (weighting.nwd.active, same, weighting.epoch_stats()["nwd/active"]) == (active, not active, float(active))
    assert "nwd/active" not in AnchorWeighting(nwd_config(constant=40.0)).epoch_stats()  # a column only when set


def test_small_classes_are_those_more_than_half_of_whose_boxes_are_small():
    """Sides 16 px (small below 32 x 32) and 40 px: class 0 two of three small, class 1 one of two (half: not more),
    class 4 one of one; a box of infinite size is left out (class 7's only one)."""
    sides = torch.tensor([16.0, 16, 40, 16, 40, 16, float("inf")], dtype=torch.float64)
    classes = torch.tensor([0, 0, 0, 1, 1, 4, 7])
    assert small_classes(sides, sides, classes, 1024, "test") == (0, 4)
    assert small_classes(sides, sides, classes, 100, "test") == ()


def test_assigner_classes_small_without_a_small_class_is_the_stock_loss_bit_for_bit():
    """``safit_small_classes`` (SAFit's assigner for the classes whose boxes are mostly small, the stock box loss):
    on labels where no class's boxes are mostly small it is the stock loss bit for bit; where one class's are,
    it is not."""
    check = stock_loss_check()
    config = load_loss_config("safit_small_classes")
    config["nwd"]["constant"] = 40.0

    def labels(class_0_small: bool) -> list[dict]:  # at imgsz 320: 768 px^2 (small) and 19200 px^2
        boxes = [[0.5, 0.5, 0.1, 0.1]] * 2 + [[0.5, 0.5, 0.5, 0.5]] * 3
        return [{"shape": (480, 640), "bboxes": boxes, "cls": [[0.0] if class_0_small else [2.0]] * 2 + [[2.0]] * 3}]

    for class_0_small, classes in ((False, ()), (True, (0,))):
        weighting, same = check(config, labels(class_0_small))
        assert (weighting.nwd.classes, same) == (classes, not class_0_small)


def test_measured_gts_marks_the_small_classes_and_copies_no_host_data_after_its_first_call():
    """``ResolvedNWD.measured_gts`` (which ground truths the gated assigner measures) runs every step: after its first
    call on a device it builds no tensor from host data (on a GPU such a copy makes the host wait every step)."""
    class HostData(TorchDispatchMode):  # counts tensors made from Python data (torch.tensor's lift_fresh)
        made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            HostData.made += func is torch.ops.aten.lift_fresh.default
            return func(*args, **(kwargs or {}))

    settings = {**load_loss_config("safit_small_classes")["nwd"], "constant": 40.0}
    resolved = ResolvedNWD.from_settings(settings, "test", ResolvedSettings(None, None, classes=(0, 4)))
    gt_classes = torch.tensor([[0.0, 1.0, 4.0], [2.0, 0.0, 0.0]])
    expected = torch.tensor([[True, False, True], [False, True, True]])
    assert torch.equal(resolved.measured_gts(gt_classes), expected)
    with HostData():
        second = resolved.measured_gts(gt_classes)
    assert torch.equal(second, expected) and HostData.made == 0


def test_unresolved_auto_assigner_stops_before_the_first_loss_with_what_to_do():
    with pytest.raises(RuntimeError, match="nwd.assigner is auto but was not resolved"):
        build_size_aware_loss(build_model("yolov8n.yaml"), AnchorWeighting(nwd_config(assigner="auto", constant=40.0)))


def test_unresolved_auto_constant_stops_the_loss_with_what_to_do():
    model = build_model("yolov8n.yaml")
    batch = bccd_batch()
    with pytest.raises(RuntimeError, match="resolve_from_labels"):
        build_size_aware_loss(model, AnchorWeighting(nwd_config()))(model(batch["img"]), batch)


# --- the loss -----------------------------------------------------------------------------------

@pytest.mark.parametrize("yaml_name, stock_type", [("yolov8n.yaml", v8DetectionLoss), ("yolo26n.yaml", E2ELoss)])
def test_ratio_zero_without_the_assigner_is_the_stock_loss_bit_for_bit(yaml_name, stock_type):
    model = build_model(yaml_name)
    batch = bccd_batch()
    preds = model(batch["img"])
    expected_loss, expected_items = model.init_criterion()(preds, batch)
    neutral = nwd_config("nwd+feedback", ratio=0, assigner=False)  # constant stays auto: never needed
    neutral["feedback"]["g_max"] = 1.0
    for cfg in ({"nwd": neutral["nwd"]}, neutral):
        weighting = AnchorWeighting(cfg)
        criterion = build_size_aware_loss(model, weighting)
        assert type(criterion) is stock_type
        for _ in range(2):
            loss, items = criterion(preds, batch)
            weighting.end_step()
            assert torch.equal(loss, expected_loss) and same_items(items, expected_items), list(cfg)

    # each use on its own changes what it should: the ratio only the box term, the assigner the assignment
    mixed = build_size_aware_loss(model, AnchorWeighting(nwd_config(ratio=0.5, assigner=False, constant=40.0)))
    items = mixed(preds, batch)[1]
    names = list(expected_items)
    assert not torch.equal(items[names[0]], expected_items[names[0]])  # box
    assert all(torch.equal(items[k], expected_items[k]) for k in names[1:])  # cls, dfl (l1) untouched
    assigned = build_size_aware_loss(model, AnchorWeighting(nwd_config(ratio=0, assigner=True, constant=40.0)))
    assert not torch.equal(assigned(preds, batch)[1][names[1]], expected_items[names[1]])  # new target scores


def test_mixed_box_loss_of_one_pair_by_hand():
    """One foreground anchor at stride 8, one background anchor; boxes given in stride units as BboxLoss gets them.

    Predicted 16 x 16 px at (8, 8), target 24 x 24 px at (8, 8); both square, so CIoU = IoU - rho^2 / c^2:
    IoU = 256 / 576, centre distance^2 = 4^2 + 4^2 = 32, enclosing diagonal^2 = 24^2 + 24^2 = 1152.
    NWD: Gaussian vectors (16, 16, 8, 8) and (20, 20, 12, 12), W2 = sqrt(4 * 4^2) = 8, C = 16: exp(-1/2).
    """
    ratio, constant, score, normaliser = 0.25, 16.0, 0.75, 1.5
    ciou = 256 / 576 - 32 / 1152
    expected = ((1 - ratio) * (1 - ciou) + ratio * (1 - math.exp(-8 / 16))) * score / normaliser

    torch.manual_seed(0)
    pred_dist = torch.randn(1, 2, 64)
    pred_bboxes = torch.tensor([[[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 9.0, 9.0]]])  # stride units
    target_bboxes = torch.tensor([[[1.0, 1.0, 4.0, 4.0], [5.0, 5.0, 6.0, 6.0]]])
    anchor_points = torch.tensor([[2.5, 2.5], [1.5, 1.5]])
    target_scores = torch.tensor([[[0.0, score, 0.0], [0.0, 0.0, 0.0]]])
    fg_mask = torch.tensor([[True, False]])
    stride = torch.tensor([[8.0], [16.0]])
    args = (pred_dist, pred_bboxes, anchor_points, target_bboxes, target_scores, torch.tensor(normaliser), fg_mask,
            torch.tensor([64.0, 64.0]), stride)

    stock_iou, stock_dfl = BboxLoss(16)(*args)
    assert stock_iou.item() == pytest.approx((1 - ciou) * score / normaliser, abs=1e-6)
    weighting = AnchorWeighting(nwd_config(ratio=ratio, constant=constant))
    loss_iou, loss_dfl = MeasureBboxLoss(BboxLoss(16), weighting)(*args)
    assert loss_iou.item() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(loss_dfl, stock_dfl)

    # the size-aware box weight scales the NWD term with the CIoU term (the wrapper order of install)
    pending = PendingWeights(box=torch.tensor([[2.0, 1.0]]))
    doubled, _ = WeightedBboxLoss(MeasureBboxLoss(BboxLoss(16), weighting), pending)(*args)
    assert doubled.item() == pytest.approx(2 * expected, abs=1e-6)
    # ratio 1 is the NWD term alone, ratio 0 the stock value
    weighting.config["nwd"]["ratio"] = 1
    assert MeasureBboxLoss(BboxLoss(16), weighting)(*args)[0].item() == pytest.approx(
        (1 - math.exp(-0.5)) * score / normaliser, abs=1e-6)
    weighting.config["nwd"]["ratio"] = 0
    assert torch.equal(MeasureBboxLoss(BboxLoss(16), weighting)(*args)[0], stock_iou)


# --- the assigner -------------------------------------------------------------------------------

SMALL, LARGE = [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 120.0, 120.0]  # 10 x 10 and 80 x 80 px, imgsz 128


def small_and_large_batch():
    """The assigner's inputs for one 128 x 128 image: every anchor inside an object predicts that object's
    box shifted, the small one poorly (4 px right and down: CIoU 0.14), the large one well (2 px: CIoU 0.91);
    class probabilities 0.5. Anchors of strides 8, 16, 32, in pixels, as the stock loss passes them."""
    feats = [torch.zeros(1, 1, 128 // s, 128 // s) for s in (8, 16, 32)]
    anchor_points, stride_tensor = make_anchors(feats, torch.tensor([8.0, 16.0, 32.0]), 0.5)
    anchors = anchor_points * stride_tensor
    pred = torch.cat([anchors - 4, anchors + 4], -1)  # an 8 x 8 box on every anchor elsewhere
    for box, shift in ((SMALL, 4.0), (LARGE, 2.0)):
        box = torch.tensor(box)
        margin = torch.clamp(16 - (box[2:] - box[:2]), min=0) / 2  # the assigner widens sides under 16 px to 16
        inside = ((anchors > box[:2] - margin) & (anchors < box[2:] + margin)).all(-1)
        pred[inside] = box + shift
    scores = torch.full((1, len(anchors), 3), 0.5)
    gt_labels = torch.tensor([[[2.0], [0.0]]])
    gt_bboxes = torch.tensor([[SMALL, LARGE]])
    return scores, pred[None], anchors, gt_labels, gt_bboxes, torch.ones(1, 2, 1)


def test_nwd_overlap_raises_the_poorly_fitted_small_objects_target_scores():
    inputs = small_and_large_batch()
    stock_criterion = build_model("yolov8n.yaml").init_criterion()
    assert type(stock_criterion.assigner) is TaskAlignedAssigner  # the real one: top-k 10, alpha 0.5, beta 6
    ours = install_size_aware_loss(copy.deepcopy(stock_criterion),
                                   AnchorWeighting(nwd_config(constant=45.0)))  # (10 + 80) / 2 px
    assert type(ours.assigner.assigner) is TaskAlignedAssigner  # the stock class; only its overlap is NWD
    _, _, iou_scores, iou_fg, iou_idx = stock_criterion.assigner(*inputs)
    _, _, nwd_scores, nwd_fg, nwd_idx = ours.assigner(*inputs)

    for obj in (0, 1):  # each object keeps exactly its anchors
        assert torch.equal(iou_fg & (iou_idx == obj), nwd_fg & (nwd_idx == obj)), obj
    small = iou_fg & (iou_idx == 0)
    large = iou_fg & (iou_idx == 1)
    assert 0 < small.sum() <= 10 and 0 < large.sum() <= 10
    iou_small, nwd_small = iou_scores[small].sum(-1), nwd_scores[small].sum(-1)
    iou_large, nwd_large = iou_scores[large].sum(-1), nwd_scores[large].sum(-1)
    # the small object's target scores were bounded by its CIoU (~0.14); NWD (~0.88) lifts them six-fold
    assert iou_small.max() < 0.2 and (nwd_small > 4 * iou_small).all()
    # the large object's barely move (CIoU ~0.905, NWD ~0.939)
    assert (nwd_large - iou_large).abs().max() < 0.05
    # the assigner's class is untouched: a fresh stock assigner still measures CIoU
    fresh = build_model("yolov8n.yaml").init_criterion().assigner(*inputs)[2]
    assert torch.equal(fresh, iou_scores)


# --- real training ------------------------------------------------------------------------------

def test_assigner_window_is_a_share_of_the_schedule():
    settings = load_loss_config("nwd")["nwd"]
    assert assigner_window(settings, 60) == (0, 60)  # the paper's: the whole training
    assert assigner_window({**settings, "assigner_until": 1 / 3}, 60) == (0, 20)
    assert assigner_window({**settings, "assigner_until": 0.33}, 100) == (0, 33)
    assert assigner_window({**settings, "assigner_until": 0.01}, 10) == (0, 1)  # at least the first epoch
    assert [assigner_window({**settings, "assigner_until": 0.5}, n) for n in (5, 7)] == [(0, 3), (0, 4)]  # halves up
    late = {**settings, "assigner_from": 0.33}
    assert assigner_window(late, 60) == (20, 60) and assigner_window(late, 2) == (1, 2)  # 19.8, 0.66 round up
    assert assigner_window({**late, "assigner_until": 0.34}, 10) == (3, 4)  # 3.3 and 3.4 both round to 3: one epoch
    assert assigner_window({**settings, "assigner_from": 0.9}, 1) == (0, 1)  # a one-epoch run has only epoch 0


def test_staging_the_assigner_switches_between_its_measure_and_the_stock_ciou():
    """``stage_overlap`` off on a criterion whose assigner measures by SAFit (normaliser held): from then on its
    loss is, bit for bit, that of the same settings with ``assigner: false`` (the stock CIoU ranks, and the two
    sums are one), and the weighting knows; on again (``nwd.assigner_from``), the SAFit loss is back bit for bit."""
    model = build_model("yolov8n.yaml")
    batch = bccd_batch()
    preds = model(batch["img"])
    settings = {**load_loss_config("safit_sharp_auto_norm")["nwd"], "constant": 40.0, "max_small_share": 1.0}
    staged = AnchorWeighting({"nwd": settings})
    criterion = build_size_aware_loss(model, staged)
    assert staged.holds_normaliser and staged.assigner_measures
    before, before_items = criterion(preds, batch)
    stage_overlap(criterion, staged, False)
    after, after_items = criterion(preds, batch)
    expected, expected_items = build_size_aware_loss(model, AnchorWeighting({"nwd": {**settings, "assigner": False}}))(
        preds, batch)
    assert not staged.holds_normaliser and not staged.assigner_measures
    assert torch.equal(after, expected) and same_items(after_items, expected_items)
    assert not torch.equal(before, after)  # SAFit had ranked otherwise
    stage_overlap(criterion, staged, True)
    again, again_items = criterion(preds, batch)
    assert staged.holds_normaliser and torch.equal(again, before) and same_items(again_items, before_items)


@pytest.mark.slow
def test_nwd_modes_train_and_leave_stock_checkpoints(bccd_subset, tmp_path):
    from yolo_sizeloss.cli import train_main
    from yolo_sizeloss.results_csv import read_columns

    # auto: the mean sqrt(w * h) of the subset's training boxes at the run's imgsz, from the label files and image sizes
    from PIL import Image

    sizes = []
    for label_file in sorted((bccd_subset.parent / "labels" / "train").glob("*.txt")):
        w0, h0 = Image.open(bccd_subset.parent / "images" / "train" / f"{label_file.stem}.jpg").size
        for line in label_file.read_text().splitlines():
            _, _, _, w, h = map(float, line.split())
            sizes.append(math.sqrt(w * w0 * h * h0) * TRAIN_IMGSZ / max(w0, h0))
    expected_constant = sum(sizes) / len(sizes)
    # nearly every box is small at this imgsz, where assigner: auto keeps the stock assigner (the platelets-alone
    # case, test_rcnn_nwd.py); "small" set below a quarter of the boxes' areas makes it choose NWD (below 1/2)
    small_area = sorted(size * size for size in sizes)[len(sizes) // 4]
    small_share = sum(size * size < small_area for size in sizes) / len(sizes)
    assert small_share < 0.5
    auto = tmp_path / "auto.yaml"
    auto.write_text(f"nwd:\n  assigner: auto\n  small_area: {small_area}\n")
    # the losses divided by the CIoU targets' sum (nwd.normaliser), the box terms weighed by those targets
    # (nwd.box_weights), and NWD ranking anchors in the first of two epochs only (nwd.assigner_until)
    held = tmp_path / "held.yaml"
    held.write_text("nwd:\n  normaliser: ciou\n  box_weights: ciou\n  assigner_until: 0.5\n")
    # and the reverse, the stock CIoU in the first of two epochs (nwd.assigner_from), SAFit in the second
    late = tmp_path / "late.yaml"
    late.write_text("nwd:\n  normaliser: ciou\n  assigner_from: 0.5\n")
    bests = []
    for name, loss, variant in (("nwd", "nwd", None), ("nwd+feedback", "nwd+feedback", auto),
                                ("held", "nwd", held), ("late", "nwd", late)):
        code = train_main(["--data", str(bccd_subset), "--loss", loss, "--model", "yolov8n.yaml", "--project",
                           str(tmp_path), "--name", name, "--epochs", "2" if name in ("held", "late") else "1",
                           "--imgsz", str(TRAIN_IMGSZ), "--batch", "8",
                           "--workers", "0", "--device", "cpu", "plots=False",
                           *(["--loss-cfg", str(variant)] if variant else [])])
        assert code == 0, name
        run_dir = tmp_path / name
        saved = yaml.safe_load((run_dir / "loss.yaml").read_text())
        assert saved == {"loss": loss, "settings": load_loss_config(loss, variant)}
        columns = read_columns(run_dir / "results.csv")
        assert columns["train/box_loss"][0] > 0
        assert columns["nwd/constant"][0] == pytest.approx(expected_constant, rel=1e-3)
        # the NWD assigner raised the target scores, so the assigned sum exceeded the CIoU one
        assert ("nwd/normaliser_scale" in columns) == (name in ("held", "late"))
        if name == "held":  # the second epoch's assigner measures by the stock CIoU: the two sums are one
            assert columns["nwd/assigner"] == [1.0, 0.0] and columns["nwd/normaliser_scale"][1] == 1.0
            assert 1 < columns["nwd/normaliser_scale"][0] < 10
        elif name == "late":  # the first epoch's by the stock CIoU, the second's by NWD
            assert columns["nwd/assigner"] == [0.0, 1.0] and columns["nwd/normaliser_scale"][0] == 1.0
            assert 1 < columns["nwd/normaliser_scale"][1] < 10
        elif variant == auto:
            assert saved["settings"]["nwd"]["assigner"] == "auto"
            assert columns["nwd/assigner"][0] == 1.0  # NWD ranks the anchors
            assert columns["feedback/steps"][0] >= 1
        else:
            assert "nwd/assigner" not in columns
        bests.append(str(run_dir / "weights" / "best.pt"))
    done = subprocess.run([sys.executable, "-c", STOCK_ONLY, str(bccd_subset), *bests], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("VALIDATED") == 4
