"""The command line: ``yolo-sizeloss train|val|convert`` (``train.py`` and ``val.py`` are shims to it).

    yolo-sizeloss train --data bccd.yaml --loss feedback
    yolo-sizeloss train --data bccd.yaml --loss plb+scb --model yolo11n.yaml --epochs 100 cls=1.0
    yolo-sizeloss train --arch faster_rcnn --data bccd.yaml --loss plb
    yolo-sizeloss val --model runs/train/feedback/weights/best.pt --data bccd.yaml --split test
    yolo-sizeloss convert path/to/VOC out/ --classes RBC,WBC,Platelets

Trailing ``key=value`` pairs go to Ultralytics (``cls=2.0``, ``mosaic=0``). Every ordinary mistake
is one ``error:`` line before anything is written: exit 2 for a bad flag, 1 for bad data; the
traceback only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any, Callable

from yolo_sizeloss.config import ARCHS, METHODS, load_loss_config, parse_loss_names, run_defaults
from yolo_sizeloss.paths import resolve_data

RESUME_FLAGS = ("imgsz", "batch", "workers", "device", "epochs")  # what a resumed YOLO run can change
RUN_FLAGS = ("epochs", "imgsz", "batch", "workers", "seed", "fraction")  # defaults in cfg/defaults.yaml
FLAG_KEYS = {"model", "data", "project", "name", "exist_ok", "resume", *RUN_FLAGS, *RESUME_FLAGS}


class DataError(Exception):
    """The data (a data yaml, its images or labels, a checkpoint) cannot be used; exit 1."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


def run_guarded(parser: argparse.ArgumentParser, check: Callable[[], Any], work: Callable[[Any], Any],
                verbose: bool) -> int:
    """Run ``work(check())``: a ValueError/LossConfigError/FileNotFoundError from ``check`` is a usage
    error (exit 2), a DataError exit 1, any failure of ``work`` exit 1; each one ``error:`` line, the
    traceback only when ``verbose``."""
    try:
        checked = check()
    except DataError as e:
        if verbose:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # LossConfigError is a ValueError
        if verbose:
            raise
        print(f"{parser.prog}: error: {one_line(e)}", file=sys.stderr)  # one line: --help shows the usage
        return 2
    try:
        work(checked)
    except Exception as e:
        if verbose:
            raise
        print(f"error: {one_line(e)} (--verbose shows the traceback)", file=sys.stderr)
        return 1
    return 0


def check_data_yaml(data: str) -> str:
    """The absolute path of a usable data yaml (Ultralytics' own check); DataError naming the file otherwise."""
    from ultralytics.data.utils import check_det_dataset

    path = resolve_data(data)
    try:
        check_det_dataset(path, autodownload=False)
    except Exception as e:
        raise DataError(f"{path}: {one_line(e)}") from e
    return path


def check_device(device: str | None) -> None:
    """Refuse a CUDA device this machine does not have (Ultralytics would fail after making the run folder)."""
    import torch

    spec = str(device or "").strip().lower().replace("cuda:", "")
    if spec in ("", "cpu", "mps", "-1"):
        return
    ids = [s.strip() for s in spec.split(",") if s.strip()]
    if not all(s.isdigit() for s in ids):
        raise ValueError(f"--device {device}: expected cpu, a CUDA index such as 0, or a list such as 0,1")
    count = torch.cuda.device_count()
    missing = [s for s in ids if int(s) >= count]
    if missing:
        raise ValueError(f"--device {device}: this machine has {count} CUDA device(s); use --device cpu"
                         if count == 0 else f"--device {device}: no CUDA device {missing[0]} (this machine has {count})")


