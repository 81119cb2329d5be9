"""Training and evaluation loop of the Faster R-CNN path (single process or torchrun + DDP).

Schedule (Hu et al. 2022, torchvision's detection tutorial): SGD, StepLR per epoch, a linear warm-up
from ``lr * WARMUP_FACTOR`` over the first ``min(warmup_iters, iterations per epoch - 1)`` iterations
of the first epoch, horizontal flip as the only augmentation. ``--batch`` is the total batch over
all processes (as on the YOLO path); each of N processes loads ``batch // N`` images.
Under ``torchrun`` every process trains on its DistributedSampler shard; validation is sharded too
and the predictions are gathered on rank 0, which alone writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from ultralytics.utils import LOGGER, TQDM
from ultralytics.utils.files import increment_path

from yolo_sizeloss.checkpoints import RCNN_ARCH, load_checkpoint
from yolo_sizeloss.checks import (
    CheckedSplits,
    DataError,
    check_resumed_epochs,
    parse_process_device,
    resumed_run_folder,
    torchrun_world_size,
)
from yolo_sizeloss.config import describe_loss, write_loss_record
from yolo_sizeloss.detections import ImageRecord, first_fraction, load_split, training_box_sizes
from yolo_sizeloss.evaluation import COCO_EDGES, coco_metrics, per_class_ap
from yolo_sizeloss.methods.nwd import ResolvedSettings, needs_training_boxes, resolve_nwd_auto
from yolo_sizeloss.methods.overlaps import IoU
from yolo_sizeloss.paths import run_data_path
from yolo_sizeloss.rcnn.data import DetectionDataset, collate_detection
from yolo_sizeloss.rcnn.model import (
    RCNN_NMS_IOU,
    assignment_columns,
    build_model,
    end_assignment_step,
    end_feedback_step,
    feedback_columns,
    model_from_checkpoint,
    set_inference_limits,
    split_feedback_state,
    unwrap,
)
from yolo_sizeloss.rcnn.switches import LossSwitches
from yolo_sizeloss.results_csv import append_row, class_ap_columns, continue_results
from yolo_sizeloss.weighting_plot import plot_weighting

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
WARMUP_FACTOR = 1e-3  # first warm-up learning rate, as a fraction of --lr
VAL_CONF, VAL_MAX_DET = 0.001, 300  # Ultralytics' validation defaults, for comparable mAP


class CheckedRun(NamedTuple):
    """What the command's checks hand ``fit``: the run's settings (a resumed run's own), the splits it trains
    and validates on, and the checkpoint it continues from (None for a new run)."""

    args: argparse.Namespace
    splits: CheckedSplits
    checkpoint: dict | None = None


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank, number of processes, device; ``owns_group`` if we
    initialised the process group (and so destroy it)."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(device: str, local_rank: int, world_size: int) -> torch.device:
    """This process's device from ``--device`` (``checks.parse_process_device``): auto (CUDA if available,
    else the CPU), cpu, a CUDA index, or a list whose ``local_rank``-th entry this torchrun process takes."""
    parsed = parse_process_device(device, world_size)
    if parsed.kind == "cpu" or (parsed.kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device(f"cuda:{parsed.indices[local_rank] if parsed.indices else local_rank}")


def setup_distributed(device: str) -> DistContext:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
    world_size = torchrun_world_size()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = select_device(device, local_rank, world_size)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, torch_device, owns_group)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


DEFAULT_PROJECT = "runs/rcnn"  # under the working directory, as YOLO's runs/train


def make_save_dir(project: str | None, name: str, exist_ok: bool, ctx: DistContext) -> Path:
    """``project/name`` (None: ``DEFAULT_PROJECT``), incremented by Ultralytics' rule unless ``exist_ok``;
    rank 0 decides and every rank gets the same path."""
    chosen = [None]
    if ctx.is_main:
        base = Path(project or DEFAULT_PROJECT).expanduser()
        chosen[0] = str(increment_path(base.resolve() / name, exist_ok=exist_ok, mkdir=True))
    if ctx.world_size > 1:
        dist.broadcast_object_list(chosen, src=0, device=ctx.device)
    return Path(chosen[0])


def shard_indices(count: int, ctx: DistContext) -> list[int]:
    """The indices of ``count`` items that this rank handles (strided)."""
    return list(range(ctx.rank, count, ctx.world_size))


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    warmup_iters: int,
    desc: str,
    show_progress: bool,
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each loss item over the epoch (all ranks)."""
    model.train()
    warmup = None
    if warmup_iters > 0:
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, WARMUP_FACTOR, total_iters=warmup_iters)
    sums = torch.zeros(len(LOSS_NAMES) + 1, dtype=torch.float64, device=device)  # loss items, steps
    bar = TQDM(loader, desc=desc, disable=not show_progress)
    for step, (images, targets, _) in enumerate(bar):
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        step_sums = reduced_loss_items(losses)
        if not torch.isfinite(step_sums).all():
            items = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOSS_NAMES, step_sums.tolist()))
            raise FloatingPointError(f"{desc}: non-finite loss at iteration {step} (summed over processes: {items})")
        optimizer.zero_grad(set_to_none=True)
        sum(losses[name] for name in LOSS_NAMES).backward()
        optimizer.step()
        end_feedback_step(unwrap(model))  # once per iteration; the state is summed across processes
        end_assignment_step(unwrap(model))
        if warmup is not None:
            warmup.step()
        sums += step_sums
        bar.set_description(f"{desc} loss {sums[:-1].sum().item() / sums[-1].item():.4f}")
    return {name: (sums[i] / sums[-1].clamp(min=1)).item() for i, name in enumerate(LOSS_NAMES)}


