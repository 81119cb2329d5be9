"""Small-object statistics for any detector: COCO AP in two frames, per-class AP, recall by size, box fit.

Input is a ``list[ImageRecord]`` (``yolo_sizeloss.detections``) with ground truth and detections in
original image pixels, plus one *input scale* per image (original pixels -> network-input pixels;
``letterbox_scales``, for both families). Two frames are evaluated:

* ``original``: box areas in original image pixels (the COCO convention);
* ``input``: box areas in network-input pixels, i.e. original area times scale**2.

Size buckets are given as side lengths (``0, 32, 96, inf`` = COCO small/medium/large); their area
thresholds are the squares. COCO AP/AR come from faster-coco-eval; the recall-by-size protocol
(Shuang et al., scale-balanced loss) is implemented here on top of greedy per-class matching.

``fit_by_size`` splits what AP mixes: how well the boxes fit each ground truth and how confident the
detector is where it found one.

Entry point: ``evaluate_records`` (the metrics dict). Its tables and files are
``yolo_sizeloss.report``, the per-image detections file ``yolo_sizeloss.detections_file``;
comparing runs is ``yolo_sizeloss.paired``.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import faster_coco_eval
import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from torchvision.ops import batched_nms, box_iou

from yolo_sizeloss.detections import ImageRecord
from yolo_sizeloss.methods.base import COCO_AREA_LIMITS

COCO_EDGES = (0.0, *(math.sqrt(a) for a in COCO_AREA_LIMITS), math.inf)  # side lengths; COCO's areaRng: their squares
COCO_NAMES = ("small", "medium", "large")
COCO_MAX_SIDE = 1e5  # faster-coco-eval's 'all' range ends at 1e5**2; an infinite edge maps to it
FRAMES = ("original", "input")
RECALL_THRESHOLDS = (0.01, 0.1, 0.3)
RECALL_NMS_IOU = 0.45
RECALL_MAX_DET = 200
RECALL_MATCH_IOU = 0.5
FIT_TIGHT_IOU = 0.75  # half of AP50-95's IoU thresholds (0.75-0.95) need a box this tight
FIT_FOUND_IOU = RECALL_MATCH_IOU  # a detection at this IoU finds its object, as recall by size counts it
COCO_MAX_DET = 100  # COCO's maxDets for AP and AR
# faster-coco-eval has no public per-image evaluations: COCOeval_faster keeps them, with the
# parameters its C++ accumulation takes, only in its private _evalImgs_cpp and _paramsEval, in an
# order no documentation states (class, then area range, then image). The paired bootstrap
# (yolo_sizeloss.paired) needs them, so the versions are pinned (pyproject.toml) to those whose layout
# tests/test_paired.py checks; 1.7 also lacks the AR_<maxDets> keys coco_metrics reads.
SUPPORTED_FASTER_COCO_EVAL = ("1.8", "1.9")  # >= the first, < the second


# ------------------------------------------------------------------------------- faster-coco-eval
def check_faster_coco_eval(version: str | None = None) -> None:
    """ImportError, one line naming the fix, unless faster-coco-eval ``version`` (default: the installed
    one) is in ``SUPPORTED_FASTER_COCO_EVAL``. Called where faster-coco-eval is used, not at import, so
    that the commands that never evaluate (YOLO's train, convert, path) run whatever is installed."""
    version = faster_coco_eval.__version__ if version is None else version
    low, high = SUPPORTED_FASTER_COCO_EVAL
    if not _major_minor(low) <= _major_minor(version) < _major_minor(high):
        raise ImportError(f"faster-coco-eval {version} is installed; yolo_sizeloss supports >={low},<{high}: "
                          f"pip install 'faster-coco-eval>={low},<{high}'")


def _major_minor(version: str) -> tuple[int, ...]:
    """``(1, 8)`` for ``"1.8.0"``; ``(0,)``, below any release, for a version not starting with two numbers."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0,)


# ----------------------------------------------------------------------------------------- buckets
def parse_size_buckets(text: str) -> tuple[float, ...]:
    """Parse ``"0,16,32,96,inf"`` into side-length edges; at least two, non-negative, strictly increasing."""
    try:
        edges = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--size-buckets must be comma-separated numbers such as 0,32,96,inf, got {text!r}") from None
    if len(edges) < 2 or edges[0] < 0 or any(math.isnan(e) for e in edges):
        raise ValueError(f"--size-buckets needs at least two non-negative side lengths, got {text!r}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"--size-buckets must be strictly increasing side lengths, got {text!r}")
    return edges


def format_edge(edge: float) -> str:
    """Side length as text: ``32`` for 32.0, ``inf`` for infinity, ``12.5`` otherwise."""
    return "inf" if math.isinf(edge) else f"{edge:g}"


def bucket_names(edges: tuple[float, ...]) -> list[str]:
    """COCO's ``small/medium/large`` for the COCO edges, else ``"lo-hi"`` per bucket (``"96-inf"``)."""
    if tuple(edges) == COCO_EDGES:
        return list(COCO_NAMES)
    return [f"{format_edge(lo)}-{format_edge(hi)}" for lo, hi in zip(edges, edges[1:])]


def bucket_index(areas: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """Bucket of each area, half-open ``[lo**2, hi**2)``; -1 for areas outside all buckets."""
    thresholds = np.square(np.asarray(edges, dtype=np.float64))
    index = np.searchsorted(thresholds, np.asarray(areas, dtype=np.float64), side="right") - 1
    index[index >= len(edges) - 1] = -1
    return index


def letterbox_scales(records: list[ImageRecord], imgsz: int) -> np.ndarray:
    """Per-image scale original -> network input, imgsz / max(w, h): YOLO's letterbox of side ``imgsz``, and
    Faster R-CNN's resize of the long side to ``imgsz`` alike."""
    return np.array([imgsz / max(r.width, r.height) for r in records], dtype=np.float64)


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """Areas of xyxy boxes, shape (N,)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)


# ------------------------------------------------------------------------------------- predictions
def coco_image_id(file: str) -> int | str:
    """The image id Ultralytics writes in predictions.json: the file stem, as int when numeric."""
    stem = Path(file).stem
    return int(stem) if stem.isnumeric() else stem


def coco_image_index(records: list[ImageRecord]) -> dict[int | str, int]:
    """Each record's position by ``coco_image_id`` of its file; two files with the same id (the same stem
    in two folders of a split) are a ValueError naming both, as their predictions could not be told apart."""
    index: dict[int | str, int] = {}
    for i, record in enumerate(records):
        key = coco_image_id(record.file)
        if key in index:
            raise ValueError(f"images {records[index[key]].file} and {record.file} share the id {key!r} (Ultralytics "
                             "names predictions by file stem): rename one")
        index[key] = i
    return index


def attach_coco_predictions(
    records: list[ImageRecord], predictions: list[dict], category_to_class: dict[int, int]
) -> list[ImageRecord]:
    """Copies of ``records`` holding the COCO-style ``predictions`` (image_id, category_id, xywh bbox, score).

    Images are matched by ``coco_image_id`` of their file; a prediction for an unknown image or
    category raises ValueError, as do two records with the same id.
    """
    index = coco_image_index(records)
    per_image: list[list[dict]] = [[] for _ in records]
    for p in predictions:
        if p["image_id"] not in index:
            raise ValueError(f"prediction for image {p['image_id']!r} that is not in the split")
        if p["category_id"] not in category_to_class:
            raise ValueError(f"prediction with unknown category_id {p['category_id']}")
        per_image[index[p["image_id"]]].append(p)
    return [_with_predictions(record, preds, category_to_class) for record, preds in zip(records, per_image)]


def _with_predictions(record: ImageRecord, preds: list[dict], category_to_class: dict[int, int]) -> ImageRecord:
    """One record with its COCO-style predictions converted to xyxy boxes, scores and class indices."""
    xywh = np.array([p["bbox"] for p in preds], dtype=np.float32).reshape(-1, 4)
    return replace(
        record,
        pred_boxes=np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
        pred_scores=np.array([p["score"] for p in preds], dtype=np.float32),
        pred_classes=np.array([category_to_class[p["category_id"]] for p in preds], dtype=np.int64),
    )


# ------------------------------------------------------------------------------------------- COCO
def to_coco(records: list[ImageRecord], num_classes: int, scales: np.ndarray) -> tuple[dict, list[dict]]:
    """COCO ground truth dict and detection list, every box multiplied by its image's scale.

    Image ids are 1-based record positions, category ids are class index + 1, GT 'area' is the
    scaled box area (so scale 1 gives the original frame), iscrowd is 0.
    """
    images, annotations, detections = [], [], []
    for image_id, (record, scale) in enumerate(zip(records, scales), 1):
        images.append(
            {"id": image_id, "file_name": Path(record.file).name,
             "width": round(record.width * scale), "height": round(record.height * scale)}
        )
        for box, cls in zip(_xywh(record.gt_boxes, scale), record.gt_classes):
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls) + 1,
                 "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            )
        for box, score, cls in zip(_xywh(record.pred_boxes, scale), record.pred_scores, record.pred_classes):
            detections.append({"image_id": image_id, "category_id": int(cls) + 1, "bbox": box, "score": float(score)})
    categories = [{"id": k + 1, "name": str(k)} for k in range(num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def _xywh(boxes: np.ndarray, scale: float) -> list[list[float]]:
    """xyxy boxes -> scaled COCO [x, y, w, h] lists."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1).tolist()


def coco_area_ranges(edges: tuple[float, ...]) -> tuple[list[list[float]], list[str]]:
    """faster-coco-eval ``areaRng``/``areaRngLbl``: 'all', COCO small/medium/large, then custom buckets."""
    ranges = [[0.0, COCO_MAX_SIDE**2]]
    labels = ["all"]
    bucket_sets = [(COCO_EDGES, COCO_NAMES)]
    if tuple(edges) != COCO_EDGES:
        bucket_sets.append((edges, bucket_names(edges)))
    for bucket_edges, names in bucket_sets:
        for lo, hi, name in zip(bucket_edges, bucket_edges[1:], names):
            ranges.append([lo**2, min(hi, COCO_MAX_SIDE) ** 2])
            labels.append(name)
    return ranges, labels


def run_cocoeval(coco_gt: COCO, coco_dt: COCO, edges: tuple[float, ...], cat_ids: list[int] | None = None,
                 max_det: int = COCO_MAX_DET) -> dict:
    """faster-coco-eval bbox evaluation; returns its ``stats_as_dict`` (AP_<label>, AR_<label>, AR_third, ...).

    AP and AR are read at the last of maxDets ``[1, 10, max_det]``: COCO's 100 by default, more for
    dense images (microscopy fields often hold over 100 objects, and a cap of 100 lowers their AP).
    ``max_det`` must be above 10, the second of COCO's maxDets.
    """
    if max_det <= 10:
        raise ValueError(f"max_det {max_det}: must be above 10 (COCO's maxDets are 1, 10 and it)")
    check_faster_coco_eval()
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=silent)
    evaluator.params.areaRng, evaluator.params.areaRngLbl = coco_area_ranges(edges)
    evaluator.params.maxDets = [1, 10, max_det]
    if cat_ids is not None:
        evaluator.params.catIds = cat_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats_as_dict


