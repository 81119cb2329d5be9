"""How many small ground truths each mode's label assignment leaves without a positive anchor, on one
model and the same batches.

    python bench/no_positive.py --weights RUN/weights/best.pt --data DATA.yaml --imgsz 640 \\
        --modes baseline nwd nwd:safit nwd:simd_assigner --batches 20
    python bench/no_positive.py --weights yolov8n.yaml --data bccd.yaml --imgsz 416   # as training starts

The checkpoint's model (or a model yaml's, built with the data's classes and ``--seed``, as a run from
scratch starts; in eval mode: its predictions as at inference, nothing trained) sees the same
augmented training batches for every mode; each mode's criterion assigns them (the task-aligned
assigner with the mode's overlap, ``nwd`` 'auto' settings resolved from the training labels) and
``yolo_sizeloss.assignment.AssignmentCounter`` counts, as every training run does in its
``assign/*`` columns. Prints one row per mode. A trained model's predictions fit their objects, so
this measures assignment late in training; a run's results.csv shows it epoch by epoch.
"""

from __future__ import annotations

import argparse
import sys

import torch
from ultralytics import YOLO
from ultralytics.cfg import get_cfg
from ultralytics.data import build_dataloader, build_yolo_dataset
from ultralytics.data.utils import check_det_dataset
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.torch_utils import init_seeds

from yolo_sizeloss.assignment import AssignmentCounter
from yolo_sizeloss.config import load_loss_config
from yolo_sizeloss.paths import resolve_data
from yolo_sizeloss.yolo.assignment import attach_counter
from yolo_sizeloss.yolo.loss import AnchorWeighting, build_size_aware_loss, stock_assigners


def training_batches(data_yaml: str, imgsz: int, batch: int, count: int, seed: int):
    """``count`` augmented training batches, as the trainer's loader makes them, and the dataset's labels."""
    cfg = get_cfg(overrides={"imgsz": imgsz, "seed": seed})
    data = check_det_dataset(resolve_data(data_yaml))
    dataset = build_yolo_dataset(cfg, data["train"], batch, data, mode="train")
    init_seeds(seed)  # the augmentation draws from Python's and NumPy's generators too
    loader = build_dataloader(dataset, batch, workers=0, shuffle=True)
    batches = []
    for batch_data in loader:
        batch_data["img"] = batch_data["img"].float() / 255
        batches.append(batch_data)
        if len(batches) == count:
            break
    return batches, dataset.labels


def count_mode(model, mode: str, batches, labels, imgsz: int) -> dict[str, float]:
    """The assignment counts of one mode (``LOSS`` or ``LOSS:SETTINGS``) over ``batches``."""
    loss, _, settings = mode.partition(":")
    if loss == "baseline":
        criterion = model.init_criterion()
    else:
        weighting = AnchorWeighting(load_loss_config(loss, settings or None))
        weighting.resolve_from_labels(labels, imgsz)
        criterion = build_size_aware_loss(model, weighting)
    counter = AssignmentCounter()
    attach_counter(counter, stock_assigners(criterion))
    with torch.no_grad():
        for batch in batches:
            criterion(model(batch["img"]), batch)
            counter.end_step()
    small, small_unmatched, total, unmatched, steps = counter.sums.tolist()
    return {"small": small / steps, **counter.epoch_stats()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a trained YOLO checkpoint, or a model yaml (untrained)")
    p.add_argument("--data", required=True, help="data yaml (its train split is assigned)")
    p.add_argument("--imgsz", type=int, required=True)
    p.add_argument("--modes", nargs="+", default=["baseline", "nwd"], help="LOSS or LOSS:SETTINGS, as bench/compare.py")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.weights.endswith((".yaml", ".yml")):
        init_seeds(args.seed)
        classes = len(check_det_dataset(resolve_data(args.data))["names"])
        model = DetectionModel(args.weights, nc=classes, verbose=False).eval()
    else:
        model = YOLO(args.weights).model.float().eval()
    model.args = get_cfg(overrides={"imgsz": args.imgsz})  # the criterion's gains: Ultralytics' defaults
    batches, labels = training_batches(args.data, args.imgsz, args.batch, args.batches, args.seed)
    print(f"{args.weights}, {len(batches)} training batches of {args.batch} at imgsz {args.imgsz} (seed {args.seed})")
    print(f"{'mode':<28} {'small GTs/step':>14} {'small, no positive/step':>24} {'share of small':>15} {'share of all':>13}")
    for mode in args.modes:
        row = count_mode(model, mode, batches, labels, args.imgsz)
        print(f"{mode:<28} {row['small']:>14.2f} {row['assign/small_no_pos']:>24.2f} "
              f"{row['assign/small_no_pos_share']:>15.1%} {row['assign/no_pos_share']:>13.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
