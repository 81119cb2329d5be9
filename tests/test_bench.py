"""bench/compare.py's bookkeeping: epoch times across a resume, presets, and the table's mean and spread."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("compare", ROOT / "bench" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def test_epoch_seconds_follow_a_time_column_that_restarts_on_resume(tmp_path):
    (tmp_path / "results.csv").write_text("epoch,time\n1,10\n2,25\n3,5\n4,12\n")  # resumed after epoch 2
    assert compare._epoch_seconds(tmp_path) == [10.0, 15.0, 5.0, 7.0]
    assert compare._epoch_seconds(tmp_path / "missing") == []


def test_faster_rcnn_gets_the_paper_batch_unless_one_is_given():
    assert compare.parse_args(["--arch", "faster_rcnn"]).batch == 4
    assert compare.parse_args(["--arch", "faster_rcnn", "--batch", "16"]).batch == 16
    assert compare.parse_args([]).batch == 16


def test_unknown_loss_is_refused_before_any_run():
    with pytest.raises(SystemExit):
        compare.parse_args(["--losses", "baseline", "focal"])


def test_table_gives_mean_and_sample_spread_over_seeds():
    reports = [{"ultralytics": {"mAP50-95": 0.30}, "train": {"seconds_per_epoch": 50.0}},
               {"ultralytics": {"mAP50-95": 0.34}, "train": {"seconds_per_epoch": 54.0}}]
    summary = compare.summarise({"feedback": reports})
    assert summary["feedback"]["mAP50-95"]["mean"] == pytest.approx(0.32)
    assert summary["feedback"]["mAP50-95"]["std"] == pytest.approx(0.02 * 2 ** 0.5)  # sample std of 0.30, 0.34
    row = compare.markdown(summary, compare.parse_args(["--seeds", "0", "1"])).splitlines()[2]
    assert row.startswith("| feedback | 32.0 ± 2.8 | n/a |") and row.endswith("| 52.0 ± 2.8 |")


def test_a_run_trained_with_another_schedule_is_not_reused(tmp_path):
    args = compare.parse_args(["--epochs", "20", "--imgsz", "416"])
    (tmp_path / "args.yaml").write_text("epochs: 20\nimgsz: 416\nbatch: 16\nseed: 0\n")
    compare.check_same_schedule(tmp_path, args, seed=0)
    with pytest.raises(SystemExit, match="epochs 20 \\(asked 30\\)"):
        compare.check_same_schedule(tmp_path, compare.parse_args(["--epochs", "30"]), seed=0)
    compare.check_same_schedule(tmp_path / "new", args, seed=0)  # nothing trained there yet


def test_a_loss_cfg_variant_gets_its_own_label_and_reaches_train_py():
    variant = str(ROOT / "bench" / "gt_areas.yaml")
    [(label, flags)] = compare.runs_of(compare.parse_args(["--losses", "plb", "--loss-cfg", variant]))
    assert label == "plb-gt_areas"
    assert flags[:2] == ["--loss", "plb"] and flags[-2:] == ["--loss-cfg", variant]
