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


def build_yolo_parser() -> argparse.ArgumentParser:
    """The YOLO flags of train.py (defaults suit BCCD on a CPU)."""
    p = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, default="yolo", help="detector family (default yolo)")
    p.add_argument("--data", default="bccd.yaml", help="data yaml; a bare name is looked up in cfg/")
    p.add_argument("--model", default="yolov8n.yaml", help="model yaml (trained from scratch) or a local .pt")
    p.add_argument("--loss", type=_loss_spec, default="baseline",
                   help="baseline | feedback | scb | plb | gradlibra, or methods joined by '+' (plb+scb)")
    p.add_argument("--loss-cfg", help="YAML overriding the methods' settings in cfg/losses/")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--imgsz", type=int, default=416)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu, 0, 0,1 ... (default: first GPU if any, else cpu)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--project", default="runs/train", help="runs go to PROJECT/NAME (made absolute)")
    p.add_argument("--name", help="run name (default: the loss name)")
    p.add_argument("--exist-ok", action="store_true", help="reuse PROJECT/NAME instead of NAME-2, NAME-3 ...")
    p.add_argument("--resume", metavar="LAST_PT", help="continue an interrupted run from its weights/last.pt")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of the training images to use")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="further Ultralytics training arguments")
    return p


def yolo_overrides(args: argparse.Namespace) -> dict:
    """Ultralytics trainer overrides from train.py's flags (the loss settings travel separately)."""
    from ultralytics.cfg import parse_key_value_pair

    if args.resume:
        if not Path(args.resume).is_file():
            raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint")
        return {"resume": str(Path(args.resume).resolve()), "model": str(Path(args.resume).resolve())}
    model = args.model
    if model.endswith(".pt") and not Path(model).is_file():
        raise FileNotFoundError(f"--model {model}: no such file (nothing is downloaded; give a local .pt or a yaml)")
    overrides = dict(parse_key_value_pair(kv) for kv in args.overrides)
    overrides.update(
        model=str(Path(model).resolve()) if Path(model).is_file() else model,
        data=resolve_data(args.data),
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        workers=args.workers,
        seed=args.seed,
        project=str(Path(args.project).resolve()),
        name=args.name or args.loss,
        exist_ok=args.exist_ok,
        fraction=args.fraction,
    )
    if args.device is not None:
        overrides["device"] = args.device
    return overrides


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
        loss_config = {} if args.resume else load_loss_config(args.loss, args.loss_cfg)
    except (FileNotFoundError, LossConfigError, SyntaxError, ValueError) as e:
        parser.error(str(e))
    from yolo_sizeloss.yolo.trainer import SizeAwareTrainer

    SizeAwareTrainer.with_loss(loss_config)(overrides=overrides).train()
    return 0
