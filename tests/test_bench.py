"""bench/compare.py's bookkeeping: epoch times across a resume, presets and modes, where runs stand,
the tables' mean and spread, paired differences over seeds and per seed."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from PIL import Image

from yolo_sizeloss.detections import ImageRecord, load_split
from yolo_sizeloss.detections_file import DETECTIONS_FILE, RunDetections
from yolo_sizeloss.evaluation import evaluate_records, letterbox_scales
from yolo_sizeloss.report import write_report

ROOT = Path(__file__).resolve().parent.parent
def bench_script(name: str):
    """A script of bench/ as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = bench_script("compare")
one_class = bench_script("one_class")
overhead = bench_script("overhead")
gpu = bench_script("gpu")
unmatched = bench_script("unmatched")
assignment = bench_script("assignment")


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding an exclusive flock on ``path``, as a second harness does; kill it after."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"f = open({str(path)!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_epoch_seconds_follow_a_time_column_that_restarts_on_resume(tmp_path):
    (tmp_path / "results.csv").write_text("epoch,time\n1,10\n2,25\n3,5\n4,12\n")  # resumed after epoch 2
    assert compare._epoch_seconds(tmp_path) == [10.0, 15.0, 5.0, 7.0]
    assert compare._epoch_seconds(tmp_path / "missing") == []


def test_faster_rcnn_gets_the_paper_batch_unless_one_is_given():
    assert compare.parse_args(["--arch", "faster_rcnn"]).batch == 4
    assert compare.parse_args(["--arch", "faster_rcnn", "--batch", "16"]).batch == 16


def test_faster_rcnn_modes_are_the_same_loss_settings():
    runs = compare.runs_of(compare.parse_args(["--arch", "faster_rcnn", "--losses", "baseline", "plb:gt_areas"]))
    assert [label for label, _ in runs] == ["rcnn-baseline", "rcnn-plb-gt_areas"]
    assert runs[1][1][:4] == ["--loss", "plb", "--arch", "faster_rcnn"]
    assert runs[1][1][-2:] == ["--loss-cfg", str(ROOT / "yolo_sizeloss" / "cfg" / "variants" / "gt_areas.yaml")]
    assert compare.parse_args([]).batch == 16


def test_unknown_loss_is_refused_before_any_run(capsys):
    with pytest.raises(SystemExit) as refused:
        compare.parse_args(["--losses", "baseline", "focal"])
    assert refused.value.code == 2  # argparse's usage error
    assert "error: unknown loss 'focal' in 'focal': valid names are baseline, " in capsys.readouterr().err


def report(**metrics) -> dict:
    """A run's report as ``run_report`` returns it, with the given metrics (keys of ``key_metrics``)."""
    return {"metrics": metrics, "val_dir": "", "train": {"seconds_per_epoch": metrics.pop("s", None)}}


def test_table_gives_mean_and_sample_spread_over_seeds():
    reports = [report(**{"ultralytics.mAP50-95": 0.30, "s": 50.0}), report(**{"ultralytics.mAP50-95": 0.34, "s": 54.0})]
    cols = compare.columns("Platelets")
    summary = compare.summarise({"feedback": dict(enumerate(reports))}, cols)
    assert summary["feedback"]["mAP50-95"]["mean"] == pytest.approx(0.32)
    assert summary["feedback"]["mAP50-95"]["std"] == pytest.approx(0.02 * 2 ** 0.5)  # sample std of 0.30, 0.34
    args = compare.parse_args(["--seeds", "0", "1"])
    row = compare.markdown(summary, {}, {}, cols, args).splitlines()[2]
    assert row.startswith("| feedback | 32.0 ± 2.8 | n/a |") and row.endswith("| 52.0 ± 2.8 |")


def test_differences_to_the_reference_are_paired_by_seed_with_a_t_interval_over_seeds():
    baseline = [report(**{"ultralytics.mAP50-95": v, "per_class.WBC.ap": w}) for v, w in ((0.30, 0.5), (0.32, 0.5), (0.34, 0.6))]
    mode = [report(**{"ultralytics.mAP50-95": v, "per_class.WBC.ap": w}) for v, w in ((0.32, 0.55), (0.35, 0.56), (0.35, 0.67))]
    cols = compare.columns("WBC")
    per_mode = {"baseline": dict(enumerate(baseline)), "feedback": dict(enumerate(mode))}
    differences = compare.seed_differences(per_mode, cols)
    overall, focus = differences["feedback"]["mAP50-95"], differences["feedback"]["WBC AP"]
    assert overall["per_seed"] == pytest.approx({0: 0.02, 1: 0.03, 2: 0.01})
    half = 4.303 * 0.01 / 3 ** 0.5  # t(2) s / sqrt(n) with s = 0.01
    assert (overall["diff"], overall["low"], overall["high"]) == pytest.approx((0.02, 0.02 - half, 0.02 + half))
    assert not overall["excludes_zero"]
    assert focus["diff"] == pytest.approx(0.06) and focus["low"] == pytest.approx(0.06 - half) and focus["excludes_zero"]
    assert differences["feedback"]["AP"]["diff"] is None  # no value in either report
    text = compare.markdown(compare.summarise(per_mode, cols), differences, {}, cols,
                            compare.parse_args(["--seeds", "0", "1", "2", "--bootstrap", "0"]))
    assert "| mode | mAP50-95 | AP | APs orig |" in text and "| WBC AP |" in text and "Platelets" not in text
    row = next(line for line in text.split("Difference to baseline")[1].splitlines() if line.startswith("| feedback"))
    assert row.startswith("| feedback | +2.0 [-0.5, +4.5] | n/a |") and "| +6.0 [+3.5, +8.5] * |" in row


def test_the_focus_class_defaults_to_the_rarest_in_the_training_labels():
    assert compare.rarest_class("bccd.yaml") == "Platelets"  # 209 boxes against WBC's 214 and RBC's 2381


def test_the_converged_preset_reuses_the_runs_started_by_name():
    args = compare.parse_args(["--preset", "converged"])
    assert (args.epochs, args.imgsz, args.batch, args.seeds) == (60, 416, 16, [0, 1, 2])
    runs = compare.runs_of(args)
    assert [label for label, _ in runs] == ["baseline", "feedback", "nwd"]
    assert runs[0][1] == ["--loss", "baseline", "--model", "yolov8n.yaml"]
    assert runs[2][1] == ["--loss", "nwd", "--model", "yolov8n.yaml"]


def test_one_invocation_mixes_modes_with_and_without_a_settings_file(capsys):
    args = compare.parse_args(["--losses", "baseline", "feedback", "plb:gt_areas", "scb", "nwd:box_only"])
    assert [label for label, _ in compare.runs_of(args)] == ["baseline", "feedback", "plb-gt_areas", "scb", "nwd-box_only"]
    gt_areas = ROOT / "yolo_sizeloss" / "cfg" / "variants" / "gt_areas.yaml"
    for bad, message in (  # a plb section for feedback; no file
        ("feedback:gt_areas", f"error: {gt_areas}:7: section 'plb' is not selected by --loss feedback "
                              "(selected: feedback; select it with --loss feedback+plb)"),
        ("plb:bench/missing.yaml", "error: loss settings 'bench/missing.yaml' not found (tried bench/missing.yaml)"),
    ):
        with pytest.raises(SystemExit) as refused:
            compare.parse_args(["--losses", "baseline", bad])
        assert refused.value.code == 2
        assert message in capsys.readouterr().err, bad


def test_files_named_from_another_folder_reach_train_py_in_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cells.yaml").write_text("path: .\ntrain: images\nval: images\ntest: images\n")  # the splits the harness checks
    (tmp_path / "my.pt").write_bytes(b"")
    args = compare.parse_args(["--data", "cells.yaml", "--model", "my.pt"])
    assert (args.data, args.model) == (str(tmp_path / "cells.yaml"), str(tmp_path / "my.pt"))
    assert (compare.parse_args([]).data, compare.parse_args([]).model) == ("bccd.yaml", "yolov8n.yaml")  # names


def test_a_run_stopped_early_by_patience_counts_as_finished(tmp_path):
    """Ultralytics ends every run, also one stopped by patience before --epochs, by stripping the
    optimizer from last.pt; resuming such a run fails, so the benchmark evaluates it instead."""
    run_dir = tmp_path / "runs" / "baseline-s0"
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "results.csv").write_text("epoch,time\n1,10\n2,20\n")
    finished = ROOT / "tests" / "assets" / "yolov8n_bccd_baseline.pt"  # a stock run's stripped checkpoint
    (run_dir / "weights" / "best.pt").write_bytes(finished.read_bytes())
    assert not compare.training_finished(run_dir, 5)  # no last.pt yet
    (run_dir / "weights" / "last.pt").write_bytes(finished.read_bytes())
    assert compare.training_finished(run_dir, 5)
    status = compare.status_lines(compare.parse_args(["--losses", "baseline", "--seeds", "0", "--epochs", "5"]), tmp_path)
    assert " ".join(status[1].split()) == "baseline-s0 2/5 epochs trained, not evaluated, stopped early"
    torch.save({"epoch": 1, "optimizer": {"state": {}, "param_groups": []}}, run_dir / "weights" / "last.pt")
    assert not compare.training_finished(run_dir, 5)  # interrupted mid-run: it resumes
    assert compare.training_finished(run_dir, 2)


def test_status_says_where_each_run_stands(tmp_path, capsys):
    runs, val = tmp_path / "runs", tmp_path / "val"
    (runs / "baseline-s0" / "weights").mkdir(parents=True)
    (runs / "baseline-s0" / "results.csv").write_text("epoch,time\n1,10\n2,20\n")
    (runs / "baseline-s0" / "weights" / "last.pt").write_bytes(b"")
    (runs / "baseline-s1").mkdir()
    (runs / "baseline-s1" / "results.csv").write_text("epoch,time\n1,10\n2,20\n3,30\n")
    (runs / "baseline-s2" / "weights").mkdir(parents=True)
    (runs / "baseline-s2" / "weights" / "last.pt").write_bytes(b"")
    holder = hold_lock(runs / "baseline-s2.lock")
    for name, files in (("feedback-s0", ["metrics.json"]), ("feedback-s1", ["metrics.json", "detections.json"])):
        (val / name).mkdir(parents=True)
        for file in files:
            (val / name / file).write_text("{}")
    try:
        assert compare.main(["--losses", "baseline", "feedback", "--seeds", "0", "1", "2", "--epochs", "3",
                             "--out", str(tmp_path), "--status"]) == 0
    finally:
        holder.kill()
    lines = capsys.readouterr().out.splitlines()
    assert [" ".join(line.split()) for line in lines[1:]] == [
        "baseline-s0 2/3 epochs unfinished, resumes from last.pt",
        "baseline-s1 3/3 epochs trained, not evaluated",
        "baseline-s2 0/3 epochs training now",
        "feedback-s0 0/3 epochs evaluated, no detections file",
        "feedback-s1 0/3 epochs evaluated",
        "feedback-s2 0/3 epochs not started",
    ]
    assert not compare.report_is_current(val / "feedback-s0", bootstrap=1000)  # evaluated again for its detections
    assert compare.report_is_current(val / "feedback-s0", bootstrap=0)
    # feedback-s1's detections.json: as val wrote it before it compressed the file
    assert compare.report_is_current(val / "feedback-s1", bootstrap=1000)
    (val / "feedback-s0" / "detections.json.bz2").write_bytes(b"")
    assert compare.report_is_current(val / "feedback-s0", bootstrap=1000)


def test_status_gives_the_val_splits_best_epoch(tmp_path):
    """The epoch best.pt holds (the last of equal maxima of mAP50-95, as Ultralytics' fitness picks it)
    and the focus class's AP there; a run from before the per-class columns gives mAP50-95 alone."""
    run_dir = tmp_path / "runs" / "nwd-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "results.csv").write_text("epoch,time,metrics/mAP50-95(B),val/AP50-95 Platelets,val/AP50-95 RBC\n"
                                         "1,10,0.25,0.1,0.4\n2,20,0.5,0.3,0.7\n3,30,0.5,0.35,0.65\n4,40,0.45,0.5,0.4\n")
    args = compare.parse_args(["--losses", "nwd", "--seeds", "0", "--epochs", "4", "--focus-class", "Platelets"])
    line = " ".join(compare.status_lines(args, tmp_path)[1].split())
    assert line == "nwd-s0 4/4 epochs trained, not evaluated; val best epoch 3: mAP50-95 50.0, Platelets AP 35.0"
    (run_dir / "results.csv").write_text("epoch,time,metrics/mAP50-95(B)\n1,10,0.25\n2,20,0.125\n")
    assert compare.best_epoch_note(run_dir, "Platelets") == "; val best epoch 1: mAP50-95 25.0"



