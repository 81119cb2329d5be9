"""SAFit and SimD: values computed by hand, their limits, and what they change in label assignment."""

import math

import pytest
import torch
from ultralytics.utils.tal import TaskAlignedAssigner

from yolo_sizeloss.methods.nwd import ResolvedSettings
from yolo_sizeloss.methods.safit import safit, safit_blend_weight, safit_matrix
from yolo_sizeloss.methods.simd import simd, simd_matrix
from yolo_sizeloss.methods.overlaps import SAFitOverlap, SimDOverlap

TINY = torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([[1.0, 0.0, 5.0, 4.0]])  # 4x4, shifted 1 px
LARGE = torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[1.0, 0.0, 101.0, 100.0]])  # 100x100, shifted 1 px
C = 12.8  # NWD's constant in these tests (the authors' AI-TOD value)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_safit_by_hand_on_a_tiny_and_a_large_pair():
    # tiny: IoU 12/20 = 0.6; NWD exp(-1/12.8) (centres 1 px apart, same size); w = sigmoid((4 - 32)/32)
    w = sigmoid((4 - 32) / 32)
    expected = w * 0.6 + (1 - w) * math.exp(-1 / C)
    assert safit(TINY[1], TINY[0], C).item() == pytest.approx(expected, rel=1e-5)
    assert safit_blend_weight(TINY[0]).item() == pytest.approx(sigmoid(-28 / 32), rel=1e-6)
    # large: IoU 9900/10100; w = sigmoid((100 - 32)/32)
    w = sigmoid((100 - 32) / 32)
    expected = w * 9900 / 10100 + (1 - w) * math.exp(-1 / C)
    assert safit(LARGE[1], LARGE[0], C).item() == pytest.approx(expected, rel=1e-5)


def test_safit_tends_to_iou_for_large_boxes_and_mostly_nwd_for_tiny_ones():
    huge = torch.tensor([[0.0, 0.0, 1e4, 1e4]])
    shifted = huge + torch.tensor([500.0, 0.0, 500.0, 0.0])
    iou = 9500 / 10500
    assert safit(shifted, huge, C).item() == pytest.approx(iou, rel=1e-6)  # w = sigmoid(311): 1
    # a ground truth of area 0: w = sigmoid(-1), the formula's floor, so NWD carries 73% (not all) of it
    point = torch.tensor([[10.0, 10.0, 10.0, 10.0]])
    assert safit_blend_weight(point).item() == pytest.approx(sigmoid(-1))
    nearby = point + 2.0
    value = safit(nearby, point, C).item()
    assert math.isfinite(value) and value == pytest.approx((1 - sigmoid(-1)) * math.exp(-math.sqrt(8) / C), rel=1e-4)


def test_safit_spread_sharpens_the_blend_by_hand():
    """w = sigmoid((sqrt(A) - 32) / spread): SAFit's spread (32) against 8, for a 24 px, a 32 px and a 40 px
    ground truth, and the blend itself for the 24 px one."""
    boxes = torch.tensor([[0.0, 0.0, 24.0, 24.0], [0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 40.0, 40.0]])
    assert safit_blend_weight(boxes).tolist() == pytest.approx([sigmoid(-0.25), 0.5, sigmoid(0.25)], abs=1e-6)
    assert safit_blend_weight(boxes, spread=8.0).tolist() == pytest.approx([sigmoid(-1), 0.5, sigmoid(1)], abs=1e-6)
    pred = boxes[:1] + torch.tensor([2.0, 0.0, 2.0, 0.0])  # shifted 2 px: IoU 22/26, NWD exp(-2/C)
    expected = sigmoid(-1) * 22 / 26 + (1 - sigmoid(-1)) * math.exp(-2 / C)
    assert safit(pred, boxes[:1], C, spread=8.0).item() == pytest.approx(expected, rel=1e-5)
    assert safit_matrix(boxes[:1], pred, C, spread=8.0).item() == pytest.approx(expected, rel=1e-5)


def test_simd_by_hand_and_scale_invariant():
    # centres 1 px apart, widths 4 + 4: D_loc = 1 / (8 / 6.13); same shape: D_shape = 0
    assert simd(*TINY).item() == pytest.approx(math.exp(-6.13 / 8), rel=1e-5)
    assert simd(*LARGE).item() == pytest.approx(math.exp(-6.13 / 200), rel=1e-5)
    # the 4x4 pair shifted 1 px is the 100x100 pair shifted 25 px: one similarity for both
    assert simd(*TINY).item() == pytest.approx(simd(LARGE[0], LARGE[0] + torch.tensor([25.0, 0, 25, 0])).item(), rel=1e-4)
    # a shape difference: widths 4 and 6, centres equal: D_loc = 0, D_shape = 2 / (10 / 6.13)
    wider = torch.tensor([[-1.0, 0.0, 5.0, 4.0]])
    assert simd(TINY[0], wider).item() == pytest.approx(math.exp(-2 / (10 / 6.13)), rel=1e-4)


