"""The Python steps of bench/gpu.sh (one GPU benchmark run); bash only starts processes and waits.

    python bench/gpu.py subset OUT [--data bccd.yaml] [--images 8 4 8]
    python bench/gpu.py prepare [--data bccd.yaml]
    python bench/gpu.py progress WORK --start EPOCH_SECONDS
    python bench/gpu.py pack WORK OUT

- subset: a data yaml in OUT over the first N train, val and test images of --data (linked, not
  copied): the smoke run's data, small enough that validating every epoch costs nothing.
- prepare: print the versions the run uses and do, once, what the trainings started at once would
  each do and could race on: Ultralytics' settings file, matplotlib's font cache and Ultralytics'
  label caches of the data's splits (written beside the labels; a training that finds another
  one's half-written cache dies reading it).
- progress: one line per family from every run's results.csv under WORK/<family>/runs: runs
  finished and training, epochs done, seconds per epoch per run (median of each run's last 5
  epochs, then the median over runs), epochs per second over all runs, the time left, and the
  GPU's load where nvidia-smi answers.
- pack: write into OUT, one level deep, at most 8 files: summary.md (each run's epochs, seconds per
  epoch and state, per family), <family>_results.md, overhead.md, records.tar.gz (the small record
  of each run: args.yaml, loss.yaml, results.csv, the plots, and its val report with the detections
  file, plus results.json/png per family: enough to tabulate again with another --bootstrap) and
  logs.tar.gz (every harness's log). gpu.sh tees its own output to OUT/gpu.log.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

FAMILIES = ("yolo", "rcnn")
RUN_FILES = ("args.yaml", "loss.yaml", "results.csv", "results.png", "weighting.png")
VAL_FILES = ("metrics.json", "metrics.md", "detections.json.bz2", "size_metrics.png")
TABLE_FILES = ("results.md", "results.json", "results.png")
MAX_TAR_BYTES = 15 * 2**20  # under the 16 MiB a file that comes back from the GPU machine may have
RECENT_EPOCHS = 5


# ------------------------------------------------------------------------------------------- subset
def subset(data: str, out: Path, images: tuple[int, int, int]) -> Path:
    """Link the first ``images`` (train, val, test) of ``data``'s split folders, with their labels, into
    ``out``; return its data yaml."""
    from ultralytics.data.utils import IMG_FORMATS, check_det_dataset, img2label_paths

    from yolo_sizeloss.paths import resolve_data

    details = check_det_dataset(resolve_data(data))
    for split, count in zip(("train", "val", "test"), images):
        chosen = sorted(p for p in Path(details[split]).iterdir() if p.suffix[1:].lower() in IMG_FORMATS)[:count]
        for folder in ("images", "labels"):
            (out / folder / split).mkdir(parents=True, exist_ok=True)
        for image, label in zip(chosen, img2label_paths([str(p) for p in chosen])):
            (out / "images" / split / image.name).symlink_to(image.resolve())
            if Path(label).is_file():
                (out / "labels" / split / Path(label).name).symlink_to(Path(label).resolve())
    names = {int(k): str(v) for k, v in details["names"].items()}
    (out / "data.yaml").write_text(yaml.safe_dump({"path": str(out.resolve()), "train": "images/train",
                                                   "val": "images/val", "test": "images/test", "names": names}))
    return out / "data.yaml"


# ------------------------------------------------------------------------------------------ prepare
def prepare(data: str) -> None:
    import matplotlib.pyplot  # noqa: F401  builds matplotlib's font cache once
    import torch
    from ultralytics import __version__ as ultralytics_version
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from yolo_sizeloss.paths import resolve_data

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, ultralytics {ultralytics_version}, "
          + ", ".join(f"{name} {version_of(name)}" for name in ("torchvision", "faster_coco_eval", "polars", "numpy", "cv2")))
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    else:
        print("GPU: none (torch.cuda.is_available() is False)")
    started = time.perf_counter()
    details = check_det_dataset(resolve_data(data))  # also Ultralytics' font check, which tries a download
    print(f"Ultralytics' data check: {time.perf_counter() - started:.1f} s (each training and val makes it once)")
    for split in ("train", "val", "test"):
        if details.get(split):
            build_yolo_dataset(get_cfg(), details[split], 16, details, mode="train" if split == "train" else "val")


def version_of(module: str) -> str:
    try:
        return getattr(__import__(module), "__version__", "?")
    except ImportError:
        return "missing"


# ----------------------------------------------------------------------------------------- progress
def run_states(family_dir: Path) -> list[dict]:
    """Every run under ``family_dir/runs``: name, epochs done and asked, seconds of its recent epochs
    and of all of them, whether its val report exists."""
    states = []
    for run_dir in sorted(p for p in (family_dir / "runs").glob("*") if p.is_dir()):
        times = epoch_times(run_dir / "results.csv")
        args_file = run_dir / "args.yaml"
        epochs = yaml.safe_load(args_file.read_text()).get("epochs") if args_file.is_file() else None
        steps = [b - a for a, b in zip([0.0, *times], times) if b >= a]  # a resume restarts the clock: skip that
        states.append({
            "name": run_dir.name,
            "done": len(times),
            "epochs": epochs,
            "recent": statistics.median(steps[-RECENT_EPOCHS:]) if steps else None,
            "mean": statistics.mean(steps) if steps else None,
            "seconds": times[-1] if times else 0.0,
            "evaluated": (family_dir / "val" / run_dir.name / "metrics.json").is_file(),
        })
    return states


def epoch_times(path: Path) -> list[float]:
    """results.csv's time column (seconds since the run's start at the end of each epoch). Read here, not by
    ``yolo_sizeloss.results_csv.read_rows``: the progress step runs every few seconds beside the trainings, and
    importing the package imports torch and Ultralytics."""
    if not path.is_file():
        return []
    with open(path) as f:
        rows = [{str(k).strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    times = []
    for row in rows:
        try:
            times.append(float(row["time"]))
        except (KeyError, TypeError, ValueError):  # a row its training is writing now
            break
    return times


def family_line(family: str, states: list[dict]) -> str:
    """'yolo: 2 evaluated, 1 evaluating, 6 training, 0 starting, epochs 40-42/100, 2.61 s/epoch per run,
    3.40 epochs/s in all, about 150 s of training left'."""
    evaluated = [s for s in states if s["evaluated"]]
    trained = [s for s in states if not s["evaluated"] and s["epochs"] and s["done"] >= s["epochs"]]
    training = [s for s in states if not s["evaluated"] and s not in trained and s["recent"] is not None]
    starting = len(states) - len(evaluated) - len(trained) - len(training)
    line = (f"{family}: {len(evaluated)} evaluated, {len(trained)} evaluating, {len(training)} training, "
            f"{starting} starting")
    if training:
        per_run = statistics.median(s["recent"] for s in training)
        left = max(((s["epochs"] - s["done"]) * s["recent"] for s in training if s["epochs"]), default=0.0)
        line += (f", epochs {min(s['done'] for s in training)}-{max(s['done'] for s in training)}"
                 f"/{training[0]['epochs']}, {per_run:.2f} s/epoch per run, "
                 f"{sum(1 / s['recent'] for s in training if s['recent'] > 0):.2f} epochs/s in all, "
                 f"about {left:.0f} s of training left")
    return line