def unusable_data(folder: Path) -> str:
    """A data yaml that exists and names its class and splits (the harness checks those before anything)
    but whose images do not exist, which train and val refuse at their own checks: how these tests make
    a child command fail."""
    (folder / "none.yaml").write_text(f"path: {folder / 'none'}\ntrain: train\nval: val\ntest: test\n"
                                      "names: {0: Platelets}\n")
    return str(folder / "none.yaml")

def test_a_second_harness_does_not_train_a_run_another_one_is_training(tmp_path):
    # Two harnesses on one --out both resumed nwd-s0 from its last.pt and interleaved their epochs in
    # one results.csv. A broken --data makes this fail fast where the lock is not checked.
    (tmp_path / "runs").mkdir()
    holder = hold_lock(tmp_path / "runs" / "baseline-s0.lock")
    try:
        with pytest.raises(SystemExit, match=r"baseline-s0 is being trained by another process"):
            compare.main(["--losses", "baseline", "--seeds", "0", "--epochs", "1", "--data", unusable_data(tmp_path),
                          "--focus-class", "Platelets", "--out", str(tmp_path)])
    finally:
        holder.kill()
    assert not (tmp_path / "runs" / "baseline-s0").exists()


def started_python(process: psutil.Process, parent_command: list[str]) -> bool:
    """Whether a child process runs the harness's Python on a command of its own."""
    try:
        command = process.cmdline()
    except psutil.NoSuchProcess:  # a short helper that has already ended
        return False
    return command[:1] == [sys.executable] and command != parent_command


def test_stopping_the_harness_stops_the_training_it_started(tmp_path):
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}
    harness = subprocess.Popen(
        [sys.executable, "bench/compare.py", "--losses", "baseline", "--seeds", "0", "--epochs", "50", "--imgsz", "64",
         "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    # the harness imports Ultralytics before it starts the training: on a loaded machine that took over a
    # minute. Importing it also runs short helpers (platform's `uname -p`), and a child caught between fork
    # and exec still shows the harness's own command line: the loop waits for a Python child past both.
    deadline = time.monotonic() + 300
    training = []
    while not training and time.monotonic() < deadline:
        training = [p for p in psutil.Process(harness.pid).children() if started_python(p, harness.args)]
        time.sleep(0.1)
    commands = [p.cmdline()[1:4] for p in training]
    harness.terminate()  # what `kill PID` of a harness left in the background sends
    harness.wait(timeout=60)
    _, alive = psutil.wait_procs(training, timeout=15)  # 50 epochs take minutes
    for process in alive:
        process.kill()
    assert commands == [["-m", "yolo_sizeloss.cli", "train"]] and not alive  # the installed command, not train.py


def test_a_trained_run_is_evaluated_with_the_installed_val_command(tmp_path, capfd):
    args = compare.parse_args(["--losses", "baseline", "--seeds", "0", "--epochs", "2", "--bootstrap", "0",
                               "--data", unusable_data(tmp_path), "--out", str(tmp_path)])
    _, run_dir, _ = compare.run_paths(tmp_path, "baseline", 0)
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "results.csv").write_text("epoch,time\n1,10\n2,20\n")  # trained: the harness goes on to evaluate
    (run_dir / "weights" / "best.pt").write_bytes((ROOT / "tests" / "assets" / "yolov8n_bccd_baseline.pt").read_bytes())
    with pytest.raises(subprocess.CalledProcessError) as failed:  # the missing data yaml stops val at its checks
        compare.train_and_validate(args, "baseline", [], 0, tmp_path)
    assert failed.value.cmd[:4] == [sys.executable, "-m", "yolo_sizeloss.cli", "val"]
    assert f"{tmp_path / 'none.yaml'}" in capfd.readouterr().err  # val's own one-line error


def test_a_recorded_run_without_its_checkpoints_is_an_error_not_a_new_training(tmp_path):
    """A committed run folder holds its record (results.csv, args) but no weights: evaluating it on another split
    must stop with a one-line error, not train it again into the same folder over its record."""
    args = compare.parse_args(["--losses", "baseline", "--seeds", "0", "--epochs", "2", "--bootstrap", "0",
                               "--split", "val", "--out", str(tmp_path)])
    _, run_dir, _ = compare.run_paths(tmp_path, "baseline", 0, "val")
    run_dir.mkdir(parents=True)
    record = "epoch,time\n1,10\n2,20\n"
    (run_dir / "results.csv").write_text(record)
    with pytest.raises(SystemExit, match=r"baseline-s0: 2 epochs are recorded but weights/best\.pt is missing"):
        compare.train_and_validate(args, "baseline", [], 0, tmp_path)
    (run_dir / "results.csv").write_text(record[:-len("2,20\n")])  # interrupted, and its last.pt gone too
    with pytest.raises(SystemExit, match=r"1 epochs are recorded but weights/last\.pt is missing"):
        compare.train_and_validate(args, "baseline", [], 0, tmp_path)
    assert (run_dir / "results.csv").read_text() == record[:-len("2,20\n")] and not (run_dir / "weights").exists()


def test_a_resumed_run_keeps_the_harness_device_and_workers(tmp_path, capfd):
    """A resume was started with neither: on the GPU machine it fell back to train's device and workers."""
    args = compare.parse_args(["--losses", "baseline", "--seeds", "0", "--epochs", "3", "--bootstrap", "0",
                               "--device", "cpu", "--workers", "1", "--out", str(tmp_path)])
    _, run_dir, _ = compare.run_paths(tmp_path, "baseline", 0)
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "results.csv").write_text("epoch,time\n1,10\n")  # stopped after its first epoch: it resumes
    last = run_dir / "weights" / "last.pt"
    # a stock run's finished checkpoint: train takes the flags, then refuses to continue a finished run
    last.write_bytes((ROOT / "tests" / "assets" / "yolov8n_bccd_baseline.pt").read_bytes())
    with pytest.raises(subprocess.CalledProcessError) as failed:
        compare.train_and_validate(args, "baseline", [], 0, tmp_path)
    command = failed.value.cmd
    assert command[3:6] == ["train", "--resume", str(last)] and command[6:] == ["--workers", "1", "--device", "cpu"]
    assert "this run finished its" in capfd.readouterr().err  # past train's check of what a resume may change


def test_a_choice_on_the_val_split_leaves_the_test_reports_alone(tmp_path, capfd):
    args = compare.parse_args(["--losses", "baseline", "--seeds", "0", "--epochs", "2", "--bootstrap", "0",
                               "--split", "val", "--data", unusable_data(tmp_path), "--out", str(tmp_path)])
    _, run_dir, val_dir = compare.run_paths(tmp_path, "baseline", 0, "val")
    assert val_dir == tmp_path / "val-val" / "baseline-s0" and compare.run_paths(tmp_path, "baseline", 0)[2] == \
        tmp_path / "val" / "baseline-s0"
    assert compare.table_files(tmp_path, "val")[1] == tmp_path / "results-val.md"
    (run_dir / "weights").mkdir(parents=True)
    (run_dir / "results.csv").write_text("epoch,time\n1,10\n2,20\n")
    (run_dir / "weights" / "best.pt").write_bytes((ROOT / "tests" / "assets" / "yolov8n_bccd_baseline.pt").read_bytes())
    # the run's test-split report, already current (bootstrap 0: its metrics.json), and the test table: were
    # the split ignored, this report would be returned as it is and no val would run
    test_dir = compare.run_paths(tmp_path, "baseline", 0)[2]
    test_dir.mkdir(parents=True)
    test_files = {test_dir / "metrics.json": b'{"metrics/mAP50-95(B)": 0.123}\n',
                  compare.table_files(tmp_path, "test")[1]: b"| mode | mAP50-95 |\n| baseline | 12.3 |\n"}
    for path, content in test_files.items():
        path.write_bytes(content)
    assert compare.report_is_current(test_dir, args.bootstrap)
    with pytest.raises(subprocess.CalledProcessError) as failed:  # the missing data yaml stops val at its checks
        compare.train_and_validate(args, "baseline", [], 0, tmp_path)
    command = failed.value.cmd
    assert command[command.index("--split") + 1] == "val" and command[command.index("--project") + 1] == str(
        tmp_path / "val-val")
    assert {path: path.read_bytes() for path in test_files} == test_files
    assert sorted(p.name for p in test_dir.iterdir()) == ["metrics.json"]
    capfd.readouterr()


