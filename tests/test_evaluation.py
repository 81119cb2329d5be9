"""The small-object report on hand-built ground truth and detections (no model involved)."""

from __future__ import annotations

import bz2
import gzip
import json
import math

import numpy as np
import pytest

from yolo_sizeloss.detections import ImageRecord
from yolo_sizeloss.detections_file import RunDetections, find_detections, load_detections, write_detections
from yolo_sizeloss.evaluation import (
    COCO_EDGES,
    COCO_MAX_DET,
    attach_coco_predictions,
    bucket_index,
    bucket_names,
    coco_metrics,
    evaluate_records,
    fit_by_size,
    greedy_assignment,
    letterbox_scales,
    parse_size_buckets,
    recall_by_size,
    unmatched_detections,
)
from yolo_sizeloss.paired_report import compare_report
from yolo_sizeloss.report import format_report, write_report

NAMES = ["RBC", "WBC", "Platelets"]
W, H = 640, 480


def square(x: float, y: float, side: float) -> list[float]:
    """An xyxy box of the given side with its top-left corner at (x, y)."""
    return [x, y, x + side, y + side]


def record(gt: list[list[float]], gt_cls: list[int], pred=(), pred_cls=(), scores=()) -> ImageRecord:
    """A 640x480 image with the given xyxy ground truth and detections."""
    return ImageRecord(
        file="img.jpg",
        width=W,
        height=H,
        gt_boxes=np.array(gt, dtype=np.float32).reshape(-1, 4),
        gt_classes=np.array(gt_cls, dtype=np.int64),
        pred_boxes=np.array(pred, dtype=np.float32).reshape(-1, 4),
        pred_scores=np.array(scores, dtype=np.float32),
        pred_classes=np.array(pred_cls, dtype=np.int64),
    )


def sized_scene(detect_small: bool) -> list[ImageRecord]:
    """Three images, each with a small (20 px), a medium (50 px) and a large (150 px) object of
    different classes; detections are exact copies of the GT, small ones only if ``detect_small``."""
    records = []
    for i in range(3):
        gt = [square(10, 10, 20), square(100, 100, 50), square(300, 200, 150)]
        classes = [2, i % 2, (i + 1) % 2]
        keep = [detect_small, True, True]
        pred = [b for b, k in zip(gt, keep) if k]
        pred_cls = [c for c, k in zip(classes, keep) if k]
        records.append(record(gt, classes, pred, pred_cls, [0.9] * len(pred)))
    return records


def unit_scales(records: list[ImageRecord]) -> np.ndarray:
    """Input frame == original frame (so both frames bucket alike)."""
    return np.ones(len(records))


def test_parse_size_buckets():
    assert parse_size_buckets("0,16,32,96,inf") == (0.0, 16.0, 32.0, 96.0, math.inf)
    assert parse_size_buckets("0,32,96,inf") == COCO_EDGES
    for bad in ("0,32,16,inf", "0,32,32,96", "32", "0,a,96", "-1,32"):
        with pytest.raises(ValueError):
            parse_size_buckets(bad)


def test_bucket_names_and_index_are_half_open_on_squared_sides():
    assert bucket_names(COCO_EDGES) == ["small", "medium", "large"]
    assert bucket_names((0, 16, 32, math.inf)) == ["0-16", "16-32", "32-inf"]
    areas = np.array([0, 31.9**2, 32**2, 95**2, 96**2, 1e9])
    assert bucket_index(areas, COCO_EDGES).tolist() == [0, 0, 1, 1, 2, 2]
    assert bucket_index(np.array([5**2, 50**2]), (10, 20, 40)).tolist() == [-1, -1]