def silent(*_args) -> None:
    """A print function that prints nothing (keeps faster-coco-eval's summary off the console)."""


def _value(x: float) -> float | None:
    """COCO's -1 (nothing to evaluate) becomes None; anything else a rounded float."""
    return None if x < 0 else round(float(x), 6)


def load_coco(records: list[ImageRecord], num_classes: int, scales: np.ndarray) -> tuple[COCO, COCO]:
    """faster-coco-eval ground-truth and detection objects for ``records`` in the frame given by ``scales``."""
    gt, detections = to_coco(records, num_classes, scales)
    coco_gt = COCO(gt)
    return coco_gt, coco_gt.loadRes(detections)


def coco_metrics(records: list[ImageRecord], num_classes: int, scales: np.ndarray, edges: tuple[float, ...],
                 max_det: int = COCO_MAX_DET) -> dict:
    """COCO AP/AR in one frame (areas scaled by ``scales**2``); ``buckets`` holds AP/AR per size bucket."""
    stats = run_cocoeval(*load_coco(records, num_classes, scales), edges, max_det=max_det)
    # faster-coco-eval labels AR at COCO's maxDets [1, 10, 100] AR_all, AR_second, AR_third, and at
    # any other [1, 10, N] AR_1, AR_10, AR_N
    ar = stats["AR_third"] if max_det == COCO_MAX_DET else stats[f"AR_{max_det}"]
    result = {"ap": stats["AP_all"], "ap50": stats["AP_50"], "ap75": stats["AP_75"], "ar100": ar}
    for name in COCO_NAMES:
        result[f"ap_{name}"] = stats[f"AP_{name}"]
        result[f"ar_{name}"] = stats[f"AR_{name}"]
    result = {key: _value(value) for key, value in result.items()}
    result["buckets"] = {
        name: {"ap": _value(stats[f"AP_{name}"]), "ar": _value(stats[f"AR_{name}"])} for name in bucket_names(edges)
    }
    return result


