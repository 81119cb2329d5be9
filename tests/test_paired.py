"""Paired comparison of runs on BCCD's real test ground truth, with detections built from it."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import faster_coco_eval
import numpy as np
import pytest
from conftest import make_subset

from yolo_sizeloss.detections import load_split
from yolo_sizeloss.detections_file import RunDetections, write_detections
from yolo_sizeloss.evaluation import (
    COCO_EDGES,
    box_areas,
    check_faster_coco_eval,
    coco_metrics,
    evaluate_records,
    letterbox_scales,
    per_class_ap,
    run_cocoeval,
)
from yolo_sizeloss.paired import (
    RunEvaluation,
    align_runs,
    bootstrap_draws,
    difference,
    image_groups,
    key_metrics,
    paired_bootstrap,
    t_interval,
)
from yolo_sizeloss.paired_report import compare_report
from yolo_sizeloss.report import write_report

IMGSZ = 416


@pytest.fixture(scope="module")
def bccd_test() -> RunDetections:
    """BCCD's 72 test images with their ground truth and, as detections, each ground-truth box three
    times, jittered by a few pixels, with random scores (seeded): an imperfect but decent detector."""
    records, data = load_split("bccd.yaml", "test")
    rng = np.random.default_rng(0)
    detected = []
    for r in records:
        boxes = np.repeat(r.gt_boxes, 3, axis=0)
        detected.append(replace(
            r,
            pred_boxes=(boxes + rng.normal(0, 3, boxes.shape)).astype(np.float32),
            pred_scores=rng.uniform(0.01, 1, len(boxes)).astype(np.float32),
            pred_classes=np.repeat(r.gt_classes, 3),
        ))
    return RunDetections(detected, letterbox_scales(detected, IMGSZ), [data["names"][k] for k in range(3)])


def without_small_predictions(run: RunDetections) -> RunDetections:
    """``run`` with every detection under 32x32 network-input pixels removed."""
    records = []
    for r, scale in zip(run.records, run.input_scales):
        keep = box_areas(r.pred_boxes) * scale**2 >= 32**2
        records.append(replace(r, pred_boxes=r.pred_boxes[keep], pred_scores=r.pred_scores[keep],
                               pred_classes=r.pred_classes[keep]))
    return RunDetections(records, run.input_scales, run.names)


def full_set_values(evaluation: RunEvaluation) -> dict:
    """The evaluation's metrics on all 72 images by name; an undefined one (NaN: no ground truth of
    that class and size) as None, as a report writes it."""
    values = evaluation.metrics(np.arange(72))
    return {k: None if math.isnan(v) else v for k, v in zip(evaluation.keys(), values)}


def test_full_set_values_are_the_reports(bccd_test):
    metrics = evaluate_records(bccd_test.records, bccd_test.names, bccd_test.input_scales)
    evaluation = RunEvaluation(bccd_test, COCO_EDGES, "input", (0.01, 0.1, 0.3))
    values = full_set_values(evaluation)
    assert values == pytest.approx(key_metrics(metrics), abs=1e-6)  # the report rounds to 6 decimals
    assert 0.2 < values["coco.input.ap_small"] < values["coco.ap"] < 0.9  # a real, imperfect detector
    assert 0.2 < values["per_class.Platelets.input.ap_small"] < 0.9 and values["per_class.WBC.input.ap_small"] is None


def test_full_set_values_follow_the_reports_max_det(bccd_test):
    """A report evaluated with val --max-det 12 is bootstrapped at COCO maxDets 12, not at 100."""
    metrics = evaluate_records(bccd_test.records, bccd_test.names, bccd_test.input_scales, max_det=12)
    evaluation = RunEvaluation(bccd_test, COCO_EDGES, "input", (0.01, 0.1, 0.3), max_det=12)
    values = full_set_values(evaluation)
    assert values == pytest.approx(key_metrics(metrics), abs=1e-6)
    at_100 = RunEvaluation(bccd_test, COCO_EDGES, "input", (0.01, 0.1, 0.3)).metrics(np.arange(72))
    assert values["coco.ap"] < at_100[0] - 0.01  # 12 detections per image (BCCD has ~20 objects) cap AP
    assert 0 < metrics["coco"]["original"]["ar100"] < 1  # AR at maxDets 12 (faster-coco-eval's key AR_12)


def test_a_drawn_image_counts_once_per_draw_as_a_distinct_image(bccd_test):
    draw = np.array([5, 5, 5, 17, 40, 40, 71])
    evaluation = RunEvaluation(bccd_test, COCO_EDGES, "input", (0.1,))
    values = dict(zip(evaluation.keys(), evaluation.metrics(draw)))
    drawn = [bccd_test.records[i] for i in draw]  # to_coco gives each position its own image id
    for frame, scales in (("original", np.ones(len(draw))), ("input", bccd_test.input_scales[draw])):
        coco = coco_metrics(drawn, 3, scales, COCO_EDGES)
        assert values["coco.ap"] == pytest.approx(coco["ap"], abs=1e-6)
        for size in ("small", "medium", "large"):  # None (no such object drawn) is NaN here
            expected = math.nan if coco[f"ap_{size}"] is None else coco[f"ap_{size}"]
            assert values[f"coco.{frame}.ap_{size}"] == pytest.approx(expected, abs=1e-6, nan_ok=True)
        for name, by_size in per_class_ap(drawn, bccd_test.names, scales).items():
            for size in ("small", "medium", "large"):
                expected = math.nan if by_size[f"ap_{size}"] is None else by_size[f"ap_{size}"]
                assert values[f"per_class.{name}.{frame}.ap_{size}"] == pytest.approx(expected, abs=1e-6, nan_ok=True)
    assert values["coco.ap"] != pytest.approx(evaluation.metrics(np.unique(draw))[0], abs=1e-3)


def test_identical_runs_differ_by_zero_with_zero_width_intervals(bccd_test):
    [differences] = paired_bootstrap([bccd_test, bccd_test], resamples=50)
    # AP, AP50, 3 sizes x 2 frames, 3 classes, 3 classes x 3 sizes x 2 frames, recall at 3 thresholds
    assert len(differences) == 2 + 3 * 2 + 3 + 3 * 3 * 2 + 3
    # BCCD's test split at 416 has no small red or white cells and no large red cells or platelets; in its
    # 640 x 480 originals no small red or white cells and no medium white cells
    undefined = {f"per_class.{c}.input.ap_{s}" for c, s in (("RBC", "small"), ("RBC", "large"), ("WBC", "small"),
                                                            ("Platelets", "large"))}
    undefined |= {f"per_class.{c}.original.ap_{s}" for c, s in (("RBC", "small"), ("WBC", "small"), ("WBC", "medium"))}
    for key, d in differences.items():
        expected = (None, None, None, False) if key in undefined else (0.0, 0.0, 0.0, False)
        assert (d["diff"], d["low"], d["high"], d["excludes_zero"]) == expected, key


def test_removing_small_predictions_costs_aps_with_an_interval_excluding_zero(bccd_test):
    [d] = paired_bootstrap([bccd_test, without_small_predictions(bccd_test)], resamples=200)
    small = d["coco.input.ap_small"]
    assert small["a"] > 0.2 and small["b"] < small["a"] / 2
    assert small["low"] <= small["diff"] <= small["high"] < 0 and small["excludes_zero"]
    assert d["recall.small@0.1"]["high"] < 0 and d["per_class.Platelets.ap"]["excludes_zero"]
    large = d["coco.input.ap_large"]  # no large object lost a detection
    assert (large["diff"], large["low"], large["high"], large["excludes_zero"]) == (0.0, 0.0, 0.0, False)


def test_a_seeded_bootstrap_is_reproducible(bccd_test):
    pair = [bccd_test, without_small_predictions(bccd_test)]
    first = paired_bootstrap(pair, resamples=60, seed=3)
    assert paired_bootstrap(pair, resamples=60, seed=3) == first
    other = paired_bootstrap(pair, resamples=60, seed=4)
    assert other[0]["coco.ap"]["diff"] == first[0]["coco.ap"]["diff"]  # the full set does not depend on draws
    assert other[0]["coco.ap"]["low"] != first[0]["coco.ap"]["low"]


def test_runs_are_paired_by_file_and_must_share_images_and_ground_truth(bccd_test):
    shuffled = RunDetections(bccd_test.records[::-1], bccd_test.input_scales[::-1], bccd_test.names)
    _, aligned = align_runs([bccd_test, shuffled])
    assert [r.file for r in aligned.records] == [r.file for r in bccd_test.records]
    np.testing.assert_array_equal(aligned.input_scales, bccd_test.input_scales)
    with pytest.raises(ValueError, match="different images"):
        align_runs([bccd_test, RunDetections(bccd_test.records[1:], bccd_test.input_scales[1:], bccd_test.names)])
    moved = [replace(bccd_test.records[0], gt_boxes=bccd_test.records[0].gt_boxes + 5), *bccd_test.records[1:]]
    with pytest.raises(ValueError, match="different ground truth for BloodImage_00007.jpg"):
        align_runs([bccd_test, RunDetections(moved, bccd_test.input_scales, bccd_test.names)])


def test_t_interval_over_seeds():
    mean, low, high = t_interval([1.0, 2.0, 3.0])  # s = 1, t(2) = 4.303
    assert (mean, low, high) == pytest.approx((2.0, 2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert t_interval([0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert t_interval([1.0]) is None


def write_reports(folder: Path, runs: dict[str, RunDetections]) -> list[Path]:
    """A val report of each run (its metrics and detections file) in ``folder/<name>``; their folders."""
    for name, run in runs.items():
        metrics = evaluate_records(run.records, run.names, run.input_scales)
        metrics["meta"].update(model=name, data="bccd", split="test", imgsz=IMGSZ)
        write_report(metrics, folder / name, run)
    return [folder / name for name in runs]


def test_compare_report_adds_paired_intervals_when_reports_have_detections(bccd_test, tmp_path):
    folders = write_reports(tmp_path, {"stock": bccd_test, "worse": without_small_predictions(bccd_test)})
    text = compare_report(folders, bootstrap=40, seed=1)
    assert "Paired difference to stock (run - stock)" in text and "40 draws" in text
    row = next(line for line in text.split("Paired")[1].splitlines() if line.startswith("| coco.input.ap_small |"))
    assert row.endswith("] * |") and "| -0." in row
    assert "Paired" not in compare_report(folders, bootstrap=0)
    assert "evaluated with different" not in text
    worse = without_small_predictions(bccd_test)
    metrics = evaluate_records(worse.records, worse.names, worse.input_scales)
    metrics["meta"].update(model="worse", data="bccd", split="test", imgsz=640, max_det=300)  # as if evaluated
    write_report(metrics, tmp_path / "worse", worse)  # with other settings
    note = " ".join(compare_report(folders, bootstrap=0).split())
    assert "evaluated with different imgsz (stock: 416, worse: 640); max_det (stock: 100, worse: 300):" in note
    (tmp_path / "worse" / "detections.json.bz2").unlink()
    assert f"no detections.json.bz2 in {folders[1]}" in " ".join(compare_report(folders).split())


def test_compare_report_names_a_run_whose_detections_file_does_not_give_back_its_report(bccd_test, tmp_path):
    """A detections file written before val kept full precision counted a hit more or less than its report
    (a score of 0.29996 rounded over 0.3): the paired figures are the file's, and the comparison says so."""
    folders = write_reports(tmp_path, {"stock": bccd_test, "worse": without_small_predictions(bccd_test)})
    assert "do not give back" not in compare_report(folders, bootstrap=10)
    # the 'worse' run's file, every score lowered a little: its recall at 0.3 is no longer its report's
    worse = without_small_predictions(bccd_test)
    lowered = [replace(r, pred_scores=r.pred_scores - np.float32(0.02)) for r in worse.records]
    write_detections(folders[1] / "detections.json.bz2", RunDetections(lowered, worse.input_scales, worse.names))
    text = " ".join(compare_report(folders, bootstrap=10).split())
    assert re.search(r"The detections files of worse \(\S+ [0-9.]+ in its report, [0-9.]+ from its file\) do not give "
                     r"back their reports' figures", text), text


