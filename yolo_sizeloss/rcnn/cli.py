"""Command line of the Faster R-CNN path: ``train.py --arch faster_rcnn ...`` or ``python -m yolo_sizeloss.rcnn.cli``.

The run flags (``add_common_arguments``) default to ``None``: a new run fills them from
``COMMON_DEFAULTS``, a resumed run takes its settings from the checkpoint and only a ``--device`` or
``--workers`` given now. Multi-process training: ``torchrun --nproc_per_node N -m yolo_sizeloss.rcnn.cli ...``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from yolo_sizeloss.paths import resolve_data
from yolo_sizeloss.rcnn.engine import fit
from yolo_sizeloss.rcnn.heads import PLB_SWITCHES, SIZE_SOURCES, LossSwitches, parse_plb
from yolo_sizeloss.rcnn.model import BACKBONES

COMMON_DEFAULTS = {  # the paper's schedule where it sets one (Hu et al. 2022: 15 epochs, batch 4)
    "data": "bccd.yaml",
    "epochs": 15,
    "imgsz": 640,
    "batch": 4,
    "workers": 4,
    "fraction": 1.0,
    "device": "",
    "project": None,
    "name": "train",
    "exist_ok": False,
    "resume": None,
    "seed": 0,
}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The run flags (defaults None: ``COMMON_DEFAULTS`` for a new run, the checkpoint's on --resume)."""
    parser.add_argument("--data", help=f"YOLO-format data yaml (default {COMMON_DEFAULTS['data']})")
    parser.add_argument("--epochs", type=int, help="training epochs (default 15)")
    parser.add_argument("--imgsz", type=int, help="long image side in pixels, aspect kept (default 640)")
    parser.add_argument("--batch", type=int, help="total batch over all processes (default 4)")
    parser.add_argument("--workers", type=int, help="dataloader workers per process, capped by CPUs (default 4)")
    parser.add_argument("--fraction", type=float, help="use the first fraction of the train split (default 1.0)")
    parser.add_argument("--device", help="'' (auto), cpu, 0, or 0,1 under torchrun")
    parser.add_argument("--project", help="runs folder (default <cwd>/runs/rcnn)")
    parser.add_argument("--name", help="run name, incremented if it exists (default train)")
    parser.add_argument("--exist-ok", action="store_true", default=None, help="reuse project/name as is")
    parser.add_argument("--resume", help="path to a run's weights/last.pt: continue that run")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The Faster-R-CNN-only flags, with the paper's schedule as defaults."""
    group = parser.add_argument_group("Faster R-CNN")
    group.add_argument("--backbone", default="resnet50_fpn", choices=list(BACKBONES),
                       help="resnet50_fpn (the paper's) or mobilenet_v3_large_fpn (for CPUs)")
    group.add_argument("--weights", default="none",
                       help="initial weights: a checkpoint path, DEFAULT (torchvision's COCO download) or none")
    group.add_argument("--plb", default="", help=f"PLB switches, comma list of {','.join(PLB_SWITCHES)} (empty: stock loss)")
    group.add_argument("--plb-source", default="predicted", choices=list(SIZE_SOURCES),
                       help="PLB box sizes from the predicted boxes or the matched ground truth")
    group.add_argument("--scb-rpn", action="store_true", help="scale-balanced weight on the RPN's positive objectness")
    group.add_argument("--lr", type=float, default=0.005, help="SGD learning rate")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    group.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    group.add_argument("--lr-step", type=int, default=3, help="StepLR step size in epochs")
    group.add_argument("--lr-gamma", type=float, default=0.1, help="StepLR factor")
    group.add_argument("--warmup-iters", type=int, default=1000,
                       help="linear warm-up iterations (capped at the first epoch's iterations - 1; 0: none)")


def build_parser() -> argparse.ArgumentParser:
    """A parser with the common and the Faster R-CNN flags."""
    parser = argparse.ArgumentParser(description="Train torchvision Faster R-CNN with size-aware losses")
    parser.add_argument("--arch", choices=["faster_rcnn"], default="faster_rcnn",
                        help="detector family (accepted so that train.py's full command line parses)")
    add_common_arguments(parser)
    add_arguments(parser)
    return parser


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Give every common flag that is missing or None its Faster R-CNN default (in place)."""
    for key, value in COMMON_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject values no run could use, naming the flag (a new run's, after ``fill_defaults``)."""
    positive = {"epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch, "lr-step": args.lr_step}
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"--{flag} {value}: must be at least 1")
    if args.workers < 0 or args.warmup_iters < 0:
        raise ValueError(f"--workers {args.workers} / --warmup-iters {args.warmup_iters}: must not be negative")
    if args.lr <= 0:
        raise ValueError(f"--lr {args.lr}: must be positive")
    if not 0 < args.fraction <= 1:
        raise ValueError(f"--fraction {args.fraction}: must be in (0, 1]")
    if args.weights.upper() != "DEFAULT" and args.weights.lower() != "none" and not Path(args.weights).is_file():
        raise ValueError(f"--weights {args.weights}: no such file (give a checkpoint path, DEFAULT or none)")
    resolve_data(args.data)
    LossSwitches(parse_plb(args.plb), args.plb_source, args.scb_rpn)


def main(argv: list[str] | None = None) -> Path:
    """Entry point of ``train.py --arch faster_rcnn`` and ``python -m yolo_sizeloss.rcnn.cli`` (also under
    torchrun): a flag no run could use is a usage error naming it, before anything is written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.resume:
            if not Path(args.resume).is_file():
                raise ValueError(f"--resume {args.resume}: no such checkpoint")
        else:
            check_args(fill_defaults(args))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return fit(args)


if __name__ == "__main__":
    main()