def gpu_load() -> str | None:
    """'GPU 63%, 21.3 GiB' from nvidia-smi, or None where there is none."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.split(",")
        return f"GPU {out[0].strip()}%, {float(out[1]) / 1024:.1f} GiB"
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def progress(work: Path, start: float) -> str:
    parts = [family_line(family, run_states(work / family)) for family in FAMILIES if (work / family / "runs").is_dir()]
    load = gpu_load()
    return f"[{time.time() - start:.0f} s] " + "; ".join((parts or ["no run folder yet"]) + ([load] if load else []))


# --------------------------------------------------------------------------------------------- pack
def summary(work: Path) -> str:
    """Markdown: per family, each run's epochs, seconds per epoch and state; then the throughput."""
    lines = ["# GPU run: throughput and state of each run", ""]
    for family in FAMILIES:
        states = run_states(work / family)
        if not states:
            continue
        lines += [f"## {family}", "", "| run | epochs | s/epoch (mean) | s/epoch (last 5, median) | training s | state |",
                  "|---|---|---|---|---|---|"]
        for s in states:
            state = "evaluated" if s["evaluated"] else ("trained, not evaluated" if s["epochs"] and s["done"] >= s["epochs"]
                                                        else "stopped before its last epoch")
            lines.append(f"| {s['name']} | {s['done']}/{s['epochs']} | {fmt(s['mean'])} | {fmt(s['recent'])} "
                         f"| {s['seconds']:.0f} | {state} |")
        means = [s["mean"] for s in states if s["mean"]]
        if means:
            lines += ["", f"{len(states)} runs, {sum(s['done'] for s in states)} epochs in all; per run "
                          f"{statistics.median(means):.2f} s/epoch (median of the runs' means), "
                          f"{sum(1 / m for m in means):.2f} epochs/s with all of them at once."]
        lines.append("")
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def add_tree(tar: tarfile.TarFile, root: Path, work: Path, skip_png: bool) -> None:
    """The small records of one family's folder: runs/*/RUN_FILES, val/*/VAL_FILES, TABLE_FILES."""
    chosen = [root / name for name in TABLE_FILES]
    chosen += [run / name for run in sorted((root / "runs").glob("*")) for name in RUN_FILES]
    chosen += [val / name for val in sorted((root / "val").glob("*")) for name in VAL_FILES]
    for path in chosen:
        if path.is_file() and not (skip_png and path.suffix == ".png"):
            tar.add(path, arcname=str(path.relative_to(work)))


