"""Small-object validation report for a trained detector: ``yolo-sizeloss val`` (``val.py``).

    yolo-sizeloss val --model runs/train/exp/weights/best.pt --data bccd.yaml [--split test] [--imgsz 416]
    yolo-sizeloss val --compare runs/val/exp runs/val/exp-2/metrics.json
    yolo-sizeloss val --update runs/val/exp runs/val/exp-2

Reports COCO AP/AR in the original and the network-input frame, AP per class and per class and size,
recall by size bucket at confidence 0.01/0.1/0.3, box fit and confidence by size, and (YOLO) the stock
Ultralytics validator's metrics; writes metrics.json, metrics.md, size_metrics.png and
detections.json.bz2 (for paired comparisons) to ``--project/--name`` (default runs/val/exp, then exp-2,
... as Ultralytics names runs).

The images and boxes evaluated are those Ultralytics' validator evaluates (``check_split``); the
report says which were skipped and why. Detector dispatch lives in ``detections_for``: it fills a
split's ``ImageRecord`` list with a checkpoint's detections (original pixels), and everything after
it is detector-agnostic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import faster_coco_eval
import torch
import ultralytics
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.utils import DEFAULT_CFG, TQDM
from ultralytics.utils.checks import check_imgsz
from ultralytics.utils.files import increment_path

from yolo_sizeloss.checkpoints import RCNN_ARCH, checkpoint_kind, load_checkpoint, yolo_module
from yolo_sizeloss.checks import (
    DataError,
    OneLineParser,
    after_path,
    check_data_yaml,
    check_detection_network,
    check_output_folder,
    check_run_flags,
    check_run_name,
    flag_error,
    non_empty,
    one_line,
    parse_device,
    parse_process_device,
    run_guarded,
)
from yolo_sizeloss.detections import ImageRecord, SkippedLabels, check_split, split_summary
from yolo_sizeloss.detections_file import DETECTIONS_FILE, RunDetections, find_detections, load_detections, report_file
from yolo_sizeloss.evaluation import (
    COCO_EDGES,
    COCO_MAX_DET,
    FRAMES,
    attach_coco_predictions,
    check_faster_coco_eval,
    coco_image_index,
    evaluate_records,
    format_edge,
    letterbox_scales,
    parse_size_buckets,
)
from yolo_sizeloss.paired import check_group_pattern, check_resamples
from yolo_sizeloss.paired_report import compare_report, load_metrics
from yolo_sizeloss.paths import run_data_path
from yolo_sizeloss.rcnn.engine import predict_checkpoint
from yolo_sizeloss.rcnn.model import RCNN_NMS_IOU, check_imgsz as check_rcnn_imgsz
from yolo_sizeloss.report import format_report, write_metrics, write_report

KEPT_DETECTIONS = 300  # detections kept per image, as Ultralytics' validator (raised by a larger --max-det)
YOLO_NMS_IOU = DEFAULT_CFG.iou  # Ultralytics' validator's default
ULTRALYTICS_KEYS = {  # stock validator stats key -> name in metrics.json "ultralytics"
    "metrics/precision(B)": "precision",
    "metrics/recall(B)": "recall",
    "metrics/mAP50(B)": "mAP50",
    "metrics/mAP50-95(B)": "mAP50-95",
    "metrics/mAP_small(B)": "mAP_small",
    "metrics/mAP_medium(B)": "mAP_medium",
    "metrics/mAP_large(B)": "mAP_large",
}


class ValParser(OneLineParser):
    """One line for the train flag users carry over: the checkpoint names its own family."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments") and "--arch" in message.split():
            self.exit(2, f"{self.prog}: error: --arch is not needed: val reads the detector family from the checkpoint\n")
        super().error(message)