def test_runs_that_cannot_be_paired_keep_their_tables_and_are_named(bccd_test, tmp_path):
    """A run on other images stopped the whole comparison with an error naming no run; the side-by-side
    tables stand without pairing."""
    fewer = RunDetections(bccd_test.records[1:], bccd_test.input_scales[1:], bccd_test.names)
    same = without_small_predictions(bccd_test)
    folders = write_reports(tmp_path, {"stock": bccd_test, "same": same, "fewer": fewer})
    text = compare_report(folders, bootstrap=40)
    assert "| coco.ap |" in text and "Box fit and confidence" in text and "Paired difference" not in text
    assert text.rstrip().endswith("No paired bootstrap against stock: fewer: runs were evaluated on different images; "
                                  "a paired comparison needs the same ones.")


def test_the_statistics_import_no_formatting():
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, yolo_sizeloss.paired\n"
         "print(sorted(m for m in sys.modules if m.startswith('yolo_sizeloss')))"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "yolo_sizeloss.evaluation" in imported
    assert "yolo_sizeloss.report" not in imported and "yolo_sizeloss.paired_report" not in imported


def test_an_unsupported_faster_coco_eval_is_one_error_naming_the_supported_range(monkeypatch):
    check_faster_coco_eval(faster_coco_eval.__version__)  # the installed one, which the tests above ran on
    check_faster_coco_eval("1.8.5")
    for version in ("1.7.2", "1.9.0", "1.10.1", "2.0", "unknown"):
        with pytest.raises(ImportError, match=rf"^faster-coco-eval {version} is installed; yolo_sizeloss supports "
                                               r">=1\.8,<1\.9: pip install 'faster-coco-eval>=1\.8,<1\.9'$"):
            check_faster_coco_eval(version)
    # the library's own entries refuse it before reading anything (a private layout read wrongly would be silent)
    monkeypatch.setattr(faster_coco_eval, "__version__", "1.7.2")
    for evaluate in (lambda: RunEvaluation(None, COCO_EDGES, "input", (0.3,)),
                     lambda: run_cocoeval(None, None, COCO_EDGES)):
        with pytest.raises(ImportError, match="^faster-coco-eval 1.7.2 is installed"):
            evaluate()