def write_tar(path: Path, work: Path, folders: list[Path], skip_png: bool = False) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for folder in folders:
            if folder.name == "logs":
                for log in sorted(folder.glob("*")):
                    tar.add(log, arcname=str(log.relative_to(work)))
            else:
                add_tree(tar, folder, work, skip_png)


def pack(work: Path, out: Path) -> list[str]:
    """Write OUT's files (see the module docstring); return one line per file written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary(work))
    for family in FAMILIES:
        if (work / family / "results.md").is_file():
            shutil.copy(work / family / "results.md", out / f"{family}_results.md")
    if (work / "overhead.md").is_file():
        shutil.copy(work / "overhead.md", out / "overhead.md")
    families = [work / family for family in FAMILIES if (work / family).is_dir()]
    notes = []
    records = out / "records.tar.gz"
    write_tar(records, work, families)
    if records.stat().st_size > MAX_TAR_BYTES:
        write_tar(records, work, families, skip_png=True)
        notes.append(f"{records.name}: over {MAX_TAR_BYTES / 2**20:.0f} MiB with the plots, packed without them")
    if (work / "logs").is_dir():
        write_tar(out / "logs.tar.gz", work, [work / "logs"])
        if (out / "logs.tar.gz").stat().st_size > MAX_TAR_BYTES:
            notes.append("logs.tar.gz: over the size that comes back; read the logs in WORK instead")
    written = sorted(p for p in out.iterdir() if p.is_file())
    return [f"{p.name}: {p.stat().st_size / 1024:.0f} KiB" for p in written] + notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("subset")
    p.add_argument("out", type=Path)
    p.add_argument("--data", default="bccd.yaml")
    p.add_argument("--images", type=int, nargs=3, default=(8, 4, 8), metavar=("TRAIN", "VAL", "TEST"))
    p = sub.add_parser("prepare")
    p.add_argument("--data", default="bccd.yaml")
    p = sub.add_parser("progress")
    p.add_argument("work", type=Path)
    p.add_argument("--start", type=float, default=time.time(), help="the run's start, in seconds since the epoch")
    p = sub.add_parser("pack")
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.step == "subset":
        print(subset(args.data, args.out, tuple(args.images)))
    elif args.step == "prepare":
        prepare(args.data)
    elif args.step == "progress":
        print(progress(args.work, args.start), flush=True)
    else:
        print("\n".join(pack(args.work, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