def check_run_flags(args: argparse.Namespace) -> None:
    """Values no run could use, naming the flag."""
    for flag in ("epochs", "imgsz", "batch"):
        value = getattr(args, flag, None)
        if value is not None and value < 1 and not (flag == "batch" and value == -1):
            raise ValueError(f"--{flag} {value}: must be at least 1" + (" (or -1: auto)" if flag == "batch" else ""))
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise ValueError(f"--workers {args.workers}: must not be negative")
    if getattr(args, "fraction", None) is not None and not 0 < args.fraction <= 1:
        raise ValueError(f"--fraction {args.fraction}: must be in (0, 1]")
    check_device(args.device)


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    """Trailing ``key=value`` Ultralytics arguments; an unknown key or a word without '=' is a usage error."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, parse_key_value_pair

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
        parsed[key] = value
    return parsed


def build_yolo_parser() -> argparse.ArgumentParser:
    """The YOLO flags of ``train`` (run defaults from cfg/defaults.yaml apply to new runs)."""
    d = run_defaults("yolo")
    p = argparse.ArgumentParser(prog="yolo-sizeloss train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, default="yolo", help="detector family (default yolo)")
    p.add_argument("--data", help="data yaml; a bare name is looked up in the package's cfg/ (default bccd.yaml)")
    p.add_argument("--model", help="model yaml (trained from scratch) or a local .pt (default yolov8n.yaml)")
    p.add_argument("--loss", help=f"baseline (default), or methods joined by '+': {', '.join(METHODS)}")
    p.add_argument("--loss-cfg", help="YAML overriding the methods' settings, or a shipped variant (box_only, gt_areas)")
    for flag, kind in (("epochs", int), ("imgsz", int), ("batch", int), ("workers", int), ("seed", int),
                       ("fraction", float)):
        p.add_argument(f"--{flag}", type=kind, help=f"default {d[flag]}")
    p.add_argument("--device", help="cpu, 0, 0,1 ... (default: first GPU if any, else cpu)")
    p.add_argument("--project", help="runs go to PROJECT/NAME (made absolute; default runs/train)")
    p.add_argument("--name", help="run name (default: the loss name)")
    p.add_argument("--exist-ok", action="store_true", help="reuse PROJECT/NAME instead of NAME-2, NAME-3 ...")
    p.add_argument("--resume", metavar="LAST_PT", help="continue an interrupted run from its weights/last.pt; "
                   f"only {', '.join('--' + k for k in RESUME_FLAGS)} and key=value pairs Ultralytics allows apply")
    p.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="further Ultralytics training arguments")
    return p


def check_yolo_resume(args: argparse.Namespace) -> None:
    """A resume continues the run's own settings: flags it cannot honour are errors, and a finished run
    (whose last.pt Ultralytics stripped of its optimizer) cannot be continued."""
    import torch

    last = Path(args.resume)
    if not last.is_file():
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint")
    given = [k for k in ("model", "data", "project", "name", "seed", "fraction") if getattr(args, k) is not None]
    if args.exist_ok:
        given.append("exist_ok")
    if given:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in given)
        raise ValueError(f"--resume continues the run with its own settings; {flags} cannot change on resume "
                         f"(allowed: {', '.join('--' + k for k in RESUME_FLAGS)})")
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        epoch, trained_for = ckpt["epoch"], ckpt["train_args"]["epochs"]
    except Exception as e:
        raise DataError(f"--resume {args.resume}: not an Ultralytics training checkpoint ({one_line(e)})") from e
    if epoch < 0 or ckpt.get("optimizer") is None:
        raise DataError(f"--resume {args.resume}: this run finished its {trained_for} epochs; to train on, start a "
                        f"new run from its weights (--model {last.parent / 'best.pt'})")
    if args.epochs is not None and args.epochs <= epoch + 1:
        raise ValueError(f"--epochs {args.epochs}: the run has already trained {epoch + 1} epochs")


def yolo_overrides(args: argparse.Namespace) -> dict:
    """Ultralytics trainer overrides from the checked flags and key=value pairs (the loss travels separately)."""
    pairs = parse_pairs(args.overrides)
    given = {k: getattr(args, k) for k in (*RUN_FLAGS, *RESUME_FLAGS) if getattr(args, k) is not None}
    if args.resume:
        last = str(Path(args.resume).resolve())
        return {**pairs, **{k: given[k] for k in RESUME_FLAGS if k in given}, "resume": last, "model": last}
    model = args.model or "yolov8n.yaml"
    if model.endswith(".pt") and not Path(model).is_file():
        raise FileNotFoundError(f"--model {model}: no such file (nothing is downloaded; give a local .pt or a yaml)")
    return {
        **pairs,
        **run_defaults("yolo"),
        **given,
        "model": str(Path(model).resolve()) if Path(model).is_file() else model,
        "data": check_data_yaml(args.data or "bccd.yaml"),
        "project": str(Path(args.project or "runs/train").resolve()),
        "name": args.name or args.loss or "baseline",
        "exist_ok": args.exist_ok,
    }


def train_main(argv: list[str] | None = None) -> int:
    """``yolo-sizeloss train`` / ``train.py``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    arch = argparse.ArgumentParser(add_help=False)
    arch.add_argument("--arch", choices=ARCHS, default="yolo")
    if arch.parse_known_args(argv)[0].arch == "faster_rcnn":
        from yolo_sizeloss.rcnn import cli as rcnn_cli

        return rcnn_cli.main(argv)

    parser = build_yolo_parser()
    args = parser.parse_args(argv)

    def check() -> tuple[dict, dict]:
        if args.loss:
            parse_loss_names(args.loss)
        check_run_flags(args)
        if args.resume:
            check_yolo_resume(args)
        overrides = yolo_overrides(args)
        # a resumed run keeps the loss of its loss.yaml; a --loss given with --resume is checked against it
        asked = args.loss or args.loss_cfg or not args.resume
        return overrides, load_loss_config(args.loss or "baseline", args.loss_cfg) if asked else {}

    def train(checked: tuple[dict, dict]) -> None:
        from yolo_sizeloss.yolo.trainer import SizeAwareTrainer

        overrides, loss_config = checked
        SizeAwareTrainer.with_loss(loss_config)(overrides=overrides).train()

    return run_guarded(parser, check, train, args.verbose)


def val_main(argv: list[str] | None = None) -> int:
    """``yolo-sizeloss val`` / ``val.py``; returns the exit code."""
    from yolo_sizeloss.validate import main

    return main(argv)


def convert_main(argv: list[str] | None = None) -> int:
    """``yolo-sizeloss convert`` (``python -m yolo_sizeloss.convert``); returns the exit code."""
    from yolo_sizeloss.convert import main

    return main(argv)


COMMANDS = {"train": train_main, "val": val_main, "convert": convert_main}


def main(argv: list[str] | None = None) -> int:
    """``yolo-sizeloss COMMAND ...``: dispatch to train, val or convert."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: yolo-sizeloss {{{','.join(COMMANDS)}}} ... (yolo-sizeloss COMMAND --help)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
