"""val.py end to end: a real checkpoint trained here, its report files, stock-equal metrics, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
IMGSZ = 320
STOCK_VAL = """
import json, sys
from ultralytics import YOLO
m = YOLO(sys.argv[1]).val(data=sys.argv[2], split="test", imgsz=%d, batch=16, conf=0.001, iou=0.7, device="cpu",
                          plots=False, project=sys.argv[3], name="stock")
print(json.dumps({"mAP50": m.box.map50, "mAP50-95": m.box.map, "precision": m.box.mp, "recall": m.box.mr}))
""" % IMGSZ


def val_py(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "val.py"), *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    """A real BCCD checkpoint of the stock loss (tests/assets/README.md says how it was trained)."""
    return ROOT / "tests" / "assets" / "yolov8n_bccd_baseline.pt"


@pytest.mark.slow
def test_val_writes_the_report_and_matches_stock_yolo_val(checkpoint, bccd_subset, tmp_path):
    run = val_py("--model", checkpoint, "--data", bccd_subset, "--split", "test", "--imgsz", IMGSZ, "--device", "cpu",
                 "--project", tmp_path, "--name", "report")
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "report"
    assert {"metrics.json", "metrics.md", "size_metrics.png"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["coco", "per_class", "recall_by_size", "fit_by_size", "ultralytics", "meta"]
    assert set(metrics["fit_by_size"]) == {"small", "medium", "large", "all"}
    for frame in ("original", "input"):
        assert {"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar100", "ar_small", "ar_medium",
                "ar_large"} <= set(metrics["coco"][frame])
    assert set(metrics["per_class"]) == {"RBC", "WBC", "Platelets"}
    assert set(metrics["recall_by_size"]) == {"0.01", "0.1", "0.3"}
    assert metrics["meta"]["split"] == "test" and metrics["meta"]["imgsz"] == IMGSZ
    assert "Platelets" in (out / "metrics.md").read_text() and "Platelets" in run.stdout
    assert "## Box fit and confidence by size" in (out / "metrics.md").read_text()

    stock = subprocess.run([sys.executable, "-c", STOCK_VAL, str(checkpoint), str(bccd_subset), str(tmp_path)],
                           capture_output=True, text=True, cwd=tmp_path)
    assert stock.returncode == 0, stock.stderr[-3000:]
    expected = json.loads(stock.stdout.strip().splitlines()[-1])
    assert sum(expected.values()) > 0  # a model that finds something, so that equality means something
    for key, value in expected.items():
        assert metrics["ultralytics"][key] == pytest.approx(value, abs=1e-6), key
    # our COCO numbers come from the validator's own detections: its faster-coco-eval size split agrees
    for size in ("small", "medium", "large"):
        ours, theirs = metrics["coco"]["original"][f"ap_{size}"], metrics["ultralytics"][f"mAP_{size}"]
        assert (ours is None and theirs == -1) or ours == pytest.approx(theirs, abs=1e-4), size
    assert metrics["meta"]["recall_frame"] == "input"
    assert set(metrics["meta"]["versions"]) == {"ultralytics", "torch", "faster_coco_eval"}


@pytest.mark.slow
def test_compare_prints_runs_side_by_side(checkpoint, bccd_subset, tmp_path):
    for buckets in ("0,32,96,inf", "0,16,32,96,inf"):  # the same --name twice: the second run goes to a-2, as Ultralytics names runs
        run = val_py("--model", checkpoint, "--data", bccd_subset, "--imgsz", IMGSZ, "--device", "cpu",
                     "--project", tmp_path, "--name", "a", "--size-buckets", buckets)
        assert run.returncode == 0, run.stderr[-3000:]
    custom = json.loads((tmp_path / "a-2" / "metrics.json").read_text())
    assert list(custom["coco"]["input"]["buckets"]) == ["0-16", "16-32", "32-96", "96-inf"]
    assert set(custom["recall_by_size"]["0.1"]) == {"0-16", "16-32", "32-96", "96-inf", "all"}
    run = val_py("--compare", tmp_path / "a", tmp_path / "a-2" / "metrics.json")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == "| metric | a | a-2/metrics.json |"
    # same detections, same AP: the small objects' row of the side-by-side table (the first table) says so
    small_row = next(line for line in run.stdout.splitlines() if line.startswith("| coco.input.ap_small | "))
    assert small_row.endswith("(+0.0000) |"), small_row


def trained_on(checkpoint: Path, data: Path | None, out: Path) -> Path:
    """A copy of ``checkpoint`` whose training settings name ``data`` as its data yaml (None: none)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    ckpt["train_args"] = {**ckpt["train_args"], "data": None if data is None else str(data)}
    torch.save(ckpt, out)
    return out


