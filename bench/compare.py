"""Train each loss mode with identical seeds, schedule and data; evaluate on the test split; tabulate.

    python bench/compare.py --preset cpu                      # five YOLO modes, one seed, ~2 h on 2 cores
    python bench/compare.py --preset full --device 0          # GPU: three seeds, a paper-like schedule
    python bench/compare.py --losses baseline plb --seeds 0 1 --epochs 30 --out bench/mine
    python bench/compare.py --arch faster_rcnn --plb-sets none 1C,1B --epochs 15
    python bench/compare.py --losses plb --loss-cfg bench/gt_areas.yaml     # run label plb-gt_areas

Each run trains with train.py into OUT/runs/<mode>-s<seed> and is evaluated with val.py (split
test) into OUT/val/<mode>-s<seed>. It resumes: a run whose metrics.json exists is not trained or
evaluated again, and an interrupted training continues from its last.pt. Writes OUT/results.md (mean
and spread over seeds), OUT/results.json and OUT/results.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from yolo_sizeloss.config import LossConfigError, parse_loss_names

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    "cpu": dict(losses=["baseline", "feedback", "scb", "plb", "gradlibra"], seeds=[0], epochs=20, imgsz=416, batch=16),
    "full": dict(losses=["baseline", "feedback", "scb", "plb", "gradlibra", "plb+scb"], seeds=[0, 1, 2], epochs=100,
                 imgsz=416, batch=16),
}
# (label, path into metrics.json); per-class AP is read from per_class.Platelets
COLUMNS = [
    ("mAP50-95", ("ultralytics", "mAP50-95")),
    ("AP orig", ("coco", "original", "ap")),
    ("APs orig", ("coco", "original", "ap_small")),
    ("APm orig", ("coco", "original", "ap_medium")),
    ("APl orig", ("coco", "original", "ap_large")),
    ("APs input", ("coco", "input", "ap_small")),
    ("APm input", ("coco", "input", "ap_medium")),
    ("APl input", ("coco", "input", "ap_large")),
    ("Platelets AP", ("per_class", "Platelets", "ap")),
    ("R small@0.1", ("recall_by_size", "0.1", "small", "recall")),
    ("R small@0.3", ("recall_by_size", "0.3", "small", "recall")),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--arch", choices=("yolo", "faster_rcnn"), default="yolo")
    p.add_argument("--losses", nargs="+", help="YOLO modes (default: the preset's)")
    p.add_argument("--loss-cfg", help="train.py --loss-cfg for every YOLO mode; labels get '-<file stem>'")
    p.add_argument("--plb-sets", nargs="+", default=["none", "1C,1B"], help="Faster R-CNN PLB switch sets")
    p.add_argument("--model", default="yolov8n.yaml", help="YOLO model yaml or local .pt")
    p.add_argument("--backbone", default="mobilenet_v3_large_fpn", help="Faster R-CNN backbone")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--imgsz", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default="bccd.yaml")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.arch == "faster_rcnn" and args.batch is None:
        args.batch = 4  # the paper's batch
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for loss in args.losses:  # a typo fails now, not after hours of earlier runs
        try:
            parse_loss_names(loss)
        except LossConfigError as e:
            p.error(str(e))
    return args


def runs_of(args) -> list[tuple[str, list[str]]]:
    """(mode label, the train.py flags that select it) for every mode to compare."""
    if args.arch == "yolo":
        variant = ["--loss-cfg", str(Path(args.loss_cfg).resolve())] if args.loss_cfg else []
        suffix = f"-{Path(args.loss_cfg).stem}" if args.loss_cfg else ""
        return [(loss + suffix, ["--loss", loss, "--model", args.model, *variant]) for loss in args.losses]
    return [(f"rcnn-{'stock' if s == 'none' else 'plb' + s.replace(',', '+')}",
             ["--arch", "faster_rcnn", "--backbone", args.backbone, *([] if s == "none" else ["--plb", s])])
            for s in args.plb_sets]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def train_and_validate(args, label: str, flags: list[str], seed: int, out: Path) -> dict:
    """Train one (mode, seed) unless done, evaluate it on the test split; return its report."""
    name = f"{label}-s{seed}"
    metrics, run_dir = out / "val" / name / "metrics.json", out / "runs" / name
    check_same_schedule(run_dir, args, seed)
    if metrics.is_file():
        return run_report(metrics, run_dir)
    best, last = run_dir / "weights" / "best.pt", run_dir / "weights" / "last.pt"
    device = ["--device", args.device] if args.device is not None else []
    unfinished = len(_results(run_dir)) < args.epochs  # also when results.csv is missing
    if unfinished or not best.is_file():
        if last.is_file() and unfinished:
            run([sys.executable, "train.py", *flags[:2], "--resume", str(last)])
        else:
            run([sys.executable, "train.py", *flags, "--data", args.data, "--epochs", str(args.epochs),
                 "--imgsz", str(args.imgsz), "--batch", str(args.batch), "--workers", str(args.workers),
                 "--seed", str(seed), "--project", str(out / "runs"), "--name", name, "--exist-ok", *device])
    run([sys.executable, "val.py", "--model", str(best), "--data", args.data, "--split", "test",
         "--imgsz", str(args.imgsz), "--project", str(out / "val"), "--name", name, "--exist-ok", *device])
    return run_report(metrics, run_dir)


def check_same_schedule(run_dir: Path, args, seed: int) -> None:
    """Refuse to reuse a run trained with another schedule (its args.yaml); another --out keeps both."""
    saved = run_dir / "args.yaml"
    if not saved.is_file():
        return
    trained = yaml.safe_load(saved.read_text())
    wanted = {"epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch, "seed": seed}
    differ = [f"{k} {trained.get(k)} (asked {v})" for k, v in wanted.items() if trained.get(k) != v]
    if differ:
        raise SystemExit(f"{run_dir} was trained with {', '.join(differ)}: use another --out")


def run_report(metrics: Path, run_dir: Path) -> dict:
    """val.py's report of one run, with its training time per epoch (key ``train``)."""
    epoch_times = _epoch_seconds(run_dir)
    mean = statistics.mean(epoch_times) if epoch_times else None
    return {**json.loads(metrics.read_text()), "train": {"epochs": len(epoch_times), "seconds_per_epoch": mean}}


