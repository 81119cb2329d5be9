"""Command line of the Faster R-CNN path: ``train.py --arch faster_rcnn ...`` or ``python -m yolo_sizeloss.rcnn.cli``.

The loss is chosen as on the YOLO path (``--loss plb+scb``, ``--loss-cfg FILE``: the same settings,
whose ``rcnn_terms`` say which Faster R-CNN terms a weight multiplies); ``--plb 1C,1B``,
``--plb-source`` and ``--scb-rpn`` are the PLB paper's shorthands for those settings. Run flags
default to ``None``: a new run fills them from ``cfg/defaults.yaml`` (section ``faster_rcnn``), a
resumed run takes its settings from the checkpoint and only the flags a resume can honour.
Multi-process training: ``torchrun --nproc_per_node N -m yolo_sizeloss.rcnn.cli ...``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ultralytics.utils import LOGGER

from yolo_sizeloss.checkpoints import RCNN_ARCH, is_yolo_checkpoint, load_checkpoint
from yolo_sizeloss.checks import (
    RESUME_HINT,
    DataError,
    OneLineParser,
    check_nwd_needs,
    check_output_folder,
    check_resume_file,
    check_resume_is_latest,
    check_resume_keeps_settings,
    check_resumed_data,
    check_run_flags,
    check_run_name,
    check_training_splits,
    checked_data,
    flag_error,
    non_empty,
    one_line,
    parse_process_device,
    read_resume_checkpoint,
    resumed_run_folder,
    run_guarded,
    torchrun_world_size,
)
from yolo_sizeloss.config import (
    LossConfigError,
    check_resumed_loss,
    load_loss_config,
    loss_flag_help,
    loss_name,
    parse_loss_names,
    run_defaults,
)
from yolo_sizeloss.detections import first_fraction
from yolo_sizeloss.evaluation import check_faster_coco_eval
from yolo_sizeloss.rcnn.engine import DEFAULT_PROJECT, CheckedRun, fit, resumed_args
from yolo_sizeloss.rcnn.model import BACKBONES, check_architecture, check_weights_match

PLB_SHORTHANDS = {"1C": "rpn_cls", "1B": "rpn_box", "2C": "roi_cls", "2B": "roi_box"}  # the paper's names
SIZE_SOURCES = ("predicted", "gt")
RESUMABLE = ("epochs", "device", "workers")  # what a resumed run can change; anything else given is an error
LOSS_FLAGS = ("loss", "loss_cfg", "plb", "plb_source", "scb_rpn")  # on resume: must give the run's own loss
YOLO_FLAGS = {  # YOLO's flags that mean something else here: one line saying what to use instead
    "--model": "--model is YOLO's: Faster R-CNN is built from --backbone and starts from --weights (a checkpoint)",
}


class RcnnParser(OneLineParser):
    """One line for a YOLO flag given to the Faster R-CNN path, saying what to use instead."""

    def error(self, message: str):
        for flag, advice in YOLO_FLAGS.items():
            if message.startswith("unrecognized arguments") and flag in message.split():
                self.exit(2, f"{self.prog}: error: {advice}\n")
        super().error(message)


def parse_plb(text: str) -> list[str]:
    """The ``rcnn_terms`` of the paper's PLB switch list (``1C,1B``; case-insensitive); ValueError naming the flag."""
    switches = [s.strip().upper() for s in text.split(",") if s.strip()]
    unknown = [s for s in switches if s not in PLB_SHORTHANDS]
    if unknown or len(set(switches)) != len(switches):
        raise ValueError(f"--plb {text}: expected distinct switches from {', '.join(PLB_SHORTHANDS)}")
    return [PLB_SHORTHANDS[s] for s in switches]