def per_class_ap(records: list[ImageRecord], names: list[str], scales: np.ndarray,
                 max_det: int = COCO_MAX_DET) -> dict:
    """Each class's AP50-95 and AP50 over all sizes (the same in any frame: a frame scales an image's
    boxes alike, which keeps every IoU) and its AP50-95 per COCO size in the frame of ``scales``:
    ``{name: {"ap", "ap50", "ap_small", "ap_medium", "ap_large"}}``, None where the class has no
    ground truth (of that size).

    COCO's APs averages over the classes that have small ground truth, so on a set where a rare class
    has a handful of small boxes that handful weighs as much as every small box of the common class;
    a focus class's own APs is the small-object figure of that class alone."""
    coco_gt, coco_dt = load_coco(records, len(names), scales)
    result = {}
    for k, name in enumerate(names):
        stats = run_cocoeval(coco_gt, coco_dt, COCO_EDGES, cat_ids=[k + 1], max_det=max_det)
        keys = {"ap": "AP_all", "ap50": "AP_50", **{f"ap_{size}": f"AP_{size}" for size in COCO_NAMES}}
        result[name] = {key: _value(stats[stat]) for key, stat in keys.items()}
    return result


# ----------------------------------------------------------------------------------------- recall
def nms_top_k(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, max_det: int) -> np.ndarray:
    """Indices kept by per-class NMS at ``iou``, by descending score, at most ``max_det``."""
    if len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    keep = batched_nms(
        torch.as_tensor(boxes, dtype=torch.float32),
        torch.as_tensor(scores, dtype=torch.float32),
        torch.as_tensor(classes, dtype=torch.int64),
        iou,
    )
    return keep[:max_det].numpy()


