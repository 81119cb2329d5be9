"""The command line: ``yolo-sizeloss train|val|convert|path`` (``train.py`` and ``val.py`` are shims to it).

    yolo-sizeloss train --data bccd.yaml --loss feedback
    yolo-sizeloss train --data bccd.yaml --loss plb+scb --model yolo11n.yaml --epochs 100 cls=1.0
    yolo-sizeloss train --arch faster_rcnn --data bccd.yaml --loss plb
    yolo-sizeloss val --model runs/train/feedback/weights/best.pt --data bccd.yaml --split test
    yolo-sizeloss convert path/to/VOC out/ --classes RBC,WBC,Platelets
    yolo val model=runs/train/feedback/weights/best.pt data=$(yolo-sizeloss path bccd.yaml)

Trailing ``key=value`` pairs go to Ultralytics (``cls=2.0``, ``mosaic=0``). Every ordinary mistake
is one ``error:`` line before anything is written (``yolo_sizeloss.checks``).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg, parse_key_value_pair
from ultralytics.engine.trainer import BaseTrainer
from ultralytics.nn.tasks import yaml_model_load

from yolo_sizeloss import convert, validate
from yolo_sizeloss.checkpoints import RCNN_ARCH, checkpoint_kind, load_checkpoint, yolo_module
from yolo_sizeloss.checks import (
    RESUME_HINT,
    DataError,
    OneLineParser,
    after_path,
    check_data_yaml,
    check_detection_network,
    check_nwd_needs,
    check_output_folder,
    check_resume_is_latest,
    check_resume_keeps_settings,
    check_resumed_data,
    check_resumed_epochs,
    check_run_flags,
    check_run_name,
    check_training_splits,
    non_empty,
    one_line,
    parse_device,
    read_resume_checkpoint,
    resumed_run_folder,
    run_guarded,
    ultralytics_dropping,
)
from yolo_sizeloss.config import (
    ARCHS,
    check_resumed_loss,
    load_loss_config,
    loss_flag_help,
    loss_name,
    parse_loss_names,
    read_loss_record,
    run_defaults,
)
from yolo_sizeloss.detections import first_fraction
from yolo_sizeloss.methods.nwd import needs_training_boxes
from yolo_sizeloss.paths import resolve_shipped_file, run_data_path, shipped_variants
from yolo_sizeloss.rcnn import cli as rcnn_cli
from yolo_sizeloss.yolo.trainer import SizeAwareTrainer

RESUME_FLAGS = ("imgsz", "batch", "workers", "device", "epochs")  # what a resumed YOLO run can change
RUN_FLAGS = ("epochs", "imgsz", "batch", "workers", "seed", "fraction")  # defaults in cfg/defaults.yaml
FLAG_KEYS = {"model", "data", "project", "name", "exist_ok", "resume", *RUN_FLAGS, *RESUME_FLAGS}
FIXED_PAIRS = {  # Ultralytics arguments with the one value this command honours, and why
    "cfg": (None, "a settings file is not read by this command (stock Ultralytics reads it in its own `yolo "
                  "train`); give its settings as flags and key=value pairs"),
    "mode": ("train", "this command trains; yolo-sizeloss val validates"),
    "task": ("detect", "yolo-sizeloss trains detection models only"),
}
TRAIN_DESCRIPTION = """\
Train a detector with a size-aware loss: Ultralytics YOLO (default) or, with --arch faster_rcnn,
torchvision Faster R-CNN (its own flags: yolo-sizeloss train --arch faster_rcnn --help).

examples:
  yolo-sizeloss train --data bccd.yaml --loss safit_small_classes
  yolo-sizeloss train --data my.yaml --loss plb+scb --model yolo11n.yaml --epochs 100 cls=1.0
  yolo-sizeloss train --resume runs/train/nwd/weights/last.pt