@pytest.mark.slow
def test_val_defaults_to_the_data_the_checkpoint_was_trained_on(checkpoint, bccd_subset, tmp_path):
    """As `yolo val model=best.pt`: without --data the report is on the checkpoint's own data yaml."""
    own = trained_on(checkpoint, bccd_subset, tmp_path / "own.pt")
    run = val_py("--model", own, "--imgsz", IMGSZ, "--device", "cpu", "--project", tmp_path, "--name", "own")
    assert run.returncode == 0, run.stderr[-3000:]
    meta = json.loads((tmp_path / "own" / "metrics.json").read_text())["meta"]
    assert meta["data"] == str(bccd_subset) and meta["split"] == "test"


def one_error_line(run: subprocess.CompletedProcess, fragment: str, code: int = 1) -> None:
    """Exit 2 for a usage error, 1 for bad data; one line either way, no traceback."""
    assert run.returncode == code, run.stderr
    lines = [line for line in run.stderr.strip().splitlines() if "WARNING" not in line]
    assert len(lines) == 1 and "error:" in lines[0] and fragment in lines[0], run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_bad_input_gives_one_clear_error_line(checkpoint, bccd_subset, tmp_path):
    # a missing file is a usage error, as in train, naming the path once
    one_error_line(val_py("--model", tmp_path / "missing.pt", "--data", bccd_subset),
                   f"error: --model {tmp_path / 'missing.pt'}: no such file", code=2)
    one_error_line(val_py("--model", tmp_path, "--data", bccd_subset),
                   f"error: --model {tmp_path}: a folder; give a checkpoint file", code=2)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    one_error_line(val_py("--model", tmp_path / "junk.pt", "--data", bccd_subset),
                   f"error: --model {tmp_path / 'junk.pt'}: not a readable checkpoint (")
    one_error_line(val_py("--model", checkpoint, "--data", bccd_subset, "--max-det", "10"), "--max-det 10: must be above 10", code=2)
    one_error_line(val_py("--model", checkpoint, "--data", bccd_subset, "--imgsz", "0"), "--imgsz 0", code=2)
    one_error_line(val_py("--data", bccd_subset), "--model is required", code=2)
    moved = trained_on(checkpoint, tmp_path / "gone" / "data.yaml", tmp_path / "moved.pt")
    one_error_line(val_py("--model", moved), f"--model {moved} was trained on {tmp_path / 'gone' / 'data.yaml'}, "
                   "which is not there; give --data", code=2)  # as a missing --data is
    broken = tmp_path / "broken.yaml"
    broken.write_text("names: [a\n")
    one_error_line(val_py("--model", trained_on(checkpoint, broken, tmp_path / "broken.pt")),
                   f"was trained on {broken}, which cannot be used here (")
    one_error_line(val_py("--model", trained_on(checkpoint, None, tmp_path / "no_data.pt")),
                   "the checkpoint names no training data; give --data", code=2)
    one_error_line(val_py("--model", checkpoint, "--data", bccd_subset, "--project", tmp_path / "reports", "--name", ""),
                   "--name '': must name a folder inside --project", code=2)  # it wrote to reports-2 beside it

    no_test = tmp_path / "no_test.yaml"
    data = yaml.safe_load(Path(bccd_subset).read_text())
    no_test.write_text(yaml.safe_dump({k: v for k, v in data.items() if k != "test"}))
    run = val_py("--model", checkpoint, "--data", no_test, "--split", "test")
    one_error_line(run, "has no 'test' split")
    assert "--verbose" not in run.stderr  # the data's fault, nothing to debug

    from ultralytics.nn.tasks import ClassificationModel

    classifier = tmp_path / "cls.pt"
    torch.save({"model": ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False), "train_args": {}}, classifier)
    one_error_line(val_py("--model", classifier, "--data", bccd_subset), "classify")

    (tmp_path / "empty" / "images").mkdir(parents=True)
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({**data, "test": str(tmp_path / "empty" / "images")}))
    one_error_line(val_py("--model", checkpoint, "--data", empty, "--split", "test"), "No images found")

    one_error_line(val_py("--model", checkpoint, "--data", bccd_subset, "--size-buckets", "0,96,32"), "increasing", code=2)
    run = val_py("--model", tmp_path / "missing.pt", "--data", bccd_subset, "--verbose")
    assert run.returncode != 0 and "Traceback" in run.stderr