def build_parser(prog: str = "yolo-sizeloss train") -> argparse.ArgumentParser:
    """train's Faster R-CNN flags (every default None: see the module docstring; the help names
    cfg/defaults.yaml's values)."""
    d = run_defaults(RCNN_ARCH)
    p = RcnnParser(prog=prog, description="Train torchvision Faster R-CNN with size-aware losses "
                                          "(--arch faster_rcnn; YOLO's flags: yolo-sizeloss train --help)")
    p.add_argument("--arch", choices=[RCNN_ARCH], default=RCNN_ARCH, help="detector family")
    p.add_argument("--data", type=non_empty,
                   help="YOLO-format data yaml; a bare name is looked up among the package's (default bccd.yaml)")
    p.add_argument("--loss", type=non_empty,
                   help=loss_flag_help())
    p.add_argument("--loss-cfg", type=non_empty,
                   help="YAML overriding the methods' settings (rcnn_terms and each method's own), or a shipped variant")
    p.add_argument("--plb", type=non_empty,
                   help=f"shorthand: PLB on the paper's switches, a comma list of {','.join(PLB_SHORTHANDS)}")
    p.add_argument("--plb-source", choices=SIZE_SOURCES, help="shorthand for plb.source")
    p.add_argument("--scb-rpn", action="store_true", default=None, help="shorthand: SCB on the RPN's positive objectness")
    p.add_argument("--epochs", type=int, help=f"training epochs (default {d['epochs']}); with --resume, a new total")
    p.add_argument("--imgsz", type=int, help=f"long image side in pixels, aspect kept (default {d['imgsz']})")
    p.add_argument("--batch", type=int, help=f"total batch over all processes (default {d['batch']})")
    p.add_argument("--workers", type=int, help=f"dataloader workers per process, capped by CPUs (default {d['workers']})")
    p.add_argument("--fraction", type=float, help=f"use the first fraction of the train split (default {d['fraction']})")
    p.add_argument("--device", help="'' (auto), cpu, 0, or 0,1 under torchrun")
    p.add_argument("--project", type=non_empty, help="runs folder (default <cwd>/runs/rcnn)")
    p.add_argument("--name", help="run name, incremented if it exists (default train)")
    p.add_argument("--exist-ok", action="store_true", default=None, help="reuse project/name as is")
    p.add_argument("--resume", type=non_empty, help="path to a run's weights/last.pt: continue that run")
    p.add_argument("--seed", type=int, help=f"random seed (default {d['seed']})")
    p.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    g = p.add_argument_group("Faster R-CNN")
    g.add_argument("--backbone", choices=list(BACKBONES), help="resnet50_fpn (the paper's) or mobilenet_v3_large_fpn (for "
                                                              f"CPUs) (default {d['backbone']})")
    g.add_argument("--weights", type=non_empty,
                   help="initial weights: a checkpoint path, DEFAULT (torchvision's COCO download) "
                        f"or none (default {d['weights']})")
    g.add_argument("--lr", type=float, help=f"SGD learning rate (default {d['lr']})")
    g.add_argument("--momentum", type=float, help=f"SGD momentum (default {d['momentum']})")
    g.add_argument("--weight-decay", type=float, help=f"SGD weight decay (default {d['weight_decay']})")
    g.add_argument("--lr-step", type=int, help=f"StepLR step size in epochs (default {d['lr_step']})")
    g.add_argument("--lr-gamma", type=float, help=f"StepLR factor (default {d['lr_gamma']})")
    g.add_argument("--warmup-iters", type=int, help="linear warm-up iterations, capped at the first epoch's "
                                                     f"iterations - 1; 0: none (default {d['warmup_iters']})")
    return p


def loss_config(args: argparse.Namespace, default_loss: str = "baseline") -> dict:
    """The resolved loss settings of ``--loss`` (``default_loss`` when not given: on resume, the run's
    methods) and ``--loss-cfg``, with the PLB paper's shorthands applied."""
    spec = default_loss if args.loss is None else args.loss
    for flag, method in ((args.plb, "plb"), (args.scb_rpn, "scb")):
        names = parse_loss_names(spec)
        if flag and method not in names:  # the shorthand adds its method (a mode in spec keeps its settings)
            spec = f"{spec}+{method}" if names else method
    config = load_loss_config(spec, args.loss_cfg)
    if args.plb:
        config["plb"]["rcnn_terms"] = parse_plb(args.plb)
    if args.plb_source:
        if "plb" not in config:
            raise LossConfigError("--plb-source needs PLB (--loss plb or --plb SWITCHES)")
        config["plb"]["source"] = args.plb_source
    if args.scb_rpn and "rpn_cls" not in config["scb"]["rcnn_terms"]:
        config["scb"]["rcnn_terms"] = [*config["scb"]["rcnn_terms"], "rpn_cls"]
    return config


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The flags with every run flag that is None given its default from ``cfg/defaults.yaml``."""
    defaults = {"data": "bccd.yaml", "device": "", "name": "train", "exist_ok": False, **run_defaults("faster_rcnn")}
    given = {k: v for k, v in vars(args).items() if v is not None}
    return argparse.Namespace(**{**vars(args), **defaults, **given})


def check_args(args: argparse.Namespace) -> CheckedRun:
    """A new run's settings (after ``fill_defaults``) with the data yaml's absolute path and the resolved loss,
    with the checked splits the engine trains on; a value no run could use is a ValueError naming the flag, a
    data yaml Ultralytics' own check refuses (or whose labels YOLO's ``train`` refuses) a DataError."""
    check_run_flags(args.epochs, args.imgsz, None, args.workers, args.fraction, args.seed)
    parse_process_device(args.device, torchrun_world_size())
    check_batch(args.batch)
    if args.lr_step < 1:
        raise ValueError(f"--lr-step {args.lr_step}: must be at least 1")
    check_architecture(args.backbone, args.imgsz)
    if args.warmup_iters < 0:
        raise ValueError(f"--warmup-iters {args.warmup_iters}: must not be negative")
    # torch refuses some of these only when the optimizer is built, after the run folder exists, and
    # takes others (a NaN lr, a growing StepLR factor) without a word
    for flag, value, ok, rule in (
        ("lr", args.lr, 0 < args.lr < math.inf, "must be positive and finite"),
        ("momentum", args.momentum, 0 <= args.momentum < 1, "must be in [0, 1)"),
        ("weight-decay", args.weight_decay, 0 <= args.weight_decay < math.inf, "must be non-negative and finite"),
        ("lr-gamma", args.lr_gamma, 0 < args.lr_gamma <= 1, "must be in (0, 1]"),
    ):
        if not ok:  # also for NaN, which fails every comparison
            raise ValueError(f"--{flag} {value}: {rule}")
    check_output_folder(args.project or DEFAULT_PROJECT, "--project")
    check_run_name(args.name)
    data, info = checked_data(args.data)
    check_weights(args.weights, args.backbone, info["nc"] + 1)
    config = loss_config(args)
    # YOLO's checks of the labels (last: the scan logs as it goes), so that data the engine would stop
    # on is the same one line in both families
    splits = check_training_splits(data)
    check_nwd_needs(config, first_fraction(splits.train, args.fraction), args.imgsz)
    return CheckedRun(argparse.Namespace(**{**vars(args), "data": data, "loss_config": config}), splits)


def check_batch(batch: int) -> None:
    """``--batch``: the images of a step over all torchrun processes, at least one each (no automatic -1 here);
    the engine would find too few only after the data scan and the model build."""
    processes = torchrun_world_size()
    if batch < processes:
        raise ValueError(f"--batch {batch}: must be at least 1" if processes == 1 else
                         f"--batch {batch}: must be at least the number of processes ({processes})")


def check_weights(weights: str, backbone: str, num_classes: int) -> None:
    """``--weights``: DEFAULT, none, or a checkpoint torchvision's Faster R-CNN can start from (this
    project's, or a plain state dict) with a tensor that fits ``backbone`` for ``num_classes`` (the
    data's classes and background); a YOLO checkpoint says which flag it belongs to."""
    if weights.upper() == "DEFAULT" or weights.lower() == "none":
        return
    if not Path(weights).is_file():
        raise ValueError(f"--weights {weights}: no such file (give a checkpoint path, DEFAULT or none)")
    try:
        ckpt = load_checkpoint(weights)
    except ValueError as e:
        raise DataError(flag_error("--weights", weights, e)) from e
    if is_yolo_checkpoint(ckpt):
        raise ValueError(f"--weights {weights} is a YOLO checkpoint: give it to YOLO as --model {weights} "
                         "(Faster R-CNN --weights takes a Faster R-CNN checkpoint or state dict)")
    check_weights_match(Path(weights), backbone, num_classes)


