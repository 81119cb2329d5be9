"""Faster R-CNN path: stock equality, each size-aware switch by hand, training, DDP, prediction, ONNX.

Run with YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0. Nothing is downloaded: models start from random weights.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import ExifTags, Image
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from yolo_sizeloss.checkpoints import RCNN_ARCH
from yolo_sizeloss.cli import train_main
from yolo_sizeloss.checkpoints import load_checkpoint as load_any_checkpoint
from yolo_sizeloss import detections
from yolo_sizeloss.config import load_loss_config, run_defaults
from yolo_sizeloss.detections import ImageRecord, load_split
from yolo_sizeloss.paths import resolve_data
from yolo_sizeloss.rcnn import export_onnx, predict_records
from yolo_sizeloss.rcnn.cli import main
from yolo_sizeloss.rcnn.data import DetectionDataset, collate_detection, read_image
from yolo_sizeloss.rcnn.engine import VAL_CONF, VAL_MAX_DET, coco_map, predict_checkpoint
from yolo_sizeloss.methods import MatchedSamples, scb
from yolo_sizeloss.rcnn.heads import SizeBalancedRoIHeads, SizeBalancedRPN
from yolo_sizeloss.rcnn.losses import weighted_fastrcnn_loss, weighted_rpn_loss
from yolo_sizeloss.rcnn.model import build_model, model_from_checkpoint, set_inference_limits
from yolo_sizeloss.rcnn.switches import LossSwitches
from yolo_sizeloss.results_csv import class_ap_columns

from conftest import BCCD, ROOT
IMGSZ = 128
SMOOTH_L1_BETA = 1 / 9


def size_switches(plb: tuple[str, ...] = (), source: str = "predicted", scb: tuple[str, ...] = ()) -> LossSwitches:
    """PLB on the ``plb`` terms sized by ``source`` and SCB (its default alpha and beta) on the ``scb`` terms."""
    config = {}
    if plb:
        config["plb"] = {**load_loss_config("plb")["plb"], "source": source, "rcnn_terms": list(plb)}
    if scb:
        config["scb"] = {**load_loss_config("scb")["scb"], "rcnn_terms": list(scb)}
    return LossSwitches.from_config(config)


def plb_by_hand(areas: list[float]) -> list[float]:
    """docs/methods.md, PLB: PLB_i = 2m / (a_i + m), m the mean area."""
    m = sum(areas) / len(areas)
    return [2 * m / (a + m) for a in areas]


def load_checkpoint(path) -> dict:
    return load_any_checkpoint(path, RCNN_ARCH)


def scb_by_hand(m: int, alpha: float = 1.0, beta: float = 3.0) -> float:
    """docs/methods.md, SCB: W = beta (ln M + alpha) / M."""
    return beta * (math.log(m) + alpha) / m


def sl1_sum(target: torch.Tensor) -> float:
    """Smooth-L1 (beta 1/9) of a zero prediction against ``target``, summed."""
    return F.smooth_l1_loss(torch.zeros_like(target), target, beta=SMOOTH_L1_BETA, reduction="sum").item()


# ----------------------------------------------------------------------------------------------------------------
# Stock equality


def bccd_batch(count: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    records, _ = load_split(resolve_data("bccd.yaml"), "train")
    images, targets, _ = collate_detection([DetectionDataset(records[:count], flip_p=0.0)[i] for i in range(count)])
    return images, targets


def test_validation_gives_each_class_ap_and_their_mean():
    """An RBC found exactly (AP 1), a WBC missed (AP 0), no platelet in the labels: mAP50-95 is the mean
    over the two classes val holds, and the platelets' results.csv column is NaN."""
    image = ImageRecord("a.jpg", 640, 480, gt_boxes=np.array([[10.0, 10, 110, 90], [300, 200, 400, 300]]),
                        gt_classes=np.array([0, 1]), pred_boxes=np.array([[10.0, 10, 110, 90]]),
                        pred_scores=np.array([0.9]), pred_classes=np.array([0]))
    metrics = coco_map([image], ["RBC", "WBC", "Platelets"])
    assert metrics["class_ap"] == {0: 1.0, 1: 0.0} and metrics["mAP50-95"] == pytest.approx(0.5)
    columns = class_ap_columns({0: "RBC", 1: "WBC", 2: "Platelets"}, metrics["class_ap"])
    assert list(columns) == ["val/AP50-95 RBC", "val/AP50-95 WBC", "val/AP50-95 Platelets"]
    assert columns["val/AP50-95 RBC"] == 1.0 and math.isnan(columns["val/AP50-95 Platelets"])


