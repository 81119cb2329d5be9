"""Time the size-aware loss against the stock Ultralytics loss on identical batches, in one process.

    python bench/overhead.py [--model yolov8n.yaml] [--imgsz 416] [--batch 16] [--repeats 10] [--device cpu]
                             [--threads 1] [--clock event|wall|cpu] [--modes MODE ...] [--sync-count] [--out FILE]

Two figures per mode, each the fastest of all samples over ``--repeats`` rounds (as ``timeit``
reports: the sample least disturbed by other work on the machine; the modes are interleaved within
each round, so drift hits them alike) and the ratio to stock; the clock is by default CUDA events on
a GPU (the time between two events recorded on the stream around the call, which counts the gaps in
which the GPU waits for the host to launch work) and the process's CPU time on the CPU (steadier on a
shared machine; with several threads it also counts their waiting, so use ``--clock wall`` on a
quiet one):
- loss: the loss call alone, forward and backward (predictions are leaf tensors: no network),
  timed 10 times per round;
- step: a whole training step (network forward, loss, backward, SGD step);
- step, from loss: the stock step plus this mode's extra loss-call time, over the stock step. The
  network's work is the same in every mode, so this is the step ratio without the step's own noise
  (a few percent on a busy CPU, more than the 1% it is meant to resolve).
The batch is real: the first ``--batch`` BCCD training images, letterboxed, with their labels. A
mode is a ``--loss`` value, or ``LOSS:SETTINGS`` with a shipped settings name or a yaml (``nwd:assigner_auto``).

``--sync-count`` (CUDA only) also counts the host synchronisations of one loss call and of one
training step per mode, as ``torch.cuda.set_sync_debug_mode("warn")`` reports them (one warning per
synchronising operation it covers; PyTorch's list is not complete), after the timing, with the
Python lines that caused them. ``--out FILE`` writes the tables to FILE as well.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from ultralytics.cfg import get_cfg
from ultralytics.data import build_yolo_dataset
from ultralytics.data.utils import check_det_dataset
from ultralytics.nn.tasks import DetectionModel

from yolo_sizeloss.checks import DataError, one_line, output_file_problem, parse_device
from yolo_sizeloss.cli import check_yolo_model
from yolo_sizeloss.config import load_loss_mode
from yolo_sizeloss.paths import resolve_data
from yolo_sizeloss.yolo.loss import AnchorWeighting, build_size_aware_loss

LOSS_CALLS_PER_ROUND = 10  # the loss call is short: more samples of it per round
MODES = ("baseline", "feedback", "scb", "plb", "gradlibra", "plb+scb+feedback+gradlibra", "nwd", "nwd+feedback",
         "nwd:safit_sharp_auto_norm", "nwd:safit_small_classes")
SYNC_WARNING = "synchronizing CUDA operation"  # what set_sync_debug_mode("warn") says, once per operation
CLOCKS = {"event": "CUDA-event time", "wall": "wall time", "cpu": "process CPU time"}


def timing_device(spec: str | None) -> torch.device:
    """``--device`` as every command reads it (``checks.parse_device``: a device this machine lacks is a
    ValueError naming the flag), as the one device all modes are timed on."""
    device = parse_device(spec)
    if len(device.indices) > 1:
        raise ValueError(f"--device {spec}: one device (every mode is timed on the same one)")
    if device.kind == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device.kind, device.indices[0] if device.indices else None)


def real_batch(imgsz: int, batch_size: int, device: torch.device) -> tuple[dict, list[dict]]:
    """The first ``batch_size`` BCCD training images, letterboxed without augmentation, collated; and the
    labels of the whole training split (what ``nwd.constant: auto`` is computed from)."""
    cfg = get_cfg(overrides={"imgsz": imgsz})
    data = check_det_dataset(resolve_data("bccd.yaml"))
    dataset = build_yolo_dataset(cfg, data["train"], batch_size, data, mode="val", stride=32)
    batch = dataset.collate_fn([dataset[i] for i in range(batch_size)])
    batch["img"] = batch["img"].float().div(255).to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, dataset.labels


def as_leaves(preds):
    """The predictions, nested as they come (end-to-end heads give a dict per branch), as leaf tensors."""
    if isinstance(preds, dict):
        return {k: as_leaves(v) for k, v in preds.items()}
    if isinstance(preds, (list, tuple)):
        return [as_leaves(v) for v in preds]
    return preds.detach().requires_grad_()


def criterion_for(mode: str, model: DetectionModel, labels: list[dict], imgsz: int):
    """The mode's loss as one training step runs it: the call, then the end of the step (the feedback
    update the trainer's batch-end callback makes), which is part of the cost."""
    if mode == "baseline":
        return model.init_criterion()
    weighting = AnchorWeighting(load_loss_mode(mode)).to(next(model.parameters()).device)
    weighting.resolve_from_labels(labels, imgsz)  # as the trainer does when training starts
    criterion = build_size_aware_loss(model, weighting)

    def step_loss(preds, batch):
        result = criterion(preds, batch)
        weighting.end_step()
        return result

    return step_loss


def timed(fn, device: torch.device, clock: str) -> float:
    """Seconds of ``fn`` by ``clock``: ``event``, between two CUDA events recorded on the current
    stream before and after it (the device idle at the first); ``wall`` (synchronised on a GPU); or
    ``cpu``, this process's CPU time, which other processes on a shared machine disturb far less (but
    which counts every thread)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    if clock == "event":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    now = time.perf_counter if clock == "wall" else time.process_time
    start = now()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return now() - start


def count_syncs(fn) -> Counter:
    """The host synchronisations ``fn`` makes on the GPU, as ``set_sync_debug_mode("warn")`` warns of
    them: a count per Python line that caused one (``file:line``, paths from the site folder)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return Counter(f"{short_path(w.filename)}:{w.lineno}" for w in caught if SYNC_WARNING in str(w.message))