def check_resume_args(args: argparse.Namespace) -> CheckedRun:
    """A resumed run continues with its own settings (``engine.resumed_args``): a flag other than RESUMABLE
    that asks for another value than the run's is an error naming it, it must have epochs left to train and
    data Ultralytics' check accepts, and a loss given must be the run's own (in any order of methods). The
    checkpoint and the checked splits travel with the settings, so that ``fit`` reads neither again."""
    check_run_flags(workers=args.workers)  # torch refuses a negative one only when the resumed run starts
    parse_process_device(args.device, torchrun_world_size())
    check_resume_file(args.resume)
    resumed_run_folder(args.resume)  # the folder fit() continues in, before what the checkpoint holds
    checkpoint = read_resume_checkpoint(args.resume, RCNN_ARCH)
    try:
        given = {k: v for k, v in vars(args).items()
                 if v is not None and k not in (*RESUMABLE, *LOSS_FLAGS, "resume", "arch", "verbose")}
        check_resume_keeps_settings(given, checkpoint["train_args"], RESUMABLE)
        run = resumed_args(checkpoint, args)
    except (KeyError, TypeError) as e:
        raise DataError(f"--resume {args.resume}: not a Faster R-CNN training checkpoint (no {one_line(e)})") from e
    check_resume_is_latest(args.resume, checkpoint["epoch"])
    _, splits = check_resumed_data(args.resume, run.data)
    if checkpoint["num_classes"] != splits.data["nc"] + 1:  # torchvision counts the background as a class
        raise DataError(f"--resume {args.resume}: the run trained {checkpoint['num_classes'] - 1} classes and its data "
                        f"{run.data} now has {splits.data['nc']}")
    check_batch(run.batch)  # as many processes as the run started with, or others
    if any(getattr(args, k) is not None for k in LOSS_FLAGS):
        note = check_resumed_loss(checkpoint["loss"], loss_config(args, loss_name(checkpoint["loss"])),
                                  f"--resume {args.resume}")
        if note:
            LOGGER.info(note)
    return CheckedRun(run, splits, checkpoint)


def main(argv: list[str] | None = None, prog: str = "yolo-sizeloss train") -> int:
    """Entry point of ``yolo-sizeloss train --arch faster_rcnn`` and ``python -m yolo_sizeloss.rcnn.cli``
    (also under torchrun): a flag no run could use is a usage error naming it (exit 2), bad data exit
    1, before anything is written; the traceback only with ``--verbose``."""
    args = build_parser(prog).parse_args(argv)

    def check() -> CheckedRun:
        check_faster_coco_eval()  # each epoch's validation evaluates with it: refused before the first epoch
        return check_resume_args(args) if args.resume else check_args(fill_defaults(args))

    return run_guarded(prog, check, fit, args.verbose, RESUME_HINT)


if __name__ == "__main__":
    sys.exit(main())