def test_per_seed_paired_bootstrap_from_the_reports_detection_files(tmp_path):
    records, data = load_split("bccd.yaml", "test")
    rng = np.random.default_rng(0)
    per_mode = {}
    for label, keep_small in (("baseline", True), ("feedback", False)):
        detected = []
        for r in records[:24]:  # detections: ground truth jittered; the second mode misses platelets
            keep = np.ones(len(r.gt_classes), bool) if keep_small else r.gt_classes != 2
            boxes = r.gt_boxes[keep] + rng.normal(0, 2, (keep.sum(), 4)).astype(np.float32)
            detected.append(replace(r, pred_boxes=boxes, pred_scores=rng.uniform(0.1, 1, keep.sum()).astype(np.float32),
                                    pred_classes=r.gt_classes[keep]))
        run = RunDetections(detected, letterbox_scales(detected, 416), [data["names"][k] for k in range(3)])
        metrics = evaluate_records(run.records, run.names, run.input_scales)
        write_report(metrics, tmp_path / label, run)
        per_mode[label] = {0: {**compare.run_report(tmp_path / label, tmp_path / "none"), "val_dir": str(tmp_path / label)}}
    bootstrap, unreproduced_runs = compare.bootstrap_differences(per_mode, resamples=100)
    assert unreproduced_runs == []  # files written by val give back their reports' figures
    platelets = bootstrap["feedback"][0]["per_class.Platelets.ap"]
    assert platelets["b"] == 0.0 and platelets["high"] < 0 and platelets["excludes_zero"]
    cols = compare.columns("Platelets")
    args = compare.parse_args(["--seeds", "0", "--bootstrap", "100"])
    text = compare.markdown(compare.summarise(per_mode, cols), compare.seed_differences(per_mode, cols),
                            bootstrap, cols, args)
    row = next(line for line in text.split("paired bootstrap")[1].splitlines() if line.startswith("| feedback s0"))
    assert row.split(" | ")[1] == "n/a" and "] * |" in row  # Ultralytics' mAP50-95 is not recomputed
    assert "do not give back" not in text
    # a report whose detections file is not the one it was computed from (here the baseline's): named, with its gap
    shutil.copy(tmp_path / "baseline" / DETECTIONS_FILE, tmp_path / "feedback" / DETECTIONS_FILE)
    stale_bootstrap, [run] = compare.bootstrap_differences(per_mode, resamples=10)
    assert run.startswith("feedback s0 (") and "in its report" in run
    stale_text = compare.markdown(compare.summarise(per_mode, cols), compare.seed_differences(per_mode, cols),
                                  stale_bootstrap, cols, args, [run])
    assert f"The detections files of {run} do not give back their reports' figures" in " ".join(stale_text.split())
    assert json.loads(json.dumps(bootstrap))["feedback"]["0"]["coco.ap"]["diff"] < 0


@pytest.mark.parametrize("draws", ["1", "99", "-5"])
def test_too_few_bootstrap_draws_are_refused_before_any_run(capsys, draws):
    """One draw starred every row of the per-seed table, with intervals not holding their own estimate."""
    with pytest.raises(SystemExit):
        compare.parse_args(["--seeds", "0", "--bootstrap", draws])
    assert f"--bootstrap {draws}: 0 (no intervals) or at least 100" in capsys.readouterr().err


def test_a_run_trained_with_another_schedule_is_not_reused(tmp_path):
    args = compare.parse_args(["--epochs", "20", "--imgsz", "416"])
    (tmp_path / "args.yaml").write_text("epochs: 20\nimgsz: 416\nbatch: 16\nseed: 0\n")
    compare.check_same_schedule(tmp_path, args, seed=0)
    with pytest.raises(SystemExit, match="epochs 20 \\(asked 30\\)"):
        compare.check_same_schedule(tmp_path, compare.parse_args(["--epochs", "30"]), seed=0)
    compare.check_same_schedule(tmp_path / "new", args, seed=0)  # nothing trained there yet


def test_a_run_trained_on_other_data_or_another_model_is_not_reused(tmp_path):
    run_dir = tmp_path / "runs" / "baseline-s0"
    run_dir.mkdir(parents=True)
    args = compare.parse_args(["--epochs", "20", "--imgsz", "416"])
    [(_, flags)] = compare.runs_of(compare.parse_args(["--epochs", "20", "--losses", "baseline"]))
    schedule = "epochs: 20\nimgsz: 416\nbatch: 16\nseed: 0\n"
    # the shipped BCCD, recorded where an older checkout kept it: the same data set
    (run_dir / "args.yaml").write_text(schedule + "data: /old/checkout/cfg/bccd.yaml\nmodel: yolov8n.yaml\n")
    compare.check_same_schedule(run_dir, args, 0, flags)
    with pytest.raises(SystemExit, match=r"model yolov8n.yaml \(asked yolo11n.yaml\)"):
        compare.check_same_schedule(run_dir, compare.parse_args(["--epochs", "20", "--model", "yolo11n.yaml"]), 0,
                                    ["--model", "yolo11n.yaml"])
    platelets = tmp_path / "bccd_platelets" / "data.yaml"
    platelets.parent.mkdir()
    platelets.write_text("path: .\ntrain: images\nval: images\ntest: images\n")  # the splits the harness checks
    with pytest.raises(SystemExit, match=r"data /old/checkout/cfg/bccd.yaml \(asked .*bccd_platelets/data.yaml\)"):
        compare.check_same_schedule(run_dir, compare.parse_args(["--epochs", "20", "--data", str(platelets)]), 0, flags)
    # a resumed run records its own last.pt as its model: no reading of the model it started from
    (run_dir / "args.yaml").write_text(schedule + "data: /x/cfg/bccd.yaml\nmodel: /elsewhere/runs/baseline-s0/weights/last.pt\n")
    compare.check_same_schedule(run_dir, args, 0, ["--model", "yolo11n.yaml"])
    rcnn = compare.parse_args(["--arch", "faster_rcnn", "--epochs", "20", "--imgsz", "416", "--batch", "16"])
    (run_dir / "args.yaml").write_text(schedule + "data: /x/cfg/bccd.yaml\nbackbone: resnet50_fpn\n")
    with pytest.raises(SystemExit, match=r"backbone resnet50_fpn \(asked mobilenet_v3_large_fpn\)"):
        compare.check_same_schedule(run_dir, rcnn, 0, [])