def test_perfect_predictions_give_ap_one_and_full_recall_everywhere():
    records = sized_scene(detect_small=True)
    metrics = evaluate_records(records, NAMES, unit_scales(records))
    for frame in ("original", "input"):
        coco = metrics["coco"][frame]
        for key in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar100", "ar_small", "ar_medium"):
            assert coco[key] == pytest.approx(1.0), (frame, key)
    one = pytest.approx(1.0)
    assert all(v["ap"] == one and v["ap50"] == one for v in metrics["per_class"].values())
    assert metrics["per_class"]["Platelets"]["input"] == {"ap_small": one, "ap_medium": None, "ap_large": None}
    assert metrics["per_class"]["RBC"]["input"] == {"ap_small": None, "ap_medium": one, "ap_large": one}
    assert all(v["original"] == v["input"] for v in metrics["per_class"].values())  # unit scales: one frame
    assert set(metrics["recall_by_size"]) == {"0.01", "0.1", "0.3"}
    for row in metrics["recall_by_size"].values():
        assert row["small"] == {"recall": 1.0, "hits": 3, "total": 3}
        assert row["medium"]["recall"] == row["large"]["recall"] == row["all"]["recall"] == 1.0
        assert row["all"]["total"] == 9


def test_missing_every_small_object_zeroes_small_metrics_only():
    records = sized_scene(detect_small=False)
    metrics = evaluate_records(records, NAMES, unit_scales(records))
    coco = metrics["coco"]["original"]
    assert coco["ap_small"] == 0.0 and coco["ar_small"] == 0.0
    assert coco["ap_medium"] == pytest.approx(1.0) and coco["ap_large"] == pytest.approx(1.0)
    assert coco["ap"] == pytest.approx(2 / 3)  # the mean over RBC 1, WBC 1 and Platelets 0
    assert metrics["per_class"]["Platelets"]["ap"] == 0.0  # all small objects are platelets here
    for row in metrics["recall_by_size"].values():
        assert row["small"] == {"recall": 0.0, "hits": 0, "total": 3}
        assert row["medium"]["recall"] == row["large"]["recall"] == 1.0
        assert row["all"] == {"recall": pytest.approx(6 / 9, abs=1e-6), "hits": 6, "total": 9}


def test_detection_below_a_threshold_does_not_count_there():
    gt = [square(100, 100, 50)]
    records = [record(gt, [0], gt, [0], [0.05]), record(gt, [0], gt, [0], [0.1])]
    recall = recall_by_size(records, unit_scales(records), COCO_EDGES)
    assert recall["0.01"]["medium"]["hits"] == 2
    assert recall["0.1"]["medium"]["hits"] == 1  # the 0.1 score counts at 0.1 (score >= threshold)
    assert recall["0.3"]["medium"]["hits"] == 0


def test_one_detection_cannot_match_two_ground_truths():
    box = square(100, 100, 50)
    taken = greedy_assignment(
        np.array([box, box], dtype=np.float32), np.array([0, 0]), np.array([box], dtype=np.float32),
        np.array([0.9]), np.array([0]),
    )
    assert taken.tolist() == [0]
    recall = recall_by_size([record([box, box], [0, 0], [box], [0], [0.9])], np.ones(1), COCO_EDGES)
    assert recall["0.1"]["medium"] == {"recall": 0.5, "hits": 1, "total": 2}


def test_greedy_assignment_needs_same_class_and_iou_and_prefers_high_scores():
    gt = np.array([square(0, 0, 100), square(20, 0, 100)], dtype=np.float32)
    classes = np.array([0, 0])
    # the 0.9 detection overlaps both (IoU 0.67 with GT0, 1.0 with GT1): it takes GT1, the 0.5 one then takes GT0
    dets = np.array([square(20, 0, 100), square(0, 0, 100)], dtype=np.float32)
    assert greedy_assignment(gt, classes, dets, np.array([0.9, 0.5]), np.array([0, 0])).tolist() == [1, 0]
    assert greedy_assignment(gt, classes, dets, np.array([0.9, 0.5]), np.array([1, 1])).tolist() == [-1, -1]
    # a matched GT is taken: the 0.5 detection (IoU 0.90 with GT0, 0.60 with GT2) falls back to GT2
    gt2 = np.array([square(0, 0, 100), square(30, 0, 100)], dtype=np.float32)
    dets2 = np.array([square(0, 0, 100), square(5, 0, 100)], dtype=np.float32)
    assert greedy_assignment(gt2, classes, dets2, np.array([0.9, 0.5]), np.array([0, 0])).tolist() == [0, 1]
    shifted = np.array([square(60, 0, 100)], dtype=np.float32)  # IoU 0.43 with GT1
    assert greedy_assignment(gt, classes, shifted, np.array([0.9]), np.array([0])).tolist() == [-1]