@pytest.mark.parametrize("measure", ["safit", "simd"])
def test_identical_disjoint_and_zero_size_boxes(measure):
    f = (lambda a, b: safit(a, b, C)) if measure == "safit" else simd
    box = torch.tensor([[10.0, 10.0, 30.0, 40.0]])
    assert f(box, box).item() == pytest.approx(1.0, abs=1e-4)
    far = box + 500.0
    value = f(far, box).item()
    assert 0 <= value < 1e-3 and math.isfinite(value)
    points = torch.zeros(2, 4)
    assert torch.isfinite(f(points, points)).all() and torch.isfinite(f(points, box.expand(2, 4))).all()


def test_the_pairwise_forms_agree_with_the_elementwise_ones():
    torch.manual_seed(0)
    corners = torch.rand(5, 2) * 100
    gts = torch.cat([corners, corners + torch.rand(5, 2) * 60 + 1], 1)
    corners = torch.rand(7, 2) * 100
    boxes = torch.cat([corners, corners + torch.rand(7, 2) * 60 + 1], 1)
    pairs_gt, pairs_box = gts.repeat_interleave(7, 0), boxes.repeat(5, 1)
    assert torch.allclose(safit_matrix(gts, boxes, C), safit(pairs_box, pairs_gt, C).view(5, 7), atol=1e-6)
    assert torch.allclose(simd_matrix(gts, boxes), simd(pairs_gt, pairs_box).view(5, 7), atol=1e-6)
    overlap = SAFitOverlap(C)
    assert torch.allclose(overlap.pairwise(gts, boxes).flatten(), overlap.elementwise(pairs_gt, pairs_box), atol=1e-6)


def positives_of_a_small_object(overlap) -> int:
    """Positive anchors the stock task-aligned assigner gives a 10x10 object on a stride-8 grid when
    every prediction sits 12 px off (no overlap), ranked by ``overlap`` (None: its stock CIoU)."""
    assigner = TaskAlignedAssigner(topk=10, num_classes=1, alpha=0.5, beta=6.0)
    if overlap is not None:
        assigner.iou_calculation = overlap.elementwise
    grid = torch.arange(4, 64, 8.0)
    anchors = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).view(-1, 2)
    predictions = torch.cat([anchors - 5 + 12, anchors + 5 + 12], -1)[None]
    gt = torch.tensor([[[27.0, 27.0, 37.0, 37.0]]])
    scores = torch.full((1, len(anchors), 1), 0.5)
    _, _, _, fg, _ = assigner(scores, predictions, anchors, torch.zeros(1, 1, 1), gt, torch.ones(1, 1, 1))
    return int(fg.sum())


def test_each_measure_gives_a_small_object_more_positive_anchors_than_ciou():
    stock = positives_of_a_small_object(None)
    assert positives_of_a_small_object(SAFitOverlap(C)) > stock
    assert positives_of_a_small_object(SimDOverlap()) > stock


@pytest.mark.parametrize("variant, overlap_type", [("safit_assigner", SAFitOverlap), ("simd_assigner", SimDOverlap)])
def test_a_shipped_variant_puts_the_measure_in_both_families_assignment(variant, overlap_type):
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from yolo_sizeloss.config import load_loss_config
    from yolo_sizeloss.rcnn.switches import LossSwitches
    from yolo_sizeloss.yolo.loss import AnchorWeighting, build_size_aware_loss, loss_branches

    config = load_loss_config("nwd", variant)
    config["nwd"]["constant"] = C  # 'auto' is resolved from training labels when a training starts
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.args = get_cfg()
    criterion = build_size_aware_loss(model, AnchorWeighting(config))
    for branch in loss_branches(criterion):
        measure = branch.assigner.assigner.iou_calculation
        assert isinstance(measure.__self__, overlap_type) and measure.__func__ is overlap_type.elementwise
    images = torch.rand(2, 3, 128, 128)
    batch = {"img": images, "batch_idx": torch.tensor([0, 1]), "cls": torch.tensor([[2.0], [0.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.05, 0.05], [0.3, 0.3, 0.4, 0.4]])}
    loss, _ = criterion(model.train()(images), batch)
    assert torch.isfinite(loss).all()
    switches = LossSwitches.from_config(config, ResolvedSettings(C, None))
    assert isinstance(switches.rpn_overlap(), overlap_type) and switches.nwd.assigner == variant.split("_")[0]


