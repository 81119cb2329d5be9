"""The small-object report on hand-built ground truth and detections (no detector involved)."""

import numpy as np
import pytest

from yolo_sizeloss.detections import ImageRecord
from yolo_sizeloss.evaluation import evaluate_records, letterbox_scales, parse_size_buckets

NAMES = ["RBC", "WBC", "Platelets"]
# one image, 640x480: a small (20x20), a medium (50x50) and a large (150x150) object, original pixels
GT = np.array([[10, 10, 30, 30], [100, 100, 150, 150], [300, 200, 450, 350]], dtype=np.float32)
GT_CLASSES = np.array([2, 0, 1])


def record(pred_boxes, pred_scores, pred_classes, gt=GT, gt_classes=GT_CLASSES) -> ImageRecord:
    return ImageRecord("a.jpg", 640, 480, gt, gt_classes, np.asarray(pred_boxes, np.float32).reshape(-1, 4),
                       np.asarray(pred_scores, np.float32), np.asarray(pred_classes, np.int64))


def report(records, imgsz=640, **kwargs) -> dict:
    return evaluate_records(records, NAMES, letterbox_scales(records, imgsz), **kwargs)


def test_perfect_predictions_give_ap_1_and_full_recall_everywhere():
    metrics = report([record(GT, [0.9, 0.8, 0.7], GT_CLASSES)])
    for frame in ("original", "input"):
        coco = metrics["coco"][frame]
        assert coco["ap"] == coco["ap50"] == coco["ap75"] == pytest.approx(1.0)
        assert coco["ap_small"] == coco["ap_medium"] == coco["ap_large"] == pytest.approx(1.0)
        assert coco["ar100"] == pytest.approx(1.0)
    assert all(v["ap"] == pytest.approx(1.0) for v in metrics["per_class"].values())
    for threshold in ("0.01", "0.1", "0.3"):
        for bucket in ("small", "medium", "large"):
            assert metrics["recall_by_size"][threshold][bucket] == {"recall": 1.0, "hits": 1, "total": 1}


def test_missing_every_small_object_zeroes_only_the_small_figures():
    metrics = report([record(GT[1:], [0.8, 0.7], GT_CLASSES[1:])])
    coco = metrics["coco"]["original"]
    assert coco["ap_small"] == 0.0 and coco["ar_small"] == 0.0
    assert coco["ap_medium"] == pytest.approx(1.0) and coco["ap_large"] == pytest.approx(1.0)
    assert metrics["per_class"]["Platelets"]["ap"] == 0.0 and metrics["per_class"]["RBC"]["ap"] == pytest.approx(1.0)
    for threshold in ("0.01", "0.1", "0.3"):
        row = metrics["recall_by_size"][threshold]
        assert row["small"]["recall"] == 0.0 and row["medium"]["recall"] == row["large"]["recall"] == 1.0


def test_a_detection_below_a_threshold_does_not_count_there():
    metrics = report([record(GT, [0.05, 0.2, 0.9], GT_CLASSES)])
    recall = metrics["recall_by_size"]
    assert recall["0.01"]["all"]["hits"] == 3
    assert recall["0.1"]["small"]["hits"] == 0 and recall["0.1"]["all"]["hits"] == 2
    assert recall["0.3"]["all"]["hits"] == 1 and recall["0.3"]["large"]["hits"] == 1


def test_one_detection_cannot_match_two_ground_truths():
    twins = np.array([[100, 100, 150, 150], [101, 101, 151, 151]], dtype=np.float32)  # IoU 0.92 with each other
    metrics = report([record([[100, 100, 150, 150]], [0.9], [0], gt=twins, gt_classes=np.array([0, 0]))])
    assert metrics["recall_by_size"]["0.1"]["all"] == {"recall": 0.5, "hits": 1, "total": 2}
    # a detection of another class finds nothing
    metrics = report([record([[100, 100, 150, 150]], [0.9], [1], gt=twins, gt_classes=np.array([0, 0]))])
    assert metrics["recall_by_size"]["0.1"]["all"]["hits"] == 0


def test_input_frame_moves_a_39px_box_at_imgsz_416_from_medium_to_small():
    box = np.array([[300, 200, 339, 239]], dtype=np.float32)  # 39x39 on a 640x480 image
    records = [record(box, [0.9], [2], gt=box, gt_classes=np.array([2]))]
    assert letterbox_scales(records, 416)[0] == pytest.approx(0.65)
    metrics = report(records, imgsz=416)
    assert metrics["coco"]["original"]["ap_medium"] == pytest.approx(1.0)
    assert metrics["coco"]["original"]["ap_small"] is None  # no small ground truth in the original frame
    assert metrics["coco"]["input"]["ap_small"] == pytest.approx(1.0)  # 39 * 0.65 = 25.4 px < 32
    assert metrics["coco"]["input"]["ap_medium"] is None
    assert metrics["recall_by_size"]["0.1"]["small"]["total"] == 1  # recall buckets in the input frame
    original = evaluate_records(records, NAMES, letterbox_scales(records, 416), recall_frame="original")
    assert original["recall_by_size"]["0.1"]["medium"]["total"] == 1


def test_custom_size_buckets():
    edges = parse_size_buckets("0,16,32,96,inf")
    metrics = report([record(GT[1:], [0.8, 0.7], GT_CLASSES[1:])], edges=edges)  # the 20 px object missed
    assert metrics["recall_by_size"]["0.1"] == {
        "0-16": {"recall": None, "hits": 0, "total": 0},
        "16-32": {"recall": 0.0, "hits": 0, "total": 1},
        "32-96": {"recall": 1.0, "hits": 1, "total": 1},
        "96-inf": {"recall": 1.0, "hits": 1, "total": 1},
        "all": {"recall": 0.666667, "hits": 2, "total": 3},
    }
    buckets = metrics["coco"]["original"]["buckets"]
    assert buckets["0-16"]["ap"] is None and buckets["16-32"]["ap"] == 0.0
    assert buckets["32-96"]["ap"] == pytest.approx(1.0) and buckets["96-inf"]["ap"] == pytest.approx(1.0)
    for bad in ("0,96,32", "32", "a,b", "-1,32"):
        with pytest.raises(ValueError):
            parse_size_buckets(bad)