def build_parser(prog: str = "yolo-sizeloss val") -> argparse.ArgumentParser:
    """Command-line options."""
    parser = ValParser(prog=prog, description=" ".join(__doc__.split("\n\n")[0].replace("``", "").split()),
                       formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", type=non_empty, help="checkpoint (.pt) to evaluate")
    parser.add_argument("--data", type=non_empty,
                        help="data yaml; a bare name such as bccd.yaml is looked up in the package's cfg/ "
                             "(default: the data the checkpoint was trained on)")
    parser.add_argument("--split", type=non_empty, default="test", help="split of the data yaml (default test)")
    parser.add_argument("--imgsz", type=int, help="network input size (default: the checkpoint's training size)")
    parser.add_argument("--batch", type=int, default=16, help="validation batch (rect batches: affects padding)")
    parser.add_argument("--device", default=None, help="cpu, 0, ... (default: Ultralytics' choice)")
    parser.add_argument("--conf", type=float, default=0.001, help="validator confidence threshold (default 0.001)")
    parser.add_argument("--iou", type=float, help=f"NMS IoU (default {YOLO_NMS_IOU}, Ultralytics' validator's; "
                        f"Faster R-CNN: torchvision's {RCNN_NMS_IOU})")
    parser.add_argument("--max-det", type=int, default=COCO_MAX_DET,
                        help=f"COCO maxDets for AP/AR, above 10 (default {COCO_MAX_DET}); detections kept per image: "
                             f"the larger of this and {KEPT_DETECTIONS}. Raise it for images with over 100 objects")
    parser.add_argument(
        "--size-buckets",
        default=",".join(format_edge(e) for e in COCO_EDGES),
        help="bucket edges as box side lengths, e.g. 0,16,32,96,inf (default COCO 0,32,96,inf)",
    )
    parser.add_argument("--recall-frame", choices=FRAMES, default="input", help="frame of the recall buckets")
    parser.add_argument("--project", type=non_empty, default="runs/val", help="output parent folder (default runs/val)")
    parser.add_argument("--name", default="exp", help="output folder name, incremented exp-2, exp-3, ...")
    parser.add_argument("--exist-ok", action="store_true", help="reuse --project/--name instead of incrementing")
    parser.add_argument("--compare", nargs="+", metavar="RUN", help="print val runs (folders or metrics.json) side "
                        "by side, with paired bootstrap intervals of the differences to the first")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of the test images for --compare "
                        "(default 1000; 0: no intervals)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument("--group", metavar="REGEX", help="with --compare: draw groups of images, each named by this "
                        "regular expression's match in the file names, not single images (for images that are not "
                        "independent: a source image's tiles, a video's frames, a slide's fields)")
    parser.add_argument("--update", nargs="+", metavar="RUN", help="add to val runs (folders) written by an older "
                        "version the metrics added since, computed from their detections files; the figures they hold "
                        "are kept")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    return parser


@dataclass(frozen=True)
class ValRequest:
    """A checked ``val`` request: the flags, the data yaml's absolute path and the read checkpoint."""

    model: str
    data: str
    split: str
    imgsz: int | None
    batch: int
    device: str | None
    conf: float
    iou: float | None  # None: the family's own NMS IoU
    max_det: int
    size_buckets: str
    recall_frame: str
    project: str
    name: str
    exist_ok: bool
    checkpoint: dict
    kind: str  # the detector family the checkpoint belongs to


COMPARE_FLAGS = ("compare", "bootstrap", "seed", "group", "verbose")
UPDATE_FLAGS = ("update", "verbose")


def flags_besides(args: argparse.Namespace, allowed: tuple[str, ...]) -> list[str]:
    """The flags of ``args`` given other than their defaults, outside ``allowed``, as typed (``--max-det``)."""
    defaults = vars(build_parser().parse_args([]))
    return [f"--{k.replace('_', '-')}" for k, v in defaults.items() if k not in allowed and getattr(args, k) != v]