def test_safit_spread_reaches_both_families_assignment_and_box_loss():
    """``nwd.safit_spread`` is the blend YOLO's assigner and box loss and Faster R-CNN's RPN matcher and box
    term measure by: a 24 px ground truth and its box shifted 2 px, by hand as in the test above."""
    from yolo_sizeloss.config import load_loss_config
    from yolo_sizeloss.rcnn.switches import LossSwitches
    from yolo_sizeloss.yolo.loss import AnchorWeighting

    config = load_loss_config("safit")
    config["nwd"].update(constant=C, safit_spread=8.0)
    gt, pred = torch.tensor([[0.0, 0.0, 24.0, 24.0]]), torch.tensor([[2.0, 0.0, 26.0, 24.0]])
    expected = sigmoid(-1) * 22 / 26 + (1 - sigmoid(-1)) * math.exp(-2 / C)
    weighting, switches = AnchorWeighting(config), LossSwitches.from_config(config)
    assert weighting.nwd.overlap().elementwise(gt, pred).item() == pytest.approx(expected, rel=1e-5)
    assert weighting.nwd.box_similarity(pred, gt).item() == pytest.approx(expected, rel=1e-5)  # plain IoU without a CIoU
    assert switches.rpn_overlap().pairwise(gt, pred).item() == pytest.approx(expected, rel=1e-5)
    assert switches.nwd.box_similarity(pred, gt).item() == pytest.approx(expected, rel=1e-5)


def assign_two_small_objects(observed):
    """Target scores (B, A, 2) and foreground mask ``observed`` (an assigner as the loss calls it) gives two 10 x 10
    objects far apart on a stride-8 grid, class 0 at the left and class 1 at the right, every prediction 12 px
    off its anchor (no overlap with either), as in ``positives_of_a_small_object``."""
    grid = torch.arange(4, 128, 8.0)
    anchors = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).view(-1, 2)
    predictions = torch.cat([anchors - 5 + 12, anchors + 5 + 12], -1)[None]
    gt = torch.tensor([[[27.0, 27.0, 37.0, 37.0], [91.0, 91.0, 101.0, 101.0]]])
    scores = torch.full((1, len(anchors), 2), 0.5)
    labels, valid = torch.tensor([[[0.0], [1.0]]]), torch.ones(1, 2, 1)
    _, _, target_scores, fg, target_gt_idx = observed(scores, predictions, anchors, labels, gt, valid)
    return target_scores, fg, target_gt_idx


def test_assigner_classes_small_measures_the_small_class_by_safit_and_the_other_by_the_stock_ciou():
    """``nwd.assigner_classes: small`` (``safit_small_classes``): on labels where class 0's boxes are small and
    class 1's large, YOLO's assigner gives the class-0 object SAFit's positives and targets and the class-1 object,
    as small in this batch as the other, the stock CIoU's, each exactly; where no class is small it is the stock
    assigner (the shipped variant then trains the stock loss)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from yolo_sizeloss.config import load_loss_config
    from yolo_sizeloss.yolo.loss import AnchorWeighting, build_size_aware_loss, loss_branches

    model = DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    model.args = get_cfg()

    def observed(classes_small: list[bool], assigner_classes: str = "small"):
        config = load_loss_config("safit_small_classes")
        config["nwd"].update(constant=C, assigner_classes=assigner_classes)
        weighting = AnchorWeighting(config)
        # a 640 x 640 image at imgsz 320: 0.05 of it is 16 px (small), 0.5 of it 160 px
        boxes = [[0.5, 0.5, 0.05 if small else 0.5, 0.05 if small else 0.5] for small in classes_small]
        weighting.resolve_from_labels([{"shape": (640, 640), "bboxes": boxes, "cls": [[0.0], [1.0]]}], 320)
        return weighting, loss_branches(build_size_aware_loss(model, weighting))[0].assigner

    gated_weighting, gated = observed([True, False])
    assert gated_weighting.nwd.classes == (0,)
    _, everywhere = observed([True, False], "all")
    stock_weighting, stock = observed([False, False])
    assert (stock_weighting.nwd.classes, stock_weighting.nwd.assigner) == ((), False)
    assert "pair_overlaps" not in vars(stock.assigner) and "iou_calculation" not in vars(stock.assigner)
    (gated_scores, gated_fg, gated_gt), (safit_scores, safit_fg, safit_gt), (stock_scores, stock_fg, stock_gt) = (
        assign_two_small_objects(observed) for observed in (gated, everywhere, stock))
    for gt, reference in ((0, (safit_scores, safit_fg, safit_gt)), (1, (stock_scores, stock_fg, stock_gt))):
        mine = gated_fg & (gated_gt == gt)
        theirs = reference[1] & (reference[2] == gt)
        assert torch.equal(mine, theirs), gt
        assert torch.equal(gated_scores[mine], reference[0][theirs]), gt
    assert int((safit_fg & (safit_gt == 0)).sum()) > int((stock_fg & (stock_gt == 0)).sum())  # the two differ here


def assign_a_large_object(assigner):
    """Target scores and foreground mask ``assigner`` gives a 180 x 150 px object on a stride-8 grid, every
    prediction a 150 x 150 box centred on its anchor (so that CIoU's centre penalty ranks them apart from IoU)."""
    grid = torch.arange(4, 256, 8.0)
    anchors = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).view(-1, 2)
    predictions = torch.cat([anchors - 75, anchors + 75], -1)[None]
    gt = torch.tensor([[[40.0, 60.0, 220.0, 210.0]]])
    scores = torch.full((1, len(anchors), 3), 0.5)
    _, _, target_scores, fg, _ = assigner(scores, predictions, anchors, torch.zeros(1, 1, 1), gt, torch.ones(1, 1, 1))
    return target_scores, fg


