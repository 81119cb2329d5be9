"""Ground truth and detections of one split, in original image pixels, shared by both detector families.

Both the YOLO and the Faster R-CNN path read the same YOLO-format data yaml through ``check_split``
(or ``load_split``), which keeps exactly the images and boxes Ultralytics' validator keeps, and hand
their detections to the evaluation as ``ImageRecord`` lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from ultralytics.data.base import BaseDataset
from ultralytics.data.utils import check_det_dataset, img2label_paths, verify_image_label
from ultralytics.utils import LOGGER, NUM_THREADS, TQDM
from ultralytics.utils.ops import xywhn2xyxy

from yolo_sizeloss.paths import resolve_data


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


def _empty_ints() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class ImageRecord:
    """One image: its ground truth and (once predicted) its detections, boxes xyxy in original pixels."""

    file: str
    width: int
    height: int
    gt_boxes: np.ndarray = field(default_factory=_empty_boxes)
    gt_classes: np.ndarray = field(default_factory=_empty_ints)
    pred_boxes: np.ndarray = field(default_factory=_empty_boxes)
    pred_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    pred_classes: np.ndarray = field(default_factory=_empty_ints)


def gt_in_image(record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
    """An image's ground-truth boxes (xyxy, float32) clipped to the image and their classes, boxes left
    empty by the clip dropped: what a detector can be trained on."""
    boxes = record.gt_boxes.reshape(-1, 4).astype(np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, record.width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, record.height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], record.gt_classes.reshape(-1)[keep]


def read_upright(file: str | Path) -> Image.Image:
    """An image as RGB, turned upright by its EXIF orientation: as cv2.imread (YOLO's reader) reads it,
    and as Ultralytics measured the size its labels belong to."""
    with Image.open(file) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def first_fraction(records: list[ImageRecord], fraction: float) -> list[ImageRecord]:
    """The images a run with ``fraction`` trains on: the first ``max(1, round(n * fraction))``, Ultralytics'
    rule (it counts the image files before dropping unreadable ones, so with those the two may differ)."""
    return records[: max(1, round(len(records) * fraction))]


def training_box_sizes(records: list[ImageRecord], imgsz: int) -> tuple[Tensor, Tensor, Tensor]:
    """Widths and heights (float64) of every training box as the heads see it at ``imgsz``, and their
    classes (int64): both families resize an image by ``imgsz / max(width, height)`` (YOLO's letterbox,
    and ``GeneralizedRCNNTransform`` with ``min_size = max_size = imgsz``); a flip changes no size."""
    kept = [gt_in_image(r) for r in records]
    scaled = [boxes.astype(np.float64) * (imgsz / max(r.width, r.height)) for r, (boxes, _) in zip(records, kept)]
    boxes = torch.from_numpy(np.concatenate([np.zeros((0, 4)), *scaled]))
    classes = torch.from_numpy(np.concatenate([np.zeros(0, np.int64), *[c.astype(np.int64) for _, c in kept]]))
    return boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1], classes


@dataclass(frozen=True)
class SkippedLabels:
    """Ground truth of one image that Ultralytics' validator leaves out, and why.

    ``whole_image`` True: the image and all ``boxes`` label rows of it are skipped (a corrupt image,
    coordinates out of range, a bad class, ...); False: the image counts, but ``boxes`` duplicate
    rows of its label file do not. ``reason`` is Ultralytics' own message without the file name.
    """

    file: str
    reason: str
    boxes: int
    whole_image: bool


def split_image_files(data: dict, split: str) -> list[str]:
    """The image files of ``split`` in a checked data dict, listed by Ultralytics' own dataset code.

    ``BaseDataset.get_img_files`` is what every stock validator lists a split with (folders, list
    files with their ``./`` rule, lists of both); it needs only a prefix and the fraction of files
    to keep from its instance, and a validator keeps them all. Raises ValueError naming the yaml.
    """
    if not data.get(split):
        raise ValueError(f"data yaml {data.get('yaml_file', '')} has no '{split}' split")
    try:
        return BaseDataset.get_img_files(SimpleNamespace(prefix="", fraction=1.0), data[split])
    except FileNotFoundError as e:
        cause = str(e.__cause__ or e).splitlines()[0]
        raise ValueError(f"data yaml {data.get('yaml_file', '')}: split '{split}': {cause}") from None


def _label_rows(label_file: str) -> int:
    """Non-blank lines of a label file (0 if there is none), read as bytes so any file counts."""
    path = Path(label_file)
    return sum(bool(line.strip()) for line in path.read_bytes().splitlines()) if path.is_file() else 0


def _row_fault(fields: list[str], classes: int, segments: bool) -> str | None:
    """Why Ultralytics' label check (``verify_image_label``) refuses one row of a detection label file, or None."""
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return "not numbers"
    if not segments and len(values) != 5:
        return f"{len(values)} columns, not the 5 of class x y w h"
    if segments and (len(values) < 7 or len(values) % 2 == 0):
        return "a polygon needs a class and pairs of x y"
    if max(values[1:]) > 1.01:
        return "coordinates above 1, not normalised to the image size"
    if min(values) < -0.01 or (min(values) < 0 and not segments and min(values[3:5]) < 0):
        return "a negative value"
    if values[0] % 1 or not 0 <= values[0] < classes:
        return f"class {fields[0]} is not one of the {classes} classes"
    return None


def first_bad_label_row(label_file: str, classes: int) -> str | None:
    """``FILE:LINE: 'ROW' (why)`` for the first row of ``label_file`` that Ultralytics' label check refuses, which
    makes it skip the whole image; None where every row passes (the image itself was refused) or there is no file.
    A file whose rows are longer than 6 fields holds polygons, as Ultralytics reads it."""
    path = Path(label_file)
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    rows = [(number, line.split()) for number, line in enumerate(lines, 1) if line.strip()]
    segments = any(len(fields) > 6 for _, fields in rows)
    for number, fields in rows:
        fault = _row_fault(fields, classes, segments)
        if fault:
            return f"{label_file}:{number}: {' '.join(fields)!r} ({fault})"
    return None


def check_split(
    data_yaml: str | Path, split: str, progress: bool = True
) -> tuple[list[ImageRecord], dict, list[SkippedLabels]]:
    """Ground truth of one split exactly as Ultralytics' detection validator counts it.

    Every image of the split goes through ``ultralytics.data.utils.verify_image_label`` with the
    arguments ``YOLODataset.cache_labels`` gives it, so the same images are skipped (unreadable or
    truncated images, coordinates above 1.01, negative values, classes outside the names, rows of
    the wrong length) and the same duplicate rows removed. Like the stock validator, that check
    re-saves in place a JPEG whose data is complete but whose end marker is missing.
    Returns the kept images' records (boxes xyxy in pixels of the EXIF-oriented image), the checked
    data dict, and what was left out, one ``SkippedLabels`` per affected image. ``progress``: a bar while the
    images are read.
    """
    data = check_det_dataset(resolve_data(data_yaml))
    images = split_image_files(data, split)
    labels = img2label_paths(images)
    nkpt, ndim = data.get("kpt_shape", (0, 0))
    args = [(im, lb, "", False, len(data["names"]), nkpt, ndim, False) for im, lb in zip(images, labels)]
    with ThreadPool(NUM_THREADS) as pool:  # a bar: on a large data set this reading takes a while
        results = list(TQDM(pool.imap(verify_image_label, args), total=len(args), desc=f"checking {split} labels",
                            disable=not progress))
    records, skipped = [], []
    for image, label_file, (_, lb, shape, *_, msg) in zip(images, labels, results):
        reason, rows = msg.removeprefix(f"{image}: "), _label_rows(label_file)
        if lb is None:
            row = first_bad_label_row(label_file, len(data["names"]))
            skipped.append(SkippedLabels(image, reason if row is None else f"{row}; {reason}", rows, True))
            continue
        if len(lb) < rows:
            skipped.append(SkippedLabels(image, reason, rows - len(lb), False))
        height, width = shape
        boxes = xywhn2xyxy(lb[:, 1:].astype(np.float64), width, height).astype(np.float32)
        records.append(ImageRecord(image, width, height, boxes, lb[:, 0].astype(np.int64)))
    return records, data, skipped


def skipped_summary(skipped: list[SkippedLabels], images: int) -> str:
    """One line: how many of ``images`` images and their boxes were skipped, and why, file by file."""
    whole = [s for s in skipped if s.whole_image]
    rows = [s for s in skipped if not s.whole_image]
    parts = []
    if whole:
        parts.append(f"{len(whole)} of {images} images skipped ({sum(s.boxes for s in whole)} boxes)")
    if rows:
        parts.append(f"{sum(s.boxes for s in rows)} duplicate label rows removed")
    details = "; ".join(f"{Path(s.file).name}: {s.reason}" for s in skipped)
    return f"{' and '.join(parts)}, as Ultralytics' validator does: {details}"


def split_summary(records: list[ImageRecord], skipped: list[SkippedLabels]) -> str:
    """``skipped_summary`` of a checked split (its kept ``records`` and what it ``skipped``); "" where nothing was."""
    return skipped_summary(skipped, len(records) + sum(s.whole_image for s in skipped)) if skipped else ""


def load_split(data_yaml: str | Path, split: str, progress: bool = True) -> tuple[list[ImageRecord], dict]:
    """``check_split`` without the list of skipped labels, which is logged as a warning.

    Raises ValueError when no image of the split is left.
    """
    records, data, skipped = check_split(data_yaml, split, progress)
    where = f"{data.get('yaml_file', data_yaml)} split '{split}'"
    summary = split_summary(records, skipped)
    if not records:
        raise ValueError(f"{where} has no valid images" + (f": {summary}" if summary else ""))
    if summary:
        LOGGER.warning(f"{where}: {summary}")
    return records, data