def test_a_missing_data_yaml_stops_the_harness_before_anything(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--data", str(tmp_path / "nosuch.yaml"), "--out", str(tmp_path / "out")])
    assert "nosuch.yaml' not found" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_gpu_preset_and_the_schedule_flags_reach_train_and_the_schedule_check(tmp_path, capsys):
    args = compare.parse_args(["--preset", "gpu"])
    assert [label for label, _ in compare.runs_of(args)] == ["baseline", "nwd", "nwd-safit_small_classes"]
    assert (args.epochs, args.imgsz, args.batch, args.seeds) == (100, 416, 16, [0, 1, 2])
    assert compare.schedule_flags(args, 2) == ["--epochs", "100", "--imgsz", "416", "--batch", "16", "--seed", "2"]
    rcnn = compare.parse_args(["--arch", "faster_rcnn", "--epochs", "12", "--imgsz", "416", "--fraction", "0.5",
                               "--lr", "0.02", "--lr-step", "8"])
    assert compare.schedule_flags(rcnn, 0) == ["--epochs", "12", "--imgsz", "416", "--batch", "4", "--seed", "0",
                                               "--fraction", "0.5", "--lr", "0.02", "--lr-step", "8"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # YOLO's learning rate is not compare.py's to set
        compare.parse_args(["--lr", "0.01"])
    assert refused.value.code == 2
    assert "error: --lr and --lr-step are Faster R-CNN's (--arch faster_rcnn)" in capsys.readouterr().err
    (tmp_path / "args.yaml").write_text("epochs: 12\nimgsz: 416\nbatch: 4\nseed: 0\nfraction: 0.5\nlr: 0.02\nlr_step: 8\n")
    compare.check_same_schedule(tmp_path, rcnn, seed=0)
    with pytest.raises(SystemExit, match=r"lr 0.02 \(asked 0.01\)"):
        compare.check_same_schedule(tmp_path, compare.parse_args(
            ["--arch", "faster_rcnn", "--epochs", "12", "--imgsz", "416", "--fraction", "0.5", "--lr", "0.01"]), seed=0)
    (tmp_path / "args.yaml").write_text("epochs: 20\nimgsz: 416\nbatch: 16\nseed: 0\n")  # before fraction was recorded
    compare.check_same_schedule(tmp_path, compare.parse_args(["--epochs", "20"]), seed=0)
    with pytest.raises(SystemExit, match=r"fraction 1.0 \(asked 0.1\)"):
        compare.check_same_schedule(tmp_path, compare.parse_args(["--epochs", "20", "--fraction", "0.1"]), seed=0)


def test_a_faster_rcnn_run_at_another_lr_is_not_reused_by_a_harness_without_lr(tmp_path):
    """Without --lr the schedule left lr out: a folder trained at --lr 0.01 was reused, and the new modes
    were trained at train's default into the same table."""
    from yolo_sizeloss.config import run_defaults

    default = run_defaults("faster_rcnn")
    # as bench/results/rcnn_converged's runs record it
    (tmp_path / "args.yaml").write_text("epochs: 30\nimgsz: 640\nbatch: 4\nseed: 0\nfraction: 1.0\nlr: 0.01\nlr_step: 20\n")
    args = compare.parse_args(["--arch", "faster_rcnn", "--epochs", "30", "--imgsz", "640"])
    with pytest.raises(SystemExit, match=rf"lr 0.01 \(asked {default['lr']}\), lr_step 20 \(asked {default['lr_step']}\)"):
        compare.check_same_schedule(tmp_path, args, seed=0)
    assert compare.schedule_flags(args, 0)[-4:] == ["--lr", str(default["lr"]), "--lr-step", str(default["lr_step"])]
    compare.check_same_schedule(tmp_path, compare.parse_args(
        ["--arch", "faster_rcnn", "--epochs", "30", "--imgsz", "640", "--lr", "0.01", "--lr-step", "20"]), seed=0)


def test_suite_reads_each_mode_from_the_table_with_the_most_seeds_of_it(tmp_path, monkeypatch, capsys):
    """A set's ``tables`` (compare.py --table NAME) add seeds for some modes: a mode is read from the table
    holding it over the most seeds, a mode in results.json alone from there, a named table not written
    is skipped."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    suite = bench_script("suite")
    per_seed = lambda *v: {str(i): x for i, x in enumerate(v)}  # noqa: E731
    columns = ("Platelets AP", "Platelets APs input", "APs input", "APl orig", "mAP50-95", "AP", "R small@0.3")
    table = lambda mode, *v: {"focus_class": "Platelets", "bootstrap": {},  # noqa: E731
                              "differences": {mode: {c: _difference(per_seed(*v)) for c in columns}}}
    three, five = table("nwd", 0.04, 0.05, 0.06), table("nwd", 0.02, 0.03, 0.04, 0.05, 0.06)
    three["differences"]["nwd-box_only"] = table("nwd-box_only", 0.01, 0.01, 0.01)["differences"]["nwd-box_only"]
    (tmp_path / "results.json").write_text(json.dumps(three))
    (tmp_path / "results-seeds5.json").write_text(json.dumps(five))
    (tmp_path / "results-one.json").write_text(json.dumps(table("nwd", 0.09)))
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"sets": [
        {"name": "M", "kind": "mixed", "small": "7%", "results": str(tmp_path), "schedule": "s", "command": "c",
         "tables": ["one", "seeds5", "unwritten"]}]}))
    assert suite.main(["--modes", "nwd", "nwd:box_only", "--suite", str(tmp_path / "suite.yaml")]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:4]]
    # +2 .. +6: mean 4, t-interval 4 -+ 2.776 * 1.581 / sqrt(5) = [+2.0, +6.0]
    assert rows[0][1:4] == ["nwd", "5", "+4.0 [+2.0, +6.0]"]
    assert rows[1][1:4] == ["nwd-box_only", "3", "+1.0 [+1.0, +1.0]"]


@pytest.mark.parametrize("flags, message", [
    (["--focus-class", "platelets"], "--focus-class platelets: not a class of BCCD (choose from RBC, WBC, Platelets)"),
    (["--split", "tset"], "--split tset: BCCD does not define it (choose from train, val, test)"),
    (["--data", "NOTEST"], "--split test: NOTEST does not define it (choose from train, val)"),
])
def test_a_focus_class_or_split_the_data_yaml_lacks_stops_the_harness_before_any_run(tmp_path, capsys, flags, message):
    """A split the yaml lacks failed at val, after the first mode trained; a focus class not among its names
    trained every mode, then tabulated n/a."""
    no_test = tmp_path / "no_test.yaml"  # as many exported data sets are: no test split
    no_test.write_text("train: images/train\nval: images/val\nnames: {0: car}\n")
    names = {"BCCD": compare.resolve_data("bccd.yaml"), "NOTEST": str(no_test)}
    with pytest.raises(SystemExit) as stop:  # parse_args, not main: without the check main would train
        compare.parse_args(["--losses", "baseline", "--seeds", "0", *(names.get(f, f) for f in flags)])
    err = capsys.readouterr().err
    for name, path in names.items():
        message = message.replace(name, path)
    assert stop.value.code == 2 and err.splitlines()[-1].endswith(f": error: {message}")


def test_only_table_tabulates_the_evaluated_seeds_and_trains_nothing(tmp_path, capsys):
    for name, value in (("baseline-s0", 0.30), ("baseline-s1", 0.32), ("nwd-s0", 0.33), ("feedback-s1", 0.35)):
        # nwd-s1 and feedback-s0 not evaluated (stopped, or still training)
        metrics = {"recall_by_size": {}, "per_class": {}, "meta": {"bucket_names": ["small"]},
                   "ultralytics": {"mAP50-95": value}}
        (tmp_path / "val" / name).mkdir(parents=True)
        (tmp_path / "val" / name / "metrics.json").write_text(json.dumps(metrics))
    argv = ["--losses", "baseline", "nwd", "feedback", "--seeds", "0", "1", "--epochs", "3", "--bootstrap", "0",
            "--focus-class", "Platelets", "--data", unusable_data(tmp_path), "--out", str(tmp_path)]
    assert compare.main([*argv, "--only", "table"]) == 0
    assert not (tmp_path / "runs").exists()  # nothing trained
    text = (tmp_path / "results.md").read_text()
    assert "Not evaluated when tabulated: nwd-s1, feedback-s0;" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["args"]["seeds"] == [0, 1] and saved["args"]["left_out"] == ["nwd-s1", "feedback-s0"]
    # a seed one mode lacks stays in the others': the reference's mean is over both of its seeds, and each
    # mode is paired with it on the seed it has
    assert saved["summary"]["baseline"]["mAP50-95"]["values"] == [0.30, 0.32]
    assert saved["differences"]["nwd"]["mAP50-95"]["per_seed"] == {"0": pytest.approx(0.03)}
    assert saved["differences"]["feedback"]["mAP50-95"]["per_seed"] == {"1": pytest.approx(0.03)}
    # another reference, as a table of its own: OUT's results.* stay as they were
    assert compare.main([*argv[:1], "nwd", "baseline", *argv[4:], "--only", "table", "--table", "nwd_ref"]) == 0
    assert (tmp_path / "results.md").read_text() == text
    assert "### Difference to nwd" in (tmp_path / "results-nwd_ref.md").read_text()
    assert compare.table_files(tmp_path, "val", "nwd_ref")[1] == tmp_path / "results-nwd_ref-val.md"
    (tmp_path / "val" / "baseline-s0" / "metrics.json").unlink()
    (tmp_path / "val" / "baseline-s1" / "metrics.json").unlink()
    with pytest.raises(SystemExit, match="the reference baseline has no seed evaluated"):
        compare.main([*argv, "--only", "table"])


def test_a_loss_cfg_variant_gets_its_own_label_and_reaches_train_py():
    variant = str(ROOT / "yolo_sizeloss" / "cfg" / "variants" / "gt_areas.yaml")
    [(label, flags)] = compare.runs_of(compare.parse_args(["--losses", "plb", "--loss-cfg", variant]))
    assert label == "plb-gt_areas"
    assert flags[:2] == ["--loss", "plb"] and flags[-2:] == ["--loss-cfg", variant]


def test_sync_count_tallies_the_sync_debug_warnings_by_line(monkeypatch):
    """set_sync_debug_mode needs a GPU; here its warnings are stood in for by the same message."""
    modes_set = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes_set.append)

    def step():
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation")  # as TORCH_WARN reaches Python
        warnings.warn("something else")

    counts = overhead.count_syncs(step)
    assert modes_set == ["warn", "default"] and sum(counts.values()) == 3
    [(place, n)] = counts.items()
    assert place.rpartition(":")[0].endswith("test_bench.py") and n == 3  # the line that warned, three times
    table = overhead.sync_table({("loss", "baseline"): Counter(), ("step", "baseline"): Counter({"a.py:1": 2}),
                                 ("loss", "nwd"): Counter({"b.py:3": 1}), ("step", "nwd"): Counter({"a.py:1": 2, "b.py:3": 1})},
                                ["baseline", "nwd"])
    assert table[2:4] == ["| baseline | 0 | 2 | +0 |", "| nwd | 1 | 3 | +1 |"]
    assert table[-1] == "| nwd | a.py:1 x2, b.py:3 x1 |"
    assert overhead.short_path("/x/lib/python3.12/site-packages/ultralytics/utils/loss.py") == "ultralytics/utils/loss.py"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real host synchronisation needs a CUDA device")
def test_sync_count_counts_a_real_host_synchronisation():
    on_gpu = torch.ones(4, device="cuda")
    counts = overhead.count_syncs(lambda: on_gpu.sum().item())  # .item() waits for the GPU
    [(place, n)] = counts.items()
    assert place.rpartition(":")[0].endswith("test_bench.py") and n == 1
    assert overhead.short_path("/work/checkout/yolo_sizeloss/weights.py") == "yolo_sizeloss/weights.py"


@pytest.mark.parametrize("flags, message", [
    (["--modes", "nosuch"], "unknown loss 'nosuch'"),
    (["--modes", "nwd:nosuchvariant"], "loss settings 'nosuchvariant' not found"),
    (["--model", "nosuch.yaml"], "--model nosuch.yaml: no such file, nor one of Ultralytics' model yamls"),
    (["--model", "yolov8n.pt"], "--model yolov8n.pt: give a model yaml"),
    (["--device", "bogus"], "--device bogus: expected cpu, mps, a CUDA index"),
    (["--repeats", "0"], "--repeats 0: must be at least 1"),  # min() of no samples, after the warm-up
    (["--out", "OUT/nodir/overhead.md"], "--out OUT/nodir/overhead.md: must be a file in an existing folder"),
    (["--out", "OUT"], "--out OUT: must be a file in an existing folder"),
])
def test_overhead_refuses_a_mistake_before_building_the_model(tmp_path, monkeypatch, capsys, flags, message):
    """A bad --out was found only after all the timing; the others stopped it with a traceback."""
    monkeypatch.setattr(overhead, "DetectionModel", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(SystemExit) as stop:
        overhead.main(["--device", "cpu", *(f.replace("OUT", str(tmp_path)) for f in flags)])
    assert stop.value.code == 2 and message.replace("OUT", str(tmp_path)) in capsys.readouterr().err


def test_gpu_progress_and_summary_read_each_runs_results_csv(tmp_path):
    def run(name, times, epochs=100, evaluated=False, family="yolo"):
        folder = tmp_path / family / "runs" / name
        folder.mkdir(parents=True)
        (folder / "args.yaml").write_text(f"epochs: {epochs}\nimgsz: 416\n")
        (folder / "results.csv").write_text("epoch,time\n" + "".join(f"{i + 1},{t}\n" for i, t in enumerate(times)))
        if evaluated:
            (tmp_path / family / "val" / name).mkdir(parents=True)
            (tmp_path / family / "val" / name / "metrics.json").write_text("{}")

    run("baseline-s0", [4, 6, 8, 10])  # 2 s an epoch after the first
    run("nwd-s0", [5, 9, 13, 17, ""])  # 4 s an epoch; its training is writing the fifth row
    run("nwd-s1", [])  # started, no epoch yet
    run("rcnn-plb-s0", [3, 6], epochs=2, family="rcnn")  # trained, being evaluated
    run("rcnn-nwd-s0", [3, 6], epochs=2, evaluated=True, family="rcnn")
    elapsed, line = gpu.progress(tmp_path, start=time.time() - 30).split(" s] ", 1)
    assert 30 <= int(elapsed.removeprefix("[")) < 60  # the wall time since start, however loaded the machine
    assert line.startswith("yolo: 0 evaluated, 0 evaluating, 2 training, 1 starting, epochs 4-4/100, 3.00 s/epoch "
                           "per run, 0.75 epochs/s in all, about 384 s of training left; "
                           "rcnn: 1 evaluated, 1 evaluating, 0 training, 0 starting"), line
    text = gpu.summary(tmp_path)
    assert "| baseline-s0 | 4/100 | 2.50 | 2.00 | 10 | stopped before its last epoch |" in text
    assert "| nwd-s1 | 0/100 | n/a | n/a | 0 | stopped before its last epoch |" in text
    assert "| rcnn-plb-s0 | 2/2 | 3.00 | 3.00 | 6 | trained, not evaluated |" in text
    assert "| rcnn-nwd-s0 | 2/2 | 3.00 | 3.00 | 6 | evaluated |" in text


WHEELS_MIB = 19  # bench/gpu_wheels.sh's .whl: 18.5 MiB, polars.tar.xz (polars 0.20.31 unpacked, xz) most of it
CARRY_LIMIT_MIB = 64  # what one call to the GPU machine may carry: the checkout and the carried .whl


def test_the_checkout_leaves_room_for_the_gpu_wheels():
    """Every tracked file travels to the GPU machine beside .whl; their sum must leave the wheels room."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    sizes = {name: (ROOT / name).stat().st_size for name in listed.stdout.split("\0") if (ROOT / name).is_file()}
    largest = sorted(sizes, key=sizes.get, reverse=True)[:5]
    assert sum(sizes.values()) / 2**20 <= CARRY_LIMIT_MIB - WHEELS_MIB, f"largest tracked files: {largest}"


@pytest.mark.slow
def test_the_gpu_script_smoke_mode_runs_every_step_and_packs_its_tables(tmp_path):
    """bench/gpu.sh --smoke: every mode of both families for one tiny epoch on the CPU, the tables,
    overhead.py, and OUT packed as the GPU run packs it (a few minutes on two busy cores)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "GPU_WORK": str(work), "PYTHON": sys.executable, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}
    done = subprocess.run(["bash", "bench/gpu.sh", "--smoke", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    data = tmp_path / "data" / "data.yaml"  # the subset's yaml, to name its data set when tabulating again
    data.parent.mkdir()
    shutil.copy(work / "data" / "data.yaml", data)
    shutil.rmtree(work)  # 1.3 GB of checkpoints
    assert done.returncode == 0, done.stdout[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu.log", "logs.tar.gz", "overhead.md", "rcnn_results.md",
                                                     "records.tar.gz", "summary.md", "yolo_results.md"]
    yolo, rcnn = (out / "yolo_results.md").read_text(), (out / "rcnn_results.md").read_text()
    assert yolo.startswith("| mode | mAP50-95 |") and rcnn.startswith("| mode | mAP50-95 |")
    for text, labels in ((yolo, ["baseline", "nwd", "nwd-safit_small_classes"]),
                         (rcnn, ["rcnn-baseline", "rcnn-plb", "rcnn-nwd", "rcnn-nwd-safit_sharp_auto"])):
        differences = text.split("Difference to")[1]
        assert all(f"\n| {label} |" in text for label in labels)
        assert all(f"\n| {label} |" in differences for label in labels[1:])
        assert "paired bootstrap over test images" in text
    timing = (out / "overhead.md").read_text()
    assert "| mode | loss call ms | ratio | training step ms |" in timing
    assert all(f"\n| {mode} |" in timing for mode in overhead.MODES)
    assert "Host synchronisations: not counted on cpu" in timing
    summary = (out / "summary.md").read_text()
    for name in ("baseline-s0", "nwd-safit_small_classes-s0", "rcnn-plb-s0", "rcnn-nwd-safit_sharp_auto-s0"):
        assert re.search(rf"\| {name} \| 1/1 \| [0-9.]+ \|.*\| evaluated \|", summary), summary
    log = (out / "gpu.log").read_text()
    assert "7 harnesses" not in log and "2 harnesses started" in log and "trainings over" in log
    assert re.search(r"yolo: \d evaluated, .*; rcnn: ", log) and "## overhead" in log
    with tarfile.open(out / "logs.tar.gz") as logs:
        assert {"logs/yolo.log", "logs/rcnn.log", "logs/overhead.log", "logs/table-yolo.log"} <= set(logs.getnames())
    unpacked = tmp_path / "unpacked"
    with tarfile.open(out / "records.tar.gz") as records:
        names = set(records.getnames())
        records.extractall(unpacked, filter="data")
    assert {"yolo/results.json", "yolo/runs/nwd-s0/results.csv", "yolo/val/nwd-s0/detections.json.bz2",
            "rcnn/runs/rcnn-plb-s0/args.yaml", "rcnn/val/rcnn-plb-s0/metrics.json"} <= names
    assert not any(name.endswith(".pt") for name in names)
    # the records are enough to tabulate again, with another number of bootstrap draws
    (unpacked / "yolo" / "results.md").unlink()
    assert compare.main(["--preset", "gpu", "--epochs", "1", "--imgsz", "32", "--batch", "4", "--seeds", "0",
                         "--bootstrap", "150", "--focus-class", "Platelets", "--only", "table", "--data", str(data),
                         "--out", str(unpacked / "yolo")]) == 0
    assert "150 draws of the test images" in (unpacked / "yolo" / "results.md").read_text()


def test_one_class_data_set_keeps_only_that_class(tmp_path):
    from conftest import BCCD

    out = tmp_path / "platelets"
    kept = one_class.one_class_dataset("bccd.yaml", "Platelets", out)
    shipped = {split: sum(line.startswith("2 ") for f in (BCCD / "labels" / split).glob("*.txt")
                          for line in f.read_text().splitlines()) for split in ("train", "val", "test")}
    assert kept == shipped and kept["train"] > 0
    rows = [line for f in (out / "labels" / "test").glob("*.txt") for line in f.read_text().splitlines()]
    assert len(rows) == kept["test"] and all(line.startswith("0 ") for line in rows)
    assert len(list((out / "images" / "test").iterdir())) == len(list((BCCD / "images" / "test").iterdir()))  # linked
    with pytest.raises(FileExistsError, match="platelets exists; choose a new folder"):
        one_class.one_class_dataset("bccd.yaml", "Platelets", out)
    with pytest.raises(ValueError, match="no class 'Cells'"):
        one_class.one_class_dataset("bccd.yaml", "Cells", tmp_path / "other")


def test_one_class_refuses_images_whose_labels_would_collide_and_writes_nothing(tmp_path):
    from conftest import BCCD

    image = next((BCCD / "images" / "train").iterdir())
    for folder in ("a", "b"):  # the same file name in two folders of one split, as Ultralytics allows
        (tmp_path / "images" / folder).mkdir(parents=True)
        (tmp_path / "images" / folder / image.name).symlink_to(image)
        (tmp_path / "labels" / folder).mkdir(parents=True)
        (tmp_path / "labels" / folder / f"{image.stem}.txt").write_text("2 0.5 0.5 0.1 0.1\n")
    data = tmp_path / "two.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: [images/a, images/b]\nval: images/a\nnames: {{0: RBC, 1: WBC, 2: Platelets}}\n")
    with pytest.raises(ValueError, match=f"share the name '{image.stem}'"):
        one_class.one_class_dataset(str(data), "Platelets", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def imageless_data(folder: Path) -> str:
    """A data yaml whose image folders do not exist."""
    (folder / "imageless.yaml").write_text(f"path: {folder}\ntrain: images/train\nval: images/val\nnames: {{0: Platelets}}\n")
    return str(folder / "imageless.yaml")


def test_one_class_names_a_missing_or_unusable_data_yaml_in_one_line(tmp_path, capsys):
    assert one_class.main(["--data", str(tmp_path / "nosuch.yaml"), "--out", str(tmp_path / "a")]) == 2
    assert f"error: data yaml '{tmp_path / 'nosuch.yaml'}' not found" in capsys.readouterr().err
    assert one_class.main(["--data", imageless_data(tmp_path), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'imageless.yaml'}: ") and "images not found" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unmatched_crops_one_tile_per_confident_detection_without_a_ground_truth(tmp_path, capsys):
    records, data = load_split("bccd.yaml", "test")
    r = records[0]
    names = [data["names"][k] for k in range(3)]
    # every ground truth found at 0.9, plus two boxes where there is none: one at 0.8, one at 0.3
    stray = np.array([[5, 5, 35, 35], [45, 5, 75, 35]], dtype=np.float32)
    detected = replace(r, pred_boxes=np.concatenate([r.gt_boxes, stray]),
                       pred_scores=np.array([0.9] * len(r.gt_boxes) + [0.8, 0.3], dtype=np.float32),
                       pred_classes=np.concatenate([r.gt_classes, [2, 2]]))
    run = RunDetections([detected], letterbox_scales([detected], 416), names)
    write_report(evaluate_records(run.records, names, run.input_scales), tmp_path / "run", run)
    out = tmp_path / "crops.png"
    assert unmatched.main([str(tmp_path / "run"), "--conf", "0.5", "--out", str(out)]) == 0
    assert "run: 1 unmatched detections at score >= 0.5" in capsys.readouterr().out
    with Image.open(out) as sheet:
        assert sheet.size == (unmatched.LABEL_WIDTH + unmatched.TILE, unmatched.TILE)
    assert unmatched.main([str(tmp_path / "run"), "--conf", "0.2", "--out", str(out)]) == 0
    with Image.open(out) as sheet:
        assert sheet.size == (unmatched.LABEL_WIDTH + 2 * unmatched.TILE, unmatched.TILE)
    assert unmatched.main([str(tmp_path), "--out", str(out)]) == 1  # a folder without a detections file


def test_unmatched_crops_the_image_upright_as_yolo_read_it(tmp_path):
    """A photo with an EXIF orientation was cropped as stored, while its boxes are in the upright frame
    YOLO (cv2) read it in: a crop below the stored height came out black."""
    import cv2

    stored = np.zeros((60, 100, 3), np.uint8)  # 100 wide, 60 tall as stored; 60 x 100 upright
    stored[:, :50] = (200, 40, 40)
    stored[:, 50:] = (40, 40, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to show
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    upright = cv2.cvtColor(cv2.imread(str(tmp_path / "photo.jpg")), cv2.COLOR_BGR2RGB)
    assert upright.shape[:2] == (100, 60)
    box = np.array([[20, 60, 40, 80]], np.float32)  # below row 60: outside the stored image
    record = ImageRecord(str(tmp_path / "photo.jpg"), 60, 100, gt_boxes=np.array([[0, 0, 10, 10]], np.float32),
                         gt_classes=np.array([0]), pred_boxes=box, pred_scores=np.array([0.9], np.float32),
                         pred_classes=np.array([0]))
    run = RunDetections([record], letterbox_scales([record], 416), ["thing"])
    write_report(evaluate_records(run.records, run.names, run.input_scales), tmp_path / "run", run)
    [tile] = unmatched.crops(str(tmp_path / "run"), conf=0.5)
    centre = np.asarray(tile)[unmatched.TILE // 2, unmatched.TILE // 2].astype(int)
    assert np.abs(centre - upright[70, 30]).max() <= 8 and centre.max() > 100


@pytest.mark.parametrize("argv, message", [
    (["REPORT", "--conf", "5", "--out", "OUT/crops.png"], "--conf 5.0: must be in [0, 1)"),
    (["REPORT", "--out", "OUT/nodir/crops.png"], "--out OUT/nodir/crops.png: must be a file in an existing folder"),
    (["REPORT", "--out", "OUT"], "--out OUT: must be a file in an existing folder"),
    (["REPORT", "--out", "OUT/crops"], "--out OUT/crops: give an image file name PIL can write"),
    (["REPORT", "--out", "OUT/crops.xyz"], "--out OUT/crops.xyz: give an image file name PIL can write"),
    (["OUT/missing", "--out", "OUT/crops.png"], "REPORT OUT/missing: no such folder"),
])
def test_unmatched_refuses_a_mistake_before_making_any_crop(tmp_path, monkeypatch, capsys, argv, message):
    """Found only when the sheet was saved, after every report's crops (or never: --conf 5)."""
    (tmp_path / "report").mkdir()
    monkeypatch.setattr(unmatched, "crops", lambda *a: pytest.fail("made the crops"))
    argv = [a.replace("REPORT", str(tmp_path / "report")).replace("OUT", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as stop:
        unmatched.main(argv)
    assert stop.value.code == 2 and message.replace("OUT", str(tmp_path)) in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "report"]


def test_unmatched_a_detections_file_val_did_not_write_is_one_error_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "detections.json.bz2").write_bytes(b"not bzip2")
    assert unmatched.main([str(tmp_path / "run"), "--out", str(tmp_path / "crops.png")]) == 1
    assert "not a detections file written by val" in capsys.readouterr().err
    assert not (tmp_path / "crops.png").exists()


def test_peer_modes_carry_their_model_and_ultralytics_arguments(capsys):
    """What a user of stock Ultralytics would try instead: class weighting and the P2 head, as modes."""
    args = compare.parse_args(["--losses", "baseline", "baseline@cls_pw=1.0", "baseline@model=yolov8n-p2.yaml",
                               "nwd:assigner_auto@model=yolov8n-p2.yaml"])
    runs = dict(compare.runs_of(args))
    assert list(runs) == ["baseline", "baseline-cls_pw1.0", "baseline-yolov8n-p2", "nwd-assigner_auto-yolov8n-p2"]
    assert runs["baseline-cls_pw1.0"] == ["--loss", "baseline", "--model", "yolov8n.yaml", "cls_pw=1.0"]
    assert runs["baseline-yolov8n-p2"][:4] == ["--loss", "baseline", "--model", "yolov8n-p2.yaml"]
    assert runs["nwd-assigner_auto-yolov8n-p2"][3] == "yolov8n-p2.yaml" and "--loss-cfg" in runs["nwd-assigner_auto-yolov8n-p2"]
    with pytest.raises(SystemExit):  # checked as train checks key=value pairs, before any run
        compare.parse_args(["--losses", "baseline", "baseline@cls_pww=1.0"])
    assert "did you mean 'cls_pw'" in capsys.readouterr().err


def test_faster_rcnn_modes_refuse_the_yolo_extras_before_any_run(capsys):
    """Faster R-CNN's train takes no key=value pairs (baseline@cls_pw=1.0 failed when its mode was reached,
    hours in) and builds its model from --backbone (plb@model=... was trained as plain plb)."""
    for mode in ("baseline@cls_pw=1.0", "plb@model=yolov8s.yaml"):
        with pytest.raises(SystemExit) as stop:
            compare.parse_args(["--arch", "faster_rcnn", "--losses", "baseline", mode])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f": error: {mode}: @key=value extras are YOLO's" in err.splitlines()[-1]


def test_the_plot_leaves_out_a_column_no_mode_has(tmp_path):
    """Faster R-CNN has no mAP50-95 (no Ultralytics validator): results.png drew it as bars at 0. The
    plot is written as SVG here, where each tick label is a comment."""
    cols = compare.columns("Platelets")
    rcnn = {label: {0: report(**{"coco.input.ap_small": v})} for label, v in (("rcnn-baseline", 0.2), ("rcnn-plb", 0.25))}
    compare.plot(compare.summarise(rcnn, cols), "Platelets", tmp_path / "rcnn.svg")
    text = (tmp_path / "rcnn.svg").read_text()
    assert "<!-- APs input -->" in text and "<!-- mAP50-95 -->" not in text
    mixed = {**rcnn, "baseline": {0: report(**{"ultralytics.mAP50-95": 0.3})}}  # one mode has it: drawn
    compare.plot(compare.summarise(mixed, cols), "Platelets", tmp_path / "mixed.svg")
    assert "<!-- mAP50-95 -->" in (tmp_path / "mixed.svg").read_text()


def test_assignment_counts_every_mode_on_the_same_batches(bccd_subset, tmp_path, capsys):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    weights = tmp_path / "untrained.pt"
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=3, verbose=False)}, weights)
    assert assignment.main(["--weights", str(weights), "--data", str(bccd_subset), "--imgsz", "160",
                             "--batch", "4", "--batches", "2", "--modes", "baseline", "nwd:safit"]) == 0
    counts, by_size = capsys.readouterr().out.split("\nper ground truth of each size")
    by_size, conflicts = by_size.split("\npositive anchors per step")
    conflicts, per_class = conflicts.split("\nper class:")
    rows = {line.split()[0]: line.split()[1:] for line in counts.splitlines() if line.startswith(("baseline", "nwd"))}
    assert list(rows) == ["baseline", "nwd:safit"]
    assert rows["baseline"][0] == rows["nwd:safit"][0] and float(rows["baseline"][0]) > 0  # the same small GTs
    assert all(0 <= float(v.rstrip("%")) <= 100 for row in rows.values() for v in row[2:])
    sizes = {line.split()[0]: line.split()[1:] for line in by_size.splitlines() if line.startswith(("baseline", "nwd"))}
    assert list(sizes) == ["baseline", "nwd:safit"]
    for row in sizes.values():  # the shares of the three sizes add up to the whole target score
        assert sum(float(v.rstrip("%")) for v in row[2:9:3] if v != "nan") == pytest.approx(100, abs=0.2)
    # the sum against the first mode's: the same medium ground truths, so (their score / their share) per mode
    # is the sum over a common count, and the two modes' ratio is the sums' (to the printed figures' rounding)
    total = {mode: float(row[4]) / float(row[5].rstrip("%")) for mode, row in sizes.items()}
    assert float(sizes["nwd:safit"][9]) == pytest.approx(total["nwd:safit"] / total["baseline"], rel=0.03)
    for row in sizes.values():  # and of the box terms' weight
        assert sum(float(v.rstrip("%")) for v in row[10:]) == pytest.approx(100, abs=0.2)
    # the stock loss's box terms are weighed by its target scores: the same shares
    assert sizes["baseline"][10:] == sizes["baseline"][2:9:3]
    claims = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in conflicts.splitlines()
              if line.startswith(("baseline", "nwd"))}
    assert list(claims) == ["baseline", "nwd:safit"]
    assert claims["baseline"][2:] == [0, 0]  # the stock overlap keeps what the stock CIoU keeps
    for positives, claimed, moved, to_smaller in claims.values():
        assert positives > 0 and claimed <= positives and to_smaller <= moved <= claimed
    classes = [line.split() for line in per_class.splitlines() if line.split()[:1] in (["Platelets"], ["RBC"], ["WBC"])]
    assert [row[:2] for row in classes] == [[c, m] for c in ("RBC", "WBC", "Platelets") for m in ("baseline", "nwd:safit")]
    for stock, mode in zip(classes[::2], classes[1::2]):
        assert stock[2] == mode[2] and float(stock[2]) > 0  # the same ground truths of the class, each step
        assert stock[5:] == ["0.00", "0.00"]  # the stock overlap moves no anchor between classes