@pytest.mark.parametrize("safit_assigner_iou", ["iou", "stock"])
def test_safit_assigner_iou_stock_assigns_a_large_object_as_the_stock_assigner(safit_assigner_iou):
    """``nwd.safit_assigner_iou: stock``: SAFit's IoU member in YOLO's assigner is the stock assigner's own CIoU,
    so a ground truth far above 32 px gets the stock positives and target scores; with plain IoU (the paper's,
    the default) its target scores are the larger IoU's (every IoU here exceeds its CIoU)."""
    import copy

    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from yolo_sizeloss.config import load_loss_config
    from yolo_sizeloss.yolo.loss import AnchorWeighting, build_size_aware_loss, loss_branches

    config = load_loss_config("nwd", "safit_sharp_assigner_auto")
    config["nwd"].update(constant=C, max_small_share=1.0, safit_assigner_iou=safit_assigner_iou)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.args = get_cfg()
    ours = loss_branches(build_size_aware_loss(model, AnchorWeighting(config)))[0].assigner.assigner
    stock = copy.deepcopy(ours)
    del stock.iou_calculation  # the class's CIoU
    (ours_scores, ours_fg), (stock_scores, stock_fg) = assign_a_large_object(ours), assign_a_large_object(stock)
    assert stock_fg.sum() == 10  # topk candidates inside the box, all positive
    if safit_assigner_iou == "stock":
        assert torch.equal(ours_fg, stock_fg) and torch.allclose(ours_scores, stock_scores, atol=1e-6)
    else:
        assert ours_scores.sum() > stock_scores.sum() + 0.05, (ours_scores.sum(), stock_scores.sum())


# --- in the box loss ----------------------------------------------------------------------------------------------

def one_pair_box_loss(measure: str, ratio: float, pred_px: list[float], target_px: list[float], constant: float = 16.0):
    """YOLO's box loss (``MeasureBboxLoss`` around the stock ``BboxLoss``) of one foreground anchor at stride 8
    (and one background anchor), boxes given in network-input pixels; returns (ours, stock) IoU parts."""
    from ultralytics.utils.loss import BboxLoss

    from yolo_sizeloss.config import load_loss_config
    from yolo_sizeloss.yolo.loss import AnchorWeighting, MeasureBboxLoss

    config = load_loss_config("nwd")
    config["nwd"].update(ratio=ratio, constant=constant, box_measure=measure)
    torch.manual_seed(0)
    pred = torch.tensor([[[v / 8 for v in pred_px], [0.0, 0.0, 9.0, 9.0]]])  # stride units, as BboxLoss gets them
    target = torch.tensor([[[v / 8 for v in target_px], [5.0, 5.0, 6.0, 6.0]]])
    args = (torch.randn(1, 2, 64), pred, torch.tensor([[2.5, 2.5], [1.5, 1.5]]), target,
            torch.tensor([[[0.0, 0.75, 0.0], [0.0, 0.0, 0.0]]]), torch.tensor(1.5), torch.tensor([[True, False]]),
            torch.tensor([64.0, 64.0]), torch.tensor([[8.0], [16.0]]))
    stock = BboxLoss(16)(*args)[0]
    return MeasureBboxLoss(BboxLoss(16), AnchorWeighting(config))(*args)[0], stock


