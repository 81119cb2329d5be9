"""Ground truth and detections of one split, in original image pixels, shared by both detector families.

Both the YOLO and the Faster R-CNN path read the same YOLO-format data yaml through ``load_split``
and hand their detections to the evaluation as ``ImageRecord`` lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from ultralytics.data.utils import IMG_FORMATS, check_det_dataset, img2label_paths

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


def read_yolo_labels(label_file: Path, width: int, height: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read ``cls xc yc w h`` (normalised) lines into xyxy pixel boxes and class ids.

    A missing file means no objects. A line that is not five numbers, or whose class is not an
    integer in ``[0, num_classes)``, raises ValueError naming the file and the line number.
    """
    if not label_file.is_file():
        return _empty_boxes(), _empty_ints()
    rows = []
    for number, line in enumerate(label_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            values = []
        if len(values) != 5:
            raise ValueError(f"{label_file}:{number}: expected 'cls xc yc w h', got {line!r}")
        if not (values[0].is_integer() and 0 <= values[0] < num_classes):
            raise ValueError(f"{label_file}:{number}: class {line.split()[0]} is not one of 0..{num_classes - 1}")
        rows.append(values)
    if not rows:
        return _empty_boxes(), _empty_ints()
    a = np.asarray(rows, dtype=np.float64)
    xc, yc, w, h = a[:, 1] * width, a[:, 2] * height, a[:, 3] * width, a[:, 4] * height
    boxes = np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], 1).astype(np.float32)
    return boxes, a[:, 0].astype(np.int64)


def split_images(data: dict, split: str) -> list[Path]:
    """The image files of ``split`` in a checked Ultralytics data dict (a folder, a list file or a list)."""
    if not data.get(split):
        raise ValueError(f"data yaml {data.get('yaml_file', '')} has no '{split}' split")
    sources = data[split] if isinstance(data[split], list) else [data[split]]
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)
        elif source.suffix == ".txt":
            root = source.parent
            for line in source.read_text().splitlines():
                if line.strip():
                    p = Path(line.strip())
                    files.append(p if p.is_absolute() else (root / p).resolve())
        else:
            files.append(source)
    return files


def load_split(data_yaml: str | Path, split: str) -> tuple[list[ImageRecord], dict]:
    """Ground truth of one split of a YOLO-format data yaml, and the checked data dict (with names)."""
    data = check_det_dataset(resolve_data(data_yaml))
    images = split_images(data, split)
    if not images:
        raise ValueError(f"split '{split}' of {data.get('yaml_file', data_yaml)} has no images")
    records = []
    for image, label in zip(images, img2label_paths([str(p) for p in images])):
        with Image.open(image) as im:
            width, height = im.size
        boxes, classes = read_yolo_labels(Path(label), width, height, len(data["names"]))
        records.append(ImageRecord(str(image), width, height, boxes, classes))
    return records, data