def check_args(args: argparse.Namespace) -> ValRequest | argparse.Namespace:
    """Usage errors (ValueError/FileNotFoundError) and data errors (DataError) before anything is
    written; the checked request (``--compare``, ``--update``: the flags as given)."""
    check_faster_coco_eval()  # every form of val evaluates
    # the runs' own reports fix their buckets, frame and max-det: a flag that would change them is not honoured
    if args.update:
        if ignored := flags_besides(args, UPDATE_FLAGS):
            raise ValueError(f"--update takes report folders only (each run's report sets the rest), not {ignored[0]}")
        for path in args.update:
            load_metrics(path)
            if not Path(path).is_dir() or find_detections(path) is None:
                raise FileNotFoundError(f"--update {path}: not a val report folder with its {DETECTIONS_FILE}")
        return args
    if args.compare:
        if ignored := flags_besides(args, COMPARE_FLAGS):
            raise ValueError(f"--compare takes --bootstrap, --seed and --group only (each run's report sets the rest), "
                             f"not {ignored[0]}")
        check_group_pattern(args.group)
        check_resamples(args.bootstrap)
        check_run_flags(seed=args.seed)
        for path in args.compare:
            if not report_file(path, "metrics.json").is_file():
                raise FileNotFoundError(f"--compare {path}: no metrics.json (give a folder val wrote, or its metrics.json)")
        return args
    if args.group is not None:
        raise ValueError("--group goes with --compare (it groups the images the bootstrap draws)")
    if not args.model:
        raise ValueError("--model is required (or use --compare)")
    for flag in ("imgsz", "batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} {value}: must be at least 1")
    if args.max_det <= 10:  # COCO's maxDets are 1, 10 and this
        raise ValueError(f"--max-det {args.max_det}: must be above 10")
    if not 0 <= args.conf < 1:
        raise ValueError(f"--conf {args.conf}: must be in [0, 1)")
    if args.iou is not None and not 0 < args.iou <= 1:
        raise ValueError(f"--iou {args.iou}: must be in (0, 1]")
    parse_size_buckets(args.size_buckets)
    parse_device(args.device)  # again below for a Faster R-CNN checkpoint, before the run folder
    check_output_folder(args.project, "--project")
    check_run_name(args.name)
    data = check_data_yaml(args.data) if args.data else None
    if not Path(args.model).is_file():  # a usage error, as train's --model
        raise FileNotFoundError(f"--model {args.model}: " + ("a folder; give a checkpoint file"
                                                             if Path(args.model).is_dir() else "no such file"))
    try:
        checkpoint = load_checkpoint(args.model)
        kind = checkpoint_kind(checkpoint, args.model)
    except ValueError as e:
        raise DataError(flag_error("--model", args.model, e)) from e
    if kind == RCNN_ARCH:
        parse_process_device(args.device, world_size=1)  # a checkpoint is evaluated by one process
        if args.imgsz is not None:  # YOLO's validator rounds a small one up; torchvision's model refuses it
            check_rcnn_imgsz(args.imgsz)
    else:
        check_detection_network(yolo_module(checkpoint), args.model, "val evaluates")
    data = data or training_data(checkpoint, args.model)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(ValRequest) if hasattr(args, f.name)}
    # `--project=~/x` reaches here unexpanded (the shell expands a ~ only at a word's start), and Ultralytics
    # would make a folder named '~' where check_output_folder checked the home folder
    project = str(Path(args.project).expanduser())
    return ValRequest(**{**flags, "project": project, "data": data, "checkpoint": checkpoint, "kind": kind})


def training_data(checkpoint: dict, model: str) -> str:
    """The data yaml a checkpoint was trained on (either family records it in ``train_args``; the shipped one
    of a package since moved, as a resume finds it): ``--data``'s default, as ``yolo val model=...`` takes
    the model's own data."""
    trained_on = (checkpoint.get("train_args") or {}).get("data")
    if not trained_on:
        raise ValueError(f"--model {model}: the checkpoint names no training data; give --data")
    try:
        return check_data_yaml(run_data_path(trained_on))
    except FileNotFoundError as e:  # a usage error, as a missing --data is
        raise FileNotFoundError(f"--model {model} was trained on {trained_on}, which is not there; give --data") from e
    except DataError as e:
        raise DataError(f"--model {model} was trained on {trained_on}, which cannot be used here "
                        f"({after_path(e, trained_on)}); give --data") from e


