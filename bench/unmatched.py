"""Crops of the confident detections that match no ground truth, to judge by eye what they are: a
real false positive, or an object the labels miss.

    python bench/unmatched.py bench/results/platelets_only/val/nwd-s1 --conf 0.5 --out unmatched.png

REPORT is a val.py output folder with its detections file; several folders give one row of crops each.
A detection is unmatched as recall by size counts it (``evaluation.unmatched_detections``: score >=
--conf, per-class NMS, greedy match at IoU 0.5 to a ground truth of its class). Each crop is centred on
the detection (red, its score above it), with the image's ground truths in green.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from yolo_sizeloss.checks import DataError, output_file_problem
from yolo_sizeloss.detections import read_upright
from yolo_sizeloss.detections_file import load_detections
from yolo_sizeloss.evaluation import unmatched_detections

TILE = 96  # original pixels around each detection; BCCD's platelets are 20-40 px across
LABEL_WIDTH = 110  # pixels left of each row for its report's name


def crops(report: str, conf: float) -> list[Image.Image]:
    """One tile per unmatched detection of the report at ``conf``, in image order."""
    tiles = []
    for record in load_detections(report).records:
        unmatched = unmatched_detections(record, conf)
        if len(unmatched) == 0:
            continue
        image = read_upright(record.file)
        draw = ImageDraw.Draw(image)
        for box in record.gt_boxes:
            draw.rectangle(box.tolist(), outline=(0, 200, 0), width=2)
        for i in unmatched:
            x0, y0, x1, y1 = record.pred_boxes[i].tolist()
            draw.rectangle([x0, y0, x1, y1], outline=(230, 0, 0), width=2)
        for i in unmatched:
            x0, y0, x1, y1 = record.pred_boxes[i].tolist()
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            tile = image.crop((cx - TILE // 2, cy - TILE // 2, cx + TILE // 2, cy + TILE // 2))
            label = ImageDraw.Draw(tile)  # on white: a crop past the image border is black there
            label.rectangle((0, 0, 28, 12), fill="white")
            label.text((2, 1), f"{record.pred_scores[i]:.2f}", fill=(0, 0, 0))
            tiles.append(tile)
    return tiles


def sheet(rows: list[list[Image.Image]], labels: list[str]) -> Image.Image:
    """The tiles of each report as one row (labelled on the left), on white."""
    width = LABEL_WIDTH + TILE * max((len(r) for r in rows), default=1)
    out = Image.new("RGB", (width, TILE * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for k, (tiles, label) in enumerate(zip(rows, labels)):
        draw.text((4, k * TILE + TILE // 2 - 6), f"{label} ({len(tiles)})", fill=(0, 0, 0))
        for j, tile in enumerate(tiles):
            out.paste(tile, (LABEL_WIDTH + j * TILE, k * TILE))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", metavar="REPORT", help="val.py output folders with detections files")
    p.add_argument("--conf", type=float, default=0.5, help="score threshold (default 0.5)")
    p.add_argument("--out", required=True, help="PNG file to write")
    args = p.parse_args(argv)
    # a mistake stops here, not when the sheet is saved after every report's crops are made
    if not 0 <= args.conf < 1:
        p.error(f"--conf {args.conf}: must be in [0, 1)")
    if problem := output_file_problem(args.out):
        p.error(f"--out {args.out}: {problem}")
    # the extension picks the format
    if Image.registered_extensions().get(Path(args.out).suffix.lower()) not in Image.SAVE:
        p.error(f"--out {args.out}: give an image file name PIL can write, such as unmatched.png")
    for report in args.reports:
        if not Path(report).exists():
            p.error(f"REPORT {report}: no such folder")
    try:
        rows = [crops(report, args.conf) for report in args.reports]
    except (FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    labels = [Path(report).name for report in args.reports]
    sheet(rows, labels).save(args.out)
    for label, tiles in zip(labels, rows):
        print(f"{label}: {len(tiles)} unmatched detections at score >= {args.conf}")
    print(f"Crops saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
