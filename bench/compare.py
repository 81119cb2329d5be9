"""Train each loss mode with identical seeds, schedule and data; evaluate on the test split (or --split); tabulate.

    python bench/compare.py --preset converged --device cpu --out bench/results/converged    # hours: resumable
    python bench/compare.py --preset converged --out bench/results/converged --status      # where it stands
    python bench/compare.py --preset cpu                      # five YOLO modes, one seed, 20 epochs
    python bench/compare.py --preset full --device 0          # GPU: three seeds, a paper-like schedule
    python bench/compare.py --preset gpu --device 0           # GPU: baseline, nwd, nwd:safit_small_classes; 3 seeds, 100 epochs
    python bench/compare.py --losses baseline feedback plb:gt_areas --seeds 0 1 --epochs 30 --out bench/mine
    python bench/compare.py --arch faster_rcnn --losses baseline plb --epochs 15

A mode is ``LOSS`` or ``LOSS:SETTINGS`` (``yolo-sizeloss train``'s --loss and --loss-cfg, for either
family; Faster R-CNN labels start with ``rcnn-``), optionally with ``@key=value,...``: a YOLO model
or Ultralytics arguments, for the peers a stock user would try (``baseline@cls_pw=1.0``,
``nwd:assigner_auto@model=yolov8n-p2.yaml``); a mode with a settings file is labelled
``LOSS-<file stem>`` (``plb:gt_areas`` -> ``plb-gt_areas``), and ``--loss-cfg FILE`` gives every
mode without its own file that one. The first mode is the reference (baseline in every preset): the
others' differences to it are paired by seed.

Each run trains with ``yolo-sizeloss train`` into OUT/runs/<mode>-s<seed> and is evaluated with
``yolo-sizeloss val`` (split test) into OUT/val/<mode>-s<seed>; ``--split val`` evaluates on val
into OUT/val-val/ and tabulates into results-val.*, for choosing between variants without the test
split. It resumes: an interrupted training continues from its last.pt, a run whose report exists is
not trained or evaluated again (a report without a detections file, from before val wrote one, is
evaluated again, which takes about a minute). A harness holds OUT/runs/<mode>-s<seed>.lock while it trains and evaluates that run: a
second harness on the same --out stops there with a one-line error, and --status says "training
now". Writes OUT/results.md, OUT/results.json and OUT/results.png: mean and spread over seeds per
mode; each mode's difference to the reference (the first of --losses) per seed, with mean and 95%
t-interval over seeds; and per seed the paired bootstrap interval over test images (``--bootstrap``
draws). ``--table NAME`` writes results-NAME.* instead: a table of some of OUT's modes, or against
another reference, beside OUT's own.

Several harnesses may share one OUT, each on its own (mode, seed) subset, to train at once (one GPU
fed by many dataloaders: ``bench/gpu.sh``): ``--only runs`` trains and evaluates without writing
the tables (each harness would overwrite them), and one last ``--only table`` call with every mode
and seed tabulates what is evaluated, training nothing; a (mode, seed) that is not evaluated is left
out of that mode only (each difference is paired by seed with the reference), and results.md says so.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from yolo_sizeloss.checkpoints import load_checkpoint
from yolo_sizeloss.cli import parse_pairs
from yolo_sizeloss.config import LossConfigError, load_loss_config, run_defaults
from yolo_sizeloss.detections import load_split
from yolo_sizeloss.detections_file import find_detections, load_detections
from yolo_sizeloss.paired import check_group_pattern, check_resamples, key_metrics, t_interval
from yolo_sizeloss.paired_report import (
    bootstrap_as_reported,
    difference_cell,
    load_metrics,
    unreproduced,
    unreproduced_note,
)
from yolo_sizeloss.paths import resolve_data, resolve_loss_cfg
from yolo_sizeloss.report import markdown_table
from yolo_sizeloss.results_csv import read_rows

ROOT = Path(__file__).resolve().parent.parent
# The installed command (the console script yolo-sizeloss is yolo_sizeloss.cli:main) run by this
# interpreter: the package and dependencies the harness itself imports, with no need for a
# yolo-sizeloss on PATH (which may be missing, or another environment's) nor for the checkout's
# train.py and val.py.
COMMAND = [sys.executable, "-m", "yolo_sizeloss.cli"]
PRESETS = {
    "cpu": dict(losses=["baseline", "feedback", "scb", "plb", "gradlibra"], seeds=[0], epochs=20, imgsz=416, batch=16),
    # 60 epochs on BCCD from scratch: past the stock baseline's steep rise (epoch ~40), a schedule
    # two cores train in about an hour (docs/results.md, converged schedule)
    "converged": dict(losses=["baseline", "feedback", "nwd"], seeds=[0, 1, 2], epochs=60,
                      imgsz=416, batch=16),
    "full": dict(losses=["baseline", "feedback", "scb", "plb", "gradlibra", "plb+scb"], seeds=[0, 1, 2], epochs=100,
                 imgsz=416, batch=16),
    # one GPU (bench/gpu.sh): the stock loss, the paper's NWD (what assigner_auto trains on BCCD) and the
    # recommended safit_small_classes, three seeds,
    # 100 epochs (past the CPU's converged 60, where the last epochs still added 1-2 points)
    "gpu": dict(losses=["baseline", "nwd", "nwd:safit_small_classes"], seeds=[0, 1, 2], epochs=100, imgsz=416, batch=16),
}
RCNN_SCHEDULE = ("lr", "lr_step")  # Faster R-CNN's flags that compare.py passes on (train's defaults when not given)


def columns(focus: str) -> list[tuple[str, str]]:
    """(column title, metric key of ``paired.key_metrics``) of the tables, ``focus`` the class of
    interest (its AP, and its own APs: COCO's APs averages the classes, and a rare class's handful of
    small boxes weighs as much there as every small box of the focus class); recall is of val's
    default first bucket, COCO small in the input frame."""
    return [
        ("mAP50-95", "ultralytics.mAP50-95"),
        ("AP", "coco.ap"),
        ("APs orig", "coco.original.ap_small"),
        ("APm orig", "coco.original.ap_medium"),
        ("APl orig", "coco.original.ap_large"),
        ("APs input", "coco.input.ap_small"),
        ("APm input", "coco.input.ap_medium"),
        ("APl input", "coco.input.ap_large"),
        (f"{focus} AP", f"per_class.{focus}.ap"),
        (f"{focus} APs input", f"per_class.{focus}.input.ap_small"),
        ("R small@0.1", "recall.small@0.1"),
        ("R small@0.3", "recall.small@0.3"),
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--arch", choices=("yolo", "faster_rcnn"), default="yolo")
    p.add_argument("--losses", nargs="+", help="modes, LOSS or LOSS:SETTINGS.yaml (default: the preset's; "
                                                 "Faster R-CNN: baseline plb)")
    p.add_argument("--loss-cfg", help="yolo-sizeloss train --loss-cfg for every mode without its own; "
                                      "labels get '-<file stem>'")
    p.add_argument("--model", default="yolov8n.yaml", help="YOLO model yaml or local .pt")
    p.add_argument("--backbone", default="mobilenet_v3_large_fpn", help="Faster R-CNN backbone")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--imgsz", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--fraction", type=float, help="train on the first fraction of the train split (default: all)")
    p.add_argument("--lr", type=float, help="Faster R-CNN's SGD learning rate (default: train's)")
    p.add_argument("--lr-step", type=int, help="Faster R-CNN's StepLR step in epochs (default: train's)")
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default="bccd.yaml")
    p.add_argument("--focus-class", help="class of interest for the tables (default: rarest in the training labels)")
    p.add_argument("--split", default="test", help="split the runs are evaluated on (default test; choose "
                   "between variants on val: its reports go to OUT/val-val/, its tables to results-val.*)")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap draws per seed (0: none)")
    p.add_argument("--group", metavar="REGEX", help="the bootstrap draws groups of images, each named by this regular "
                                                    "expression's match in the file names (val --compare --group)")
    p.add_argument("--status", action="store_true", help="print where each run stands; train nothing")
    p.add_argument("--only", choices=("runs", "table"), help="runs: train and evaluate, write no table; "
                                                             "table: tabulate what is evaluated, train nothing")
    p.add_argument("--table", metavar="NAME", help="write the tables as results-NAME.* (a comparison of some of "
                                                    "OUT's modes, another reference first, beside OUT's own tables)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.arch == "faster_rcnn":
        args.batch = args.batch or 4  # the paper's batch
        args.losses = args.losses or ["baseline", "plb"]
        # train's default, not None: a run folder trained at another --lr is then refused as it is when
        # --lr is given, instead of reused beside new modes trained at the default into one table
        defaults = run_defaults("faster_rcnn")
        for key in RCNN_SCHEDULE:
            if getattr(args, key) is None:
                setattr(args, key, defaults[key])
    elif any(getattr(args, key) is not None for key in RCNN_SCHEDULE):
        p.error("--lr and --lr-step are Faster R-CNN's (--arch faster_rcnn)")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # the train and val commands run in the repository root: a file given relative to this folder goes
    # to them as an absolute path; a name (bccd.yaml, yolov8n.yaml) stays a name for them to look up
    args.data, args.model = (str(Path(v).resolve()) if Path(v).is_file() else v for v in (args.data, args.model))
    try:  # a typo in a name or a settings file fails now, not after hours of earlier runs
        problem = data_choice_error(resolve_data(args.data), args.focus_class, args.split)
        check_resamples(args.bootstrap)
        check_group_pattern(args.group)
        args.modes = [loss_mode(spec, args.loss_cfg, args.arch) for spec in args.losses]
    except (LossConfigError, ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if problem:
        p.error(problem)
    return args


def data_choice_error(data: str, focus: str | None, split: str) -> str | None:
    """One line on a --focus-class that is not among the data yaml's names or a --split it does not
    define, else None. Otherwise a wrong split failed only at val, after the first mode trained, and a
    wrong focus class trained every mode and then tabulated n/a."""
    try:
        spec = yaml.safe_load(Path(data).read_text())
    except (OSError, yaml.YAMLError):
        return None  # train and val refuse an unreadable yaml in one line of their own
    if not isinstance(spec, dict):
        return None
    names = spec.get("names") or {}
    names = [str(name) for name in (names.values() if isinstance(names, dict) else names)]
    splits = [key for key in ("train", "val", "test", "minival") if spec.get(key)]  # what Ultralytics resolves
    if focus is not None and names and focus not in names:  # no names: train refuses the yaml itself
        return f"--focus-class {focus}: not a class of {data} (choose from {', '.join(names)})"
    if split not in splits:
        return f"--split {split}: {data} does not define it (choose from {', '.join(splits)})"
    return None


def loss_mode(spec: str, default_cfg: str | None, arch: str = "yolo") -> tuple[str, str, Path | None, dict]:
    """``LOSS[:SETTINGS][@key=value,...]`` -> (label, loss, settings file or None, extras), checked with
    the loss configuration. SETTINGS is a file (relative to the current folder) or a variant shipped
    in the package (``box_only``, ``gt_areas``). Extras are what a user of stock Ultralytics would
    try instead of a size-aware loss, for peer rows: ``model=yolov8n-p2.yaml`` (this mode's YOLO
    model) and Ultralytics training arguments (``cls_pw=1.0``), checked as ``train`` checks them; each
    extends the label (``baseline@cls_pw=1.0`` -> ``baseline-cls_pw1.0``)."""
    spec, _, extra_text = spec.partition("@")
    if extra_text and arch == "faster_rcnn":
        # none would be honoured: Faster R-CNN's train takes no key=value pairs (it failed when the mode was
        # reached, hours in) and is built from --backbone (a model= was dropped without a word)
        raise ValueError(f"{spec}@{extra_text}: @key=value extras are YOLO's (a model, Ultralytics arguments); "
                         "Faster R-CNN modes take none")
    loss, _, cfg = spec.partition(":")
    cfg = cfg or default_cfg
    path = resolve_loss_cfg(cfg) if cfg else None
    load_loss_config(loss, path)
    pairs = [pair for pair in extra_text.split(",") if pair]
    model = next((pair.split("=", 1)[1] for pair in pairs if pair.startswith("model=")), None)
    extras = parse_pairs([pair for pair in pairs if not pair.startswith("model=")])
    if model is not None:
        extras["model"] = str(Path(model).resolve()) if Path(model).is_file() else model
    label = "-".join([loss, *([path.stem] if path else []), *([Path(model).stem] if model else []),
                      *(f"{key}{value}" for key, value in extras.items() if key != "model")])
    return (f"rcnn-{label}" if arch == "faster_rcnn" else label), loss, path, extras


def runs_of(args) -> list[tuple[str, list[str]]]:
    """(mode label, the ``yolo-sizeloss train`` flags that select it) for every mode to compare, reference first."""
    runs = []
    for label, loss, cfg, extras in args.modes:
        model = extras.get("model", args.model)
        family = ["--model", model] if args.arch == "yolo" else ["--arch", "faster_rcnn", "--backbone", args.backbone]
        pairs = [f"{key}={value}" for key, value in extras.items() if key != "model"]
        runs.append((label, ["--loss", loss, *family, *(["--loss-cfg", str(cfg)] if cfg else []), *pairs]))
    return runs


def schedule_of(args, seed: int) -> dict:
    """The run settings a (mode, seed) is trained with, as its args.yaml records them: the flags
    given to ``train`` (``schedule_flags``) and what ``check_same_schedule`` compares."""
    schedule = {"epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch, "seed": seed}
    if args.fraction is not None:
        schedule["fraction"] = args.fraction
    return {**schedule, **{key: getattr(args, key) for key in RCNN_SCHEDULE if getattr(args, key, None) is not None}}


def schedule_flags(args, seed: int) -> list[str]:
    """``schedule_of`` as ``yolo-sizeloss train`` flags."""
    return [item for key, value in schedule_of(args, seed).items() for item in (f"--{key.replace('_', '-')}", str(value))]


def rarest_class(data: str) -> str:
    """The class with the fewest boxes in the data yaml's training labels (the first of a tie)."""
    records, data_dict = load_split(data, "train", progress=False)  # --status prints a table
    names = [data_dict["names"][k] for k in range(len(data_dict["names"]))]
    counts = np.bincount(np.concatenate([r.gt_classes for r in records]), minlength=len(names))
    return names[int(np.argmin(counts))]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}.lock"