@pytest.mark.parametrize("flags, message", [
    (["--modes", "nosuch"], "unknown loss 'nosuch'"),
    (["--modes", "baseline", "nwd:nosuchvariant"], "loss settings 'nosuchvariant' not found"),
    (["--weights", "nosuch.pt"], "--weights nosuch.pt: no such file (nothing is downloaded"),
    (["--weights", "nosuch.yaml"], "--weights nosuch.yaml: no such file, nor one of Ultralytics' model yamls"),
    (["--data", "nosuch.yaml"], "data yaml 'nosuch.yaml' not found"),
    (["--batches", "0"], "--batches 0: must be at least 1"),  # it was the whole split
])
def test_assignment_refuses_a_mistake_before_loading_any_data(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(assignment, "training_batches", lambda *a: pytest.fail("loaded the batches"))
    with pytest.raises(SystemExit) as stop:
        assignment.main(["--weights", "yolov8n.yaml", "--data", "bccd.yaml", "--imgsz", "160", *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_assignment_names_a_data_yaml_without_its_images_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(assignment, "training_batches", lambda *a: pytest.fail("loaded the batches"))
    assert assignment.main(["--weights", "yolov8n.yaml", "--data", imageless_data(tmp_path), "--imgsz", "160"]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'imageless.yaml'}: " in err and "images not found" in err and len(err.splitlines()) == 1


def test_size_tally_of_a_hand_built_assignment():
    """Two images; image 0: a 10x10 (small) and a 100x100 (large) ground truth, image 1: a 50x50 (medium)
    one and a padding slot. Anchors 0-1 of image 0 go to the small one (scores 0.5, 0.3), anchor 2 to
    the large one (0.8), anchor 3 is background; anchor 0 of image 1 goes to the medium one (0.4)."""
    tally = assignment.SizeTally()
    gt_bboxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 100, 100]], [[0, 0, 50, 50], [0, 0, 0, 0]]], dtype=torch.float32)
    mask_gt = torch.tensor([[[1], [1]], [[1], [0]]])
    fg_mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    target_gt_idx = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0]])
    target_scores = torch.zeros(2, 4, 3)  # one-hot times the normalised alignment, as the assigner returns
    target_scores[0, 0, 1], target_scores[0, 1, 1], target_scores[0, 2, 0], target_scores[1, 0, 2] = 0.5, 0.3, 0.8, 0.4
    target_scores[0, 3, 0] = 0.9  # a background anchor's row: not anyone's score
    outputs = (None, None, target_scores, fg_mask, target_gt_idx)
    tally(None, (None, None, None, None, gt_bboxes, mask_gt), {}, outputs)
    rows = tally.rows()
    assert rows["small"] == pytest.approx((2, 0.8, 0.8 / 2.0))
    assert rows["medium"] == pytest.approx((1, 0.4, 0.4 / 2.0))
    assert rows["large"] == pytest.approx((1, 0.8, 0.8 / 2.0))