def greedy_assignment(
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_classes: np.ndarray,
    iou_threshold: float = RECALL_MATCH_IOU,
) -> np.ndarray:
    """The ground truth each detection takes, -1 for none: detections by descending score each take the
    unmatched GT of their class with the highest IoU >= ``iou_threshold``. Int (D,)."""
    taken = np.full(len(det_boxes), -1, dtype=np.int64)
    if len(gt_boxes) == 0 or len(det_boxes) == 0:
        return taken
    iou = box_iou(torch.as_tensor(det_boxes, dtype=torch.float64), torch.as_tensor(gt_boxes, dtype=torch.float64))
    iou = iou.numpy()
    matched = np.zeros(len(gt_boxes), dtype=bool)
    for d in np.argsort(-np.asarray(det_scores), kind="stable"):
        candidates = (gt_classes == det_classes[d]) & ~matched & (iou[d] >= iou_threshold)
        if candidates.any():
            taken[d] = np.argmax(np.where(candidates, iou[d], -1.0))
            matched[taken[d]] = True
    return taken


def recall_detections(
    record: ImageRecord, threshold: float, nms_iou: float = RECALL_NMS_IOU, max_det: int = RECALL_MAX_DET
) -> np.ndarray:
    """Indices of the detections of one image that recall counts: score >= ``threshold``, after NMS and top-k."""
    keep = np.flatnonzero(record.pred_scores >= threshold)
    return keep[nms_top_k(record.pred_boxes[keep], record.pred_scores[keep], record.pred_classes[keep], nms_iou, max_det)]


