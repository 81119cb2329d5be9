"""What each mode's label assignment gives objects of each size, on one model and the same batches.

    python bench/assignment.py --weights RUN/weights/best.pt --data DATA.yaml --imgsz 640 \\
        --modes baseline nwd nwd:safit nwd:simd_assigner --batches 20
    python bench/assignment.py --weights yolov8n.yaml --data bccd.yaml --imgsz 416   # as training starts

The checkpoint's model (or a model yaml's, built with the data's classes and ``--seed``, as a run from
scratch starts; in eval mode: its predictions as at inference, nothing trained) sees the same
augmented training batches for every mode; each mode's criterion assigns them (the task-aligned
assigner with the mode's overlap, ``nwd`` 'auto' settings resolved from the training labels) and
``yolo_sizeloss.assignment.AssignmentCounter`` counts, as every training run does in its
``assign/*`` columns. Prints one row per mode. A trained model's predictions fit their objects, so
this measures assignment late in training; a run's results.csv shows it epoch by epoch.

A second table splits each mode's assignment by ground-truth size (COCO's buckets in network-input
pixels): positive anchors per ground truth, its summed target score (the weight its anchors carry in
the box loss and the class targets they are pulled to) and its bucket's share of the step's
target-score sum, the normaliser of both losses, and its share of the box terms' weights (what
Ultralytics' box loss receives: the target scores, or the stock CIoU's with ``nwd.box_weights:
ciou``). A measure that is lenient to small boxes raises their scores, and so, through the shared
normaliser, lowers every other object's weight without touching its assignment.

A third table follows the anchors that two or more ground truths claim (the assigner keeps the one
whose overlap with the anchor's prediction is highest): how many a step, and how many of them the
mode's overlap gives to another ground truth than the stock CIoU would, split by the sizes of the two.
A measure lenient to small boxes can hand a small object an anchor that a larger neighbour's CIoU
would have kept. A class-gated mode (``nwd.assigner_classes: small``) compares one class's lenient
overlap with another's CIoU there, so the last table gives each class, per mode, its positives and
target score per ground truth and the anchors moved from it to another class and to it from one.
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
from ultralytics.utils.loss import BboxLoss
from ultralytics.utils.torch_utils import init_seeds

from yolo_sizeloss.assignment import AssignmentCounter
from yolo_sizeloss.checks import DataError, checked_data, one_line
from yolo_sizeloss.cli import check_yolo_model
from yolo_sizeloss.config import load_loss_mode
from yolo_sizeloss.evaluation import COCO_NAMES
from yolo_sizeloss.methods.base import COCO_AREA_LIMITS, box_areas
from yolo_sizeloss.paths import resolve_data
from yolo_sizeloss.yolo.assignment import attach_counter, positives_per_slot, slot_ids
from yolo_sizeloss.yolo.loss import AnchorWeighting, build_size_aware_loss, loss_branches, stock_assigners


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


BUCKETS = COCO_NAMES


def size_buckets(boxes: torch.Tensor) -> torch.Tensor:
    """The index into ``BUCKETS`` of each xyxy box (network-input pixels), by its area."""
    return torch.bucketize(box_areas(boxes.float()), torch.tensor(COCO_AREA_LIMITS), right=True)


def slot_tallies(outputs, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From an assigner's ``outputs``: each ground-truth slot's positive anchors and summed target score,
    (B, G) float64 each."""
    _, _, target_scores, fg_mask, target_gt_idx = outputs
    positives = positives_per_slot(fg_mask, target_gt_idx, slots).double()
    score = torch.zeros(fg_mask.shape[0] * slots, dtype=torch.float64).index_add_(
        0, slot_ids(target_gt_idx, slots), (target_scores.sum(-1) * fg_mask).flatten().double())
    return positives, score.view(-1, slots)