def training_elsewhere(run_dir: Path) -> bool:
    """Whether a harness holds the run's lock (``run_lock``) now."""
    path = lock_path(run_dir)
    if not path.is_file():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold ``<run_dir>.lock`` while one process trains and evaluates the run. Two harnesses on one
    --out would otherwise both resume it from last.pt and interleave their epochs in one
    results.csv. An flock is released by the kernel when its holder dies, so a killed harness
    leaves no stale lock."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"{run_dir} is being trained by another process (it holds {path}); "
                             f"see --status, or wait for it") from None
        yield


def run_paths(out: Path, label: str, seed: int, split: str = "test") -> tuple[str, Path, Path]:
    """A (mode, seed)'s name, training folder and report folder on ``split`` (test: OUT/val/, another
    split OUT/val-<split>/, so that evaluating a run on val for a choice leaves its test report alone)."""
    name = f"{label}-s{seed}"
    return name, out / "runs" / name, out / ("val" if split == "test" else f"val-{split}") / name


def table_files(out: Path, split: str, name: str | None = None) -> tuple[Path, Path, Path]:
    """results.json, results.md and results.png of ``split``; another split than test adds ``-<split>``, a
    ``--table`` name ``-<name>`` before it (results-p2.md, results-p2-val.md)."""
    stem = "-".join(["results", *([name] if name else []), *([split] if split != "test" else [])])
    return out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"