def test_box_weight_tally_of_a_hand_built_box_loss_call():
    """One image at stride 8: anchor 0's target is 2 x 2 stride units (16 x 16 px: small) with score 0.5,
    anchor 1's 20 x 20 (160 x 160 px: large) with 0.3 + 0.2 over two classes, anchor 2 is background (its
    row 0.9 counts for no one): shares 0.5 / 0 / 0.5."""
    tally = assignment.BoxWeightTally()
    target_bboxes = torch.tensor([[[0, 0, 2, 2], [0, 0, 20, 20], [0, 0, 1, 1]]], dtype=torch.float32)
    target_scores = torch.tensor([[[0.5, 0, 0], [0.3, 0.2, 0], [0.9, 0, 0]]])
    fg_mask = torch.tensor([[True, True, False]])
    stride = torch.full((3, 1), 8.0)
    tally(None, (None, None, None, target_bboxes, target_scores, 1.0, fg_mask, None, stride))
    assert tally.shares() == pytest.approx([0.5, 0.0, 0.5])


def test_conflict_tally_of_a_hand_built_assignment():
    """A 40 x 40 (medium) ground truth with an 8 x 8 (small) one at its centre; three anchors, the middle one
    inside both, its prediction the 20 x 20 box between them in size: CIoU 0.25 with the medium object and 0.16
    with the small one, so the stock assigner keeps it for the medium object; NWD's Wasserstein distances are
    14.1 px to the medium object and 8.5 px to the small one (equal centres, side differences 20 and 12), so an
    NWD assigner gives it to the small object."""
    from ultralytics.utils.tal import TaskAlignedAssigner

    from yolo_sizeloss.methods.overlaps import NWDOverlap

    inputs = (torch.full((1, 3, 1), 0.5),  # pd_scores
              torch.tensor([[[0, 0, 12, 12], [10, 10, 30, 30], [28, 28, 40, 40]]], dtype=torch.float32),  # pd_bboxes
              torch.tensor([[4.0, 4.0], [20.0, 20.0], [36.0, 36.0]]),  # anchor points
              torch.zeros(1, 2, 1),  # gt_labels
              torch.tensor([[[0, 0, 40, 40], [16, 16, 24, 24]]], dtype=torch.float32),  # gt_bboxes
              torch.ones(1, 2, 1))  # mask_gt
    stock, lenient = TaskAlignedAssigner(topk=3, num_classes=1), TaskAlignedAssigner(topk=3, num_classes=1)
    lenient.iou_calculation = NWDOverlap(12.8, "").elementwise  # as yolo/loss.py sets a mode's overlap
    tallies = []
    for assigner in (stock, lenient):
        tallies.append(assignment.ConflictTally())
        assigner.register_forward_hook(tallies[-1], with_kwargs=True)
        *_, target_gt_idx = assigner(*inputs)
        assert target_gt_idx[0, 1] == (0 if assigner is stock else 1)  # whom each assigner gave the anchor
    for tally in tallies:
        assert (tally.positives, tally.claimed) == (3, 1)
    assert tallies[0].kept_otherwise.sum() == 0
    moved = torch.zeros(3, 3, dtype=torch.float64)
    moved[1, 0] = 1  # the medium object's CIoU would keep it, the small object gets it
    assert torch.equal(tallies[1].kept_otherwise, moved)



