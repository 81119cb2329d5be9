"""``train.py``: train YOLO with a size-aware loss, or Faster R-CNN with PLB (``--arch faster_rcnn``).

    python train.py --data bccd.yaml --loss feedback
    python train.py --data bccd.yaml --loss plb+scb --model yolo11n.yaml --epochs 100 cls=1.0
    python train.py --arch faster_rcnn --data bccd.yaml --plb 1C,1B

Trailing ``key=value`` pairs go to Ultralytics as they are (``cls=2.0``, ``mosaic=0``); Ultralytics
checks them. The loss settings are saved as ``loss.yaml`` beside the run's ``weights/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from yolo_sizeloss.config import LossConfigError, load_loss_config, parse_loss_names
from yolo_sizeloss.paths import resolve_data

ARCHS = ("yolo", "faster_rcnn")


def _loss_spec(value: str) -> str:
    try:
        parse_loss_names(value)
    except LossConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


NEW_RUN_DEFAULTS = {"epochs": 50, "imgsz": 416, "batch": 16, "workers": 2, "seed": 0, "fraction": 1.0}
RESUME_FLAGS = ("imgsz", "batch", "workers", "device")  # what Ultralytics lets a resumed run change
FLAG_KEYS = {"model", "data", "project", "name", "exist_ok", "resume", *NEW_RUN_DEFAULTS, *RESUME_FLAGS}


def build_yolo_parser() -> argparse.ArgumentParser:
    """The YOLO flags of train.py (defaults suit BCCD on a CPU; those of NEW_RUN_DEFAULTS apply to new runs)."""
    p = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, default="yolo", help="detector family (default yolo)")
    p.add_argument("--data", default="bccd.yaml", help="data yaml; a bare name is looked up in cfg/")
    p.add_argument("--model", default="yolov8n.yaml", help="model yaml (trained from scratch) or a local .pt")
    p.add_argument("--loss", type=_loss_spec,
                   help="baseline (default) | feedback | scb | plb | gradlibra, or methods joined by '+' (plb+scb)")
    p.add_argument("--loss-cfg", help="YAML overriding the methods' settings in cfg/losses/")
    p.add_argument("--epochs", type=int, help="default 50")
    p.add_argument("--imgsz", type=int, help="default 416")
    p.add_argument("--batch", type=int, help="default 16")
    p.add_argument("--device", help="cpu, 0, 0,1 ... (default: first GPU if any, else cpu)")
    p.add_argument("--workers", type=int, help="default 2")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--project", default="runs/train", help="runs go to PROJECT/NAME (made absolute)")
    p.add_argument("--name", help="run name (default: the loss name)")
    p.add_argument("--exist-ok", action="store_true", help="reuse PROJECT/NAME instead of NAME-2, NAME-3 ...")
    p.add_argument("--resume", metavar="LAST_PT", help="continue an interrupted run from its weights/last.pt; "
                   "--imgsz, --batch, --workers, --device and key=value pairs that Ultralytics allows apply")
    p.add_argument("--fraction", type=float, help="fraction of the training images to use (default 1.0)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="further Ultralytics training arguments")
    return p


def yolo_overrides(args: argparse.Namespace) -> dict:
    """Ultralytics trainer overrides from train.py's flags and key=value pairs (the loss settings travel
    separately). A pair that names a flag's setting is an error, so that neither silently wins."""
    from ultralytics.cfg import parse_key_value_pair

    pairs = dict(parse_key_value_pair(kv) for kv in args.overrides)
    clash = sorted(FLAG_KEYS & pairs.keys())
    if clash:
        raise ValueError(f"'{clash[0]}={pairs[clash[0]]}': use train.py's --{clash[0].replace('_', '-')} flag instead")
    given = {k: getattr(args, k) for k in (*NEW_RUN_DEFAULTS, *RESUME_FLAGS) if getattr(args, k) is not None}
    if args.resume:
        if not Path(args.resume).is_file():
            raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint")
        last = str(Path(args.resume).resolve())
        return {**pairs, **{k: given[k] for k in RESUME_FLAGS if k in given}, "resume": last, "model": last}
    model = args.model
    if model.endswith(".pt") and not Path(model).is_file():
        raise FileNotFoundError(f"--model {model}: no such file (nothing is downloaded; give a local .pt or a yaml)")
    return {
        **pairs,
        **NEW_RUN_DEFAULTS,
        **given,
        "model": str(Path(model).resolve()) if Path(model).is_file() else model,
        "data": resolve_data(args.data),
        "project": str(Path(args.project).resolve()),
        "name": args.name or args.loss or "baseline",
        "exist_ok": args.exist_ok,
    }


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of train.py; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    arch = argparse.ArgumentParser(add_help=False)
    arch.add_argument("--arch", choices=ARCHS, default="yolo")
    if arch.parse_known_args(argv)[0].arch == "faster_rcnn":
        from yolo_sizeloss.rcnn import cli as rcnn_cli

        rcnn_cli.main(argv)
        return 0

    parser = build_yolo_parser()
    args = parser.parse_args(argv)
    try:
        overrides = yolo_overrides(args)
        # a resumed run keeps the loss in its loss.yaml; a --loss given with --resume is checked against it
        asked = args.loss or args.loss_cfg or not args.resume
        loss_config = load_loss_config(args.loss or "baseline", args.loss_cfg) if asked else {}
    except (FileNotFoundError, LossConfigError, SyntaxError, ValueError) as e:
        parser.error(str(e))
    from yolo_sizeloss.yolo.trainer import SizeAwareTrainer

    SizeAwareTrainer.with_loss(loss_config)(overrides=overrides).train()
    return 0