def train_and_validate(args, label: str, flags: list[str], seed: int, out: Path) -> dict:
    """Train one (mode, seed) unless done, evaluate it on ``args.split``; return its report."""
    name, run_dir, val_dir = run_paths(out, label, seed, args.split)
    check_same_schedule(run_dir, args, seed, flags)
    if report_is_current(val_dir, args.bootstrap):
        return run_report(val_dir, run_dir)
    with run_lock(run_dir):
        best, last = run_dir / "weights" / "best.pt", run_dir / "weights" / "last.pt"
        device = ["--device", args.device] if args.device is not None else []
        finished = training_finished(run_dir, args.epochs)
        if not (finished and best.is_file()):
            if last.is_file() and not finished:
                # the run's own loss.yaml and args rule a resume: a loss flag without its settings file would differ
                arch = ["--arch", "faster_rcnn"] if args.arch == "faster_rcnn" else []
                # both families' resume takes these: where this harness runs, not how the run trains
                run([*COMMAND, "train", *arch, "--resume", str(last), "--workers", str(args.workers), *device])
            elif recorded := read_rows(run_dir / "results.csv"):
                # a record whose checkpoint is gone (the repository keeps records, not checkpoints): training
                # into the folder again would overwrite it
                missing = "best.pt" if finished else "last.pt"
                raise SystemExit(f"{run_dir}: {len(recorded)} epochs are recorded but weights/{missing} is "
                                 "missing (checkpoints are not kept with the results), so it can be neither "
                                 "evaluated nor resumed; train it into another --out")
            else:
                run([*COMMAND, "train", *flags, "--data", args.data, *schedule_flags(args, seed),
                     "--workers", str(args.workers), "--project", str(out / "runs"), "--name", name, "--exist-ok",
                     *device])
        run([*COMMAND, "val", "--model", str(best), "--data", args.data, "--split", args.split,
             "--imgsz", str(args.imgsz), "--project", str(val_dir.parent), "--name", name, "--exist-ok", *device])
        return run_report(val_dir, run_dir)


