"""A val report's per-image detections file: what a report was computed from, written next to it so
that runs can later be compared image by image (``yolo_sizeloss.paired``) without running the models again.

The file is bzip2-compressed JSON (``detections.json.bz2``); a report folder holding it gzip-compressed
(``detections.json.gz``, as reports were written before) or uncompressed (``detections.json``) is read as
well. Entry points: ``write_detections``,
``load_detections`` (the file back as ``RunDetections``), ``find_detections`` (a report folder's
file, under any of these names) and ``report_file`` (a file of a report given as the file or its folder).
"""

from __future__ import annotations

import bz2
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yolo_sizeloss.checks import DataError, one_line
from yolo_sizeloss.detections import ImageRecord

DETECTIONS_FILE = "detections.json.bz2"
# read, never written: earlier reports' gzip-compressed file, and an uncompressed one; bzip2 stores the same
# JSON in about three quarters of gzip's bytes, which matters for the reports a checkout keeps
OLDER_DETECTIONS_FILES = ("detections.json.gz", "detections.json")
_DECOMPRESS = {".bz2": bz2.decompress, ".gz": gzip.decompress}


@dataclass
class RunDetections:
    """What a report was computed from: per-image ground truth and detections (original pixels), the
    per-image scale original -> network input that defines the ``input`` frame, and the class names."""

    records: list[ImageRecord]
    input_scales: np.ndarray
    names: list[str]


def exact_float32(values) -> np.ndarray:
    """float64 copies of ``values`` as float32, each the shortest decimal that reads back as the same
    float32. Rounding to fixed decimals moved a score of 0.29996 to 0.3 and a box across IoU 0.5, so
    that a paired comparison recomputed from the file counted other hits than the report it came from."""
    single = np.asarray(values, dtype=np.float32)
    shortest = [float(np.format_float_positional(v, unique=True)) for v in single.ravel()]
    return np.array(shortest, dtype=np.float64).reshape(single.shape)


def write_detections(path: Path, run: RunDetections) -> Path:
    """Write ``run`` as bzip2-compressed compact JSON: per image its file, size, input scale, ``gt``
    rows ``[x1, y1, x2, y2, class]`` and ``pred`` rows ``[x1, y1, x2, y2, score, class]``; boxes and
    scores as the float32 values ``load_detections`` reads back, each in its shortest decimal form."""
    images = []
    for record, scale in zip(run.records, run.input_scales, strict=True):
        gt = exact_float32(record.gt_boxes).reshape(-1, 4).tolist()
        boxes = exact_float32(record.pred_boxes).reshape(-1, 4).tolist()
        scores = exact_float32(record.pred_scores).tolist()
        images.append({
            "file": record.file, "width": record.width, "height": record.height, "scale": float(scale),
            "gt": [[*box, int(c)] for box, c in zip(gt, record.gt_classes)],
            "pred": [[*box, score, int(c)] for box, score, c in zip(boxes, scores, record.pred_classes)],
        })
    path = Path(path)
    text = json.dumps({"names": list(run.names), "images": images}, separators=(",", ":")) + "\n"
    # bzip2 stores no time stamp: the same run gives the same bytes, so a committed report changes only when its
    # detections do
    path.write_bytes(bz2.compress(text.encode(), 9))
    return path


def load_detections(path: str | Path) -> RunDetections:
    """Read a detections file written by ``write_detections`` (or an older gzip-compressed or uncompressed one);
    ``path`` is the file or the report folder holding it. FileNotFoundError when there is none."""
    file = find_detections(path) if Path(path).is_dir() else Path(path)
    if file is None or not file.is_file():
        raise FileNotFoundError(f"no {DETECTIONS_FILE} (nor {' nor '.join(OLDER_DETECTIONS_FILES)}) at {path}")
    packed = file.read_bytes()
    try:
        data = json.loads(_DECOMPRESS.get(file.suffix, bytes)(packed))
        return _read_run(data)
    except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError) as e:  # not what val writes
        raise DataError(f"{file}: not a detections file written by val ({one_line(e)})") from e


def _read_run(data: dict) -> RunDetections:
    """The parsed file's images as records, with their input scales and the class names."""
    records = [
        ImageRecord(
            file=image["file"], width=image["width"], height=image["height"],
            gt_boxes=_columns(image["gt"], slice(0, 4), 5, np.float32),
            gt_classes=_columns(image["gt"], 4, 5, np.int64),
            pred_boxes=_columns(image["pred"], slice(0, 4), 6, np.float32),
            pred_scores=_columns(image["pred"], 4, 6, np.float32),
            pred_classes=_columns(image["pred"], 5, 6, np.int64),
        )
        for image in data["images"]
    ]
    scales = np.array([image["scale"] for image in data["images"]], dtype=np.float64)
    return RunDetections(records, scales, data["names"])


def find_detections(folder: str | Path) -> Path | None:
    """The detections file in the report folder ``folder``: ``DETECTIONS_FILE``, else the first of
    ``OLDER_DETECTIONS_FILES`` there; None when there is none."""
    for name in (DETECTIONS_FILE, *OLDER_DETECTIONS_FILES):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def report_file(path: str | Path, name: str) -> Path:
    """``path`` itself when it is a file, else the file ``name`` in the report folder ``path``."""
    path = Path(path)
    return path / name if path.is_dir() else path


def _columns(rows: list[list[float]], columns: int | slice, width: int, dtype: type) -> np.ndarray:
    """Columns of a detections file's row list as an array (shape kept for an empty list)."""
    return np.asarray(rows, dtype=np.float64).reshape(-1, width)[:, columns].astype(dtype)
