"""How hard each box measure pulls a nearly fitted box onto its object, by the object's size.

    python bench/box_pull.py --constant 67.3 --ratio 0.5          # BCCD's NWD constant at imgsz 416
    python bench/box_pull.py --constant 40.8 --ratio 0.5          # aerial cars' at 640

A square ground truth of each side (network-input pixels) and a prediction ``--offset`` pixels to
its right; the pull is the derivative of the box loss's overlap part with respect to that offset,
``(1 - ratio) * (1 - CIoU) + ratio * (1 - similarity)`` as the YOLO loss mixes them (docs/methods.md
section 5), with Ultralytics' own CIoU and the package's measures (``methods.overlaps.box_similarity``).
Each row gives the stock pull (ratio 0: CIoU alone) and each measure's as a multiple of it. CIoU's
pull per pixel falls as 1/side (IoU measures relative error); NWD's is 1/C for every box, so with the
data set's mean size as C a box smaller than C is pulled less than the stock loss pulls it, a larger
one more. What the assigner does (target scores, the losses' normaliser) multiplies both alike and
is left out: this is the box term's own geometry.
"""

from __future__ import annotations

import argparse

import torch
from ultralytics.utils.metrics import bbox_iou

from yolo_sizeloss.methods.overlaps import box_similarity

MEASURES = {"nwd": ("nwd", None), "safit": ("safit", None), "safit_sharp": ("safit", 4.0), "simd": ("simd", None)}


def pull(side: float, offset: float, measure: str | None, constant: float, ratio: float) -> float:
    """d(box loss overlap part)/d(offset) for a side x side ground truth and a prediction ``offset`` px right."""
    gt = torch.tensor([[100.0, 100.0, 100.0 + side, 100.0 + side]], dtype=torch.float64)
    shift = torch.tensor(offset, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros((), dtype=torch.float64)
    pred = gt + torch.stack([shift, zero, shift, zero])[None]
    ciou = bbox_iou(pred, gt, xywh=False, CIoU=True).squeeze(-1)
    loss = 1 - ciou
    if measure is not None:
        name, spread = MEASURES[measure]
        similarity = box_similarity(name, pred, gt, constant, iou=ciou, safit_spread=spread)
        loss = (1 - ratio) * loss + ratio * (1 - similarity)
    (grad,) = torch.autograd.grad(loss.sum(), shift)
    return float(grad)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--constant", type=float, required=True, help="NWD's C in input pixels (results.csv nwd/constant)")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of the measure in the box term (nwd.ratio)")
    parser.add_argument("--offset", type=float, default=1.0, help="prediction's offset from its object, pixels")
    parser.add_argument("--sides", type=float, nargs="+", default=[8, 16, 24, 32, 48, 64, 128, 256])
    parser.add_argument("--measures", nargs="+", choices=list(MEASURES), default=list(MEASURES))
    args = parser.parse_args(argv)
    if args.constant <= 0 or not 0 <= args.ratio <= 1 or args.offset <= 0 or min(args.sides) <= 0:
        parser.error("--constant, --offset and --sides must be positive, --ratio in [0, 1]")
    print(f"C = {args.constant:g} px, ratio {args.ratio:g}, prediction {args.offset:g} px off; pull as a multiple of stock")
    print("| side px | stock pull per px | " + " | ".join(args.measures) + " |")
    print("|---|---|" + "---|" * len(args.measures))
    for side in args.sides:
        stock = pull(side, args.offset, None, args.constant, args.ratio)
        ratios = [pull(side, args.offset, m, args.constant, args.ratio) / stock for m in args.measures]
        print(f"| {side:g} | {stock:.4f} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