class SizeTally:
    """A forward hook on a stock assigner: per size bucket, the ground truths, their positive anchors
    and their summed target scores, over every call since it was made."""

    def __init__(self):
        self.sums = torch.zeros(3, len(BUCKETS), dtype=torch.float64)  # GTs, positives, target score

    def __call__(self, assigner, args, kwargs, outputs) -> None:
        gt_bboxes, mask_gt = args[4], args[5]
        if gt_bboxes.shape[1] == 0:
            return
        positives, score = slot_tallies(outputs, gt_bboxes.shape[1])
        bucket = size_buckets(gt_bboxes)
        valid = mask_gt.reshape(positives.shape).bool()
        for b in range(len(BUCKETS)):
            chosen = valid & (bucket == b)
            self.sums[:, b] += torch.stack([chosen.sum(), positives[chosen].sum(), score[chosen].sum()]).double()

    def rows(self) -> dict[str, tuple[float, float, float]]:
        """Per bucket: positives per GT, target score per GT, share of all target score."""
        gts, positives, score = self.sums
        total = float(score.sum()) or 1.0
        return {name: (float(positives[b] / gts[b]) if gts[b] else float("nan"),
                       float(score[b] / gts[b]) if gts[b] else float("nan"), float(score[b]) / total)
                for b, name in enumerate(BUCKETS)}


class BoxWeightTally:
    """A forward pre-hook on a stock ``BboxLoss``: per size bucket of the target box, the weight its
    foreground anchors' box terms receive (their target-score rows' sums), over every call since it was made."""

    def __init__(self):
        self.sums = torch.zeros(len(BUCKETS), dtype=torch.float64)

    def __call__(self, box_loss, args) -> None:
        # BboxLoss(pred_dist, pred_bboxes, anchor_points, target_bboxes, target_scores, target_scores_sum,
        #          fg_mask, imgsz, stride): target boxes in stride units
        target_bboxes, target_scores, fg_mask, stride = args[3], args[4], args[6], args[8]
        bucket = size_buckets(target_bboxes.float() * stride)
        weight = torch.where(fg_mask, target_scores.sum(-1), 0.0).double()
        for b in range(len(BUCKETS)):
            self.sums[b] += weight[bucket == b].sum()

    def shares(self) -> list[float]:
        total = float(self.sums.sum()) or 1.0
        return [float(v) / total for v in self.sums]


class ConflictTally:
    """A forward hook on a stock assigner, over every call since it was made (an end-to-end head's two
    branches add up): ``positives``, the anchors assigned to any ground truth; ``claimed``, those two or
    more ground truths claim; ``kept_otherwise``, those the assigner's own overlap keeps for another ground
    truth than the stock CIoU would, per size bucket of the one the CIoU would keep (rows) and of the one
    kept (columns). It asks the assigner again for its positives before they are resolved
    (``get_pos_mask``), so it observes the assigner's own candidates and top-k."""

    def __init__(self):
        self.positives = self.claimed = 0
        self.kept_otherwise = torch.zeros(len(BUCKETS), len(BUCKETS), dtype=torch.float64)
        self.class_moves: dict[tuple[int, int], int] = {}  # (class the CIoU would keep, class kept): anchors

    def __call__(self, assigner, args, kwargs, outputs) -> None:
        pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt = args[:6]
        if gt_bboxes.shape[1] == 0:
            return
        # kwargs: the batch-first extras a class-gated overlap reads (ClassGatedPairs' measured_gts)
        mask_pos, _, overlaps = assigner.get_pos_mask(pd_scores, pd_bboxes, gt_labels, gt_bboxes, anc_points, mask_gt,
                                                      **kwargs)
        candidates = assigner.select_candidates_in_gts(anc_points, gt_bboxes, mask_gt).bool() & mask_gt.bool()
        image, gt, anchor = candidates.nonzero(as_tuple=True)
        ciou = torch.zeros_like(overlaps)
        stock_overlap = type(assigner).iou_calculation  # the class's CIoU, whatever the instance measures by
        ciou[image, gt, anchor] = stock_overlap(assigner, gt_bboxes[image, gt], pd_bboxes[image, anchor])
        by_ciou, by_own = ciou.argmax(1), overlaps.argmax(1)  # (B, A): the ground truth each keeps
        claimed = mask_pos.sum(1) > 1
        moved = claimed & (by_ciou != by_own)
        self.positives += int(outputs[3].sum())
        self.claimed += int(claimed.sum())
        bucket = size_buckets(gt_bboxes)  # (B, G)
        self.kept_otherwise.index_put_((bucket.gather(1, by_ciou)[moved], bucket.gather(1, by_own)[moved]),
                                       torch.ones(int(moved.sum()), dtype=torch.float64), accumulate=True)
        classes = gt_labels[..., 0].long()  # (B, G)
        pairs = torch.stack([classes.gather(1, by_ciou)[moved], classes.gather(1, by_own)[moved]], -1)
        for pair in map(tuple, pairs.tolist()):
            self.class_moves[pair] = self.class_moves.get(pair, 0) + 1