def recall_assignment(record: ImageRecord, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``recall_detections`` of one image at ``threshold`` and the GT each takes (``greedy_assignment``)."""
    keep = recall_detections(record, threshold)
    taken = greedy_assignment(
        record.gt_boxes, record.gt_classes, record.pred_boxes[keep], record.pred_scores[keep], record.pred_classes[keep]
    )
    return keep, taken


def found_ground_truth(record: ImageRecord, threshold: float) -> np.ndarray:
    """Bool per GT of one image: taken by one of its ``recall_detections`` at ``threshold``."""
    found = np.zeros(len(record.gt_boxes), dtype=bool)
    taken = recall_assignment(record, threshold)[1]
    found[taken[taken >= 0]] = True
    return found


def unmatched_detections(record: ImageRecord, threshold: float) -> np.ndarray:
    """Indices of the ``recall_detections`` at ``threshold`` that take no ground truth: a detector's
    confident false positives, or objects the labels miss."""
    keep, taken = recall_assignment(record, threshold)
    return keep[taken < 0]


def frame_scales(input_scales: np.ndarray) -> dict[str, np.ndarray]:
    """Each frame's per-image scale from original pixels: 1 in ``original``, ``input_scales``
    (``letterbox_scales``) in ``input``."""
    scales = np.asarray(input_scales, dtype=np.float64)
    return {"original": np.ones(len(scales)), "input": scales}


def gt_size_buckets(records: list[ImageRecord], scales: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """The size bucket of every ground truth of ``records`` in order (its area times its image's
    scale**2), as one int array."""
    return np.concatenate(
        [bucket_index(box_areas(r.gt_boxes) * s**2, edges) for r, s in zip(records, scales)] + [np.zeros(0, np.int64)]
    )


def recall_by_size(
    records: list[ImageRecord],
    scales: np.ndarray,
    edges: tuple[float, ...],
    thresholds: tuple[float, ...] = RECALL_THRESHOLDS,
) -> dict:
    """Recall per size bucket (GT area times scale**2) and overall, at each confidence threshold.

    Returns ``{"0.1": {bucket: {"recall", "hits", "total"}, ..., "all": {...}}, ...}``; recall is
    None for an empty bucket.
    """
    gt_buckets = gt_size_buckets(records, scales, edges)
    names = bucket_names(edges)
    result = {}
    for threshold in thresholds:
        found = np.concatenate([found_ground_truth(r, threshold) for r in records] + [np.zeros(0, bool)])
        row = {name: _recall(found[gt_buckets == b]) for b, name in enumerate(names)}
        row["all"] = _recall(found)
        result[f"{threshold:g}"] = row
    return result


def _recall(found: np.ndarray) -> dict:
    """``{"recall", "hits", "total"}`` of a bool array of found ground truths."""
    hits, total = int(found.sum()), int(found.size)
    return {"recall": round(hits / total, 6) if total else None, "hits": hits, "total": total}


# ------------------------------------------------------------------------ box fit and confidence
def fit_and_confidence(record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
    """Per ground truth of one image: the highest IoU of any detection of its class (0 without one),
    and the highest score among detections of its class at IoU >= ``FIT_FOUND_IOU`` (0 without one).
    Every detection val kept counts, whatever its score and whether it also covers another object."""
    best_iou = np.zeros(len(record.gt_boxes))
    best_score = np.zeros(len(record.gt_boxes))
    if len(record.gt_boxes) == 0 or len(record.pred_boxes) == 0:
        return best_iou, best_score
    iou = box_iou(torch.as_tensor(record.gt_boxes, dtype=torch.float64),
                  torch.as_tensor(record.pred_boxes, dtype=torch.float64)).numpy()
    iou = np.where(record.gt_classes[:, None] == record.pred_classes[None, :], iou, 0.0)
    best_iou = iou.max(1)
    best_score = np.where(iou >= FIT_FOUND_IOU, record.pred_scores[None, :].astype(np.float64), 0.0).max(1)
    return best_iou, best_score


def fit_by_size(records: list[ImageRecord], scales: np.ndarray, edges: tuple[float, ...]) -> dict:
    """Per size bucket (GT area times scale**2) and overall: ``total`` ground truths, ``iou`` the mean
    of their best IoU, ``tight`` the share whose best IoU is >= ``FIT_TIGHT_IOU`` and ``score`` the mean
    of their best score at IoU >= ``FIT_FOUND_IOU``; None for an empty bucket.

    AP rises when boxes fit tighter (the IoU thresholds above 0.5) or when the found objects score
    above the false positives (the ranking); a size-aware loss may buy either, and these tell which.
    """
    gt_buckets = gt_size_buckets(records, scales, edges)
    per_gt = [fit_and_confidence(r) for r in records]
    best_iou = np.concatenate([i for i, _ in per_gt] + [np.zeros(0)])
    best_score = np.concatenate([c for _, c in per_gt] + [np.zeros(0)])

    def summary(mask: np.ndarray) -> dict:
        total = int(mask.sum())
        if total == 0:
            return {"total": 0, "iou": None, "tight": None, "score": None}
        return {"total": total, "iou": round(float(best_iou[mask].mean()), 6),
                "tight": round(float((best_iou[mask] >= FIT_TIGHT_IOU).mean()), 6),
                "score": round(float(best_score[mask].mean()), 6)}

    result = {name: summary(gt_buckets == b) for b, name in enumerate(bucket_names(edges))}
    result["all"] = summary(np.ones(len(gt_buckets), dtype=bool))
    return result


# ----------------------------------------------------------------------------------- all metrics
def evaluate_records(
    records: list[ImageRecord],
    names: list[str],
    input_scales: np.ndarray,
    edges: tuple[float, ...] = COCO_EDGES,
    recall_frame: str = "input",
    max_det: int = COCO_MAX_DET,
) -> dict:
    """The whole report for detections in original pixels: ``coco`` (per frame), ``per_class`` (AP,
    AP50 and, under each frame's name, AP per COCO size in that frame), ``recall_by_size`` and
    ``fit_by_size`` (buckets in ``recall_frame``) and ``meta`` describing buckets and protocol.

    ``input_scales[i]`` maps image i from original to network-input pixels (``letterbox_scales``);
    ``max_det`` is COCO's maxDets for AP and AR.
    """
    if recall_frame not in FRAMES:
        raise ValueError(f"recall_frame must be one of {FRAMES}, got {recall_frame!r}")
    scales = frame_scales(input_scales)
    by_class = {frame: per_class_ap(records, names, scales[frame], max_det) for frame in FRAMES}
    return {
        "coco": {frame: coco_metrics(records, len(names), scales[frame], edges, max_det) for frame in FRAMES},
        "per_class": {
            name: {
                "ap": ap["ap"],
                "ap50": ap["ap50"],
                **{frame: {f"ap_{size}": by_class[frame][name][f"ap_{size}"] for size in COCO_NAMES} for frame in FRAMES},
            }
            for name, ap in by_class["input"].items()
        },
        "recall_by_size": recall_by_size(records, scales[recall_frame], edges),
        "fit_by_size": fit_by_size(records, scales[recall_frame], edges),
        "meta": {
            "images": len(records),
            "size_buckets": [format_edge(e) for e in edges],
            "bucket_names": bucket_names(edges),
            "recall_frame": recall_frame,
            "max_det": max_det,
            "recall_protocol": (
                f"score >= threshold, per-class NMS IoU {RECALL_NMS_IOU}, top {RECALL_MAX_DET} per image, "
                f"greedy match by descending score at IoU >= {RECALL_MATCH_IOU} to an unmatched GT of the same class; "
                f"GT bucket by its area in the {recall_frame} frame, [lo^2, hi^2)"
            ),
            "coco_protocol": f"faster-coco-eval bbox, maxDets {max_det}; area ranges are squared side lengths, inclusive",
        },
    }