def evaluated_runs(args, out: Path) -> tuple[dict[str, dict[int, dict]], list[str]]:
    """``--only table``: the evaluated reports of every mode ({mode: {seed: report}}) and the (mode, seed)
    names not evaluated. A mode's figures are over its own evaluated seeds and its differences over the
    seeds it shares with the reference (the first mode): a seed one mode lacks stays in the others'. A mode
    with none is left out; the reference with none is an error."""
    per_mode, missing = {}, []
    for label, flags in runs_of(args):
        per_mode[label] = {}
        for seed in args.seeds:
            name, run_dir, val_dir = run_paths(out, label, seed, args.split)
            if not (val_dir / "metrics.json").is_file():
                missing.append(name)
                continue
            check_same_schedule(run_dir, args, seed, flags)
            per_mode[label][seed] = run_report(val_dir, run_dir)
    reference = next(iter(per_mode))
    if not per_mode[reference]:
        raise SystemExit(f"{out}: the reference {reference} has no seed evaluated (missing: {', '.join(missing)}); "
                         "nothing to tabulate")
    return {label: reports for label, reports in per_mode.items() if reports}, missing


def training_finished(run_dir: Path, epochs: int) -> bool:
    """Every epoch is in results.csv, or the training ended early: a stop by Ultralytics' patience
    leaves fewer rows and, as every finished YOLO run, a last.pt stripped of its optimizer."""
    if len(read_rows(run_dir / "results.csv")) >= epochs:  # also False when results.csv is missing
        return True
    best, last = run_dir / "weights" / "best.pt", run_dir / "weights" / "last.pt"
    return best.is_file() and last.is_file() and load_checkpoint(last).get("optimizer") is None