def test_conflict_and_class_tallies_of_a_class_gated_assigner():
    """The hand-built pair above, the medium object of class 0 and the small one of class 1, with only class 1
    measured by NWD (``nwd.assigner_classes: small``; the assigner is called with ``measured_gts``, which the
    tally must hand on when it asks for the candidates): the claimed middle anchor moves from class 0 to class 1.
    Per class: one ground truth each; class 0 keeps its outer anchors 0 and 2, class 1 gets anchor 1 alone."""
    from ultralytics.utils.tal import TaskAlignedAssigner

    from yolo_sizeloss.methods.overlaps import NWDOverlap
    from yolo_sizeloss.yolo.loss import ClassGatedPairs

    gt_labels = torch.tensor([[[0.0], [1.0]]])
    inputs = (torch.full((1, 3, 2), 0.5),
              torch.tensor([[[0, 0, 12, 12], [10, 10, 30, 30], [28, 28, 40, 40]]], dtype=torch.float32),
              torch.tensor([[4.0, 4.0], [20.0, 20.0], [36.0, 36.0]]),
              gt_labels,
              torch.tensor([[[0, 0, 40, 40], [16, 16, 24, 24]]], dtype=torch.float32),
              torch.ones(1, 2, 1))
    assigner = TaskAlignedAssigner(topk=3, num_classes=2)
    assigner.pair_overlaps = ClassGatedPairs(assigner, NWDOverlap(12.8, ""))  # as yolo/loss.py installs it
    conflicts, by_class = assignment.ConflictTally(), assignment.ClassTally(2)
    for hook in (conflicts, by_class):
        assigner.register_forward_hook(hook, with_kwargs=True)
    *_, target_scores, fg_mask, target_gt_idx = assigner(*inputs, measured_gts=gt_labels[..., 0] == 1)
    assert target_gt_idx[0].tolist() == [0, 1, 0] and fg_mask.all()
    assert (conflicts.positives, conflicts.claimed) == (3, 1) and conflicts.class_moves == {(0, 1): 1}
    scores = target_scores.sum(-1)[0]
    expected = torch.tensor([[1, 2, float(scores[0] + scores[2])], [1, 1, float(scores[1])]], dtype=torch.float64).T
    assert torch.allclose(by_class.sums, expected)

def _difference(per_seed: dict[str, float]) -> dict:
    """One column of compare.py's results.json differences, its t-interval computed as compare does."""
    from yolo_sizeloss.paired import t_interval

    interval = t_interval(list(per_seed.values()))
    mean, low, high = interval or (next(iter(per_seed.values())), None, None)
    return {"per_seed": per_seed, "diff": mean, "low": low, "high": high, "excludes_zero": False}