def test_a_checkpoint_trained_for_other_classes_is_refused_before_any_report(checkpoint, bccd_subset, tmp_path):
    data = yaml.safe_load(Path(bccd_subset).read_text())
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(yaml.safe_dump({**data, "names": {0: "RBC", 1: "Platelets", 2: "WBC"}}))
    run = val_py("--model", checkpoint, "--data", renamed, "--split", "test", "--project", tmp_path / "reports")
    one_error_line(run, "trained for classes ['RBC', 'WBC', 'Platelets'], ")
    assert "--verbose" not in run.stderr and not (tmp_path / "reports").exists()


REPORT = ROOT / "bench" / "results" / "converged" / "val" / "baseline-s0"  # a real val report, committed


@pytest.mark.parametrize("case, code, fragment", [
    ("missing folder", 2, "--compare {dir}/nothere: no metrics.json"),
    ("empty object", 1, "{dir}/bad/metrics.json: not a val report (no coco, per_class, recall_by_size, meta)"),
    ("a list", 1, "{dir}/bad/metrics.json: not a val report (no coco"),
    ("broken json", 1, "{dir}/bad/metrics.json: not a val report (Expecting"),
    ("corrupt detections", 1, "{dir}/bad/detections.json.bz2: not a detections file written by val (Invalid data stream"),
])
def test_compare_names_the_file_that_is_not_a_report(tmp_path, capsys, case, code, fragment):
    from yolo_sizeloss.validate import main

    bad = tmp_path / "bad"
    bad.mkdir()
    metrics = {"empty object": "{}", "a list": "[1, 2]", "broken json": "{coco: 1}"}.get(
        case, (REPORT / "metrics.json").read_text())
    (bad / "metrics.json").write_text(metrics)
    (bad / "detections.json.bz2").write_bytes(b"garbage")
    other = tmp_path / "nothere" if case == "missing folder" else bad
    assert main(["--compare", str(REPORT), str(other), "--bootstrap", "100"]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("yolo-sizeloss val: error: "), err
    assert fragment.format(dir=tmp_path) in err and "--verbose" not in err, err


@pytest.mark.parametrize("flags, message", [
    (["--size-buckets", "0,16,inf"], "--compare takes --bootstrap, --seed and --group only (each run's report sets the rest), "
                                     "not --size-buckets"),
    (["--max-det", "300"], "not --max-det"),
    (["--bootstrap", "10"], "--bootstrap 10: 0 (no intervals) or at least 100, fewer draws cannot place a 95% interval"),
    (["--seed", "-1"], "--seed -1: must not be negative"),
])
def test_compare_refuses_a_flag_it_would_not_honour(capsys, flags, message):
    """--compare read its buckets from the reports and silently dropped --size-buckets; a handful of draws
    starred every row."""
    from yolo_sizeloss.validate import main

    assert main(["--compare", str(REPORT), str(REPORT), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"yolo-sizeloss val: error: {message}" or (len(err.splitlines()) == 1 and err.endswith(message)), err


@pytest.mark.slow
def test_a_reused_report_folder_does_not_read_the_earlier_reports_detections(checkpoint, bccd_subset, tmp_path):
    """At a confidence nothing reaches, the validator writes no predictions.json; the one the first report
    left in the folder was read as this one's and failed on the class map it had not filled."""
    common = ["--model", checkpoint, "--data", bccd_subset, "--imgsz", IMGSZ, "--device", "cpu",
              "--project", tmp_path, "--name", "report"]
    assert val_py(*common).returncode == 0
    run = val_py(*common, "--exist-ok", "--conf", "0.999")
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["meta"]["conf"] == 0.999 and metrics["recall_by_size"]["0.01"]["all"]["recall"] == 0
    assert not (tmp_path / "report" / "ultralytics" / "predictions.json").exists()


def strip_class_sizes(folder: Path) -> dict:
    """Make the report in ``folder`` one of a version before the box fit table and per-class AP by size;
    return its metrics then."""
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics.pop("fit_by_size", None)
    for entry in metrics["per_class"].values():
        entry.pop("input", None)
        entry.pop("original", None)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def test_update_adds_the_metrics_of_this_version_and_keeps_the_rest(tmp_path, capsys):
    """A report of an older version lacks the box fit table and per-class AP by size; --update computes them
    from the report's detections file and keeps every figure the report held (computed from the model's own
    detections, which this report's file holds rounded to 1e-4, so that recomputing them would move them)."""
    from yolo_sizeloss.detections_file import load_detections
    from yolo_sizeloss.evaluation import evaluate_records
    from yolo_sizeloss.validate import main

    folder = tmp_path / "baseline-s0"
    folder.mkdir()
    for name in ("metrics.json", "detections.json.bz2"):
        (folder / name).write_bytes((REPORT / name).read_bytes())
    before = strip_class_sizes(folder)
    assert main(["--update", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == f"Updated {folder}"
    after = json.loads((folder / "metrics.json").read_text())
    run = load_detections(folder)
    expected = evaluate_records(run.records, run.names, run.input_scales)
    assert after.pop("fit_by_size") == expected["fit_by_size"]
    for name, entry in after["per_class"].items():
        for frame in ("input", "original"):
            assert entry.pop(frame) == expected["per_class"][name][frame], (name, frame)
    platelets, wbc = (expected["per_class"][name]["input"]["ap_small"] for name in ("Platelets", "WBC"))
    assert 0 < platelets < 1 and wbc is None
    assert after == before
    assert after["coco"]["input"]["ap"] != expected["coco"]["input"]["ap"]  # held, not recomputed
    assert "| Platelets |" in (folder / "metrics.md").read_text()


@pytest.mark.parametrize("case, code, message", [
    ("no detections", 2, "--update {bad}: not a val report folder with its detections.json.bz2"),
    ("not a report", 1, "{bad}/metrics.json: not a val report (no coco, per_class, recall_by_size, meta)"),
    ("a flag", 2, "--update takes report folders only (each run's report sets the rest), not --max-det"),
    # found only on reading it, after the first folder was computed: that one is not written either
    ("corrupt detections", 1, "{bad}/detections.json.bz2: not a detections file written by val (Invalid data stream"),
])
def test_update_refuses_bad_input_before_it_rewrites_any_report(tmp_path, capsys, case, code, message):
    from yolo_sizeloss.validate import main

    good = tmp_path / "good"
    good.mkdir()
    for name in ("metrics.json", "detections.json.bz2"):
        (good / name).write_bytes((REPORT / name).read_bytes())
    strip_class_sizes(good)
    written = (good / "metrics.json").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text("{}" if case == "not a report" else (REPORT / "metrics.json").read_text())
    if case == "corrupt detections":
        (bad / "detections.json.bz2").write_bytes(b"garbage")
    elif case != "no detections":
        (bad / "detections.json.bz2").write_bytes((REPORT / "detections.json.bz2").read_bytes())
    flags = ["--max-det", "300"] if case == "a flag" else []
    assert main(["--update", str(good), str(bad), *flags]) == code
    err = capsys.readouterr().err.strip()
    # one error line, last (the progress bar over the folders may stand before it on stderr)
    assert err.count("error:") == 1 and err.splitlines()[-1].startswith("yolo-sizeloss val: error: " + message.format(bad=bad)), err
    assert (good / "metrics.json").read_bytes() == written


@pytest.mark.parametrize("flags, code, message", [
    (["--compare", "{r}", "{r}", "--group", "(x"], 2, "--group '(x': not a regular expression (missing ), unterminated"),
    (["--compare", "{r}", "{r}", "--group", "Cell"], 1, "--group 'Cell' does not match image BloodImage_00007.jpg"),
    (["--model", "m.pt", "--data", "bccd.yaml", "--group", "x"], 2, "--group goes with --compare"),
])
def test_group_is_checked_and_names_the_image_it_does_not_match(capsys, flags, code, message):
    from yolo_sizeloss.validate import main

    assert main([f.format(r=REPORT) for f in flags]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"yolo-sizeloss val: error: {message}"), err


def test_compare_with_group_draws_groups_and_says_so(capsys):
    from yolo_sizeloss.validate import main

    assert main(["--compare", str(REPORT), str(REPORT.parent / "nwd-s0"), "--bootstrap", "100",
                 "--group", r"BloodImage_00(\d)"]) == 0
    out = capsys.readouterr().out
    assert "100 draws of the groups of images --group 'BloodImage_00(\\\\d)' names with replacement" in out