def detections_for(args: ValRequest, records: list[ImageRecord], save_dir: Path) -> tuple[list[ImageRecord], dict]:
    """Detections of the checked ``args.checkpoint`` on ``records`` (the split ``check_split`` gave),
    in original image pixels: the dispatch point for detector families.

    Returns ``(records, meta)``: ``meta`` must hold ``"detector"`` and ``"imgsz"`` (the network input
    side actually used, which defines the ``input`` frame as imgsz / max(w, h)) and may hold
    ``"ultralytics"`` (stock validator metrics) and other settings, all of which land in
    metrics.json. ``save_dir`` is the report folder (the YOLO path keeps Ultralytics' own output in
    ``save_dir/ultralytics``). A new detector family adds a branch on ``args.kind``.
    """
    if args.kind == RCNN_ARCH:
        return predict_faster_rcnn(args, records)
    return predict_yolo(args, records, save_dir)


def check_trained_names(args: ValRequest, names: list[str]) -> None:
    """Refuse a checkpoint trained for other classes than the data yaml names: its per-class and
    per-size figures would be computed against labels it never learnt."""
    trained = args.checkpoint["names"] if args.kind == RCNN_ARCH else getattr(yolo_module(args.checkpoint), "names", None)
    if isinstance(trained, dict):
        trained = [trained[k] for k in sorted(trained)]
    if trained is not None and list(trained) != names:
        raise DataError(f"{args.model}: trained for classes {list(trained)}, {args.data} names {names}")


def predict_faster_rcnn(args: ValRequest, records: list[ImageRecord]) -> tuple[list[ImageRecord], dict]:
    """Detections of this project's Faster R-CNN checkpoint (long image side resized to the input size)."""
    ckpt = args.checkpoint
    imgsz = args.imgsz or ckpt["imgsz"]
    iou = RCNN_NMS_IOU if args.iou is None else args.iou
    predicted = predict_checkpoint(ckpt, records, imgsz, args.device, batch=args.batch, conf=args.conf, iou=iou,
                                   max_det=max(args.max_det, KEPT_DETECTIONS))
    meta = {"detector": RCNN_ARCH, "backbone": ckpt["backbone"], "imgsz": imgsz, "conf": args.conf, "iou": iou}
    return predicted, meta


ULTRALYTICS_DIR = "ultralytics"  # the stock validator's own output, inside the report folder


def predict_yolo(args: ValRequest, records: list[ImageRecord], save_dir: Path) -> tuple[list[ImageRecord], dict]:
    """Run Ultralytics' stock DetectionValidator (save_json=True) and read its predictions.json back."""
    module = yolo_module(args.checkpoint)
    imgsz = args.imgsz or int(args.checkpoint.get("train_args", {}).get("imgsz", 640))
    stride = max(int(module.stride.max()), 32)  # as Ultralytics' AutoBackend
    input_size = check_imgsz(imgsz, stride=stride)

    iou = YOLO_NMS_IOU if args.iou is None else args.iou
    # the validator writes no predictions.json when it detects nothing: one left in a folder reused with
    # --exist-ok is an earlier report's
    (Path(save_dir) / ULTRALYTICS_DIR / "predictions.json").unlink(missing_ok=True)
    sink: dict = {}
    metrics = YOLO(str(args.model)).val(
        validator=stats_keeping_validator(sink),
        data=args.data,
        split=args.split,
        imgsz=imgsz,
        batch=args.batch,
        conf=args.conf,
        iou=iou,
        max_det=max(args.max_det, KEPT_DETECTIONS),
        device=args.device,
        save_json=True,
        plots=False,
        project=str(Path(save_dir).resolve()),
        name=ULTRALYTICS_DIR,
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
        "iou": iou,
        "ultralytics_dir": str(metrics.save_dir),
        "ultralytics": {name: float(stats[key]) for key, name in ULTRALYTICS_KEYS.items() if key in stats},
    }
    return records, meta


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