def report_is_current(val_dir: Path, bootstrap: int) -> bool:
    """A val report exists, with the detections file when a paired bootstrap is wanted."""
    return (val_dir / "metrics.json").is_file() and (bootstrap <= 0 or find_detections(val_dir) is not None)


def check_same_schedule(run_dir: Path, args, seed: int, flags: list[str] = ()) -> None:
    """Refuse to reuse a run trained with another schedule, data set, model or backbone (its
    args.yaml) than the (mode, seed) asks for with ``flags`` (``runs_of``); another --out keeps both."""
    saved = run_dir / "args.yaml"
    if not saved.is_file():
        return
    trained = {"fraction": 1.0, **yaml.safe_load(saved.read_text())}  # runs from before fraction was recorded
    wanted = {"fraction": 1.0, **schedule_of(args, seed)}
    differ = [f"{k} {trained.get(k)} (asked {v})" for k, v in wanted.items() if trained.get(k) != v]
    # paths are compared by their last two parts (cfg/bccd.yaml, aerial_cars_jekhor/data.yaml): a checkout
    # or an installed package moved since keeps its runs, another data set does not
    if trained.get("data") and Path(trained["data"]).parts[-2:] != Path(resolve_data(args.data)).parts[-2:]:
        differ.append(f"data {trained['data']} (asked {args.data})")
    model = flags[flags.index("--model") + 1] if "--model" in flags else None
    # a resumed YOLO run records its own last.pt as its model, which says nothing of the model it started from
    own = Path(str(trained.get("model")))
    resumed = own.name == "last.pt" and own.parent.name == "weights" and own.parent.parent.name == Path(run_dir).name
    if model and trained.get("model") and not resumed and Path(trained["model"]).name != Path(model).name:
        differ.append(f"model {trained['model']} (asked {model})")
    if args.arch == "faster_rcnn" and trained.get("backbone", args.backbone) != args.backbone:
        differ.append(f"backbone {trained['backbone']} (asked {args.backbone})")
    if differ:
        raise SystemExit(f"{run_dir} was trained with {', '.join(differ)}: use another --out")