def test_unmatched_detections_are_the_confident_ones_that_take_no_ground_truth():
    gt = [square(0, 0, 100), square(300, 300, 40)]
    # 0: on GT0 (IoU 0.74); 1: also on GT0 (IoU 0.54; 0.38 with box 0, so recall's NMS at 0.45 keeps it),
    # which box 0 took first; 2: on GT1 but of another class; 3: on nothing; 4: on nothing, below 0.5
    dets = [square(-15, 0, 100), square(30, 0, 100), square(300, 300, 40), square(500, 100, 30), square(500, 300, 30)]
    r = record(gt, [0, 1], dets, [0, 0, 0, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.2])
    assert unmatched_detections(r, 0.5).tolist() == [1, 2, 3]
    assert unmatched_detections(r, 0.1).tolist() == [1, 2, 3, 4]
    assert unmatched_detections(r, 0.95).tolist() == []
    assert greedy_assignment(r.gt_boxes, r.gt_classes, r.pred_boxes, r.pred_scores, r.pred_classes).tolist() == [
        0, -1, -1, -1, -1]


def test_recall_applies_per_class_nms_and_top_200():
    a, b = square(100, 100, 100), square(130, 100, 100)  # IoU 0.54 > 0.45
    same_class = record([a, b], [0, 0], [a, b], [0, 0], [0.9, 0.8])
    other_class = record([a, b], [0, 1], [a, b], [0, 1], [0.9, 0.8])
    recall = recall_by_size([same_class, other_class], np.ones(2), COCO_EDGES)
    assert recall["0.1"]["large"]["hits"] == 1 + 2  # NMS drops b's detection only when the classes agree

    clutter = [square(5 * (i % 100), 400 + 5 * (i // 100), 4) for i in range(200)]
    target = square(300, 100, 50)
    crowded = record([target], [0], clutter + [target], [1] * 200 + [0], [0.9] * 200 + [0.5])
    assert recall_by_size([crowded], np.ones(1), COCO_EDGES)["0.1"]["medium"]["hits"] == 0  # 201st by score


def test_input_frame_moves_a_39px_box_from_medium_to_small():
    box = square(100, 100, 39)
    records = [record([box], [2], [box], [2], [0.9])]
    scales = letterbox_scales(records, 416)
    assert scales.tolist() == [pytest.approx(0.65)]
    original = coco_metrics(records, 3, np.ones(1), COCO_EDGES)
    scaled = coco_metrics(records, 3, scales, COCO_EDGES)
    assert original["ap_medium"] == pytest.approx(1.0) and original["ap_small"] is None
    assert scaled["ap_small"] == pytest.approx(1.0) and scaled["ap_medium"] is None
    recall = recall_by_size(records, scales, COCO_EDGES)["0.1"]
    assert recall["small"]["total"] == 1 and recall["medium"]["total"] == 0
    assert evaluate_records(records, NAMES, scales)["recall_by_size"]["0.1"]["small"]["total"] == 1
    original = evaluate_records(records, NAMES, scales, recall_frame="original")
    assert original["recall_by_size"]["0.1"]["medium"]["total"] == 1
    assert original["meta"]["recall_frame"] == "original"


def test_custom_buckets_are_evaluated_by_faster_coco_eval():
    tiny, small = square(10, 10, 10), square(100, 100, 20)  # 10 px in 0-16, 20 px in 16-32
    records = [record([tiny, small], [2, 2], [tiny], [2], [0.9])]
    edges = parse_size_buckets("0,16,32,96,inf")
    metrics = evaluate_records(records, NAMES, np.ones(1), edges)
    buckets = metrics["coco"]["original"]["buckets"]
    assert list(buckets) == ["0-16", "16-32", "32-96", "96-inf"]
    assert buckets["0-16"]["ap"] == pytest.approx(1.0) and buckets["16-32"]["ap"] == 0.0
    assert buckets["32-96"]["ap"] is None
    # COCO's small holds both objects, one found exactly: precision 1 at recall 0 to 0.5, 51 of COCO's 101 points
    assert metrics["coco"]["original"]["ap_small"] == pytest.approx(51 / 101)
    assert metrics["recall_by_size"]["0.3"] == {
        "0-16": {"recall": 1.0, "hits": 1, "total": 1},
        "16-32": {"recall": 0.0, "hits": 0, "total": 1},
        "32-96": {"recall": None, "hits": 0, "total": 0},
        "96-inf": {"recall": None, "hits": 0, "total": 0},
        "all": {"recall": 0.5, "hits": 1, "total": 2},
    }
    assert metrics["meta"]["size_buckets"] == ["0", "16", "32", "96", "inf"]


def test_attach_coco_predictions_maps_images_categories_and_boxes():
    records = [
        ImageRecord("/d/images/BloodImage_00007.jpg", W, H),
        ImageRecord("/d/images/42.jpg", W, H),
    ]
    predictions = [
        {"image_id": "BloodImage_00007", "category_id": 3, "bbox": [10, 20, 30, 40], "score": 0.5},
        {"image_id": 42, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.25},
    ]
    filled = attach_coco_predictions(records, predictions, {1: 0, 2: 1, 3: 2})
    assert filled[0].pred_boxes.tolist() == [[10, 20, 40, 60]] and filled[0].pred_classes.tolist() == [2]
    assert filled[1].pred_scores.tolist() == [0.25] and filled[1].pred_classes.tolist() == [0]
    assert len(records[0].pred_boxes) == 0  # inputs untouched
    with pytest.raises(ValueError, match="not in the split"):
        attach_coco_predictions(records, [{**predictions[0], "image_id": "other"}], {3: 2})
    with pytest.raises(ValueError, match="category_id"):
        attach_coco_predictions(records, predictions, {3: 2})


def test_write_report_and_compare(tmp_path):
    runs = []
    for name, detect_small in (("good", True), ("worse", False)):
        records = sized_scene(detect_small)
        metrics = evaluate_records(records, NAMES, unit_scales(records))
        metrics["meta"].update(model=name, data="synthetic", split="test", imgsz=640)
        paths = write_report(metrics, tmp_path / name, RunDetections(records, unit_scales(records), NAMES))
        assert [p.name for p in paths] == ["metrics.json", "metrics.md", "size_metrics.png", "detections.json.bz2"]
        assert json.loads(paths[0].read_text()) == json.loads(json.dumps(metrics))
        assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        runs.append(paths[0])
    markdown = (tmp_path / "good" / "metrics.md").read_text()
    assert "| input (640 px) | 1.000 |" in markdown and "100.00 (3/3)" in markdown
    table = compare_report([tmp_path / "good", runs[1]], bootstrap=0)
    small_row = next(line for line in table.splitlines() if line.startswith("| coco.original.ap_small "))
    assert small_row.split("|")[2:4] == [" 1.0000 ", " 0.0000 (-1.0000) "]
    assert "| recall.small@0.3 | 1.0000 | 0.0000 (-1.0000) |" in table
    assert "| good, small (0-32 px) | 3 | 1.000 | 100.0 | 0.900 |" in table  # box fit, from detections.json.bz2
    assert "| worse/metrics.json, small (0-32 px) | 3 | 0.000 | 0.0 | 0.000 |" in table
    assert "| small (0-32 px) | 3 | 1.000 | 100.0 | 0.900 |" in markdown


def test_report_labels_recall_with_the_max_det_it_was_evaluated_at():
    records = sized_scene(True)
    for max_det, label in ((COCO_MAX_DET, "AR100"), (12, "AR12")):
        markdown = format_report(evaluate_records(records, NAMES, unit_scales(records), max_det=max_det))
        assert f"| frame | AP | AP50 | AP75 | APs | APm | APl | {label} | ARs |" in markdown
        assert f"## AP50-95 / {label} by size bucket" in markdown


def test_detections_file_keeps_what_a_paired_comparison_needs(tmp_path):
    a = record([[10.123, 20.456, 30.789, 40.001]], [2], [[10.126, 20.4, 30.7, 40.0]], [2], [0.123456])
    b = ImageRecord("/data/other.jpg", 416, 320)  # nothing found and no ground truth
    run = RunDetections([a, b], np.array([0.65, 1.0]), NAMES)
    packed = write_detections(tmp_path / "detections.json.bz2", run).read_bytes()
    assert packed[:3] == b"BZh"  # bzip2
    assert write_detections(tmp_path / "again.json.bz2", run).read_bytes() == packed  # the same run, the same bytes
    text = bz2.decompress(packed).decode()
    assert len(text) < 400 and "10.123,20.456,30.789,40.001,2" in text  # compact: shortest decimals
    run = load_detections(tmp_path)
    assert run.names == NAMES and run.input_scales.tolist() == [0.65, 1.0]
    first, second = run.records
    assert (first.file, first.width, first.height) == ("img.jpg", W, H)
    # exactly the float32 values the report was computed from
    assert np.array_equal(first.gt_boxes, a.gt_boxes) and np.array_equal(first.pred_boxes, a.pred_boxes)
    assert np.array_equal(first.pred_scores, a.pred_scores) and first.pred_classes.tolist() == [2]
    assert first.gt_classes.dtype == np.int64 and first.pred_boxes.dtype == np.float32
    assert second.gt_boxes.shape == (0, 4) and second.pred_boxes.shape == (0, 4) and second.pred_scores.shape == (0,)
    with pytest.raises(FileNotFoundError, match="no detections.json.bz2"):
        load_detections(tmp_path / "elsewhere")


def test_recall_from_a_detections_file_is_the_reports(tmp_path):
    # a score just under the 0.3 threshold, rounded to 1e-4, crossed it: the file's recall counted a hit
    # the report had not (aerial cars: 198 small hits against the report's 197)
    scene = record([[10, 10, 30, 30]], [0], [[10, 10, 30, 30]], [0], [0.29996])
    run = RunDetections([scene], np.array([1.0]), NAMES)
    write_detections(tmp_path / "detections.json.bz2", run)
    [loaded] = load_detections(tmp_path).records
    assert recall_by_size([loaded], np.ones(1), COCO_EDGES) == recall_by_size([scene], np.ones(1), COCO_EDGES)
    assert recall_by_size([loaded], np.ones(1), COCO_EDGES)["0.3"]["all"]["hits"] == 0


@pytest.mark.parametrize("name", ["detections.json", "detections.json.gz"])
def test_a_detections_file_of_an_older_report_still_loads(tmp_path, name):
    """Reports written before val compressed the file hold an uncompressed detections.json, and those written
    before it used bzip2 a gzip-compressed detections.json.gz."""
    image = {"file": "img.jpg", "width": W, "height": H, "scale": 0.65,
             "gt": [[10.12, 20.46, 30.79, 40.0, 2]], "pred": [[10.13, 20.4, 30.7, 40.0, 0.1235, 2]]}
    text = json.dumps({"names": NAMES, "images": [image]}, separators=(",", ":")).encode()
    (tmp_path / name).write_bytes(gzip.compress(text, mtime=0) if name.endswith(".gz") else text)
    for path in (tmp_path, tmp_path / name):
        run = load_detections(path)
        assert run.names == NAMES and run.input_scales.tolist() == [0.65]
        [loaded] = run.records
        np.testing.assert_allclose(loaded.pred_boxes, [[10.13, 20.4, 30.7, 40.0]])
        assert loaded.pred_scores.tolist() == [pytest.approx(0.1235)] and loaded.gt_classes.tolist() == [2]
    assert find_detections(tmp_path) == tmp_path / name
    write_detections(tmp_path / "detections.json.bz2", run)  # the same report evaluated again: its new file is read
    assert find_detections(tmp_path) == tmp_path / "detections.json.bz2"
    assert find_detections(tmp_path / "elsewhere") is None


def test_box_fit_and_confidence_by_size_by_hand():
    small, medium, large = square(10, 10, 20), square(100, 100, 50), square(300, 200, 150)
    pred = [
        square(15, 10, 20),    # small's class, shifted 5 px: IoU 300 / 500 = 0.6
        square(20, 10, 20),    # small's class, shifted 10 px: IoU 200 / 600 = 1/3, below 0.5: its score does not count
        small,                 # exact, but another class
        medium,                # exact
        square(110, 100, 50),  # medium's class, shifted 10 px: IoU 2000 / 3000 = 2/3
    ]
    scene = [
        record([small, medium, large], [2, 0, 1], pred, [2, 2, 0, 0, 0], [0.4, 0.8, 0.9, 0.7, 0.95]),
        record([square(200, 200, 40)], [0]),  # a medium object nothing found
    ]
    fit = fit_by_size(scene, unit_scales(scene), (0.0, 16.0, 32.0, 96.0, math.inf))
    assert fit["0-16"] == {"total": 0, "iou": None, "tight": None, "score": None}
    assert fit["16-32"] == {"total": 1, "iou": pytest.approx(0.6), "tight": 0.0, "score": pytest.approx(0.4)}
    assert fit["32-96"] == {"total": 2, "iou": pytest.approx(0.5), "tight": 0.5, "score": pytest.approx(0.475)}
    assert fit["96-inf"] == {"total": 1, "iou": 0.0, "tight": 0.0, "score": 0.0}
    assert fit["all"] == {"total": 4, "iou": pytest.approx(1.6 / 4), "tight": 0.25, "score": pytest.approx(1.35 / 4)}


def test_the_report_plot_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from yolo_sizeloss.report import plot_size_metrics

    records = sized_scene(True)
    metrics = evaluate_records(records, NAMES, unit_scales(records))
    metrics["meta"].update(model="m", data="synthetic", split="test", imgsz=640)
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # any backend but the Agg the plot draws with
    try:
        assert plot_size_metrics(metrics, tmp_path / "size.png").read_bytes()[:4] == b"\x89PNG"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_class_ap_by_size_is_each_classs_own_where_coco_averages_the_classes():
    """COCO's APs is the mean over the classes with small ground truth: one missed small platelet beside a
    found small red cell gives APs 0.5, while each class's own small AP is 0 and 1. In the input frame at
    scale 0.5 the 50 px white cell is small too."""
    gt = [square(10, 10, 20), square(200, 10, 20), square(100, 100, 50)]
    found = [square(10, 10, 20), square(100, 100, 50)]
    records = [record(gt, [0, 2, 1], found, [0, 1], [0.9, 0.9])]
    metrics = evaluate_records(records, NAMES, np.ones(1))
    assert metrics["coco"]["input"]["ap_small"] == pytest.approx(0.5)
    by_size = {name: v["input"] for name, v in metrics["per_class"].items()}
    assert by_size["RBC"] == {"ap_small": pytest.approx(1.0), "ap_medium": None, "ap_large": None}
    assert by_size["WBC"] == {"ap_small": None, "ap_medium": pytest.approx(1.0), "ap_large": None}
    assert by_size["Platelets"] == {"ap_small": 0.0, "ap_medium": None, "ap_large": None}
    halved = evaluate_records(records, NAMES, np.full(1, 0.5))
    assert halved["coco"]["input"]["ap_small"] == pytest.approx(2 / 3)
    assert halved["per_class"]["WBC"]["input"] == {"ap_small": pytest.approx(1.0), "ap_medium": None, "ap_large": None}
    assert halved["per_class"]["WBC"]["original"] == by_size["WBC"]  # the original frame keeps it medium
    assert halved["per_class"]["WBC"]["ap"] == metrics["per_class"]["WBC"]["ap"]  # AP over all sizes: frame-free
    assert "| Platelets | 0.000 | 0.000 | 0.000 | n/a | n/a | 0.000 | n/a | n/a |" in format_report(metrics)
    assert "| WBC | 1.000 | 1.000 | 1.000 | n/a | n/a | n/a | 1.000 | n/a |" in format_report(halved)
