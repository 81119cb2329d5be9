"""A class's AP per group of images (a scene, a video, a slide), for reports whose images are not
independent: tiles of one source image, frames of one video, fields of one slide.

    python bench/by_group.py bench/results/aerial_cars/val/{baseline,nwd-assigner_auto}-s0 --class car \
        --group '^(DJI_\\d+|MOS)'

REPORT is a val.py output folder with its detections file. ``--group`` is a regular expression whose
first match in each image's file name names that image's group (the whole match, or its first
parenthesised part; ``paired.image_groups``); an image it does not match is an error. For each group
and report: the images, the class's ground truths (and how many are small, network-input frame), its
AP and its AP per COCO size (input frame), as val computes them. The paired bootstrap of val --compare draws images as if
each were independent (``--group`` draws groups instead); where a split is a few groups of near-copies
(20 frames of the same parked cars), its interval speaks of those groups only, and this table says
which group a difference is in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from yolo_sizeloss.checks import DataError
from yolo_sizeloss.detections_file import RunDetections, load_detections
from yolo_sizeloss.evaluation import COCO_EDGES, COCO_NAMES, box_areas, frame_scales, per_class_ap
from yolo_sizeloss.paired import check_group_pattern, image_groups
from yolo_sizeloss.report import format_value, markdown_table


def group_rows(run: RunDetections, groups: list[str], class_name: str) -> dict[str, list[str]]:
    """Per group (in order of first appearance): images, ground truths of the class (small ones in the
    input frame), its AP and AP per COCO size in the input frame, formatted."""
    k = run.names.index(class_name)
    rows = {}
    for group in dict.fromkeys(groups):
        picked = np.flatnonzero(np.array(groups) == group)
        records = [run.records[i] for i in picked]
        scales = frame_scales(run.input_scales[picked])["input"]
        ap = per_class_ap(records, run.names, scales)[class_name]
        areas = [box_areas(r.gt_boxes[r.gt_classes == k]) * s**2 for r, s in zip(records, scales)]
        gt = sum(len(a) for a in areas)
        small = sum(int((a < COCO_EDGES[1] ** 2).sum()) for a in areas)
        rows[group] = [str(len(picked)), f"{gt} ({small} small)", format_value(ap["ap"])] + [
            format_value(ap[f"ap_{size}"]) for size in COCO_NAMES]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", metavar="REPORT", help="val.py output folders with detections files")
    p.add_argument("--class", dest="class_name", required=True, help="the class to tabulate")
    p.add_argument("--group", required=True, help="regular expression naming each image's group from its file name")
    args = p.parse_args(argv)
    try:
        check_group_pattern(args.group)
    except ValueError as e:
        p.error(str(e))
    table = []
    try:
        for report in args.reports:
            run = load_detections(report)
            if args.class_name not in run.names:
                p.error(f"--class {args.class_name}: not a class of {report} ({', '.join(run.names)})")
            groups = image_groups(run.records, args.group)
            rows = group_rows(run, groups, args.class_name)
            table += [[Path(report).name, group, *row] for group, row in rows.items()]
    except (FileNotFoundError, DataError, ValueError) as e:
        print(f"by_group.py: error: {e}", file=sys.stderr)
        return 1
    header = ["report", "group", "images", f"{args.class_name} GT", "AP", "APs input", "APm input", "APl input"]
    print(markdown_table(header, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