def run_report(val_dir: Path, run_dir: Path) -> dict:
    """One run's compared metrics (``key_metrics`` of its val report), its report folder and its
    training time per epoch."""
    epoch_times = _epoch_seconds(run_dir)
    mean = statistics.mean(epoch_times) if epoch_times else None
    metrics = key_metrics(json.loads((val_dir / "metrics.json").read_text()))
    return {"metrics": metrics, "val_dir": str(val_dir), "train": {"epochs": len(epoch_times), "seconds_per_epoch": mean}}


def _epoch_seconds(run_dir: Path) -> list[float]:
    """Wall seconds of each epoch (training and validation), from results.csv's time column: seconds
    since training started; in a run resumed by an older trainer the clock restarted from 0 at the
    resume (a drop marks that)."""
    times = [float(r["time"]) for r in read_rows(run_dir / "results.csv") if "time" in r]
    return [b - a if b >= a else b for a, b in zip([0.0, *times], times)]


def status_lines(args, out: Path) -> list[str]:
    """Where each (mode, seed) stands: epochs in results.csv of the total, last.pt, the report, and the
    val split's best epoch (``best_epoch_note``)."""
    lines = [f"{out}: {args.epochs} epochs, imgsz {args.imgsz}, batch {args.batch}"]
    focus = args.focus_class or rarest_class(args.data)
    for label, _ in runs_of(args):
        for seed in args.seeds:
            name, run_dir, val_dir = run_paths(out, label, seed, args.split)
            done = len(read_rows(run_dir / "results.csv"))
            if (val_dir / "metrics.json").is_file():
                state = "evaluated" + ("" if find_detections(val_dir) else ", no detections file")
            elif training_finished(run_dir, args.epochs):
                state = "trained, not evaluated" + ("" if done >= args.epochs else ", stopped early")
            elif training_elsewhere(run_dir):
                state = "training now"
            elif (run_dir / "weights" / "last.pt").is_file():
                state = "unfinished, resumes from last.pt"
            else:
                state = "not started"
            lines.append(f"{name:<24} {done:>4}/{args.epochs} epochs  {state}{best_epoch_note(run_dir, focus)}")
    return lines


def best_epoch_note(run_dir: Path, focus: str) -> str:
    """The val split's verdict on a run, from its results.csv: the best epoch's mAP50-95 (the epoch
    best.pt holds, as fitness picks it: the last of equal maxima) and the focus class's AP50-95 there
    where the run logged it. What a choice between modes on val reads without the checkpoints."""
    rows = [r for r in read_rows(run_dir / "results.csv") if r.get("metrics/mAP50-95(B)")]
    if not rows:
        return ""
    best = max(reversed(rows), key=lambda r: float(r["metrics/mAP50-95(B)"]))
    note = f"; val best epoch {best['epoch']}: mAP50-95 {100 * float(best['metrics/mAP50-95(B)']):.1f}"
    focus_ap = best.get(f"val/AP50-95 {focus}")
    return note + (f", {focus} AP {100 * float(focus_ap):.1f}" if focus_ap else "")


