"""``nwd.normaliser: ciou`` and ``nwd.box_weights: ciou``: YOLO's losses divided by the target-score sum the stock
CIoU gives the positives, and their box terms weighed by those scores."""

from __future__ import annotations

import copy

import pytest
import torch
from ultralytics.utils.tal import TaskAlignedAssigner

from yolo_sizeloss.config import load_loss_config
from yolo_sizeloss.yolo.loss import AnchorWeighting, build_size_aware_loss, install_size_aware_loss
from yolo_sizeloss.yolo.normaliser import ciou_target_scores

from test_loss import bccd_batch, build_model, same_items
from test_nwd import small_and_large_batch


def test_ciou_target_scores_of_two_positives_by_hand():
    """One 10 x 10 ground truth of class 1; anchor 0 predicts it exactly (CIoU 1) with probability 0.25, anchor 1
    an 8 x 8 box on the same centre (IoU = CIoU = 64/100: same centre, same aspect) with probability 1; anchor 2
    is background, its target the padding slot's zeros. alpha 0.5, beta 6: a = (0.5, 0.64^6); the best
    overlap 1 and the best a 0.5 make the targets 0.5 / 0.5 = 1 and 0.64^6 / 0.5."""
    assigner = TaskAlignedAssigner(topk=10, num_classes=3, alpha=0.5, beta=6.0)
    gt = [0.0, 0.0, 10.0, 10.0]
    pd_bboxes = torch.tensor([[gt, [1.0, 1.0, 9.0, 9.0], [50.0, 50.0, 60.0, 60.0]]])
    pd_scores = torch.tensor([[[0.9, 0.25, 0.1], [0.0, 1.0, 0.0], [0.3, 0.3, 0.3]]])
    target_labels = torch.tensor([[1, 1, 0]])
    target_bboxes = torch.tensor([[gt, gt, [0.0, 0.0, 0.0, 0.0]]])
    fg_mask = torch.tensor([[True, True, False]])
    target_gt_idx = torch.tensor([[0, 0, 0]])
    scores = ciou_target_scores(assigner, pd_scores, pd_bboxes, target_labels, target_bboxes, fg_mask, target_gt_idx, 2)
    assert scores.shape == (1, 3)
    assert scores[0].tolist() == pytest.approx([1, 0.64**6 / 0.5, 0], rel=1e-5)
    empty = ciou_target_scores(assigner, pd_scores, pd_bboxes, target_labels, target_bboxes,
                               torch.zeros_like(fg_mask), target_gt_idx, 0)  # the assigner's early return
    assert empty.shape == (1, 3) and not empty.any()


def test_ciou_target_scores_are_the_stock_assigners_scores():
    """On the stock assignment of a real model's predictions for real BCCD labels, and of a hand-built image,
    they equal the stock target scores anchor by anchor; an NWD assigner that keeps the same positives gets
    those same scores back, though its own are larger."""
    model = build_model("yolov8n.yaml")
    criterion = model.init_criterion()
    captured = []
    hook = criterion.assigner.register_forward_hook(lambda module, args, out: captured.append((args, out)))
    criterion(model(bccd_batch()["img"]), bccd_batch())
    hook.remove()
    captured.append((small_and_large_batch(), criterion.assigner(*small_and_large_batch())))
    for (pd_scores, pd_bboxes, _, _, gt_bboxes, _), (labels, boxes, scores, fg, idx) in captured:
        assert fg.sum() > 0
        ours = ciou_target_scores(criterion.assigner, pd_scores, pd_bboxes, labels, boxes, fg, idx, gt_bboxes.shape[1])
        torch.testing.assert_close(ours, scores.sum(-1), rtol=1e-5, atol=1e-7)

    nwd = install_size_aware_loss(copy.deepcopy(criterion), AnchorWeighting({"nwd": {
        **load_loss_config("nwd")["nwd"], "constant": 45.0}}))
    inputs = small_and_large_batch()
    labels, boxes, scores, fg, idx = nwd.assigner(*inputs)
    stock_scores, stock_fg = captured[-1][1][2], captured[-1][1][3]
    assert torch.equal(fg, stock_fg) and scores.sum() > 1.3 * stock_scores.sum()  # 13.8 against 9.7
    ours = ciou_target_scores(nwd.assigner.assigner, inputs[0], inputs[1], labels, boxes, fg, idx, 2)
    torch.testing.assert_close(ours, stock_scores.sum(-1), rtol=1e-5, atol=1e-7)


def independent_scale(criterion, preds, batch) -> float:
    """The normaliser's factor worked out apart from the loss: the target-score sum the (NWD) assigner gave,
    clamped at 1, over the sum of the stock CIoU targets of the same positives (``ciou_target_scores``, which
    the test above holds equal to Ultralytics' own), clamped at 1 as the stock loss clamps its normaliser.
    Runs ``criterion`` once on a copy, so the caller's weighting statistics are untouched."""
    criterion = copy.deepcopy(criterion)
    seen = {}
    stock_assigner = criterion.assigner.assigner
    stock_assigner.register_forward_hook(lambda module, args, out: seen.update(assigner=(args, out)))
    criterion(preds, batch)
    (pd_scores, pd_bboxes, _, _, gt_bboxes, _), (labels, boxes, scores, fg, idx) = seen["assigner"]
    assert fg.sum() > 10
    ciou = ciou_target_scores(stock_assigner, pd_scores, pd_bboxes, labels, boxes, fg, idx, gt_bboxes.shape[1])
    return (scores.sum().clamp(min=1) / ciou.sum().clamp(min=1)).item()