class ClassTally:
    """A forward hook on a stock assigner: per class, its ground truths, their positive anchors and their summed
    target scores, over every call since it was made."""

    def __init__(self, classes: int):
        self.sums = torch.zeros(3, classes, dtype=torch.float64)  # GTs, positives, target score

    def __call__(self, assigner, args, kwargs, outputs) -> None:
        gt_labels, gt_bboxes, mask_gt = args[3], args[4], args[5]
        if gt_bboxes.shape[1] == 0:
            return
        positives, score = slot_tallies(outputs, gt_bboxes.shape[1])
        valid = mask_gt.flatten().bool()
        classes = gt_labels.flatten().long()[valid]
        for row, values in enumerate((torch.ones_like(positives), positives, score)):
            self.sums[row].index_add_(0, classes, values.flatten()[valid])


def stock_box_losses(criterion) -> list:
    """Each branch's stock ``BboxLoss``, inside the size-aware wrappers where there are any."""
    losses = []
    for branch in loss_branches(criterion):
        box_loss = branch.bbox_loss
        while not isinstance(box_loss, BboxLoss):
            box_loss = box_loss.bbox_loss
        losses.append(box_loss)
    return losses


def count_mode(model, mode: str, batches, labels, imgsz: int, classes: int
               ) -> tuple[dict[str, float], tuple[dict, float], ConflictTally, ClassTally]:
    """The assignment counts of one mode (``LOSS`` or ``LOSS:SETTINGS``) over ``batches``; its
    ``SizeTally.rows``, its whole target score and ``BoxWeightTally.shares``; its ``ConflictTally``; its
    ``ClassTally`` over the data's ``classes``."""
    config = load_loss_mode(mode)
    if not config:  # baseline: the stock criterion
        criterion = model.init_criterion()
    else:
        weighting = AnchorWeighting(config)
        weighting.resolve_from_labels(labels, imgsz)
        criterion = build_size_aware_loss(model, weighting)
    counter, tally, conflicts, by_class = AssignmentCounter(), SizeTally(), ConflictTally(), ClassTally(classes)
    attach_counter(counter, stock_assigners(criterion))
    for assigner in stock_assigners(criterion):
        for hook in (tally, conflicts, by_class):
            assigner.register_forward_hook(hook, with_kwargs=True)
    box_tally = BoxWeightTally()
    for box_loss in stock_box_losses(criterion):
        box_loss.register_forward_pre_hook(box_tally)
    with torch.no_grad():
        for batch in batches:
            criterion(model(batch["img"]), batch)
            counter.end_step()
    small, steps = counter.sums[0].item(), counter.sums[4].item()
    return ({"small": small / steps, **counter.epoch_stats()},
            (tally.rows(), float(tally.sums[2].sum()), box_tally.shares()), conflicts, by_class)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a trained YOLO checkpoint, or a model yaml (untrained)")
    p.add_argument("--data", required=True, help="data yaml (its train split is assigned)")
    p.add_argument("--imgsz", type=int, required=True)
    p.add_argument("--modes", nargs="+", default=["baseline", "nwd"],
                   help="LOSS or LOSS:SETTINGS (a shipped settings name or a yaml)")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # a mistake stops here, before the model is built and the batches are loaded
    for flag in ("imgsz", "batches", "batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    try:
        for mode in args.modes:
            load_loss_mode(mode)
        check_yolo_model(args.weights, f"--weights {args.weights}")
        names = checked_data(args.data)[1]["names"]  # Ultralytics' check of the yaml, read once
    except (ValueError, FileNotFoundError) as e:  # LossConfigError is a ValueError
        p.error(one_line(e))
    except DataError as e:  # a data yaml found but unusable (its images missing): the data's fault, exit 1
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    if args.weights.endswith((".yaml", ".yml")):
        init_seeds(args.seed)
        model = DetectionModel(args.weights, nc=len(names), verbose=False).eval()
    else:
        model = YOLO(args.weights).model.float().eval()
    model.args = get_cfg(overrides={"imgsz": args.imgsz})  # the criterion's gains: Ultralytics' defaults
    batches, labels = training_batches(args.data, args.imgsz, args.batch, args.batches, args.seed)
    print(f"{args.weights}, {len(batches)} training batches of {args.batch} at imgsz {args.imgsz} (seed {args.seed})")
    print(f"{'mode':<28} {'small GTs/step':>14} {'small, no positive/step':>24} {'share of small':>15} {'share of all':>13}")
    by_size, conflicts, by_class = {}, {}, {}
    for mode in args.modes:
        row, by_size[mode], conflicts[mode], by_class[mode] = count_mode(model, mode, batches, labels, args.imgsz,
                                                                         len(names))
        print(f"{mode:<28} {row['small']:>14.2f} {row['assign/small_no_pos']:>24.2f} "
              f"{row['assign/small_no_pos_share']:>15.1%} {row['assign/no_pos_share']:>13.1%}")
    print("\nper ground truth of each size (input pixels): positive anchors, summed target score; "
          "the size's share of all target score, and that sum (the losses' normaliser) against the first mode's; "
          "the size's share of the box terms' weight")
    print(f"{'mode':<28}" + "".join(f" {name + ' pos':>10} {name + ' score':>12} {name + ' share':>12}"
                                    for name in BUCKETS) + f" {'sum':>6}"
          + "".join(f" {name + ' box':>10}" for name in BUCKETS))
    first = next(iter(by_size.values()))
    for mode, (rows, total, box_shares) in by_size.items():
        print(f"{mode:<28}" + "".join(f" {pos:>10.2f} {score:>12.2f} {share:>12.1%}" for pos, score, share in rows.values())
              + f" {total / first[1]:>6.2f}" + "".join(f" {share:>10.1%}" for share in box_shares))
    print("\npositive anchors per step; those two or more ground truths claim; of these, those the mode's overlap "
          "keeps for another ground truth than the stock CIoU would, and of those, the ones a larger object's CIoU "
          "would keep and a smaller object gets")
    print(f"{'mode':<28} {'positives':>10} {'claimed':>9} {'kept otherwise':>15} {'to a smaller':>13}")
    for mode, tally in conflicts.items():
        per_step = [tally.positives, tally.claimed, tally.kept_otherwise.sum(), tally.kept_otherwise.tril(-1).sum()]
        print(f"{mode:<28}" + "".join(f" {float(v) / len(batches):>{w}.1f}" for v, w in zip(per_step, (10, 9, 15, 13))))
    print_class_table(by_class, conflicts, names, len(batches))
    return 0


def print_class_table(by_class: dict[str, ClassTally], conflicts: dict[str, ConflictTally], names: dict[int, str],
                      steps: int) -> None:
    """Per class and mode: ground truths a step, positives and target score per ground truth, and the claimed
    anchors a step the mode's overlap moves from the class (its CIoU would keep them) to another class, and to the
    class from another."""
    print("\nper class: ground truths per step, positive anchors and summed target score per ground truth; claimed "
          "anchors per step the mode's overlap gives another class than the stock CIoU would (lost) and this class "
          "where the CIoU would give another (won)")
    print(f"{'class':<14} {'mode':<28} {'GTs/step':>9} {'pos/GT':>7} {'score/GT':>9} {'lost':>6} {'won':>6}")
    for c, name in names.items():
        for mode, tally in by_class.items():
            gts, positives, score = tally.sums[:, c].tolist()
            moves = conflicts[mode].class_moves
            lost = sum(n for (keep, got), n in moves.items() if keep == c and got != c)
            won = sum(n for (keep, got), n in moves.items() if got == c and keep != c)
            per_gt = (positives / gts, score / gts) if gts else (float("nan"), float("nan"))
            print(f"{name[:14]:<14} {mode:<28} {gts / steps:>9.2f} {per_gt[0]:>7.2f} {per_gt[1]:>9.3f} "
                  f"{lost / steps:>6.2f} {won / steps:>6.2f}")


if __name__ == "__main__":
    sys.exit(main())