def summarise(per_mode: dict[str, dict[int, dict]], cols: list[tuple[str, str]]) -> dict:
    """mean, spread (sample std, 0 for one seed) and values of every column, per mode, over its seeds."""
    summary = {}
    for label, reports in per_mode.items():
        row = {}
        for column, key in [*cols, ("s/epoch", None)]:
            values = [r["train"]["seconds_per_epoch"] if key is None else r["metrics"].get(key) for r in reports.values()]
            values = [v for v in values if v is not None]
            row[column] = {
                "mean": statistics.mean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
        summary[label] = row
    return summary


def seed_differences(per_mode: dict[str, dict[int, dict]], cols: list[tuple[str, str]]) -> dict:
    """Per mode after the reference (the first), per column: the difference to the reference of the
    same seed, over the seeds both have, and their mean with a 95% t-interval (``low``/``high`` None
    for one seed)."""
    reference, *others = per_mode
    result = {}
    for label in others:
        row = {}
        for column, key in cols:
            pairs = [(seed, r["metrics"].get(key), per_mode[reference][seed]["metrics"].get(key))
                     for seed, r in per_mode[label].items() if seed in per_mode[reference]]
            per_seed = {seed: v - b for seed, v, b in pairs if v is not None and b is not None}
            interval = t_interval(list(per_seed.values()))
            mean, low, high = interval or (next(iter(per_seed.values()), None), None, None)
            row[column] = {"per_seed": per_seed, "diff": mean, "low": low, "high": high,
                           "excludes_zero": interval is not None and (low > 0 or high < 0)}
        result[label] = row
    return result


def bootstrap_differences(per_mode: dict[str, dict[int, dict]], resamples: int,
                          group: str | None = None) -> tuple[dict, list[str]]:
    """Per seed of the reference, the paired bootstrap of every mode evaluated on that seed against it on
    the test images (``paired.paired_bootstrap``; ``group``: of the groups of images it names), for the
    modes whose report has a detections file: ``({mode: {seed: ...}}, runs)``, ``runs`` naming those whose
    file does not give back their report's figures (``paired_report.unreproduced``)."""
    reference, *others = per_mode
    result: dict[str, dict[int, dict]] = {label: {} for label in others}
    unreproduced_runs: list[str] = []
    for seed in per_mode[reference]:
        folders = {label: Path(reports[seed]["val_dir"]) for label, reports in per_mode.items() if seed in reports}
        with_files = [label for label in others if label in folders and find_detections(folders[label])]
        if not with_files or not find_detections(folders[reference]):
            continue
        labels = [reference, *with_files]
        runs = [load_detections(folders[label]) for label in labels]
        reports = [load_metrics(folders[label]) for label in labels]
        differences_by_mode = bootstrap_as_reported(reports[0], runs, resamples, seed=0, group=group)
        for label, differences in zip(with_files, differences_by_mode):
            result[label][seed] = differences
        found = unreproduced(reports, differences_by_mode, [f"{label} s{seed}" for label in labels])
        unreproduced_runs += [run for run in found if run not in unreproduced_runs]
    return result, unreproduced_runs


def markdown(summary: dict, differences: dict, bootstrap: dict, cols: list[tuple[str, str]], args,
             unreproduced_runs: list[str] = ()) -> str:
    titles = [c for c, _ in cols]
    lines = [markdown_table(["mode", *titles, "s/epoch"], [
        [label, *(_mean_std(row[c], 100) for c in titles), _mean_std(row["s/epoch"], 1)] for label, row in summary.items()
    ])]
    seeds = ", ".join(map(str, args.seeds))
    lines.append(f"\nAP and recall in percent on the {args.split} split; mean ± sample std over seeds {seeds}; "
                 f"{args.epochs} epochs, imgsz {args.imgsz}, batch {args.batch}. 'input' = areas in network-input pixels; "
                 "mAP50-95 is Ultralytics' validator's (YOLO only), 'AP' the COCO AP (faster-coco-eval) of either family. "
                 "s/epoch is each training's wall time as it ran, with whatever else shared the machine: "
                 "bench/overhead.py measures what a loss costs.")
    if getattr(args, "left_out", None):
        lines.append(f"\nNot evaluated when tabulated: {', '.join(args.left_out)}; each mode's figures are over its "
                     "evaluated seeds, its differences over the seeds it shares with the reference.")
    reference = next(iter(summary))
    if differences:
        lines += [f"\n### Difference to {reference}, paired by seed (percentage points)\n"]
        lines.append(markdown_table(["mode", *titles], [
            [label, *(difference_cell(row[c], 100, 1) for c in titles)] for label, row in differences.items()
        ]))
        lines.append(f"\nMean over seeds {seeds} of (mode - {reference}) on the same seed, [95% t-interval over seeds]; "
                     "* = the interval excludes 0. Per seed in results.json.")
    boot_rows = [[f"{label} s{seed}", *(difference_cell(d[key], 100, 1) if key in d else "n/a" for _, key in cols)]
                 for label, per_seed in bootstrap.items() for seed, d in per_seed.items()]
    if boot_rows:
        lines += [f"\n### Difference to {reference} per seed, paired bootstrap over {args.split} images (percentage points)\n"]
        lines.append(markdown_table(["mode, seed", *titles], boot_rows))
        drawn = f"the {args.split} images"
        if args.group is not None:
            drawn = f"the groups of {drawn} --group {args.group!r} names"
        lines.append(f"\n{args.bootstrap} draws of {drawn} with replacement (seed 0), both runs' metrics "
                     "recomputed on each draw from val's detections files; [95% percentile interval]; * = excludes 0. "
                     "mAP50-95 is Ultralytics' own and not recomputed.")
        if unreproduced_runs:
            lines.append(unreproduced_note(unreproduced_runs).rstrip())
    elif differences and args.bootstrap > 0:
        lines.append("\nNo paired bootstrap: the reports have no detections files.")
    return "\n".join(lines) + "\n"


def _mean_std(cell: dict, scale: float) -> str:
    """``mean ± std`` (``mean`` for one seed), scaled; ``n/a`` without values."""
    if cell["mean"] is None:
        return "n/a"
    return f"{cell['mean'] * scale:.1f}" + (f" ± {cell['std'] * scale:.1f}" if len(cell["values"]) > 1 else "")


def plot(summary: dict, focus: str, path: Path, split: str = "test") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = ["mAP50-95", "APs input", "APm input", "APl input", f"{focus} AP", "R small@0.3"]
    # a column no mode has (Faster R-CNN's mAP50-95: no Ultralytics validator) would read as bars at 0
    titles = [c for c in titles if any(row[c]["mean"] is not None for row in summary.values())]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(len(summary), 1)
    for i, (label, row) in enumerate(summary.items()):
        means = [100 * (row[c]["mean"] or 0) for c in titles]
        stds = [100 * row[c]["std"] for c in titles]
        ax.bar([x + i * width for x in range(len(titles))], means, width, yerr=stds, label=label, capsize=2)
    ax.set_xticks([x + width * (len(summary) - 1) / 2 for x in range(len(titles))], titles)
    ax.set_ylabel(f"percent ({split} split)")
    ax.set_title("Size-aware losses: mean ± std over seeds")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    if args.status:
        print("\n".join(status_lines(args, out)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    args.left_out = []
    if args.only == "table":
        per_mode, args.left_out = evaluated_runs(args, out)
    else:
        try:
            per_mode = {label: {seed: train_and_validate(args, label, flags, seed, out) for seed in args.seeds}
                        for label, flags in runs_of(args)}
        except subprocess.CalledProcessError as e:  # the command printed its own one-line error above
            raise SystemExit(f"compare.py: stopped: `{' '.join(map(str, e.cmd))}` failed (exit {e.returncode})") from None
        if args.only == "runs":
            return 0
    focus = args.focus_class or rarest_class(args.data)
    cols = columns(focus)
    summary = summarise(per_mode, cols)
    differences = seed_differences(per_mode, cols)
    bootstrap, unreproduced_runs = bootstrap_differences(per_mode, args.bootstrap, args.group) if args.bootstrap > 0 \
        else ({}, [])
    saved_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "modes"}
    json_file, md_file, png_file = table_files(out, args.split, args.table)
    json_file.write_text(json.dumps(
        {"args": saved_args, "focus_class": focus, "summary": summary, "differences": differences,
         "bootstrap": bootstrap, "unreproduced": unreproduced_runs}, indent=2))
    text = markdown(summary, differences, bootstrap, cols, args, unreproduced_runs)
    md_file.write_text(text)
    plot(summary, focus, png_file, args.split)
    print(text)
    return 0


if __name__ == "__main__":
    # Python dies of SIGTERM without unwinding, and subprocess.run then leaves its training running
    # into the run folder unseen; as SystemExit, subprocess.run stops the child first.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