Trailing key=value pairs go to Ultralytics. A mistake is one error line before anything is
written: exit 2 for a flag no run can use, 1 for data that cannot be used."""


def default_prog(command: str) -> str:
    """The program's name as the user typed it: ``train.py`` for the shim, else ``yolo-sizeloss COMMAND``."""
    name = Path(sys.argv[0]).name
    return name if name == f"{command}.py" else f"yolo-sizeloss {command}"


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    """Trailing ``key=value`` Ultralytics arguments; an unknown key or a word without '=' is a usage error."""
    parsed = {}
    for pair in pairs:
        if "=" not in pair or pair.startswith("=") or pair.endswith("="):
            raise ValueError(f"'{pair}': expected an Ultralytics argument as key=value (such as cls=2.0)")
        key, value = parse_key_value_pair(pair)
        if key not in DEFAULT_CFG_DICT:
            close = difflib.get_close_matches(key, DEFAULT_CFG_DICT, n=1)
            raise ValueError(f"'{pair}': '{key}' is not an Ultralytics argument"
                             + (f" (did you mean '{close[0]}'?)" if close else ""))
        if key in FLAG_KEYS:
            raise ValueError(f"'{pair}': use the --{key.replace('_', '-')} flag instead")
        if key in FIXED_PAIRS and value != FIXED_PAIRS[key][0]:
            raise ValueError(f"'{pair}': {FIXED_PAIRS[key][1]}")
        parsed[key] = value
    try:  # Ultralytics' own type and range check, which it would otherwise run after the run folder exists
        check_cfg(parsed)
    except (TypeError, ValueError) as e:
        raise ValueError(one_line(e)) from e
    if "optimizer" in parsed:
        check_optimizer(parsed["optimizer"])
    if isinstance(parsed.get("pretrained"), str):  # weights to start from, which Ultralytics would download
        weights = parsed["pretrained"]
        if Path(weights).suffix != ".pt" or not Path(weights).is_file():
            raise ValueError(f"'pretrained={weights}': give a local .pt checkpoint (nothing is downloaded) or True/False")
        parsed["pretrained"] = check_yolo_model(weights, f"'pretrained={weights}'")
    return parsed


class OneLayerModel(torch.nn.Module):
    """The smallest module shaped like an Ultralytics model (its layers in ``.model``): MuSGD's branch of
    ``build_optimizer`` reads the last layer."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.ModuleList([torch.nn.Linear(1, 1)])


def check_optimizer(name: Any) -> None:
    """Ultralytics' own optimizer lookup (``BaseTrainer.build_optimizer``, on a one-layer model), which
    the trainer runs only after the run folder exists. ``auto`` needs the trainer's data and is always valid."""
    if str(name).lower() == "auto":
        return
    try:
        with ultralytics_dropping(lambda record: True):  # its line naming the optimizer it built
            BaseTrainer.build_optimizer(None, OneLayerModel(), name=name)
    except NotImplementedError as e:
        raise ValueError(f"'optimizer={name}': {one_line(e).split(' Request support')[0]}") from None


def build_yolo_parser(prog: str = "yolo-sizeloss train") -> argparse.ArgumentParser:
    """The YOLO flags of ``train`` (run defaults from cfg/defaults.yaml apply to new runs)."""
    d = run_defaults("yolo")
    p = OneLineParser(prog=prog, description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, default="yolo", help="detector family (default yolo)")
    p.add_argument("--data", type=non_empty,
                   help="data yaml; a bare name is looked up among the package's (default bccd.yaml)")
    p.add_argument("--model", type=non_empty,
                   help="model yaml (trained from scratch) or a local .pt (default yolov8n.yaml)")
    p.add_argument("--loss", type=non_empty,
                   help=loss_flag_help())
    p.add_argument("--loss-cfg", type=non_empty,
                   help="a YAML file overriding the methods' settings, or a shipped variant: "
                        f"{', '.join(shipped_variants())}")
    for flag, kind in (("epochs", int), ("imgsz", int), ("batch", int), ("workers", int), ("seed", int),
                       ("fraction", float)):
        p.add_argument(f"--{flag}", type=kind, help=f"default {d[flag]}")
    p.add_argument("--device", help="cpu, mps, 0, 0,1 ... (default: the first GPU if any, else cpu)")
    p.add_argument("--project", type=non_empty, help="runs go to PROJECT/NAME (default runs/train)")
    p.add_argument("--name", help="run name (default: the loss name)")
    p.add_argument("--exist-ok", action="store_true", help="reuse PROJECT/NAME instead of NAME-2, NAME-3 ...")
    p.add_argument("--resume", type=non_empty, metavar="LAST_PT",
                   help="continue an interrupted run from its weights/last.pt "
                   f"(either family); only {', '.join('--' + k for k in RESUME_FLAGS)} and the key=value "
                   "pairs Ultralytics allows may change")
    p.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="further Ultralytics training arguments")
    return p


@dataclass(frozen=True)
class YoloRun:
    """A checked YOLO training request: Ultralytics' trainer overrides and the resolved loss settings
    (None: a resume that keeps its run's own)."""

    overrides: dict[str, Any]
    loss_config: dict[str, dict[str, Any]] | None