# each command with faster-coco-eval's version made 1.7.2 (in a child process, as the check reads it)
UNSUPPORTED_RUN = """
import sys
import faster_coco_eval
faster_coco_eval.__version__ = "1.7.2"
from yolo_sizeloss.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv, code", [
    (["path", "bccd.yaml"], 0),
    (["train", "--epochs", "0"], 2),  # YOLO's train never evaluates: its own checks run
    (["val", "--compare", "a", "b"], 1),
    (["train", "--arch", "faster_rcnn", "--epochs", "0"], 1),  # each epoch's validation would evaluate
])
def test_an_unsupported_faster_coco_eval_stops_only_the_commands_that_evaluate_with_one_line(argv, code):
    """Only the commands that evaluate need a supported faster-coco-eval, and refuse another in one line."""
    done = subprocess.run([sys.executable, "-c", UNSUPPORTED_RUN, *argv], capture_output=True, text=True)
    assert done.returncode == code, done.stderr
    if argv[0] == "path":
        assert done.stdout.strip().endswith("bccd.yaml") and done.stderr == ""
    elif code == 1:
        assert done.stderr.strip().splitlines() == [
            f"yolo-sizeloss {argv[0]}: error: faster-coco-eval 1.7.2 is installed; yolo_sizeloss supports >=1.8,<1.9: "
            "pip install 'faster-coco-eval>=1.8,<1.9' (--verbose shows the traceback)"
        ]
    else:
        assert "faster-coco-eval" not in done.stderr


def test_compare_report_notes_reports_evaluated_with_different_data_yamls(tmp_path):
    """Two copies of the same BCCD test images under different data yamls: their file names pair the
    runs, and the comparison says that the data yamls differ."""
    folders = []
    for name in ("here", "there"):
        data = make_subset(tmp_path / f"{name}_data", {"train": 1, "val": 1, "test": 4})
        records, _ = load_split(str(data), "test")
        detected = [replace(r, pred_boxes=r.gt_boxes, pred_scores=np.full(len(r.gt_boxes), 0.9, np.float32),
                            pred_classes=r.gt_classes) for r in records]
        run = RunDetections(detected, letterbox_scales(detected, IMGSZ), ["RBC", "WBC", "Platelets"])
        metrics = evaluate_records(run.records, run.names, run.input_scales)
        metrics["meta"].update(model=name, data=str(data), split="test", imgsz=IMGSZ)
        write_report(metrics, tmp_path / name, run)
        folders.append(tmp_path / name)
    text = " ".join(compare_report(folders, bootstrap=10).split())
    assert (f"evaluated with different data yamls (here: {tmp_path}/here_data/data.yaml, "
            f"there: {tmp_path}/there_data/data.yaml)") in text
    assert "Paired difference to here" in text  # the same file names and ground truth still pair them


def test_a_group_is_drawn_whole_and_singleton_groups_draw_the_images_draws(bccd_test):
    """Tiles of one source image go into a draw together or not at all; with every image its own group the
    grouped bootstrap is the image bootstrap, draw for draw."""
    for draw in bootstrap_draws(3, 200, 0, ["a", "a", "b"]):
        assert (draw == 0).sum() == (draw == 1).sum() and len(draw) in (2, 3, 4)
    images = [d.tolist() for d in bootstrap_draws(72, 50, 7)]
    assert [d.tolist() for d in bootstrap_draws(72, 50, 7, [str(k) for k in range(72)])] == images
    one_by_one = paired_bootstrap([bccd_test, without_small_predictions(bccd_test)], resamples=100, seed=3)
    whole_names = paired_bootstrap([bccd_test, without_small_predictions(bccd_test)], resamples=100, seed=3,
                                   group=r"^.*$")
    assert whole_names == one_by_one


def test_image_groups_name_each_image_by_the_patterns_match(bccd_test):
    groups = image_groups(bccd_test.records, r"BloodImage_00(\d)")  # the hundreds digit of the image number
    assert groups[:2] == ["0", "0"] and sorted(set(groups)) == ["0", "1", "2", "3", "4"]
    with pytest.raises(ValueError, match=r"--group 'Cell' does not match image BloodImage_\d+\.jpg"):
        image_groups(bccd_test.records, "Cell")


def test_difference_takes_the_central_95_percent_of_the_defined_draws():
    """41 defined draws 0..40 (and one undefined): the 2.5 and 97.5 percentiles are 1 and 39."""
    d = difference(0.2, 0.5, np.array([np.nan, *range(41)], dtype=float))
    assert (d["low"], d["high"]) == pytest.approx((1.0, 39.0)) and d["excludes_zero"] and d["diff"] == pytest.approx(0.3)
    d = difference(0.2, 0.2, np.arange(-20, 21, dtype=float))
    assert (d["low"], d["high"], d["excludes_zero"]) == (-19.0, 19.0, False)