def test_safit_and_simd_in_yolos_box_loss_by_hand():
    """Predicted 16 x 16 px at (8, 8), target 24 x 24 px at (8, 8) (tests/test_nwd.py's pair): CIoU =
    256/576 - 32/1152, NWD = exp(-8/16); score 0.75, normaliser 1.5."""
    ciou, nwd_value, scale = 256 / 576 - 32 / 1152, math.exp(-8 / 16), 0.75 / 1.5
    w = sigmoid((24 - 32) / 32)  # SAFit's weight on the detector's own overlap (CIoU) for a 24 px ground truth
    safit_value = w * ciou + (1 - w) * nwd_value
    ours, stock = one_pair_box_loss("safit", 0.5, [8, 8, 24, 24], [8, 8, 32, 32])
    assert ours.item() == pytest.approx((0.5 * (1 - ciou) + 0.5 * (1 - safit_value)) * scale, abs=1e-6)
    assert stock.item() == pytest.approx((1 - ciou) * scale, abs=1e-6)
    # SimD: centres 4 px apart on each axis, sides 16 and 24: per axis divided by (16 + 24) / m
    sx, sy = 40 / 6.13, 40 / 4.59
    simd_value = math.exp(-(math.hypot(4 / sx, 4 / sy) + math.hypot(8 / sx, 8 / sy)))
    ours, _ = one_pair_box_loss("simd", 1.0, [8, 8, 24, 24], [8, 8, 32, 32])
    assert ours.item() == pytest.approx((1 - simd_value) * scale, rel=1e-4)


def test_safit_in_the_box_loss_is_the_stock_term_for_a_large_box():
    """w = sigmoid((400 - 32) / 32) = 1 - 1e-5: a 400 px ground truth keeps the stock CIoU term, even at ratio 1."""
    ours, stock = one_pair_box_loss("safit", 1.0, [0, 0, 380, 400], [8, 8, 408, 408])
    assert ours.item() == pytest.approx(stock.item(), rel=1e-4)
    assert one_pair_box_loss("nwd", 1.0, [0, 0, 380, 400], [8, 8, 408, 408])[0].item() != pytest.approx(
        stock.item(), rel=1e-2)  # NWD alone would not be


@pytest.mark.parametrize("measure", ["nwd", "safit", "simd"])
def test_each_box_measure_has_a_finite_gradient_for_identical_boxes(measure):
    from yolo_sizeloss.methods.overlaps import box_similarity

    pred = torch.tensor([[10.0, 10.0, 14.0, 14.0], [10.0, 10.0, 10.0, 10.0]], requires_grad=True)
    gt = torch.tensor([[10.0, 10.0, 14.0, 14.0], [10.0, 10.0, 10.0, 10.0]])  # a tiny box and a zero-size one
    value = box_similarity(measure, pred, gt, C)
    (1 - value).sum().backward()
    assert torch.isfinite(pred.grad).all() and torch.isfinite(value).all()
    assert value[0].item() == pytest.approx(1.0, abs=1e-3)  # identical 4 x 4 boxes: a perfect fit
    # two identical points: SAFit's IoU member is 0 (no area to overlap), so only its NWD part counts
    assert value[1].item() == pytest.approx(1 - sigmoid(-1) if measure == "safit" else 1.0, abs=1e-3)


@pytest.mark.parametrize("measure", ["safit", "simd"])
def test_faster_rcnn_box_terms_mix_the_named_measure(measure):
    """The hand-built RPN batch of tests/test_rcnn.py: each positive's decoded box against its ground truth,
    by the measure ``nwd.box_measure`` names (SAFit with plain IoU: smooth-L1 has no overlap of its own)."""
    from test_rcnn import RPN_GT, RPN_POS_MATCHED, rpn_box_terms, rpn_forward, tiny_rpn
    from test_rcnn_nwd import nwd_switches, rpn_predicted_boxes

    losses, labels, anchors = rpn_forward(tiny_rpn(nwd_switches(ratio=0.5, assigner=False, box_measure=measure)))
    pred = torch.tensor(rpn_predicted_boxes(anchors))
    gt = RPN_GT[list(RPN_POS_MATCHED)]
    similarity = safit(pred, gt, 10.0) if measure == "safit" else simd(pred, gt)
    expected = (0.5 * sum(rpn_box_terms(anchors)) + 0.5 * (1 - similarity).sum().item()) / int((labels >= 0).sum())
    assert losses["loss_rpn_box_reg"].item() == pytest.approx(expected, rel=1e-5)