def check_yolo_resume(args: argparse.Namespace, ckpt: dict) -> None:
    """A resume continues the run's own settings: flags asking for another value than the run's are errors, and a
    finished run (whose last.pt Ultralytics stripped of its optimizer) cannot be continued."""
    try:
        epoch, trained_for, saved = ckpt["epoch"], ckpt["train_args"]["epochs"], ckpt["train_args"]
    except (KeyError, TypeError) as e:
        raise DataError(f"--resume {args.resume}: not an Ultralytics training checkpoint (no {one_line(e)})") from e
    given = {k: getattr(args, k) for k in ("model", "data", "project", "name", "seed", "fraction")
             if getattr(args, k) is not None}
    if args.exist_ok:
        given["exist_ok"] = True
    check_resume_keeps_settings(given, saved, RESUME_FLAGS)
    if epoch < 0 or ckpt.get("optimizer") is None:
        raise DataError(f"--resume {args.resume}: this run finished its {trained_for} epochs; to train on, start a "
                        f"new run from its weights (--model {Path(args.resume).parent / 'best.pt'})")
    check_resumed_epochs(args.epochs, epoch + 1)


def check_yolo_model(model: str, named: str | None = None) -> str:
    """``--model`` (or the argument messages call ``named``, such as ``--weights PATH``): a model yaml name
    or file, or a local YOLO ``.pt``; anything else is an error that names the argument."""
    named = named or f"--model {model}"
    if Path(model).suffix in (".yaml", ".yml"):
        try:  # Ultralytics' own lookup (yolov8n-p2.yaml is its yolov8-p2.yaml at scale n), here before any folder
            network = yaml_model_load(model)
        except FileNotFoundError:
            raise FileNotFoundError(f"{named}: no such file, nor one of Ultralytics' model yamls "
                                    "(such as yolov8n.yaml)") from None
        except Exception as e:  # a yaml it cannot read
            raise DataError(f"{named}: {one_line(e)}") from e
        if not {"backbone", "head"} <= set(network):  # Ultralytics would fail on it after making the run folder
            data = " (it reads as a data yaml: give it to --data)" if {"names", "train"} & set(network) else ""
            raise ValueError(f"{named}: not a model yaml, which names a backbone and a head{data}")
    elif Path(model).suffix != ".pt":
        raise ValueError(f"{named}: give a model yaml (such as yolov8n.yaml) or a local .pt checkpoint")
    elif not Path(model).is_file():
        raise FileNotFoundError(f"{named}: no such file (nothing is downloaded; give a local .pt or a yaml)")
    else:
        try:
            checkpoint = load_checkpoint(model)
            kind = checkpoint_kind(checkpoint, model)
        except ValueError as e:
            raise DataError(f"{named}: {after_path(e, model)}") from e
        if kind == RCNN_ARCH:
            raise ValueError(f"{named} is a Faster R-CNN checkpoint: train from it with --arch faster_rcnn "
                             f"--weights {model}, or continue its run with --resume")
        network = yolo_module(checkpoint)
    check_detection_network(network, named, "train trains")
    return str(Path(model).resolve()) if Path(model).is_file() else model


def check_resumed_imgsz(imgsz: int | None, trained: int | None, saved: dict | None) -> None:
    """A new ``--imgsz`` on resume (Ultralytics allows one) is refused where the run's ``nwd`` settings were
    resolved from its training boxes at the old size: resolved again, NWD's constant, its assigner or NWD
    itself could change mid-run, while the loss record says the loss is the same."""
    nwd = (saved or {}).get("nwd")
    if imgsz is not None and imgsz != trained and nwd is not None and needs_training_boxes(nwd):
        raise ValueError(f"--imgsz {imgsz}: the run's nwd settings were resolved from its boxes at imgsz {trained} "
                         "and a resume keeps them; start a new run to train at another size")


def check_yolo_request(args: argparse.Namespace) -> YoloRun:
    """Every check of a YOLO ``train`` request, in the order a user fixes them; nothing is written."""
    if args.loss is not None:
        parse_loss_names(args.loss)
    check_run_flags(args.epochs, args.imgsz, args.batch, args.workers, args.fraction, args.seed)
    parse_device(args.device)
    pairs = parse_pairs(args.overrides)
    given = {k: getattr(args, k) for k in (*RUN_FLAGS, *RESUME_FLAGS) if getattr(args, k) is not None}
    if args.resume:
        last = Path(args.resume).resolve()
        ckpt = read_resume_checkpoint(args.resume)
        check_yolo_resume(args, ckpt)
        check_resume_is_latest(args.resume, ckpt["epoch"])
        # Ultralytics would continue in the folder the checkpoint was first saved to, so a run folder moved
        # or copied elsewhere would write into the original (or make it again)
        run_dir = resumed_run_folder(args.resume)
        stored = ckpt["train_args"].get("data") or ""
        data, _ = check_resumed_data(args.resume, run_data_path(stored))
        saved = read_loss_record(run_dir)  # read again by the trainer, after it rewrote args.yaml
        loss_config = None
        if args.loss is not None or args.loss_cfg is not None:  # it must be the run's own loss; a --loss-cfg
            loss_config = load_loss_config(args.loss or loss_name(saved), args.loss_cfg)  # alone sets its settings
            check_resumed_loss(saved, loss_config, f"--resume {args.resume}")
        check_resumed_imgsz(args.imgsz, ckpt["train_args"].get("imgsz"), saved)
        overrides = {**pairs, **{k: given[k] for k in RESUME_FLAGS if k in given}, "resume": str(last),
                     "model": str(last), "save_dir": str(run_dir)}
        if data != stored:  # the shipped data of a package since moved (paths.run_data_path); the stock
            overrides["data"] = data  # resume takes a given data over the checkpoint's
        return YoloRun(overrides, loss_config)
    loss_config = load_loss_config(args.loss or "baseline", args.loss_cfg)
    model = check_yolo_model(args.model or "yolov8n.yaml")  # before the data scan, which logs as it goes
    project = args.project or "runs/train"
    check_output_folder(project, "--project")
    check_run_name(args.name)
    data = check_data_yaml(args.data or "bccd.yaml")
    splits = check_training_splits(data)
    settings = {**run_defaults("yolo"), **given}
    check_nwd_needs(loss_config, first_fraction(splits.train, settings["fraction"]), settings["imgsz"])
    overrides = {
        **pairs,
        **settings,
        "model": model,
        "data": data,
        "project": str(Path(project).expanduser().resolve()),  # `--project=~/x` is not expanded by the shell
        "name": args.name or args.loss or "baseline",
        "exist_ok": args.exist_ok,
    }
    return YoloRun(overrides, loss_config)