def _results(run_dir: Path) -> list[dict]:
    path = run_dir / "results.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]


def _epoch_seconds(run_dir: Path) -> list[float]:
    """Wall seconds of each epoch (training and validation), from results.csv's time column: seconds
    since training started, which restarts from 0 when a run is resumed (a drop marks that)."""
    times = [float(r["time"]) for r in _results(run_dir) if "time" in r]
    return [b - a if b >= a else b for a, b in zip([0.0, *times], times)]


def dig(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def summarise(per_mode: dict[str, list[dict]]) -> dict:
    """mean, spread (sample std, 0 for one seed) and values of every column, per mode."""
    summary = {}
    for label, reports in per_mode.items():
        row = {}
        for column, path in [*COLUMNS, ("s/epoch", ("train", "seconds_per_epoch"))]:
            values = [v for v in (dig(r, path) for r in reports) if v is not None]
            row[column] = {
                "mean": statistics.mean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
        summary[label] = row
    return summary


def markdown(summary: dict, args) -> str:
    columns = [c for c, _ in COLUMNS] + ["s/epoch"]
    scale = {c: (1 if c == "s/epoch" else 100) for c in columns}  # AP and recall in percent
    lines = [f"| mode | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for label, row in summary.items():
        cells = []
        for c in columns:
            m, s = row[c]["mean"], row[c]["std"]
            cells.append("n/a" if m is None else f"{m * scale[c]:.1f}" + (f" ± {s * scale[c]:.1f}" if len(row[c]["values"]) > 1 else ""))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    seeds = ", ".join(map(str, args.seeds))
    lines.append(f"\nAP and recall in percent on the test split; mean ± sample std over seeds {seeds}; "
                 f"{args.epochs} epochs, imgsz {args.imgsz}, batch {args.batch}. 'input' = areas in network-input pixels; "
                 "mAP50-95 is Ultralytics' validator's (YOLO only), 'AP orig' the COCO AP of either family.")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["mAP50-95", "APs input", "APm input", "APl input", "Platelets AP", "R small@0.3"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(len(summary), 1)
    for i, (label, row) in enumerate(summary.items()):
        means = [100 * (row[c]["mean"] or 0) for c in columns]
        stds = [100 * row[c]["std"] for c in columns]
        ax.bar([x + i * width for x in range(len(columns))], means, width, yerr=stds, label=label, capsize=2)
    ax.set_xticks([x + width * (len(summary) - 1) / 2 for x in range(len(columns))], columns)
    ax.set_ylabel("percent (test split)")
    ax.set_title("Size-aware losses on BCCD")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    per_mode = {}
    for label, flags in runs_of(args):
        per_mode[label] = [train_and_validate(args, label, flags, seed, out) for seed in args.seeds]
    summary = summarise(per_mode)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "summary": summary}, indent=2))
    (out / "results.md").write_text(markdown(summary, args))
    plot(summary, out / "results.png")
    print(markdown(summary, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