def skipped_meta(skipped: list[SkippedLabels]) -> list[dict]:
    """The skipped images and label rows as plain dicts for metrics.json."""
    return [dataclasses.asdict(s) for s in skipped]


def run_report(args: ValRequest) -> Path:
    """Predict, evaluate and write the report of the checked ``args``; return the output folder."""
    edges = parse_size_buckets(args.size_buckets)
    try:
        records, data, skipped = check_split(args.data, args.split)
    except (ValueError, FileNotFoundError) as e:  # the data's fault (no such split, no images), not a failure
        raise DataError(one_line(e)) from e
    names = [data["names"][k] for k in range(len(data["names"]))]
    check_trained_names(args, names)
    if args.kind != RCNN_ARCH:  # checked before the stock validator writes its output
        try:
            coco_image_index(records)
        except ValueError as e:
            raise DataError(f"--data {args.data}: split '{args.split}': {one_line(e)}") from e
    save_dir = increment_path(Path(args.project) / args.name, exist_ok=args.exist_ok)
    records, meta = detections_for(args, records, save_dir)
    scales = letterbox_scales(records, meta["imgsz"])
    metrics = evaluate_records(records, names, scales, edges, args.recall_frame, args.max_det)
    summary = split_summary(records, skipped)
    evaluated = metrics.pop("meta")
    metrics["ultralytics"] = meta.pop("ultralytics", None)
    metrics["meta"] = {
        "model": str(args.model),
        "data": args.data,
        "split": args.split,
        **meta,
        **evaluated,
        "skipped": skipped_meta(skipped),
        "skipped_summary": summary,
        "versions": versions(),
    }
    write_report(metrics, save_dir, RunDetections(records, scales, names))
    print("\n" + format_report(metrics))
    if summary:
        print(f"Skipped: {summary}")
    print(f"Report saved to {save_dir}")
    return save_dir


def updated_metrics(folder: str | Path) -> dict:
    """The report in ``folder`` with what ``evaluate_records`` computes and the report lacks (a report
    of an older version) added, from its detections file and with its own buckets, recall frame and
    max-det. Every figure the report holds is kept: it was computed from the model's own detections,
    which a detections file of an older version holds rounded."""
    metrics = load_metrics(folder)
    run = load_detections(folder)
    meta = metrics["meta"]
    edges = parse_size_buckets(",".join(meta["size_buckets"]))
    fresh = evaluate_records(run.records, run.names, run.input_scales, edges, meta["recall_frame"],
                             meta.get("max_det", COCO_MAX_DET))
    fill_missing(metrics, fresh)
    return metrics


def fill_missing(into: dict, source: dict) -> None:
    """Copy into ``into`` every key of ``source`` it lacks, at any depth of nested dicts."""
    for key, value in source.items():
        if key not in into:
            into[key] = value
        elif isinstance(into[key], dict) and isinstance(value, dict):
            fill_missing(into[key], value)


def main(argv: list[str] | None = None, prog: str = "yolo-sizeloss val") -> int:
    """``yolo-sizeloss val``: 0 on success; one error line and exit 2 (usage) or 1 (data, failure), the
    traceback only with --verbose."""
    args = build_parser(prog).parse_args(argv)

    def work(checked: ValRequest | argparse.Namespace) -> None:
        if isinstance(checked, ValRequest):
            run_report(checked)
        elif checked.update:
            # every report is read and computed before any is rewritten: a bad detections file in the
            # last folder leaves the first ones as they were
            updated = []
            for folder in TQDM(checked.update, desc="val --update", disable=len(checked.update) < 2, file=sys.stderr):
                updated.append(updated_metrics(folder))
            for folder, metrics in zip(checked.update, updated):
                write_metrics(metrics, folder)
                print(f"Updated {folder}")
        else:
            print(compare_report(checked.compare, bootstrap=checked.bootstrap, seed=checked.seed, group=checked.group),
                  end="")

    return run_guarded(prog, lambda: check_args(args), work, args.verbose)
