"""Small-object validation report for a trained detector (project issue 4).

    python val.py --model runs/train/exp/weights/best.pt --data bccd.yaml [--split test] [--imgsz 416]
    python val.py --compare runs/val/exp runs/val/exp-2/metrics.json

Reports COCO AP/AR in the original and the network-input frame, AP per class, recall by size bucket
at confidence 0.01/0.1/0.3, and the stock Ultralytics validator's metrics; writes metrics.json,
metrics.md and size_metrics.png to ``--project/--name`` (default runs/val/exp, then exp-2, ... as Ultralytics names runs).

Detector dispatch lives in ``predict_records``: it turns a checkpoint into ``list[ImageRecord]``
(detections in original pixels) and everything after it is detector-agnostic.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import faster_coco_eval
import torch
import ultralytics
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.nn.tasks import guess_model_task
from ultralytics.utils.checks import check_imgsz
from ultralytics.utils.files import increment_path

from yolo_sizeloss.detections import ImageRecord, load_split
from yolo_sizeloss.evaluation import (
    COCO_EDGES,
    FRAMES,
    attach_coco_predictions,
    compare_report,
    evaluate_records,
    format_edge,
    format_report,
    letterbox_scales,
    parse_size_buckets,
    write_report,
)
from yolo_sizeloss.paths import resolve_data

ULTRALYTICS_KEYS = {  # stock validator stats key -> name in metrics.json "ultralytics"
    "metrics/precision(B)": "precision",
    "metrics/recall(B)": "recall",
    "metrics/mAP50(B)": "mAP50",
    "metrics/mAP50-95(B)": "mAP50-95",
    "metrics/mAP_small(B)": "mAP_small",
    "metrics/mAP_medium(B)": "mAP_medium",
    "metrics/mAP_large(B)": "mAP_large",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", help="checkpoint (.pt) to evaluate")
    parser.add_argument("--data", help="data yaml; a bare name such as bccd.yaml is looked up in cfg/")
    parser.add_argument("--split", default="test", help="split of the data yaml (default test)")
    parser.add_argument("--imgsz", type=int, help="network input size (default: the checkpoint's training size)")
    parser.add_argument("--batch", type=int, default=16, help="validation batch (rect batches: affects padding)")
    parser.add_argument("--device", default=None, help="cpu, 0, ... (default: Ultralytics' choice)")
    parser.add_argument("--conf", type=float, default=0.001, help="validator confidence threshold (default 0.001)")
    parser.add_argument("--iou", type=float, default=0.7, help="validator NMS IoU (default 0.7)")
    parser.add_argument(
        "--size-buckets",
        default=",".join(format_edge(e) for e in COCO_EDGES),
        help="bucket edges as box side lengths, e.g. 0,16,32,96,inf (default COCO 0,32,96,inf)",
    )
    parser.add_argument("--recall-frame", choices=FRAMES, default="input", help="frame of the recall buckets")
    parser.add_argument("--project", default="runs/val", help="output parent folder (default runs/val)")
    parser.add_argument("--name", default="exp", help="output folder name, incremented exp-2, exp-3, ...")
    parser.add_argument("--exist-ok", action="store_true", help="reuse --project/--name instead of incrementing")
    parser.add_argument("--compare", nargs="+", metavar="RUN", help="print val runs (folders or metrics.json) side by side")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    return parser.parse_args(argv)


def load_checkpoint(model_path: str | Path) -> dict:
    """The checkpoint dict of ``model_path``; ValueError when it is missing or not a readable checkpoint."""
    path = Path(model_path)
    if not path.is_file():
        raise ValueError(f"model file not found: {model_path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {model_path}: {e}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{model_path} is not a checkpoint dict (got {type(ckpt).__name__})")
    return ckpt


def checkpoint_kind(ckpt: dict, model_path: str | Path) -> str:
    """``"faster_rcnn"`` for this project's Faster R-CNN checkpoints (key ``arch``), ``"yolo"`` for
    Ultralytics checkpoints (an ``ema`` or ``model`` module); ValueError otherwise."""
    if ckpt.get("arch") == "faster_rcnn":
        return "faster_rcnn"
    if isinstance(ckpt.get("ema"), torch.nn.Module) or isinstance(ckpt.get("model"), torch.nn.Module):
        return "yolo"
    raise ValueError(f"{model_path} is neither an Ultralytics YOLO nor a Faster R-CNN checkpoint")


def predict_records(args: argparse.Namespace, save_dir: Path) -> tuple[list[ImageRecord], list[str], dict]:
    """Detections of ``args.model`` on ``args.split`` of ``args.data`` (val.py's parsed arguments):
    the dispatch point for detector families.

    Returns ``(records, names, meta)``: ``records`` from ``load_split`` with predictions filled in, in
    original image pixels; ``names`` the class names by index; ``meta`` a dict that must hold
    ``"detector"`` and ``"imgsz"`` (the network input side actually used, which defines the ``input``
    frame as imgsz / max(w, h)) and may hold ``"ultralytics"`` (stock validator metrics) and other
    settings, all of which land in metrics.json. ``save_dir`` is the report folder (the YOLO path
    keeps Ultralytics' own output in ``save_dir/ultralytics``).
    A new detector family adds a branch on ``checkpoint_kind``.
    """
    ckpt = load_checkpoint(args.model)
    if checkpoint_kind(ckpt, args.model) == "yolo":
        return predict_yolo(ckpt, args, args.imgsz or int(ckpt.get("train_args", {}).get("imgsz", 640)), save_dir)
    return predict_faster_rcnn(ckpt, args, args.imgsz or ckpt["imgsz"])


def predict_faster_rcnn(
    ckpt: dict, args: argparse.Namespace, imgsz: int
) -> tuple[list[ImageRecord], list[str], dict]:
    """Detections of this project's Faster R-CNN checkpoint (long image side resized to ``imgsz``)."""
    from yolo_sizeloss.rcnn import predict_records as predict_rcnn

    records = predict_rcnn(args.model, args.data, args.split, imgsz, args.device, batch=args.batch, conf=args.conf)
    names = [ckpt["names"][k] for k in sorted(ckpt["names"])]
    meta = {"detector": "faster_rcnn", "backbone": ckpt["backbone"], "imgsz": imgsz, "conf": args.conf}
    return records, names, meta


def predict_yolo(
    ckpt: dict, args: argparse.Namespace, imgsz: int, save_dir: Path
) -> tuple[list[ImageRecord], list[str], dict]:
    """Run Ultralytics' stock DetectionValidator (save_json=True) and read its predictions.json back."""
    module = ckpt["ema"] if isinstance(ckpt.get("ema"), torch.nn.Module) else ckpt["model"]
    task = guess_model_task(module)
    if task != "detect":
        raise ValueError(f"{args.model} is a '{task}' model; val.py evaluates detection models only")
    records, data_dict = load_split(args.data, args.split)
    names = [data_dict["names"][k] for k in range(len(data_dict["names"]))]
    stride = max(int(module.stride.max()), 32)  # as Ultralytics' AutoBackend
    input_size = check_imgsz(imgsz, stride=stride)

    sink: dict = {}
    metrics = YOLO(str(args.model)).val(
        validator=stats_keeping_validator(sink),
        data=resolve_data(args.data),
        split=args.split,
        imgsz=imgsz,
        batch=args.batch,
        conf=args.conf,
        iou=args.iou,
        device=args.device,
        save_json=True,
        plots=False,
        project=str(Path(save_dir).resolve()),
        name="ultralytics",
        exist_ok=True,
    )
    predictions_file = Path(metrics.save_dir) / "predictions.json"
    if predictions_file.is_file():  # absent when the model detected nothing at all
        category_to_class = {category: k for k, category in enumerate(sink["class_map"])}
        records = attach_coco_predictions(records, json.loads(predictions_file.read_text()), category_to_class)
    stats = sink.get("stats", metrics.results_dict)
    meta = {
        "detector": "yolo",
        "imgsz": input_size,
        "batch": args.batch,
        "conf": args.conf,
        "iou": args.iou,
        "ultralytics_dir": str(metrics.save_dir),
        "ultralytics": {name: float(stats[key]) for key, name in ULTRALYTICS_KEYS.items() if key in stats},
    }
    return records, names, meta


def stats_keeping_validator(sink: dict) -> type[DetectionValidator]:
    """The stock DetectionValidator, which also leaves its final stats (with faster-coco-eval's
    mAP_small/medium/large) and its class -> category_id map in ``sink``; ``YOLO.val`` drops both."""

    class StatsKeepingValidator(DetectionValidator):
        def eval_json(self, stats: dict) -> dict:
            stats = super().eval_json(stats)
            sink["stats"] = dict(stats)
            sink["class_map"] = list(self.class_map)
            return stats

    return StatsKeepingValidator


def versions() -> dict:
    """Versions of the libraries behind the numbers."""
    return {
        "ultralytics": ultralytics.__version__,
        "torch": torch.__version__,
        "faster_coco_eval": faster_coco_eval.__version__,
    }


def run_report(args: argparse.Namespace) -> Path:
    """Predict, evaluate and write the report of ``args``; return the output folder."""
    if not args.model or not args.data:
        raise ValueError("--model and --data are required (or use --compare)")
    edges = parse_size_buckets(args.size_buckets)
    save_dir = increment_path(Path(args.project) / args.name, exist_ok=args.exist_ok)
    records, names, meta = predict_records(args, save_dir)
    metrics = evaluate_records(records, names, letterbox_scales(records, meta["imgsz"]), edges, args.recall_frame)
    metrics["ultralytics"] = meta.pop("ultralytics", None)
    metrics["meta"] = {
        "model": str(args.model),
        "data": resolve_data(args.data),
        "split": args.split,
        **meta,
        **metrics["meta"],
        "versions": versions(),
    }
    metrics = {key: metrics[key] for key in ("coco", "per_class", "recall_by_size", "ultralytics", "meta")}
    write_report(metrics, save_dir)
    print("\n" + format_report(metrics))
    print(f"Report saved to {save_dir}")
    return save_dir


def main(argv: list[str] | None = None) -> int:
    """CLI entry: 0 on success, 1 with one ``error:`` line on stderr on failure (traceback with --verbose)."""
    args = parse_args(argv)
    try:
        if args.compare:
            print(compare_report(args.compare), end="")
        else:
            run_report(args)
    except Exception as e:
        if args.verbose:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