def short_path(filename: str) -> str:
    """``.../site-packages/ultralytics/utils/loss.py`` -> ``ultralytics/utils/loss.py``; the same for the
    checkout's ``yolo_sizeloss``."""
    parts = Path(filename).parts
    for anchor in ("yolo_sizeloss", "ultralytics", "torch"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor):])
    return filename


def sync_table(counts: dict[tuple[str, str], Counter], modes: list[str]) -> list[str]:
    """Markdown: syncs per loss call and per training step for each mode, the step's count over
    stock's; then each mode's lines that synchronise, with how often."""
    base_step = sum(counts["step", "baseline"].values())
    lines = ["| mode | syncs per loss call | syncs per training step | step - stock |", "|---|---|---|---|"]
    for mode in modes:
        loss, step = sum(counts["loss", mode].values()), sum(counts["step", mode].values())
        lines.append(f"| {mode} | {loss} | {step} | {step - base_step:+d} |")
    lines += ["", "| mode | where a training step synchronises (file:line, count) |", "|---|---|"]
    for mode in modes:
        where = ", ".join(f"{place} x{n}" for place, n in sorted(counts["step", mode].items())) or "none"
        lines.append(f"| {mode} | {where} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolov8n.yaml", help="model yaml (built untrained, as a run from scratch starts)")
    parser.add_argument("--imgsz", type=int, default=416)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", help="cpu, mps or one CUDA index (default: the first GPU, else the CPU)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), help="default: event (CUDA events) on a GPU, cpu (process time) "
                                                                 "on the CPU")
    parser.add_argument("--threads", type=int, help="CPU threads (default torch's); 1 is steadiest on a busy machine")
    parser.add_argument("--modes", nargs="+", default=MODES, metavar="MODE",
                        help="LOSS or LOSS:SETTINGS to time (baseline, the reference, is always timed)")
    parser.add_argument("--sync-count", action="store_true", help="count host synchronisations per loss call and "
                                                                   "training step (CUDA; on the CPU one line says why not)")
    parser.add_argument("--out", help="also write the tables to this file (markdown)")
    args = parser.parse_args(argv)
    modes = ["baseline", *dict.fromkeys(m for m in args.modes if m != "baseline")]
    # a mistake stops here, before the model is built and long before the timing ends
    for flag in ("imgsz", "batch", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if Path(args.model).suffix not in (".yaml", ".yml"):
        parser.error(f"--model {args.model}: give a model yaml (the network is built untrained)")
    if args.out and (problem := output_file_problem(args.out)):
        parser.error(f"--out {args.out}: {problem}")
    try:
        for mode in modes:
            load_loss_mode(mode)
        check_yolo_model(args.model)
        device = timing_device(args.device)
    except (ValueError, FileNotFoundError, DataError) as e:  # LossConfigError is a ValueError
        parser.error(one_line(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = args.clock or ("event" if device.type == "cuda" else "cpu")
    if clock == "event" and device.type != "cuda":
        parser.error("--clock event needs a CUDA --device")
    torch.manual_seed(0)
    base = DetectionModel(args.model, nc=3, verbose=False).to(device).train()
    base.args = get_cfg()
    batch, labels = real_batch(args.imgsz, args.batch, device)

    leaves = as_leaves(base(batch["img"]))
    models = {mode: copy.deepcopy(base) for mode in modes}  # one model per mode: identical weights at the start
    criteria = {mode: criterion_for(mode, models[mode], labels, args.imgsz) for mode in modes}
    optimizers = {mode: torch.optim.SGD(models[mode].parameters(), lr=1e-4, momentum=0.9) for mode in modes}

    def loss_call(mode):
        criteria[mode](leaves, batch)[0].sum().backward()

    def train_step(mode):
        model, optimizer = models[mode], optimizers[mode]
        criteria[mode](model(batch["img"]), batch)[0].sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    times = {(kind, mode): [] for kind in ("loss", "step") for mode in modes}
    for mode in modes:  # warm-up
        loss_call(mode), train_step(mode)
    for _ in range(args.repeats):
        for mode in modes:
            times["loss", mode] += [timed(lambda: loss_call(mode), device, clock) for _ in range(LOSS_CALLS_PER_ROUND)]
            times["step", mode].append(timed(lambda: train_step(mode), device, clock))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    lines = [f"{args.model} imgsz {args.imgsz} batch {args.batch} on {device} ({where}), torch {torch.__version__}, "
             f"{CLOCKS[clock]}, fastest of {args.repeats} rounds", "",
             "| mode | loss call ms | ratio | training step ms | ratio | step ratio from loss |", "|---|---|---|---|---|---|"]
    best = {key: min(samples) * 1e3 for key, samples in times.items()}
    base_loss, base_step = best["loss", "baseline"], best["step", "baseline"]
    for mode in modes:
        loss_ms, step_ms = best["loss", mode], best["step", mode]
        lines.append(f"| {mode} | {loss_ms:.2f} | {loss_ms / base_loss:.3f} | {step_ms:.1f} | {step_ms / base_step:.3f} "
                     f"| {(base_step + loss_ms - base_loss) / base_step:.4f} |")
    if args.sync_count and device.type == "cuda":
        counts = {(kind, mode): count_syncs(lambda: (loss_call if kind == "loss" else train_step)(mode))
                  for mode in modes for kind in ("loss", "step")}
        lines += ["", "Host synchronisations (torch.cuda.set_sync_debug_mode('warn'), one loss call and one training "
                      "step after the timing):", "", *sync_table(counts, modes)]
    elif args.sync_count:
        lines += ["", f"Host synchronisations: not counted on {device} (set_sync_debug_mode watches CUDA only)."]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