def test_suite_reads_each_sets_tables_and_checks_the_goal_lines(tmp_path, monkeypatch, capsys):
    """bench/suite.py on two hand-built sets: a mixed one over three seeds (t-interval over seeds) and a
    control with one seed (its paired bootstrap interval), each mode's lines decided by hand."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    suite = bench_script("suite")
    per_seed = lambda *v: {str(i): x for i, x in enumerate(v)}  # noqa: E731
    mixed = {"focus_class": "Platelets", "bootstrap": {}, "differences": {
        # focus +4, +5, +6 points: mean 5, t-interval 5 -+ 4.303 * 1 / sqrt(3) = [2.52, 7.48]
        # the line is on the focus class's own APs (+5), not on COCO's APs of all classes (+2)
        "nwd-safit_sharp": {"Platelets AP": _difference(per_seed(0.04, 0.05, 0.06)),
                 "Platelets APs input": _difference(per_seed(0.04, 0.05, 0.06)), "APs input": _difference(per_seed(0.01, 0.02, 0.03)),
                 "APl orig": _difference(per_seed(-0.004, -0.005, -0.006)), "mAP50-95": _difference(per_seed(0.0, 0.01, -0.01)),
                 "AP": _difference(per_seed(0.0, 0.0, 0.0)), "R small@0.3": _difference(per_seed(0.1, 0.2, 0.3))},
        # the same, but APl -1 and the focus class's interval reaching below 0 (+0, +3, +6: [-4.45, +10.45])
        "nwd": {"Platelets AP": _difference(per_seed(0.0, 0.03, 0.06)),
                "Platelets APs input": _difference(per_seed(0.04, 0.05, 0.06)), "APs input": _difference(per_seed(0.04, 0.05, 0.06)),
                   "APl orig": _difference(per_seed(-0.01, -0.01, -0.01)), "mAP50-95": _difference(per_seed(0.0, 0.01, -0.01)),
                   "AP": _difference(per_seed(0.0, 0.0, 0.0))},  # no recall column: tables older than it
    }}
    boot = lambda d, lo, hi: {"diff": d, "low": lo, "high": hi}  # noqa: E731
    undefined = {"per_seed": {}, "diff": None, "low": None, "high": None, "excludes_zero": False}  # no small wbc
    control = {"focus_class": "wbc", "differences": {"nwd-safit_sharp": {"AP": _difference(per_seed(0.006)),
                                                                         "wbc APs input": undefined}},
               "bootstrap": {"nwd-safit_sharp": {"0": {"coco.ap": boot(0.006, -0.01, 0.02)}}}}
    for name, results in (("mixed", mixed), ("control", control)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"sets": [
        {"name": "M", "kind": "mixed", "small": "7%", "results": str(tmp_path / "mixed"), "schedule": "s", "command": "c",
         "trains_as": {"nwd-assigner_auto": "nwd"}},
        # the mode's own run is read where it has one, even where it trains another mode's loss
        {"name": "C", "kind": "control", "small": "1%", "results": str(tmp_path / "control"), "schedule": "s", "command": "c",
         "trains_as": {"nwd-safit_sharp": "nwd"}},
    ]}))
    assert suite.main(["--modes", "nwd:safit_sharp", "nwd:assigner_auto", "--suite", str(tmp_path / "suite.yaml")]) == 0
    table = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:6]]
    assert table[0][1:6] == ["nwd-safit_sharp", "3", "+5.0 [+2.5, +7.5]", "+5.0 [+2.5, +7.5]", "+2.0 [-0.5, +4.5]"]
    assert table[0][-1] == "all |"
    assert table[1][1] == "nwd-assigner_auto (trains as nwd here)"
    assert table[1][-1] == "misses: focus AP interval not above 0; APl orig -1.0 < -0.5 |"
    assert table[1][-2] == "not tabulated"  # run over 3 seeds, tabulated without that column: not "not run"
    # one seed: the bootstrap's interval; +0.6 is above the control's ceiling of +0.5
    assert table[2][1:3] == ["nwd-safit_sharp (trains as nwd here)", "1"] and table[2][8] == "+0.6 [-1.0, +2.0]"
    assert table[2][4:6] == ["n/a", "not tabulated"]  # undefined on the set; a column the table lacks
    assert table[2][-1] == "misses: AP +0.6 > +0.5 |"
    assert table[3][1:4] == ["nwd-assigner_auto", "0", "not run"]


@pytest.mark.parametrize("flags, message", [
    (["--suite", "OUT/missing.yaml"], "--suite OUT/missing.yaml: "),
    (["--out", "OUT/nodir/suite.md"], "--out OUT/nodir/suite.md: must be a file in an existing folder"),
    (["--out", "OUT"], "--out OUT: must be a file in an existing folder"),
    (["--split", "tset"], "--split tset: no set of OUT/suite.yaml has tables of that split (results-tset.json)"),
    (["--modes", "baseline"], "--modes baseline: the stock loss is the reference"),
])
def test_suite_refuses_a_mistake_before_printing_the_table(tmp_path, monkeypatch, capsys, flags, message):
    """A bad --out failed after the table was printed; a misspelt split or the reference as a mode printed
    a table of 'not run' and exit 0."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    suite = bench_script("suite")
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "results.json").write_text(json.dumps({"focus_class": "wbc", "differences": {}, "bootstrap": {}}))
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"sets": [
        {"name": "C", "kind": "control", "small": "1%", "results": str(tmp_path / "set"), "schedule": "s", "command": "c"}]}))
    with pytest.raises(SystemExit) as stop:
        suite.main(["--modes", "nwd", "--suite", str(tmp_path / "suite.yaml"), *(f.replace("OUT", str(tmp_path)) for f in flags)])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and message.replace("OUT", str(tmp_path)) in err and out == ""


def test_curves_averages_each_epochs_gap_over_seeds_and_bins(tmp_path, capsys):
    """bench/curves.py on hand-written results.csv files: per epoch (mode - baseline) in percent, mean over the
    two seeds, then over bins of two epochs (the last bin shorter)."""
    curves = bench_script("curves")
    values = {("baseline", 0): [0.10, 0.20, 0.30], ("baseline", 1): [0.10, 0.30, 0.30],
              ("nwd", 0): [0.12, 0.26, 0.31], ("nwd", 1): [0.10, 0.30, 0.33]}
    for (label, seed), column in values.items():
        run = tmp_path / "runs" / f"{label}-s{seed}"
        run.mkdir(parents=True)
        rows = "".join(f"{e + 1},{v}\n" for e, v in enumerate(column))
        (run / "results.csv").write_text("epoch,metrics/mAP50-95(B)\n" + rows)
    # epoch gaps in points: seed 0 +2, +6, +1; seed 1 0, 0, +3 -> means +1, +3, +2 -> bins (+1 +3)/2 = +2, then +2
    assert curves.main([str(tmp_path), "--modes", "nwd", "--seeds", "0", "1", "--bin", "2"]) == 0
    assert "| nwd | +2.0 | +2.0 |" in capsys.readouterr().out
    assert curves.main([str(tmp_path), "--modes", "nwd", "--seeds", "0", "1", "--column", "val/AP50-95 x"]) == 2
    assert "'val/AP50-95 x' is not a column of both nwd-s0 and baseline-s0" in capsys.readouterr().err


@pytest.mark.parametrize("width", ["0", "-3"])
def test_curves_refuses_a_bin_below_one_epoch(tmp_path, capsys, width):
    """--bin 0 said "range() arg 3 must not be zero"; --bin -3 printed an empty table and exit 0."""
    curves = bench_script("curves")
    for label in ("baseline", "nwd"):
        (tmp_path / "runs" / f"{label}-s0").mkdir(parents=True)
        (tmp_path / "runs" / f"{label}-s0" / "results.csv").write_text("epoch,metrics/mAP50-95(B)\n1,0.1\n2,0.2\n")
    with pytest.raises(SystemExit) as stop:
        curves.main([str(tmp_path), "--modes", "nwd", "--seeds", "0", "--bin", width])
    assert stop.value.code == 2 and f"--bin {width}: must be at least 1" in capsys.readouterr().err


def test_a_failing_command_stops_the_harness_with_one_line(tmp_path, capfd):
    with pytest.raises(SystemExit) as stop:
        compare.main(["--losses", "baseline", "--seeds", "0", "--epochs", "1", "--data", unusable_data(tmp_path),
                      "--device", "cpu", "--out", str(tmp_path / "out")])
    assert re.fullmatch(r"compare\.py: stopped: `.* -m yolo_sizeloss\.cli train .*` failed \(exit 1\)", str(stop.value))
    assert "Traceback" not in capfd.readouterr().err


def test_by_group_splits_a_class_ap_by_the_group_each_file_name_names(tmp_path, capsys):
    """Two frames of scene 'kit' whose 20 px car is found exactly and two of scene 'dji' whose car is missed:
    car AP 1 and 0 by scene (0.5 over all four images, the mean the paired bootstrap draws from)."""
    by_group = bench_script("by_group")
    box = np.array([[10, 10, 30, 30]], dtype=np.float32)
    none = np.zeros((0, 4), dtype=np.float32)
    records = [
        ImageRecord(file=f"{scene}_{k}.jpg", width=100, height=100, gt_boxes=box, gt_classes=np.array([0]),
                    pred_boxes=box if scene == "kit" else none, pred_scores=np.full(int(scene == "kit"), 0.9, np.float32),
                    pred_classes=np.zeros(int(scene == "kit"), dtype=np.int64))
        for scene in ("kit", "dji") for k in range(2)
    ]
    run = RunDetections(records, np.ones(4), ["car", "bus"])
    write_report(evaluate_records(run.records, run.names, run.input_scales), tmp_path / "report", run)
    assert by_group.main([str(tmp_path / "report"), "--class", "car", "--group", "^([a-z]+)_"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert rows == ["| report | kit | 2 | 2 (2 small) | 1.000 | 1.000 | n/a | n/a |",
                    "| report | dji | 2 | 2 (2 small) | 0.000 | 0.000 | n/a | n/a |"]
    assert by_group.main([str(tmp_path / "report"), "--class", "car", "--group", "^kit"]) == 1
    assert "--group '^kit' does not match image dji_0.jpg" in capsys.readouterr().err


def test_box_pull_by_hand():
    """A prediction 1 px right of its object: NWD's distance is 1 px, so the pull of 1 - exp(-W / C) is
    exp(-1 / C) / C whatever the side; with ratio 0 every measure pulls as the stock CIoU does; at ratio 0.5
    the pull is the mean of the two."""
    box_pull = bench_script("box_pull")
    for side in (8.0, 128.0):
        stock = box_pull.pull(side, 1.0, None, 67.3, 0.5)
        # (NWD adds a tiny eps under its square root, hence rel 1e-6)
        assert box_pull.pull(side, 1.0, "nwd", 67.3, 1.0) == pytest.approx(np.exp(-1 / 67.3) / 67.3, rel=1e-6)
        assert box_pull.pull(side, 1.0, "safit_sharp", 67.3, 0.0) == stock
        assert box_pull.pull(side, 1.0, "nwd", 67.3, 0.5) == pytest.approx((stock + np.exp(-1 / 67.3) / 67.3) / 2)
    # CIoU measures relative error: an 8 px box is pulled harder than a 128 px one, NWD pulls both alike
    assert box_pull.pull(8.0, 1.0, None, 67.3, 0.5) > 10 * box_pull.pull(128.0, 1.0, None, 67.3, 0.5)