def test_held_normaliser_scales_every_term_by_the_ratio_of_the_sums():
    """With the NWD assigner, the class and box terms divided by the CIoU sum are the terms divided by the
    assigned sum times their ratio (nwd/normaliser_scale, above 1: NWD raised the scores); the DFL too."""
    model = build_model("yolov8n.yaml")
    batch = bccd_batch()
    preds = model(batch["img"])
    settings = {**load_loss_config("nwd")["nwd"], "constant": 40.0}
    assigned = build_size_aware_loss(model, AnchorWeighting({"nwd": settings}))
    weighting = AnchorWeighting({"nwd": {**settings, "normaliser": "ciou"}})
    held = build_size_aware_loss(model, weighting)
    _, expected = assigned(preds, batch)
    scale = independent_scale(held, preds, batch)
    _, items = held(preds, batch)
    assert scale > 1.05
    assert weighting.epoch_stats()["nwd/normaliser_scale"] == pytest.approx(scale, rel=1e-6)
    for key in expected:
        assert items[key].item() == pytest.approx(expected[key].item() * scale, rel=1e-5), key
    assert "nwd/normaliser_scale" not in AnchorWeighting({"nwd": settings}).epoch_stats()  # a column only when set


def test_stock_box_weights_weigh_each_positive_by_its_ciou_target_and_leave_the_class_term():
    """With the NWD assigner and ``box_weights: ciou``, the stock box loss receives, for each positive anchor,
    the target score the stock CIoU gives it (its IoU and DFL weight), not NWD's larger one; the class term
    is that of ``box_weights: assigned`` to the bit, and the box terms are smaller (NWD raised the scores)."""
    model = build_model("yolov8n.yaml")
    batch = bccd_batch()
    preds = model(batch["img"])
    settings = {**load_loss_config("nwd")["nwd"], "ratio": 0.0, "assigner": True, "constant": 40.0}
    _, assigned_items = build_size_aware_loss(model, AnchorWeighting({"nwd": settings}))(preds, batch)
    weighting = AnchorWeighting({"nwd": {**settings, "box_weights": "ciou"}})
    assert weighting.holds_box_weights and not weighting.holds_normaliser
    criterion = build_size_aware_loss(model, weighting)
    seen = {}
    stock_assigner = criterion.assigner.assigner
    stock_assigner.register_forward_hook(lambda module, args, out: seen.update(assigner=(args, out)))
    stock_box_loss = criterion.bbox_loss.bbox_loss  # inside the size-aware wrapper: what Ultralytics' BboxLoss gets
    stock_box_loss.register_forward_pre_hook(lambda module, args: seen.update(box=args))
    _, items = criterion(preds, batch)

    (pd_scores, pd_bboxes, _, _, gt_bboxes, _), (labels, boxes, scores, fg, idx) = seen["assigner"]
    expected = ciou_target_scores(stock_assigner, pd_scores, pd_bboxes, labels, boxes, fg, idx, gt_bboxes.shape[1])
    weights = seen["box"][4].sum(-1)  # BboxLoss(pred_dist, pred_bboxes, anchor_points, target_bboxes, target_scores, ...)
    assert fg.sum() > 10
    torch.testing.assert_close(weights[fg], expected[fg], rtol=1e-5, atol=1e-7)
    assert scores.sum(-1)[fg].sum() > 1.2 * expected[fg].sum()  # the weights NWD's own scores would have given
    assert torch.equal(seen["box"][5], scores.sum().clamp(min=1))  # the normaliser is the assigned sum here
    assert torch.equal(items["cls_loss"], assigned_items["cls_loss"])
    assert items["box_loss"] < assigned_items["box_loss"] and items["dfl_loss"] < assigned_items["dfl_loss"]


@pytest.mark.parametrize("setting", ["normaliser", "box_weights"])
def test_stock_overlap_factors_with_the_stock_assigner_are_the_stock_loss_bit_for_bit(setting):
    model = build_model("yolov8n.yaml")
    batch = bccd_batch()
    preds = model(batch["img"])
    expected_loss, expected_items = model.init_criterion()(preds, batch)
    weighting = AnchorWeighting({"nwd": {**load_loss_config("nwd")["nwd"], "ratio": 0, "assigner": False,
                                         setting: "ciou"}})
    assert not weighting.holds_normaliser and not weighting.holds_box_weights
    loss, items = build_size_aware_loss(model, weighting)(preds, batch)
    assert torch.equal(loss, expected_loss) and same_items(items, expected_items)


def test_nwd_targets_divides_the_stock_box_weights_by_their_own_sum():
    """``--loss nwd_targets`` (box_weights and normaliser both ciou): every term is the box_weights-only term
    times the normaliser's factor, so the box terms are the CIoU-weighted ones over the CIoU targets' sum."""
    model = build_model("yolov8n.yaml")
    batch = bccd_batch()
    preds = model(batch["img"])
    settings = {**load_loss_config("nwd_targets")["nwd"], "constant": 40.0, "max_small_share": 1.0}
    assert settings["box_weights"] == settings["normaliser"] == "ciou" and settings["ratio"] == 0
    _, expected = build_size_aware_loss(model, AnchorWeighting({"nwd": {**settings, "normaliser": "assigned"}}))(
        preds, batch)
    weighting = AnchorWeighting({"nwd": settings})
    criterion = build_size_aware_loss(model, weighting)
    scale = independent_scale(criterion, preds, batch)
    _, items = criterion(preds, batch)
    assert scale > 1.05
    assert weighting.epoch_stats()["nwd/normaliser_scale"] == pytest.approx(scale, rel=1e-6)
    for key in expected:
        assert items[key].item() == pytest.approx(expected[key].item() * scale, rel=1e-5), key