def train_yolo(run: YoloRun) -> None:
    """Train as the checked request says."""
    SizeAwareTrainer.with_loss(run.loss_config or {})(overrides=run.overrides).train()


def is_faster_rcnn_request(argv: list[str]) -> bool:
    """``--arch faster_rcnn``, or ``--resume`` of a Faster R-CNN checkpoint (which knows its family)."""
    peek = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    peek.add_argument("--arch")
    peek.add_argument("--resume")
    try:
        known = peek.parse_known_args(argv)[0]
    except argparse.ArgumentError:  # a flag without its value: the YOLO parser says so, in one line
        return False
    if known.arch is not None:
        return known.arch == RCNN_ARCH
    if known.resume and Path(known.resume).is_file():
        try:
            return load_checkpoint(known.resume).get("arch") == RCNN_ARCH
        except ValueError:
            return False  # the YOLO path reports an unreadable checkpoint
    return False


def train_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``yolo-sizeloss train`` / ``train.py``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    prog = prog or default_prog("train")
    if is_faster_rcnn_request(argv):
        return rcnn_cli.main(argv, prog)
    args = build_yolo_parser(prog).parse_args(argv)
    return run_guarded(prog, lambda: check_yolo_request(args), train_yolo, args.verbose, RESUME_HINT)


def val_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``yolo-sizeloss val`` / ``val.py``; returns the exit code."""
    return validate.main(argv, prog or default_prog("val"))


def convert_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``yolo-sizeloss convert`` (``python -m yolo_sizeloss.convert``); returns the exit code."""
    return convert.main(argv, prog or "yolo-sizeloss convert")


def path_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``yolo-sizeloss path NAME``: the absolute path of a file the package ships (the BCCD data yaml, a
    loss-settings variant), for stock commands that need a path: ``yolo val data=$(yolo-sizeloss path bccd.yaml)``."""
    prog = prog or "yolo-sizeloss path"
    p = OneLineParser(prog=prog, description="Print the absolute path of a file the package ships, for stock "
                                             "commands that need a path.")
    p.add_argument("name", help=f"bccd.yaml, or a loss-settings variant: {', '.join(shipped_variants())}")
    args = p.parse_args(argv)
    return run_guarded(prog, lambda: resolve_shipped_file(args.name), print, verbose=False)


COMMANDS = {  # name: (entry point, what it does, for ``yolo-sizeloss --help``)
    "train": (train_main, "train YOLO (or Faster R-CNN) with a size-aware loss"),
    "val": (val_main, "small-object report of a checkpoint; --compare runs with paired intervals"),
    "convert": (convert_main, "convert a Pascal VOC data set into YOLO format"),
    "path": (path_main, "print the absolute path of a shipped file (bccd.yaml, a loss variant)"),
}


def usage() -> str:
    """``yolo-sizeloss --help``: the commands, one line each."""
    lines = ["usage: yolo-sizeloss COMMAND [options]   (yolo-sizeloss COMMAND --help)", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``yolo-sizeloss COMMAND ...``: dispatch to the command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        entry, _ = COMMANDS[argv[0]]
        return entry(argv[1:], f"yolo-sizeloss {argv[0]}")
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv:
        print(f"yolo-sizeloss: error: unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)}; "
              "yolo-sizeloss --help)", file=sys.stderr)
    else:
        print(usage(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