def reduced_loss_items(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The step's loss items and step count (float64), summed over the processes.

    Summed before the finiteness check, as torchvision's references/detection/engine.py reduces
    before its own: every rank sees the same verdict, so a non-finite loss on one rank stops all of
    them together, where a rank stopping alone would leave the others waiting in DDP's all-reduce.
    """
    items = torch.stack([losses[n].detach().double() for n in LOSS_NAMES])
    items = torch.cat([items, items.new_ones(1)])  # the step count
    if dist.is_initialized():
        dist.all_reduce(items)
    return items


@torch.no_grad()
def predict(
    model: torch.nn.Module, records: list[ImageRecord], device: torch.device, batch: int, workers: int,
    show_progress: bool,
) -> list[ImageRecord]:
    """Copies of ``records`` with the model's detections (original image pixels, YOLO class ids); a progress bar
    with ``show_progress`` (minutes on a CPU, as YOLO's validator shows its own)."""
    net = unwrap(model)
    net.eval()
    loader = DataLoader(
        DetectionDataset(records, flip_p=0.0), batch_size=batch, num_workers=workers, collate_fn=collate_detection
    )
    predicted = list(records)
    for images, _, indices in TQDM(loader, desc="val", disable=not show_progress):
        for index, out in zip(indices, net([image.to(device) for image in images])):
            predicted[index] = dataclasses.replace(
                records[index],
                pred_boxes=out["boxes"].float().cpu().numpy(),
                pred_scores=out["scores"].float().cpu().numpy(),
                pred_classes=(out["labels"] - 1).cpu().numpy(),
            )
    return predicted


def coco_map(records: list[ImageRecord], names: list[str]) -> dict:
    """COCO box mAP50 and mAP50-95 in original pixels, from the report's evaluation
    (``yolo_sizeloss.evaluation``, faster-coco-eval), 0 when there is nothing to evaluate; and
    ``class_ap``, each class's AP50-95 by class index (a class without ground truth left out)."""
    metrics = coco_metrics(records, len(names), np.ones(len(records)), COCO_EDGES)
    by_class = per_class_ap(records, names, np.ones(len(records)))
    return {"mAP50": metrics["ap50"] or 0.0, "mAP50-95": metrics["ap"] or 0.0,
            "class_ap": {k: by_class[name]["ap"] for k, name in enumerate(names) if by_class[name]["ap"] is not None}}


def validate(
    model: torch.nn.Module, records: list[ImageRecord], names: list[str], ctx: DistContext, batch: int, workers: int
) -> dict | None:
    """Predict each rank's shard of ``records``, gather on rank 0 and return its mAPs there (``coco_map``;
    None elsewhere)."""
    shard = shard_indices(len(records), ctx)
    predicted = predict(model, [records[i] for i in shard], ctx.device, batch, workers, ctx.is_main)
    if ctx.world_size > 1:
        gathered: list = [None] * ctx.world_size
        dist.all_gather_object(gathered, list(zip(shard, predicted)))
        predicted = [r for _, r in sorted((pair for part in gathered for pair in part), key=lambda p: p[0])]
    return coco_map(predicted, names) if ctx.is_main else None


def fitness(metrics: dict[str, float]) -> float:
    """The rule that picks ``best.pt``: mAP50-95, as Ultralytics 8.4's detection fitness."""
    return metrics["mAP50-95"]


def plain_args(args: argparse.Namespace) -> dict:
    """The run's arguments as YAML/torch.load-safe plain values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def resumed_args(checkpoint: dict, args: argparse.Namespace) -> argparse.Namespace:
    """The checkpoint's training arguments, with ``resume`` and, where given now, ``epochs`` (a new total,
    which also extends a finished run), ``device`` and ``workers``. Nothing left to train is refused in
    the YOLO path's words: a new total not above the epochs trained is a ValueError naming ``--epochs``,
    a finished run without one a DataError."""
    restored = argparse.Namespace(**checkpoint["train_args"])
    restored.resume = str(args.resume)
    restored.data = run_data_path(restored.data)
    for key in ("epochs", "device", "workers"):
        if getattr(args, key, None) is not None:
            setattr(restored, key, getattr(args, key))
    trained = checkpoint["epoch"] + 1
    check_resumed_epochs(getattr(args, "epochs", None), trained)
    if trained >= restored.epochs:
        raise DataError(f"--resume {args.resume}: this run finished its {trained} epochs; give --epochs above "
                        f"{trained} to train on")
    return restored


def make_train_loader(
    records: list[ImageRecord], batch: int, workers: int, seed: int, ctx: DistContext
) -> tuple[DataLoader, DistributedSampler]:
    """Shuffled, flipped training batches of this rank (``batch`` images per rank)."""
    sampler = DistributedSampler(
        DetectionDataset(records, flip_p=0.5), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed
    )
    loader = DataLoader(
        sampler.dataset, batch_size=batch, sampler=sampler, num_workers=workers,
        collate_fn=collate_detection, pin_memory=ctx.device.type == "cuda", drop_last=False,
    )
    return loader, sampler


def fit(run: CheckedRun) -> Path:
    """Train Faster R-CNN as the command checked it (``yolo_sizeloss.rcnn.cli``); return the run directory."""
    ctx = setup_distributed(run.args.device)
    try:
        return _fit(*run, ctx)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def training_nwd_settings(
    config: dict, records: list[ImageRecord], imgsz: int, checkpoint: dict | None, log: bool = True
) -> ResolvedSettings | None:
    """NWD's constant, the RPN matcher's measure, whether NWD acts at all and the classes whose ground truths
    the matcher measures by it (None: all), for this run; None without ``nwd``.

    The constant is the configured number; on resume the checkpoint's; else (``auto``) the mean
    ``sqrt(w * h)`` of the training boxes at ``imgsz``, as Wang et al. set C (``training_box_sizes``:
    the pixels the heads see). ``assigner: auto`` is ``methods.nwd.nwd_assigner_auto`` of the same
    boxes, ``max_small_share`` turns NWD off where more of them are small, and ``assigner_classes: small``
    keeps the classes whose boxes are mostly small. All are computed once here
    (``methods.nwd.resolve_nwd_auto``)."""
    if "nwd" not in config:
        return None
    nwd_cfg = dict(config["nwd"])
    if nwd_cfg["constant"] == "auto" and checkpoint is not None and checkpoint.get("nwd_constant") is not None:
        nwd_cfg["constant"] = checkpoint["nwd_constant"]
    if not needs_training_boxes(nwd_cfg):
        return ResolvedSettings(float(nwd_cfg["constant"]), nwd_cfg["assigner"])
    resolved = resolve_nwd_auto(nwd_cfg, *training_box_sizes(records, imgsz), imgsz)
    for line in resolved.lines if log else ():
        LOGGER.info(line)
    return resolved


def _fit(args: argparse.Namespace, splits: CheckedSplits, checkpoint: dict | None, ctx: DistContext) -> Path:
    train_records, val_records, data = first_fraction(splits.train, args.fraction), splits.val, splits.data
    switches = LossSwitches.from_config(
        args.loss_config, training_nwd_settings(args.loss_config, train_records, args.imgsz, checkpoint, ctx.is_main))
    seed_everything(args.seed)
    # the model first: a build that fails (weights that do not load) leaves no empty run folder
    model = checkpoint_or_new_model(checkpoint, args, switches, data["nc"] + 1)
    if checkpoint is not None:
        save_dir = resumed_run_folder(args.resume)
    else:
        save_dir = make_save_dir(args.project, args.name, args.exist_ok, ctx)
    if checkpoint is not None and feedback_columns(model) and ctx.is_main:
        LOGGER.info(f"Resumed feedback state {feedback_columns(model)}")
    set_inference_limits(model, VAL_CONF, VAL_MAX_DET)
    model.to(ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=args.lr_gamma)
    start_epoch, best_fitness = 0, -math.inf
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, best_fitness = checkpoint["epoch"] + 1, checkpoint["best_fitness"]
    if ctx.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)

    per_rank_batch = args.batch // ctx.world_size
    workers = min(args.workers, (os.cpu_count() or 1) // ctx.world_size)
    loader, sampler = make_train_loader(train_records, per_rank_batch, workers, args.seed, ctx)
    weights_dir = save_dir / "weights"
    resumed_seconds = 0.0  # results.csv's time of the epochs a resumed run had trained
    if ctx.is_main:
        weights_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "args.yaml").write_text(yaml.safe_dump(plain_args(args), sort_keys=False))
        write_loss_record(save_dir, args.loss_config)
        if checkpoint is not None:
            resumed_seconds = continue_results(save_dir / "results.csv", start_epoch)
        else:  # a new run in a reused folder (--exist-ok) has its own rows only, as Ultralytics' trainer deletes it
            (save_dir / "results.csv").unlink(missing_ok=True)
        LOGGER.info(f"size-aware loss: {describe_loss(args.loss_config, 'faster_rcnn')}")
        LOGGER.info(f"Faster R-CNN {args.backbone}, {len(train_records)} train / "
                    f"{len(val_records)} val images, {ctx.world_size} process(es) on {ctx.device}; saving to {save_dir}")

    train_start = time.time() - resumed_seconds  # results.csv's time counts from the run's first start
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed(args.seed + epoch * ctx.world_size + ctx.rank)  # flips and RPN/RoI sampling
        warmup_iters = min(args.warmup_iters, len(loader) - 1) if epoch == 0 else 0
        stage_rpn_overlap(unwrap(model), switches, epoch, args.epochs, ctx.is_main)
        losses = train_one_epoch(model, optimizer, loader, ctx.device, warmup_iters,
                                 f"{epoch + 1}/{args.epochs}", ctx.is_main)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics = validate(model, val_records, [data["names"][k] for k in sorted(data["names"])], ctx, per_rank_batch,
                           workers)
        if ctx.is_main:
            best_fitness = save_epoch(save_dir, epoch, time.time() - train_start, losses, metrics, lr, best_fitness,
                                      model, optimizer, scheduler, args, data)
            plot_weighting(save_dir)
    return save_dir


def stage_rpn_overlap(model: torch.nn.Module, switches: LossSwitches, epoch: int, epochs: int, log: bool) -> None:
    """Outside ``nwd.assigner_from`` .. ``assigner_until`` of the epochs the RPN's matcher measures by IoU, inside
    by ``nwd.assigner``'s overlap; called every epoch, so that a run resumed anywhere does too."""
    nwd = switches.nwd
    if not nwd.assigner:
        return
    acts = nwd.assigner_acts(epoch, epochs)
    if acts == isinstance(model.rpn.overlap, IoU):
        model.rpn.use_overlap(switches.rpn_overlap() if acts else IoU())
        if log:
            measure = f"nwd.assigner's overlap ({nwd.assigner})" if acts else "IoU"
            LOGGER.info(f"the RPN's matcher measures by {measure} from epoch {epoch + 1}")


def checkpoint_or_new_model(
    checkpoint: dict | None, args: argparse.Namespace, switches: LossSwitches, num_classes: int
) -> torch.nn.Module:
    """The resumed checkpoint's model, or a new one from ``--backbone``/``--weights``; either with
    ``switches``, the loop's own (``stage_rpn_overlap`` and results.csv go by them)."""
    if checkpoint is None:
        return build_model(args.backbone, num_classes, args.imgsz, switches, args.weights)
    return model_from_checkpoint(checkpoint, switches=switches)


def save_epoch(
    save_dir: Path,
    epoch: int,
    elapsed: float,
    losses: dict[str, float],
    metrics: dict,
    lr: float,
    best_fitness: float,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    args: argparse.Namespace,
    data: dict,
) -> float:
    """Write the epoch's ``results.csv`` row (with the feedback state at the epoch's end, the RPN's
    assignment counts, the NWD constant, if any, and the assigner decision of ``nwd.assigner: auto``),
    ``weights/last.pt`` and
    (if fitter) ``best.pt``; return the best fitness."""
    nwd = unwrap(model).rpn.switches.nwd
    append_row(save_dir / "results.csv", {
        "epoch": epoch + 1,
        "time": round(elapsed, 2),
        **{f"train/{k}": round(v, 6) for k, v in losses.items()},
        "metrics/mAP50(B)": round(metrics["mAP50"], 6),
        "metrics/mAP50-95(B)": round(metrics["mAP50-95"], 6),
        "lr/pg0": lr,
        **class_ap_columns(data["names"], metrics["class_ap"]),
        **feedback_columns(unwrap(model)),
        **assignment_columns(unwrap(model)),
        **nwd.epoch_columns(nwd.assigner_acts(epoch, args.epochs)),
    })
    detector_state, feedback_state = split_feedback_state(unwrap(model).state_dict())
    current = fitness(metrics)
    best_fitness = max(best_fitness, current)
    checkpoint = {
        "arch": RCNN_ARCH,
        "backbone": args.backbone,
        "num_classes": len(data["names"]) + 1,
        "names": {int(k): str(v) for k, v in data["names"].items()},
        "imgsz": args.imgsz,
        "model": detector_state,  # torchvision's keys only: a stock FasterRCNN loads it
        "feedback": feedback_state,  # the loss heads' feedback state (empty without feedback), for --resume
        "nwd_constant": nwd.constant,  # NWD's C as used (auto resolved from the labels); None without nwd
        "nwd_assigner": nwd.assigner,  # NWD in the RPN matcher, as used (also when auto)
        "nwd_active": nwd.active,  # False: nwd.max_small_share turned NWD off
        "nwd_classes": nwd.classes,  # the classes the RPN matcher measures by NWD's overlap (None: all)
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "best_fitness": best_fitness,
        "train_args": plain_args(args),
        "loss": args.loss_config,
    }
    torch.save(checkpoint, save_dir / "weights" / "last.pt")
    if current >= best_fitness:
        torch.save(checkpoint, save_dir / "weights" / "best.pt")
    LOGGER.info(f"epoch {epoch + 1}: {elapsed:.0f}s since start, " + ", ".join(f"{k} {v:.4f}" for k, v in {**losses, "mAP50": metrics["mAP50"], "mAP50-95": metrics["mAP50-95"]}.items()))
    return best_fitness


def predict_records(
    checkpoint_path: str | Path, data: str | Path, split: str, imgsz: int | None = None, device: str | None = None,
    **options,
) -> list[ImageRecord]:
    """Ground truth and detections of ``split`` of the data yaml ``data`` for a trained checkpoint.

    Boxes are xyxy in original image pixels; classes are YOLO class ids. ``imgsz`` None: the size the
    checkpoint was trained at. ``device``: as ``--device`` ('' or None: CUDA if available).
    ``options``: ``batch``, ``workers``, ``conf``, ``max_det`` of ``predict_checkpoint``.
    """
    checkpoint = load_checkpoint(checkpoint_path, RCNN_ARCH)
    records, data_dict = load_split(data, split)
    if len(data_dict["names"]) + 1 != checkpoint["num_classes"]:
        raise ValueError(f"{checkpoint_path}: trained for {checkpoint['num_classes'] - 1} classes, "
                         f"data {data} has {len(data_dict['names'])}")
    return predict_checkpoint(checkpoint, records, imgsz, device, **options)


def predict_checkpoint(
    checkpoint: dict,
    records: list[ImageRecord],
    imgsz: int | None = None,
    device: str | None = None,
    *,
    batch: int = 4,
    workers: int = 0,
    conf: float = VAL_CONF,
    max_det: int = VAL_MAX_DET,
    iou: float = RCNN_NMS_IOU,
) -> list[ImageRecord]:
    """Copies of ``records`` with the detections of a loaded Faster R-CNN checkpoint (see ``predict_records``)."""
    torch_device = select_device(device or "", 0, 1)
    model = model_from_checkpoint(checkpoint, imgsz).to(torch_device)
    set_inference_limits(model, conf, max_det, iou)
    return predict(model, records, torch_device, batch, workers, show_progress=True)