def test_switches_off_equal_stock_torchvision_bit_for_bit():
    images, targets = bccd_batch(2)
    torch.manual_seed(0)
    ours = build_model("mobilenet_v3_large_fpn", 4, IMGSZ, LossSwitches()).train()
    stock = fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=IMGSZ, max_size=IMGSZ
    ).train()
    assert type(stock.rpn) is RegionProposalNetwork and type(stock.roi_heads) is RoIHeads
    stock.load_state_dict(ours.state_dict())
    torch.manual_seed(1)
    ours_losses = ours(images, targets)
    torch.manual_seed(1)
    stock_losses = stock(images, targets)
    assert set(ours_losses) == set(stock_losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    for name in stock_losses:
        assert torch.equal(ours_losses[name], stock_losses[name]), name


def test_weighted_losses_with_unit_weights_equal_stock_functions():
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(AnchorGenerator(), RPNHead(1, 3), 0.7, 0.3, 256, 0.5, {"training": 1, "testing": 1},
                                {"training": 1, "testing": 1}, 0.7)
    labels = [torch.randint(-1, 2, (3000,)).float() for _ in range(2)]
    objectness, deltas, targets = torch.randn(6000, 1), torch.randn(6000, 4), [torch.randn(3000, 4) for _ in range(2)]
    torch.manual_seed(5)
    stock = rpn.compute_loss(objectness, deltas, labels, targets)
    torch.manual_seed(5)
    pos, neg = rpn.fg_bg_sampler(labels)
    pos, neg = torch.where(torch.cat(pos))[0], torch.where(torch.cat(neg))[0]
    ours = weighted_rpn_loss(objectness.flatten(), deltas, torch.cat(labels), torch.cat(targets), pos, neg,
                             torch.ones(len(pos) + len(neg)), torch.ones(len(pos)))
    assert all(torch.equal(a, b) for a, b in zip(ours, stock))

    for rois_per_image in (256, 512, 2049):  # sizes where a plain mean of the weighted terms would round differently
        logits, regression = torch.randn(2 * rois_per_image, 4), torch.randn(2 * rois_per_image, 16)
        roi_labels = [torch.randint(0, 4, (rois_per_image,)) for _ in range(2)]
        roi_targets = [torch.randn(rois_per_image, 4) for _ in range(2)]
        stock = fastrcnn_loss(logits, regression, roi_labels, roi_targets)
        all_labels = torch.cat(roi_labels)
        ours = weighted_fastrcnn_loss(logits, regression, all_labels, torch.cat(roi_targets),
                                      torch.ones(len(all_labels)), torch.ones(int((all_labels > 0).sum())))
        assert all(torch.equal(a, b) for a, b in zip(ours, stock)), rois_per_image


# ----------------------------------------------------------------------------------------------------------------
# Each switch on a hand-built batch. RPN: one 6x6 feature map of stride 8 (48x48 image), anchors of
# side 8 and 16 at every grid point, a head with zero weights and biases except one: the width delta
# of the side-16 anchors is ln 2. So every objectness logit is 0 (BCE ln 2 for every anchor), a
# side-8 anchor's proposal is the anchor (area 64) and a side-16 anchor's proposal is twice as wide
# (area 512 instead of 256).
# Ground truth: g0 is matched by the side-8 anchor at (8, 8) (IoU 0.89), g1 by the side-16 anchor at
# (16, 16) (IoU 0.94), g2 lies between two side-16 anchors (IoU 0.6 each: both positive as its best,
# low-quality matches). Positives in anchor order: matched g0, g1, g2, g2.

LN2 = math.log(2)
RPN_GT = torch.tensor([[4.0, 4, 12, 13], [8, 8, 24, 25], [20, 24, 36, 40]])
RPN_POSITIVES = [14, 29, 55, 57]  # anchor indices: (y * 6 + x) * 2 + side, side 0: 8 pixels, 1: 16 pixels
RPN_POS_MATCHED = [0, 1, 2, 2]
RPN_POS_M = [1, 1, 2, 2]  # anchors matched per ground truth
# Sizing areas per source: (positives, a negative side-8 anchor, a negative side-16 anchor).
RPN_AREAS = {"predicted": ([64.0, 512, 512, 512], 64.0, 512.0), "gt": ([72.0, 272, 256, 256], 64.0, 256.0)}


def tiny_rpn(switches: LossSwitches) -> SizeBalancedRPN:
    head = RPNHead(in_channels=1, num_anchors=2)
    for p in (*head.cls_logits.parameters(), *head.bbox_pred.parameters()):
        torch.nn.init.zeros_(p)
    with torch.no_grad():
        head.bbox_pred.bias[4 + 2] = LN2  # anchor type 1 (side 16), delta dw
    return SizeBalancedRPN(AnchorGenerator(((8, 16),), ((1.0,),)), head, 0.7, 0.3, 256, 0.5,
                           {"training": 100, "testing": 100}, {"training": 100, "testing": 100}, 0.7,
                           switches=switches).train()


def run_tiny_rpn(switches: LossSwitches) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Losses, labels and anchors of the hand-built RPN batch."""
    return rpn_forward(tiny_rpn(switches))


def rpn_forward(rpn: SizeBalancedRPN) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Losses, labels and anchors of ``rpn`` (a ``tiny_rpn``, kept between calls) on the hand-built batch."""
    images = ImageList(torch.zeros(1, 1, 48, 48), [(48, 48)])
    features = {"0": torch.zeros(1, 1, 6, 6)}
    targets = [{"boxes": RPN_GT.clone(), "labels": torch.tensor([1, 1, 1])}]
    _, losses = rpn(images, features, targets)
    anchors = rpn.anchor_generator(images, list(features.values()))
    labels, _ = RegionProposalNetwork.assign_targets_to_anchors(rpn, anchors, targets)
    return losses, labels[0], anchors[0]


def test_rpn_hand_built_batch_matches_the_setup():
    losses, labels, anchors = run_tiny_rpn(LossSwitches())
    assert anchors.shape == (72, 4)  # 6 x 6 grid points, two anchors each
    assert torch.where(labels == 1)[0].tolist() == RPN_POSITIVES
    # ignored (IoU in [0.3, 0.7), not a best match): four side-16 anchors next to g1 [8, 8, 24, 25] (area 272),
    # each overlapping it in 16 x 8 (IoU 128 / 400 = 0.32) or, the one at (16, 24), 16 x 9 (144 / 384 = 0.375):
    # at (16, 8), (8, 16), (24, 16), (16, 24). Every other anchor stays below 0.3 with every box (the best:
    # the side-16 one at (8, 8) on g0, 72 / 256 = 0.28; side-16 ones beside g2, 96 / 416 = 0.23): negative.
    assert torch.where(labels == -1)[0].tolist() == [17, 27, 31, 41]
    assert int((labels == 0).sum()) == 72 - 4 - 4
    # the sampler (256 per image, half positive at most) takes all 4 positives and all 64 negatives: no randomness
    pos, neg = tiny_rpn(LossSwitches()).fg_bg_sampler([labels])
    assert torch.where(pos[0])[0].tolist() == RPN_POSITIVES and torch.equal(neg[0], labels == 0)
    areas = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    assert areas[RPN_POSITIVES].tolist() == [64.0, 256, 256, 256]
    assert losses["loss_objectness"].item() == pytest.approx(LN2, rel=1e-6)


def rpn_expected_objectness(labels: torch.Tensor, source: str, pos_extra: list[float], plb: bool) -> float:
    """ln 2 times the mean weight over the sampled anchors (positives first, then negatives)."""
    pos_areas, neg_area_8, neg_area_16 = RPN_AREAS[source]
    negatives = torch.where(labels == 0)[0].tolist()
    neg_areas = [neg_area_8 if i % 2 == 0 else neg_area_16 for i in negatives]
    weights = plb_by_hand(pos_areas + neg_areas) if plb else [1.0] * (len(pos_areas) + len(neg_areas))
    weights = [w * e for w, e in zip(weights, pos_extra + [1.0] * len(negatives))]
    return LN2 * sum(weights) / len(weights)


@pytest.mark.parametrize("source", ["predicted", "gt"])
def test_plb1c_weights_objectness_only(source):
    stock, labels, _ = run_tiny_rpn(LossSwitches())
    losses, _, _ = run_tiny_rpn(size_switches(("rpn_cls",), source))
    expected = rpn_expected_objectness(labels, source, [1.0] * 4, plb=True)
    assert losses["loss_objectness"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_objectness"].item() != pytest.approx(stock["loss_objectness"].item(), rel=1e-3)
    assert torch.equal(losses["loss_rpn_box_reg"], stock["loss_rpn_box_reg"])


def rpn_box_terms(anchors: torch.Tensor) -> list[float]:
    """Unweighted smooth-L1 of each sampled positive anchor (the side-16 anchors predict a doubled width)."""
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    terms = []
    for anchor, gt in zip(RPN_POSITIVES, RPN_POS_MATCHED):
        predicted_deltas = torch.tensor([[0.0, 0, LN2 if anchor % 2 else 0, 0]])
        target = coder.encode_single(RPN_GT[[gt]], anchors[[anchor]])
        terms.append(F.smooth_l1_loss(predicted_deltas, target, beta=SMOOTH_L1_BETA, reduction="sum").item())
    return terms


@pytest.mark.parametrize("source", ["predicted", "gt"])
def test_plb1b_weights_rpn_box_only(source):
    stock, labels, anchors = run_tiny_rpn(LossSwitches())
    losses, _, _ = run_tiny_rpn(size_switches(("rpn_box",), source))
    per_anchor = rpn_box_terms(anchors)
    sampled = int((labels >= 0).sum())
    assert stock["loss_rpn_box_reg"].item() == pytest.approx(sum(per_anchor) / sampled, rel=1e-5)
    expected = sum(w * s for w, s in zip(plb_by_hand(RPN_AREAS[source][0]), per_anchor)) / sampled
    assert losses["loss_rpn_box_reg"].item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(losses["loss_objectness"], stock["loss_objectness"])


def test_scb_rpn_weights_positive_objectness_only():
    stock, labels, _ = run_tiny_rpn(LossSwitches())
    losses, _, _ = run_tiny_rpn(size_switches(scb=("rpn_cls",)))
    scb = [scb_by_hand(m) for m in RPN_POS_M]
    assert scb[:2] == [3.0, 3.0]  # M = 1: beta * alpha; the third ground truth has M = 2
    expected = rpn_expected_objectness(labels, "predicted", scb, plb=False)
    assert losses["loss_objectness"].item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(losses["loss_rpn_box_reg"], stock["loss_rpn_box_reg"])
    combined, _, _ = run_tiny_rpn(size_switches(("rpn_cls",), scb=("rpn_cls",)))  # PLB x SCB multiply
    expected = rpn_expected_objectness(labels, "predicted", scb, plb=True)
    assert combined["loss_objectness"].item() == pytest.approx(expected, rel=1e-5)


def test_scb_rpn_uses_the_configured_alpha_and_beta():
    """The SCB settings of the loss yaml reach the two-stage path (they were once ignored there)."""
    stock, labels, _ = run_tiny_rpn(LossSwitches())
    losses, _, _ = run_tiny_rpn(LossSwitches.from_config({"scb": {"alpha": 2.0, "beta": 1.5, "terms": ["cls"],
                                                                 "rcnn_terms": ["rpn_cls"]}}))
    scb = [scb_by_hand(m, 2.0, 1.5) for m in RPN_POS_M]
    assert scb[:2] == [3.0, 3.0]  # M = 1: beta * alpha
    expected = rpn_expected_objectness(labels, "predicted", scb, plb=False)
    assert losses["loss_objectness"].item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(losses["loss_rpn_box_reg"], stock["loss_rpn_box_reg"])


def test_loss_config_compiles_to_the_rcnn_terms():
    switches = LossSwitches.from_config(load_loss_config("plb+scb"))
    plb, scb = switches.config["plb"], switches.config["scb"]
    assert switches.terms("plb") == ("rpn_cls", "rpn_box") and plb["source"] == "predicted"  # the paper's RPN stage
    assert switches.terms("scb") == ("rpn_cls",) and (scb["alpha"], scb["beta"]) == (1.0, 3.0)
    assert switches.rpn_active and not switches.roi_active
    assert not LossSwitches.from_config({}).rpn_active


def test_anchor_scb_weights_count_matches_per_ground_truth():
    matched = torch.tensor([0, -1, 0, 1, -2, 0, 2, 2, 2, 2, 2])  # M = 3, 1, 5
    positives = torch.where(matched >= 0)[0]
    boxes = torch.zeros(len(matched), 4)
    samples = MatchedSamples(  # every anchor a class-term sample, as the RPN counts before sampling
        gt_boxes=boxes[positives], pred_boxes=boxes[positives], gt_ids=matched[positives], box_loss=lambda: None,
        gt_areas=torch.zeros(3), gt_counts=torch.bincount(matched[positives], minlength=3),
        cls_gt_boxes=boxes, cls_pred_boxes=boxes, cls_positives=positives)
    weights = scb.weights(samples, load_loss_config("scb")["scb"], ("cls",)).cls
    expected = [scb_by_hand(3), 1, scb_by_hand(3), 3.0, 1, scb_by_hand(3)] + [scb_by_hand(5)] * 5
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)


# RoI heads: one 1-channel 8x8 feature map for a 64x64 image, a predictor with zero weights and
# biases except one: class 2's width delta is 5 ln 2 (ln 2 after torchvision's weight 5). So every
# class logit is 0 (cross-entropy ln 3 for every RoI); a class-1 RoI's predicted box is the RoI, a
# class-2 RoI's is twice as wide. Proposals p0, p1, p2 plus the two ground-truth boxes torchvision
# appends; sampled RoIs in order: p0 (matches g0), p1 (g1), p2 (background), g0, g1.

ROI_GT = torch.tensor([[0.0, 0, 8, 9], [0, 0, 16, 17]])
ROI_GT_LABELS = torch.tensor([1, 2])
ROI_PROPOSALS = torch.tensor([[0.0, 0, 8, 8], [0, 0, 16, 16], [20, 20, 28, 36]])
ROI_MATCHED = [0, 1, None, 0, 1]  # per sampled RoI: matched ground truth (None: background)
# 2C sizes every sampled RoI; 2B the positives p0, p1, g0, g1.
ROI_AREAS_2C = {"predicted": [64.0, 256, 128, 72, 272], "gt": [72.0, 272, 128, 72, 272]}
ROI_AREAS_2B = {"predicted": [64.0, 512, 72, 544], "gt": [72.0, 272, 72, 272]}


def tiny_roi_heads(switches: LossSwitches) -> SizeBalancedRoIHeads:
    """The hand-built RoI heads (in training mode)."""
    predictor = FastRCNNPredictor(8, 3)
    for p in predictor.parameters():
        torch.nn.init.zeros_(p)
    with torch.no_grad():
        predictor.bbox_pred.bias[2 * 4 + 2] = 5 * LN2  # class 2, delta dw
    return SizeBalancedRoIHeads(MultiScaleRoIAlign(["0"], 2, 1), TwoMLPHead(4, 8), predictor, 0.5, 0.5, 512, 0.25,
                                None, 0.05, 0.5, 100, switches=switches).train()


def roi_forward(heads: SizeBalancedRoIHeads) -> dict[str, torch.Tensor]:
    """Losses of ``heads`` (``tiny_roi_heads``, kept between calls) on the hand-built batch."""
    targets = [{"boxes": ROI_GT.clone(), "labels": ROI_GT_LABELS.clone()}]
    _, losses = heads({"0": torch.rand(1, 1, 8, 8)}, [ROI_PROPOSALS.clone()], [(64, 64)], targets)
    return losses


def run_tiny_roi_heads(switches: LossSwitches) -> dict[str, torch.Tensor]:
    return roi_forward(tiny_roi_heads(switches))


def roi_box_terms() -> list[float]:
    """Smooth-L1 of each positive RoI (p0, p1, g0, g1) against its target (torchvision's weights 10, 10, 5, 5)."""
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    rois = torch.cat([ROI_PROPOSALS, ROI_GT])
    terms = []
    for roi, gt in enumerate(ROI_MATCHED):
        if gt is not None:
            predicted = torch.tensor([[0.0, 0, 5 * LN2 if ROI_GT_LABELS[gt] == 2 else 0, 0]])
            target = coder.encode_single(ROI_GT[[gt]], rois[[roi]])
            terms.append(F.smooth_l1_loss(predicted, target, beta=SMOOTH_L1_BETA, reduction="sum").item())
    return terms


@pytest.mark.parametrize("source", ["predicted", "gt"])
def test_plb2c_weights_classifier_only(source):
    stock = run_tiny_roi_heads(LossSwitches())
    losses = run_tiny_roi_heads(size_switches(("roi_cls",), source))
    assert stock["loss_classifier"].item() == pytest.approx(math.log(3), rel=1e-6)
    weights = plb_by_hand(ROI_AREAS_2C[source])
    assert losses["loss_classifier"].item() == pytest.approx(math.log(3) * sum(weights) / 5, rel=1e-5)
    assert torch.equal(losses["loss_box_reg"], stock["loss_box_reg"])


@pytest.mark.parametrize("source", ["predicted", "gt"])
def test_plb2b_weights_roi_box_only(source):
    stock = run_tiny_roi_heads(LossSwitches())
    losses = run_tiny_roi_heads(size_switches(("roi_box",), source))
    terms = roi_box_terms()
    assert stock["loss_box_reg"].item() == pytest.approx(sum(terms) / 5, rel=1e-5)
    expected = sum(w * t for w, t in zip(plb_by_hand(ROI_AREAS_2B[source]), terms)) / 5
    assert losses["loss_box_reg"].item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(losses["loss_classifier"], stock["loss_classifier"])


@pytest.mark.parametrize("flags, message", [
    (["--plb", "1C,3X"], "error: --plb 1C,3X: expected distinct switches from 1C, 1B, 2C, 2B"), (["--weights", "missing.pt"], "--weights missing.pt: no such file"),
    (["--data", "nope.yaml"], "data yaml 'nope.yaml' not found"), (["--resume", "gone.pt"], "--resume gone.pt"),
    (["--loss", "focal"], "unknown loss 'focal'"),
    (["--epochs", "0"], "--epochs 0"), (["--imgsz", "0"], "--imgsz 0"), (["--fraction", "2"], "--fraction 2"),
    (["--plb-source", "gt"], "--plb-source needs PLB"),
    (["--seed", "-1"], "--seed -1: must not be negative"), (["--workers", "-1"], "--workers -1: must not be negative"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(tmp_path, capsys, flags, message):
    project = tmp_path / "runs"
    assert main([*flags, "--project", str(project)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1  # one line, no traceback
    assert not project.exists()  # nothing was written


@pytest.mark.parametrize("labels, loss, message", [
    ("0 nan 0.5 0.1 0.1\n", "baseline", "split 'train' has no valid images"),
    ("", "nwd", "nwd: auto settings, max_small_share and assigner_classes small need boxes"),
])
def test_bad_labels_are_the_same_one_line_in_both_families_before_any_run_folder(tmp_path, capsys, labels, loss,
                                                                                   message):
    """YOLO's label checks before anything is written; Faster R-CNN's engine stopped on the same data with a
    plain error and a pointer to the traceback."""
    from test_cli_errors import one_error_line, rewrite_train_labels, tiny_bccd

    data = tiny_bccd(tmp_path / "data", rewrite_train_labels(labels))  # every train label file
    project, errors = tmp_path / "runs", []
    for family in ([], ["--arch", "faster_rcnn"]):
        assert train_main([*family, "--data", str(data), "--loss", loss, "--project", str(project),
                           "--device", "cpu"]) == 1
        errors.append(one_error_line(capsys))
        assert not project.exists()
    assert errors[0] == errors[1] and message in errors[0]


@pytest.mark.parametrize("width, height", [(100, 60), (64, 64)])
def test_images_are_read_upright_by_their_exif_orientation_as_cv2_reads_them(tmp_path, width, height):
    """A JPEG stored sideways with EXIF orientation 6 (turn 90 degrees clockwise), as cameras save photos.
    Ultralytics' label check measures it upright and YOLO reads it with cv2, which turns it; read as
    stored, a non-square one stopped training at its first batch and a square one lay turned under its
    labels."""
    import cv2

    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    rows, columns = np.mgrid[0:height, 0:width]
    stored = np.stack([columns * 255 // width, rows * 255 // height, np.full_like(rows, 128)], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    photo = tmp_path / "images" / "photo.jpg"
    Image.fromarray(stored).save(photo, exif=exif, quality=100, subsampling=0)
    (tmp_path / "labels" / "photo.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path), "train": "images", "val": "images", "names": {0: "RBC"}}))
    records, _ = load_split(data, "train")
    assert (records[0].width, records[0].height) == (height, width)  # Ultralytics' size: upright
    image, _, _ = DetectionDataset(records, flip_p=0.0)[0]
    upright = cv2.imread(str(photo))[..., ::-1]  # BGR to RGB
    assert np.array_equal((image.permute(1, 2, 0) * 255).round().byte().numpy(), upright)


# ----------------------------------------------------------------------------------------------------------------
# Training on real BCCD images, prediction, resume, DDP, ONNX


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A data yaml with 4 BCCD train and 2 val images (copied, with labels)."""
    root = tmp_path_factory.mktemp("bccd_tiny")
    for split, count in (("train", 4), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for image in sorted((BCCD / "images" / split).glob("*.jpg"))[:count]:
            shutil.copy(image, root / "images" / split)
            shutil.copy(BCCD / "labels" / split / f"{image.stem}.txt", root / "labels" / split)
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                    "names": {0: "RBC", 1: "WBC", 2: "Platelets"}}))
    return data


TRAIN_FLAGS = ["--backbone", "mobilenet_v3_large_fpn", "--imgsz", str(IMGSZ), "--epochs", "1", "--batch", "2",
               "--workers", "0", "--device", "cpu", "--plb", "1C,1B", "--scb-rpn"]


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("runs")
    assert main(["--data", str(tiny_data), "--project", str(project), *TRAIN_FLAGS]) == 0
    return project / "train"


@pytest.mark.slow
def test_a_skipped_training_image_is_named_once_with_its_label_row(tiny_data, tmp_path):
    """The command checks the splits before training: one warning, naming the label file and the row that made
    Ultralytics' check skip the image."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data.parent, root)
    data = root / "data.yaml"
    data.write_text(tiny_data.read_text().replace(str(tiny_data.parent), str(root)))
    label = sorted((root / "labels" / "train").glob("*.txt"))[0]
    label.write_text(label.read_text() + "0 0.5 0.5 abc\n")
    rows = len(label.read_text().splitlines())
    result = subprocess.run([sys.executable, "-m", "yolo_sizeloss.rcnn.cli", "--data", str(data), "--project",
                             str(tmp_path / "runs"), *TRAIN_FLAGS], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert output.count("1 of 4 images skipped") == 1
    assert f"{label}:{rows}: '0 0.5 0.5 abc' (not numbers)" in output


@pytest.mark.slow
def test_one_epoch_writes_results_weights_and_settings(trained_run):
    rows = (trained_run / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    for column in ("train/loss_objectness", "train/loss_rpn_box_reg", "train/loss_classifier", "train/loss_box_reg",
                   "metrics/mAP50(B)", "metrics/mAP50-95(B)", "assign/small_no_pos", "assign/small_no_pos_share",
                   "assign/no_pos_share"):
        assert column in header
    row = dict(zip(header, rows[1].split(",")))
    assert len(rows) == 2 and all(math.isfinite(float(v)) for k, v in row.items() if not k.startswith("val/AP50-95"))
    assert 0 <= float(row["assign/small_no_pos_share"]) <= 1 and 0 <= float(row["assign/no_pos_share"]) <= 1
    # a mean per training step (4 images in batches of 2: 2 steps) of whole counts
    small_no_pos = float(row["assign/small_no_pos"]) * (4 // 2)
    assert small_no_pos == round(small_no_pos)
    # each class's val AP50-95 of the epoch (NaN: none in val); COCO's AP is their mean over the classes val holds
    class_ap = [float(row[f"val/AP50-95 {name}"]) for name in ("RBC", "WBC", "Platelets")]
    assert np.nanmean(class_ap) == pytest.approx(float(row["metrics/mAP50-95(B)"]), abs=2e-6)
    checkpoint = load_checkpoint(trained_run / "weights" / "last.pt")
    assert checkpoint["backbone"] == "mobilenet_v3_large_fpn" and checkpoint["imgsz"] == IMGSZ
    assert checkpoint["num_classes"] == 4 and checkpoint["names"] == {0: "RBC", 1: "WBC", 2: "Platelets"}
    expected = load_loss_config("plb+scb")  # --plb 1C,1B --scb-rpn: the shorthands of these settings
    assert checkpoint["loss"] == expected and expected["plb"]["rcnn_terms"] == ["rpn_cls", "rpn_box"]
    assert checkpoint["epoch"] == 0 and {"optimizer", "scheduler", "best_fitness", "train_args"} <= set(checkpoint)
    assert (trained_run / "weights" / "best.pt").is_file()
    settings = yaml.safe_load((trained_run / "args.yaml").read_text())
    assert settings["loss_config"] == checkpoint["loss"]
    assert {k: settings[k] for k in ("lr", "lr_step")} == {k: run_defaults("faster_rcnn")[k] for k in ("lr", "lr_step")}


@pytest.mark.slow
def test_predict_records_in_original_pixels(trained_run, tiny_data):
    records = predict_records(trained_run / "weights" / "best.pt", tiny_data, "val", None, "cpu")
    assert [Path(r.file).name for r in records] == [Path(r.file).name for r in load_split(tiny_data, "val")[0]]
    for r in records:
        assert (r.width, r.height) == (640, 480) and len(r.gt_boxes) > 0
        assert len(r.pred_boxes) == len(r.pred_scores) == len(r.pred_classes) > 0
        assert r.pred_boxes[:, [0, 2]].max() <= 640 and r.pred_boxes[:, [1, 3]].max() <= 480
        assert r.pred_boxes[:, 2].max() > IMGSZ  # scaled back from the 128-pixel network input
        assert set(r.pred_classes.tolist()) <= {0, 1, 2}


@pytest.mark.slow
def test_each_record_holds_its_own_images_model_output(trained_run, tiny_data, tmp_path):
    """Batched prediction keeps each image's detections with its record: each equals what the checkpoint's
    model returns for that image alone (labels less torchvision's background). This barely trained model
    answers every image alike in its input frame, so the images differ in size: their boxes, mapped back to
    original pixels, differ, and a swap would show."""
    records = load_split(tiny_data, "val")[0]
    for r in list(records):
        for width, height in ((320, 240), (480, 360)):
            smaller = tmp_path / f"{width}_{Path(r.file).name}"
            Image.open(r.file).resize((width, height)).save(smaller)
            records.append(ImageRecord(str(smaller), width, height))
    checkpoint = load_any_checkpoint(trained_run / "weights" / "best.pt", RCNN_ARCH)
    predicted = predict_checkpoint(checkpoint, records, device="cpu", batch=4)
    assert [p.file for p in predicted] == [r.file for r in records]
    assert len({p.pred_boxes[:, 2].max() for p in predicted}) > 1
    model = model_from_checkpoint(checkpoint).eval()
    set_inference_limits(model, VAL_CONF, VAL_MAX_DET)
    for p in predicted:
        with torch.no_grad():
            (out,) = model([read_image(p.file)])
        alone = np.column_stack([out["labels"].numpy() - 1, out["scores"].numpy(), out["boxes"].numpy()])
        batched = np.column_stack([p.pred_classes, p.pred_scores, p.pred_boxes])
        # tied scores may come out in either order: compare the detections as sorted rows; a batch pads its
        # images to one size, which moves a box near the padded edge by a fraction of a pixel
        batched, alone = batched[np.lexsort(batched.T[::-1])], alone[np.lexsort(alone.T[::-1])]
        np.testing.assert_allclose(batched[:, :2], alone[:, :2], atol=1e-4)
        np.testing.assert_allclose(batched[:, 2:], alone[:, 2:], atol=0.5)


@pytest.mark.slow
def test_val_applies_its_nms_iou_to_faster_rcnn_and_records_it(trained_run, tiny_data, tmp_path, capfd):
    """val --iou was Ultralytics' NMS setting only: a Faster R-CNN checkpoint kept torchvision's 0.5
    whatever was asked, and the report did not say which. (And its prediction showed no progress.)"""
    from torchvision.ops import box_iou

    from yolo_sizeloss.detections_file import load_detections
    from yolo_sizeloss.validate import main as val_main

    def max_same_class_overlap(report: Path) -> float:
        worst = 0.0
        for r in load_detections(report).records:
            for k in set(r.pred_classes.tolist()):
                boxes = torch.as_tensor(r.pred_boxes[r.pred_classes == k])
                iou = box_iou(boxes, boxes).fill_diagonal_(0)
                worst = max(worst, float(iou.max()) if len(boxes) > 1 else 0.0)
        return worst

    best = str(trained_run / "weights" / "best.pt")
    for name, flags in (("default", []), ("strict", ["--iou", "0.2"])):
        assert val_main(["--model", best, "--data", str(tiny_data), "--split", "val", "--device", "cpu",
                         "--project", str(tmp_path), "--name", name, *flags]) == 0
        out, err = capfd.readouterr()
        assert re.search(r"val: 100%.* 1/1 ", out + err), out + err  # 2 images in one batch
    meta = {name: json.loads((tmp_path / name / "metrics.json").read_text())["meta"] for name in ("default", "strict")}
    assert (meta["default"]["iou"], meta["strict"]["iou"]) == (0.5, 0.2)
    # boxes are scaled back to the original image after NMS, which keeps their IoU up to rounding
    assert 0.2 + 1e-4 < max_same_class_overlap(tmp_path / "default") <= 0.5 + 1e-4
    assert max_same_class_overlap(tmp_path / "strict") <= 0.2 + 1e-4


def stopped_copy(trained_run: Path, run: Path, **train_args) -> Path:
    """A copy of the 1-epoch run at ``run`` whose last.pt says it was started for 2 epochs (and with
    ``train_args``) and stopped after 1, so that a resume would train; its last.pt."""
    shutil.copytree(trained_run, run)
    last = run / "weights" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["train_args"].update(epochs=2, **train_args)
    torch.save(checkpoint, last)
    return last


def count_split_reads(monkeypatch) -> list[str]:
    """The splits whose label files are read from now on (``detections.check_split``, which every reader calls)."""
    read, real = [], detections.check_split
    monkeypatch.setattr(detections, "check_split",
                        lambda data, split, *rest: read.append(split) or real(data, split, *rest))
    return read


def count_checkpoint_reads(monkeypatch, path: Path) -> list[Path]:
    """Each time ``path`` is read by ``torch.load`` from now on."""
    read, real = [], torch.load

    def load(f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f) == path:
            read.append(f)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return read


@pytest.mark.slow
def test_the_engine_trains_on_the_splits_the_command_checked(tiny_data, tmp_path, monkeypatch):
    """The command's check reads each split's labels once and the engine trains on the images it kept (it
    once read every label file again)."""
    read = count_split_reads(monkeypatch)
    assert main(["--data", str(tiny_data), "--project", str(tmp_path), *TRAIN_FLAGS]) == 0
    assert sorted(read) == ["train", "val"]
    assert len(list(csv.DictReader(open(tmp_path / "train" / "results.csv")))) == 1


@pytest.mark.slow
def test_resume_continues_the_run(trained_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    last = stopped_copy(trained_run, run)
    read = count_split_reads(monkeypatch)
    checkpoint_reads = count_checkpoint_reads(monkeypatch, last)
    # as a run started before the assignment columns existed, killed after epoch 2's row, before its checkpoint
    old = [row for row in csv.DictReader(open(run / "results.csv"))]
    old = [{k: v for k, v in row.items() if not k.startswith("assign/")} for row in old]
    first_row = ",".join(old[0].values())
    with open(run / "results.csv", "w") as f:
        f.write(",".join(old[0]) + "\n" + first_row + "\n" + first_row.replace("1,", "2,", 1) + "\n")
    # the checkpoint knows its family: no --arch needed to resume it
    assert train_main(["--resume", str(last)]) == 0
    assert sorted(read) == ["train", "val"]  # checked once, as a new run's
    # the family's peek and the check; the engine continues from the checked checkpoint (it once read it again)
    assert len(checkpoint_reads) == 2
    rows = list(csv.DictReader(open(run / "results.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[1]["time"]) > float(rows[0]["time"])
    assert rows[1] != dict(zip(rows[0], first_row.replace("1,", "2,", 1).split(",")))  # trained again
    assert rows[0]["assign/no_pos_share"] == "" and float(rows[1]["assign/no_pos_share"]) <= 1  # the columns added
    resumed = load_checkpoint(last)
    assert resumed["epoch"] == 1 and resumed["scheduler"]["last_epoch"] == 2
    assert yaml.safe_load((run / "loss.yaml").read_text())["settings"] == resumed["loss"]
    assert (run / "weighting.png").is_file()
    capsys.readouterr()
    assert main(["--resume", str(last)]) == 1  # finished: a one-line error, not a traceback
    assert "this run finished its 2 epochs; give --epochs above 2 to train on" in capsys.readouterr().err
    assert main(["--resume", str(last), "--imgsz", "256"]) == 2  # a resume keeps its image size
    imgsz = resumed["train_args"]["imgsz"]
    assert f"--imgsz 256 (the run's: {imgsz}) cannot change on resume" in capsys.readouterr().err
    # the run's own values, as a user repeating the command with --resume gives them: accepted (it is finished)
    assert main(["--resume", str(last), "--imgsz", str(imgsz), "--data", resumed["train_args"]["data"]]) == 1
    assert "this run finished its 2 epochs" in capsys.readouterr().err
    # a changed loss: the YOLO path's words and exit code, under the program's own name
    assert train_main(["--resume", str(last), "--loss", "feedback", "--epochs", "3"], "yolo-sizeloss train") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"yolo-sizeloss train: error: --resume {last}: a resumed run keeps its loss (plb+scb); "
                          "the request differs in") and len(err.splitlines()) == 1
    # --loss-cfg alone sets the run's own methods' settings (not those of a --loss baseline never given)
    (tmp_path / "gt.yaml").write_text("plb:\n  source: gt\n")
    assert train_main(["--resume", str(last), "--loss-cfg", str(tmp_path / "gt.yaml"), "--epochs", "3"]) == 2
    assert capsys.readouterr().err.strip() == (f"yolo-sizeloss train: error: --resume {last}: a resumed run keeps its "
                                               "loss (plb+scb); the request differs in plb.source (predicted -> gt); leave "
                                               "--loss and --loss-cfg out to resume with the run's own")
    # the run's methods in another order: accepted; a new total extends the finished run
    assert main(["--resume", str(last), "--loss", "scb+plb", "--plb", "1C,1B", "--scb-rpn", "--epochs", "3"]) == 0
    assert len((run / "results.csv").read_text().splitlines()) == 4 and load_checkpoint(last)["epoch"] == 2


def test_weights_that_fit_no_tensor_are_refused_before_any_run_folder(tiny_data, tmp_path, capsys):
    from yolo_sizeloss.rcnn.cli import build_parser, check_args, fill_defaults

    unrelated, coco = tmp_path / "unrelated.pt", tmp_path / "coco_classes.pt"
    torch.save({"foo": torch.zeros(3)}, unrelated)
    # torchvision's own detector with COCO's 91 classes: all but the class predictor fits a 3-class model
    torch.save(fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None).state_dict(), coco)
    project = tmp_path / "proj"
    flags = ["--arch", "faster_rcnn", "--backbone", "mobilenet_v3_large_fpn", "--data", str(tiny_data),
             "--project", str(project), "--epochs", "1", "--device", "cpu"]
    assert train_main([*flags, "--weights", str(unrelated)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"yolo-sizeloss train: error: --weights {unrelated}: no tensor matches this model's names and "
                   "shapes")
    assert check_args(fill_defaults(build_parser().parse_args([*flags, "--weights", str(coco)])))[0].weights == str(coco)
    assert not project.exists()


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time: what a command left unchanged."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.slow
@pytest.mark.parametrize("flags, code, message", [
    ([], 1, "--resume {last}: this run finished its 1 epochs; give --epochs above 1 to train on"),
    (["--epochs", "1"], 2, "--epochs 1: the run has already trained 1 epochs"),
])
def test_resuming_a_finished_run_is_one_line_and_writes_nothing(trained_run, tmp_path, capsys, flags, code, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # trained its 1 of 1 epochs
    last, before = run / "weights" / "last.pt", folder_state(run)
    assert train_main(["--resume", str(last), *flags]) == code
    assert capsys.readouterr().err.strip() == "yolo-sizeloss train: error: " + message.format(last=last)
    assert folder_state(run) == before


@pytest.mark.slow
def test_resuming_a_checkpoint_older_than_the_runs_last_pt_is_refused(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    last = stopped_copy(trained_run, run)
    best = run / "weights" / "best.pt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["train_args"]["epochs"] = 3
    checkpoint["epoch"] = 1  # last.pt two epochs in, best.pt (with its optimizer) one
    torch.save(checkpoint, last)
    checkpoint["epoch"] = 0
    torch.save(checkpoint, best)
    before = folder_state(run)
    assert train_main(["--resume", str(best)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"yolo-sizeloss train: error: --resume {best}: holds 1 trained epochs and the run's last.pt 2; resuming it "
        f"would drop the later epochs: resume {last}, or resume a copy of the run folder")
    assert folder_state(run) == before


@pytest.mark.slow
def test_a_resume_whose_data_yaml_is_gone_is_one_line_naming_it_and_writes_nothing(trained_run, tmp_path, capsys):
    run, gone = tmp_path / "run", tmp_path / "gone" / "data.yaml"
    last = stopped_copy(trained_run, run, data=str(gone))  # its data moved since
    before = folder_state(run)
    assert train_main(["--resume", str(last)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"yolo-sizeloss train: error: --resume {last}: the run's data: data yaml '{gone}' not found")
    assert len(err.splitlines()) == 1 and "--verbose" not in err
    assert folder_state(run) == before


@pytest.mark.slow
def test_resume_with_negative_workers_is_one_line_naming_the_flag_and_writes_nothing(trained_run, tmp_path, capsys):
    """torch refused it only when the resumed run built its data loader, with its own words."""
    run = tmp_path / "run"
    last = stopped_copy(trained_run, run)
    before = folder_state(run)
    assert train_main(["--resume", str(last), "--workers", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "yolo-sizeloss train: error: --workers -1: must not be negative"
    assert folder_state(run) == before


@pytest.mark.slow
def test_resume_on_data_with_other_classes_is_one_line_and_writes_nothing(trained_run, tiny_data, tmp_path, capsys):
    """A class added to the run's data yaml since: it was found only when the engine built the model (exit 1,
    pointing to the traceback)."""
    data = yaml.safe_load(tiny_data.read_text())
    data["names"][3] = "Neutrophil"
    grown = tmp_path / "grown.yaml"
    grown.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    last = stopped_copy(trained_run, run, data=str(grown))
    before = folder_state(run)
    assert train_main(["--resume", str(last)]) == 1
    assert capsys.readouterr().err.strip() == (f"yolo-sizeloss train: error: --resume {last}: the run trained 3 classes "
                                               f"and its data {grown} now has 4")
    assert folder_state(run) == before


@pytest.mark.slow
def test_a_new_run_in_a_reused_folder_writes_only_its_own_results(tiny_data, tmp_path):
    """--exist-ok reuses the folder of an earlier run: its results.csv goes, as Ultralytics' trainer deletes
    it on a new run, instead of the new rows following the old ones."""
    run = tmp_path / "train"
    run.mkdir()
    (run / "results.csv").write_text("epoch,time,metrics/mAP50-95(B)\n1,60.0,0.1\n2,120.0,0.2\n")  # an earlier run's
    assert main(["--data", str(tiny_data), "--project", str(tmp_path), "--name", "train", "--exist-ok",
                 "--backbone", "mobilenet_v3_large_fpn", "--imgsz", "64", "--epochs", "1", "--batch", "1",
                 "--fraction", "0.25", "--workers", "0", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(run / "results.csv")))
    assert [r["epoch"] for r in rows] == ["1"] and "train/loss_objectness" in rows[0]  # this run's one epoch


@pytest.mark.slow
def test_two_process_gloo_training(tiny_data, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(ROOT / "train.py"), "--arch", "faster_rcnn", "--data", str(tiny_data), "--project", str(tmp_path),
               *TRAIN_FLAGS]
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["train"]  # one run directory, written by rank 0
    rows = (tmp_path / "train" / "results.csv").read_text().splitlines()
    assert len(rows) == 2
    checkpoint = load_checkpoint(tmp_path / "train" / "weights" / "last.pt")
    assert not any(k.startswith("module.") for k in checkpoint["model"])


@pytest.mark.slow
def test_onnx_export_matches_pytorch(trained_run, tmp_path):
    import onnxruntime

    from yolo_sizeloss.rcnn.data import read_image
    from yolo_sizeloss.rcnn.model import model_from_checkpoint, set_inference_limits

    weights = trained_run / "weights" / "last.pt"
    onnx_file = export_onnx(weights, tmp_path / "model.onnx", conf=0.05, max_det=100)
    image = read_image(str(sorted((BCCD / "images" / "val").glob("*.jpg"))[0]))
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    boxes, labels, scores = session.run(None, {"image": image.numpy()})
    model = model_from_checkpoint(load_checkpoint(weights)).eval()
    set_inference_limits(model, 0.05, 100)
    with torch.no_grad():
        expected = model([image])[0]
    assert len(boxes) > 0 and len(boxes) == len(expected["boxes"])
    for box, label, score in zip(boxes, labels, scores):  # each ONNX detection has its PyTorch twin
        same_label = expected["labels"].numpy() == label
        distance = np.abs(expected["boxes"].numpy()[same_label] - box).max(1)
        nearest = distance.argmin()
        assert distance[nearest] < 0.05
        assert expected["scores"].numpy()[same_label][nearest] == pytest.approx(score, abs=1e-4)


@pytest.mark.slow
def test_train_py_and_val_py_cover_faster_rcnn(tiny_data, tmp_path):
    """The common command line: train.py --arch faster_rcnn --loss plb (the settings shared with YOLO, not
    the paper's shorthands), then val.py's report on its checkpoint."""
    flags = [f for f in TRAIN_FLAGS if f not in ("--plb", "1C,1B", "--scb-rpn")]
    train_run = subprocess.run(
        [sys.executable, "train.py", "--arch", "faster_rcnn", "--loss", "plb", "--data", str(tiny_data),
         "--project", str(tmp_path), "--name", "frcnn", *flags], capture_output=True, text=True, cwd=ROOT)
    assert train_run.returncode == 0, train_run.stderr[-3000:]
    assert "size-aware loss: plb (source=predicted, rcnn_terms=['rpn_cls', 'rpn_box'])" in train_run.stdout
    assert load_checkpoint(tmp_path / "frcnn" / "weights" / "best.pt")["loss"] == load_loss_config("plb")
    best = tmp_path / "frcnn" / "weights" / "best.pt"
    val_run = subprocess.run(
        [sys.executable, "val.py", "--model", str(best), "--data", str(tiny_data), "--split", "val", "--device", "cpu",
         "--project", str(tmp_path), "--name", "report"], capture_output=True, text=True, cwd=ROOT)
    assert val_run.returncode == 0, val_run.stderr[-3000:]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["meta"]["detector"] == "faster_rcnn" and metrics["meta"]["imgsz"] == IMGSZ
    assert set(metrics["per_class"]) == {"RBC", "WBC", "Platelets"}
    assert metrics["recall_by_size"]["0.01"]["all"]["total"] == sum(
        len(r.gt_boxes) for r in load_split(tiny_data, "val")[0])
    assert (tmp_path / "report" / "size_metrics.png").is_file()


def test_hflip_mirrors_the_image_and_its_boxes():
    """Faster R-CNN's training flip: on a 10 px wide image a box over x 1-4 lies over x 6-9 after it."""
    from yolo_sizeloss.rcnn.data import hflip

    image = torch.arange(2 * 3 * 10, dtype=torch.float32).view(2, 3, 10)
    target = {"boxes": torch.tensor([[1.0, 0.0, 4.0, 2.0]]), "labels": torch.tensor([3])}
    flipped, out = hflip(image, target)
    assert torch.equal(flipped, image.flip(-1)) and torch.equal(flipped[:, :, 0], image[:, :, 9])
    assert out["boxes"].tolist() == [[6.0, 0.0, 9.0, 2.0]] and torch.equal(out["labels"], target["labels"])
    assert target["boxes"].tolist() == [[1.0, 0.0, 4.0, 2.0]]  # the input target is left as it was
