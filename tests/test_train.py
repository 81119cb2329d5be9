"""Real training on BCCD images: every mode trains, checkpoints stay stock, resume and DDP carry the loss."""

import csv
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from yolo_sizeloss.config import load_loss_config

ROOT = Path(__file__).resolve().parent.parent
IMGSZ = 160
COMMON = ["--epochs", "1", "--imgsz", str(IMGSZ), "--batch", "8", "--workers", "0", "--device", "cpu", "plots=False"]
MODES = [("baseline", "yolov8n.yaml"), ("feedback", "yolov8n.yaml"), ("scb", "yolov8n.yaml"), ("plb", "yolov8n.yaml"),
         ("gradlibra", "yolov8n.yaml"), ("plb+scb", "yolov8n.yaml"), ("feedback", "yolo26n.yaml")]

# Loads and validates checkpoints in a process where yolo_sizeloss cannot be imported.
STOCK_ONLY = """
import sys
sys.modules["yolo_sizeloss"] = None  # any pickled reference to our package would fail to load
from ultralytics import YOLO
data, *weights = sys.argv[1:]
for w in weights:
    metrics = YOLO(w).val(data=data, imgsz=%d, batch=8, device="cpu", plots=False, workers=0, verbose=False)
    print("VALIDATED", w, metrics.box.map)
""" % IMGSZ


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=kwargs.pop("cwd", ROOT), **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def results_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained_runs(bccd_subset, tmp_path_factory) -> dict[str, Path]:
    """One epoch of every mode through train.py, each in its own run folder."""
    project = tmp_path_factory.mktemp("runs")
    runs = {}
    for loss, model in MODES:
        name = f"{loss}-{Path(model).stem}"
        run([sys.executable, "train.py", "--data", str(bccd_subset), "--loss", loss, "--model", model,
             "--project", str(project), "--name", name, *COMMON])
        runs[name] = project / name
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("loss, model", MODES)
def test_every_mode_trains_and_records_its_loss(trained_runs, loss, model):
    run_dir = trained_runs[f"{loss}-{Path(model).stem}"]
    assert (run_dir / "weights" / "best.pt").is_file()
    saved = yaml.safe_load((run_dir / "loss.yaml").read_text())
    assert saved == {"loss": loss, "settings": load_loss_config(loss)}
    args = yaml.safe_load((run_dir / "args.yaml").read_text())
    assert (args["epochs"], args["imgsz"], args["plots"]) == (1, IMGSZ, False)  # flags and key=value pairs arrive
    rows = results_rows(run_dir)
    assert [r["epoch"] for r in rows] == ["1"]  # --epochs 1: one row
    row = rows[0]
    assert float(row["train/box_loss"]) > 0
    steps = 16 // 8  # bccd_subset's 16 training images in batches of 8
    # every mode, the stock loss too, counts the small objects its assigner left without a positive anchor: a
    # mean per training step of whole counts, so a whole number once multiplied by the steps
    small_no_pos = float(row["assign/small_no_pos"]) * steps
    assert small_no_pos == round(small_no_pos)
    assert 0 <= float(row["assign/small_no_pos_share"]) <= 1
    assert 0 <= float(row["assign/no_pos_share"]) <= 1
    # each class's val AP50-95 of the epoch; Ultralytics' mAP50-95 is their mean over the classes val holds, up to
    # its validator's rounding to 5 decimals (4.2446e-05 was written 4e-05) and results.csv's 6 significant digits
    class_ap = [float(row[f"val/AP50-95 {name}"]) for name in ("RBC", "WBC", "Platelets")]
    assert np.nanmean(class_ap) == pytest.approx(float(row["metrics/mAP50-95(B)"]), abs=5e-6 + 5e-7)
    if loss == "baseline":
        assert not any(k.startswith(("sizeloss/", "feedback/")) for k in row)
    else:
        weights = [float(row[f"sizeloss/{k}"]) for k in ("box_w_small", "box_w_other", "cls_w_small", "cls_w_other")]
        assert all(np.isfinite(weights))
        # a column is 1.0 where no anchor was seen: a loss that never applied its weighting would show four
        assert any(w != 1.0 for w in weights), weights
    if loss == "feedback":
        # every step holds small objects (at imgsz 160 nearly every BCCD cell is under 32 x 32): each one counts
        assert float(row["feedback/steps"]) == steps and 1.0 <= float(row["feedback/gain"]) <= 4.0
        assert 0 < float(row["feedback/q"]) <= 1
    if loss == "gradlibra":
        assert float(row["sizeloss/cls_w_other"]) < 0.34  # G <= 1 - 0.8 sin(1)


@pytest.mark.slow
def test_safit_sharp_auto_trains_as_the_stock_loss_where_nearly_every_box_is_small(bccd_subset, tmp_path):
    """At imgsz 64 every BCCD box is under 32 x 32 input pixels, over nwd.max_small_share (0.8): the mode
    turns NWD off, says so, and trains exactly as the stock loss (same seed, same losses and metrics)."""
    rows, logs = {}, {}
    for loss in ("baseline", "safit_sharp_auto"):
        result = run([sys.executable, "train.py", "--data", str(bccd_subset), "--loss", loss, "--project", str(tmp_path),
                      "--name", loss, *[("64" if flag == str(IMGSZ) else flag) for flag in COMMON]])
        rows[loss], logs[loss] = results_rows(tmp_path / loss)[0], result.stdout + result.stderr
    assert "nwd is off, the stock loss trains (100.0% of" in logs["safit_sharp_auto"]
    assert float(rows["safit_sharp_auto"]["nwd/active"]) == 0.0
    for key in ("train/box_loss", "train/cls_loss", "train/dfl_loss", "val/box_loss", "metrics/mAP50-95(B)"):
        assert rows["safit_sharp_auto"][key] == rows["baseline"][key], key



@pytest.mark.slow
def test_a_box_loss_the_nwd_assigner_left_empty_is_named_once(bccd_subset, tmp_path):
    """At imgsz 64 on BCCD (NWD's constant auto: about 10 px) the untrained model's boxes miss by many times C:
    the NWD assigner's target scores, and with them the box loss, are about 0 from the first epoch. The run
    says so once; the stock loss, whose box loss is not 0, says nothing."""
    logs, rows = {}, {}
    flags = [("64" if flag == str(IMGSZ) else flag) for flag in COMMON]
    flags[flags.index("--epochs") + 1] = "2"
    for loss in ("baseline", "nwd"):
        result = run([sys.executable, "train.py", "--data", str(bccd_subset), "--loss", loss, "--project",
                      str(tmp_path), "--name", loss, *flags])
        logs[loss], rows[loss] = result.stdout + result.stderr, results_rows(tmp_path / loss)
    assert all(float(row["train/box_loss"]) < 1e-4 for row in rows["nwd"])
    assert all(float(row["train/box_loss"]) > 1e-2 for row in rows["baseline"])
    assert logs["nwd"].count("train/box_loss") == 1 and "in epoch 1: the assigner, ranking anchors by NWD" in logs["nwd"]
    assert "target scores near 0" not in logs["baseline"]

@pytest.mark.slow
def test_checkpoints_load_and_validate_without_yolo_sizeloss(trained_runs, bccd_subset):
    weights = [str(r / "weights" / "best.pt") for r in trained_runs.values()]
    out = run([sys.executable, "-c", STOCK_ONLY, str(bccd_subset), *weights], cwd="/").stdout
    assert out.count("VALIDATED") == len(weights)


@pytest.mark.slow
def test_stock_cli_validates_and_exports_onnx_matching_pytorch(trained_runs, bccd_subset, tmp_path):
    best = tmp_path / "best.pt"
    shutil.copy(trained_runs["feedback-yolov8n"] / "weights" / "best.pt", best)
    run(["yolo", "val", f"model={best}", f"data={bccd_subset}", f"imgsz={IMGSZ}", "device=cpu", "plots=False"], cwd=tmp_path)
    run(["yolo", "export", f"model={best}", "format=onnx", f"imgsz={IMGSZ}"], cwd=tmp_path)
    onnx_file = tmp_path / "best.onnx"
    assert onnx_file.is_file()

    import cv2
    import onnxruntime as ort
    from ultralytics import YOLO
    from ultralytics.data.augment import LetterBox

    image = cv2.imread(str(next((Path(bccd_subset).parent / "images" / "test").glob("*.jpg"))))
    x = LetterBox((IMGSZ, IMGSZ), auto=False)(image=image)[..., ::-1].transpose(2, 0, 1)
    x = np.ascontiguousarray(x, dtype=np.float32)[None] / 255.0
    model = YOLO(str(best)).model.float().eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(x))[0].numpy()
    got = ort.InferenceSession(str(onnx_file)).run(None, {"images": x})[0]
    assert got.shape == expected.shape == (1, 4 + 3, (IMGSZ // 8) ** 2 + (IMGSZ // 16) ** 2 + (IMGSZ // 32) ** 2)
    np.testing.assert_allclose(got[:, :4], expected[:, :4], atol=1e-2)  # boxes, input pixels
    np.testing.assert_allclose(got[:, 4:], expected[:, 4:], atol=1e-4)  # class scores


def test_unknown_loss_fails_at_once_with_the_valid_names():
    result = subprocess.run([sys.executable, "train.py", "--loss", "focal"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "unknown loss 'focal'" in result.stderr and "baseline, feedback, scb, plb, gradlibra" in result.stderr


def test_key_value_pairs_reach_ultralytics_and_may_not_shadow_a_flag(bccd_subset, capsys):
    from yolo_sizeloss.cli import build_yolo_parser, check_yolo_request, train_main

    parse = build_yolo_parser().parse_args
    new_run = check_yolo_request(parse(["--data", str(bccd_subset), "--epochs", "3", "cls=2.5", "mosaic=0"]))
    overrides = new_run.overrides
    assert (overrides["epochs"], overrides["batch"], overrides["cls"], overrides["mosaic"]) == (3, 16, 2.5, 0)
    capsys.readouterr()
    assert train_main(["--loss", "feedback", "epochs=5"]) == 2
    assert capsys.readouterr().err.strip() == "yolo-sizeloss train: error: 'epochs=5': use the --epochs flag instead"


@pytest.mark.slow
def test_resume_restores_the_feedback_state_and_continues_results_csv(bccd_subset, tmp_path, capsys):
    from ultralytics.utils.patches import torch_load

    from yolo_sizeloss.cli import build_yolo_parser, check_yolo_request
    from yolo_sizeloss.yolo.trainer import SizeAwareTrainer

    class Killed(Exception):
        pass

    overrides = dict(model="yolov8n.yaml", data=str(bccd_subset), epochs=3, imgsz=IMGSZ, batch=8, workers=0,
                     device="cpu", plots=False, project=str(tmp_path), name="fb")
    first = SizeAwareTrainer.with_loss(load_loss_config("feedback"))(overrides=overrides)
    save_model = first.save_model

    def killed_in_epoch_2():  # after epoch 2's results.csv row, before its checkpoint: as a run killed there
        if first.epoch == 1:
            raise Killed
        return save_model()

    first.save_model = killed_in_epoch_2
    with pytest.raises(Killed):
        first.train()
    before = results_rows(tmp_path / "fb")
    assert [int(r["epoch"]) for r in before] == [1, 2]
    # as a run started by a version without the assignment columns: the resumed rows must still line up
    before = [{k: v for k, v in r.items() if not k.startswith("assign/")} for r in before]
    with open(tmp_path / "fb" / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(before[0]))
        writer.writeheader()
        writer.writerows(before)
    last = tmp_path / "fb" / "weights" / "last.pt"
    saved = torch_load(last, map_location="cpu", weights_only=False)["train_metrics"]
    assert saved["feedback/steps"] == 16 // 8  # epoch 1's steps (16 images, batch 8), each with small objects

    # resume: what a resumed run can change is passed (a new --epochs too); new-run defaults are not
    resumed = check_yolo_request(build_yolo_parser().parse_args(
        ["--resume", str(last), "--batch", "8", "--epochs", "9", "close_mosaic=2"]))
    assert resumed.overrides == {"resume": str(last), "model": str(last), "batch": 8, "epochs": 9, "close_mosaic": 2,
                                 "save_dir": str(last.parent.parent)}
    assert resumed.loss_config is None  # the run's own loss.yaml rules

    changed = load_loss_config("feedback")
    changed["feedback"]["momentum"] = 0.5
    with pytest.raises(ValueError, match=r"differs in feedback.momentum \(0.9 -> 0.5\)"):
        SizeAwareTrainer.with_loss(changed)(overrides={"resume": str(last), "model": str(last)})

    # the command line refuses it before anything runs, in the Faster R-CNN path's words and exit code
    from yolo_sizeloss.cli import train_main

    (tmp_path / "momentum.yaml").write_text("feedback:\n  momentum: 0.5\n")
    capsys.readouterr()
    assert train_main(["--resume", str(last), "--loss", "feedback", "--loss-cfg", str(tmp_path / "momentum.yaml")],
                      "yolo-sizeloss train") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"yolo-sizeloss train: error: --resume {last}: a resumed run keeps its loss (feedback); "
                   "the request differs in feedback.momentum (0.9 -> 0.5); leave --loss and --loss-cfg out to resume "
                   "with the run's own")
    # a new total must leave an epoch to train (one was saved before the kill), as in the Faster R-CNN path
    assert train_main(["--resume", str(last), "--epochs", "1"], "yolo-sizeloss train") == 2
    assert capsys.readouterr().err.strip() == (
        "yolo-sizeloss train: error: --epochs 1: the run has already trained 1 epochs")

    # the run folder moved: the resume continues where it is now, not in the folder it was saved to first
    moved = tmp_path / "fb_moved"
    shutil.move(tmp_path / "fb", moved)
    request = check_yolo_request(build_yolo_parser().parse_args(["--resume", str(moved / "weights" / "last.pt")]))
    restored = {}
    # the class knows no loss (it comes from the run's loss.yaml)
    resumed = SizeAwareTrainer(overrides=request.overrides)
    resumed.add_callback("on_pretrain_routine_end", lambda t: restored.update(t.weighting.feedback_state()))
    resumed.train()
    assert resumed.loss_config == load_loss_config("feedback")
    assert restored == {k: saved[k] for k in restored} and len(restored) == 5
    assert not (tmp_path / "fb").exists()
    rows = results_rows(moved)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # epoch 2 once: the row of the killed run is gone
    assert rows[0] == {**before[0], "assign/small_no_pos": "", "assign/small_no_pos_share": "",
                       "assign/no_pos_share": ""}  # the earlier row kept, blank in the new columns
    assert all(float(r["assign/no_pos_share"]) <= 1 and float(r["feedback/gain"]) >= 1 for r in rows[1:])
    assert [float(r["feedback/steps"]) for r in rows] == [2, 4, 6]  # the restored count goes on, 2 steps an epoch
    times = [float(r["time"]) for r in rows]
    assert times[0] < times[1] < times[2]  # the time column continues across the resume


@pytest.mark.slow
def test_resumed_end_to_end_run_wraps_the_criterion_with_its_restored_branch_gains(bccd_subset, tmp_path):
    from ultralytics.utils.torch_utils import unwrap_model

    from yolo_sizeloss.yolo.loss import ObservedAssigner, loss_branches
    from yolo_sizeloss.yolo.trainer import SizeAwareTrainer

    class Stop(Exception):
        pass

    def stop(trainer):
        raise Stop

    overrides = dict(model="yolo26n.yaml", data=str(bccd_subset), epochs=2, imgsz=IMGSZ, batch=8, workers=0,
                     device="cpu", plots=False, project=str(tmp_path), name="e2e")
    first = SizeAwareTrainer.with_loss(load_loss_config("plb"))(overrides=overrides)
    first.add_callback("on_model_save", stop)  # interrupted after epoch 1 is saved
    with pytest.raises(Stop):
        first.train()

    last = str(tmp_path / "e2e" / "weights" / "last.pt")
    resumed = SizeAwareTrainer(overrides={"resume": last, "model": last})
    seen = []
    resumed.add_callback("on_pretrain_routine_end", lambda t: seen.append(unwrap_model(t.model).criterion))
    resumed.add_callback("on_pretrain_routine_end", stop)  # the set-up is what this test is about
    with pytest.raises(Stop):
        resumed.train()
    criterion = seen[0]
    assert all(isinstance(branch.assigner, ObservedAssigner) for branch in loss_branches(criterion))
    # stock resume_training ran the gain schedule to epoch 2 of 2: the one-to-many gain is its final 0.1, not
    # the 0.8 a new criterion starts at
    assert criterion.o2m == pytest.approx(0.1) and criterion.o2o == pytest.approx(0.9)


@pytest.mark.slow
def test_ddp_worker_file_rebuilds_the_trainer_with_its_loss(bccd_subset, tmp_path):
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

    from yolo_sizeloss.yolo.trainer import SizeAwareTrainer

    config = load_loss_config("plb+feedback")
    config["plb"]["source"] = "gt"
    trainer = SizeAwareTrainer.with_loss(config)(overrides=dict(
        model="yolov8n.yaml", data=str(bccd_subset), epochs=1, imgsz=IMGSZ, batch=8, workers=0, device="cpu",
        plots=False, project=str(tmp_path), name="ddp"))
    shutil.rmtree(trainer.save_dir)  # as generate_ddp_command does before launching the workers
    file = generate_ddp_file(trainer)
    try:
        run([sys.executable, file], cwd=tmp_path)  # a fresh process, as each torch.distributed worker is
    finally:
        ddp_cleanup(trainer, file)
    assert yaml.safe_load((tmp_path / "ddp" / "loss.yaml").read_text())["settings"] == config
    assert "feedback/gain" in results_rows(tmp_path / "ddp")[0]


ALL_METHODS = "plb+scb+feedback+gradlibra+nwd"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["yolo", "faster_rcnn"])
def test_every_method_trains_on_images_without_boxes(tmp_path, arch):
    """A background image alone in its batch (batch 1, no mosaic) once stopped feedback and SCB."""
    from conftest import make_subset

    data = make_subset(tmp_path / "data", {"train": 3, "val": 1})
    next((tmp_path / "data" / "labels" / "train").glob("*.txt")).write_text("")
    family = ["--model", "yolov8n.yaml", "mosaic=0", "plots=False"] if arch == "yolo" else \
        ["--arch", "faster_rcnn", "--backbone", "mobilenet_v3_large_fpn"]
    run([sys.executable, "train.py", "--data", str(data), "--loss", ALL_METHODS, "--epochs", "1", "--imgsz", "96",
         "--batch", "1", "--workers", "0", "--device", "cpu", "--project", str(tmp_path), "--name", arch, *family])
    rows = results_rows(tmp_path / arch)
    assert len(rows) == 1 and all(np.isfinite(float(v)) for k, v in rows[0].items() if "loss" in k)


@pytest.mark.slow
def test_the_stock_commands_work_from_any_folder(trained_runs, tmp_path):
    """README's stock examples: stock Ultralytics cannot find the package's data yaml by name, so
    ``yolo-sizeloss path`` gives it its path."""
    data = run(["yolo-sizeloss", "path", "bccd.yaml"], cwd=tmp_path).stdout.strip()
    assert Path(data).is_absolute() and Path(data).is_file() and Path(data).name == "bccd.yaml"
    best = trained_runs["baseline-yolov8n"] / "weights" / "best.pt"
    out = run(["yolo", "val", f"model={best}", f"data={data}", "split=test", f"imgsz={IMGSZ}", "device=cpu",
               "plots=False", "batch=8"], cwd=tmp_path).stdout
    # the validator's summary row: "all", the images, the instances (the rows of their label files), then the
    # metrics; not anchored at a line start: the progress bar shares stdout and may end on the same line
    labels = Path(data).parent.parent / "datasets" / "bccd" / "labels" / "test"
    images = len(list((labels.parent.parent / "images" / "test").iterdir()))
    instances = sum(1 for f in labels.glob("*.txt") for line in f.read_text().splitlines() if line.strip())
    assert re.search(rf"\sall\s+{images}\s+{instances}\s+\d", out), out[-3000:]


def test_ddp_worker_trainer_runs_each_weighting_callback_once(bccd_subset, tmp_path):
    """The worker file rebuilds the trainer with the launching trainer's callbacks; ours must not run twice
    (a second ``end_step`` in one step folds empty sums and resets the feedback gain to 1; a second install
    is refused)."""
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file
    from ultralytics.utils.patches import torch_load

    from yolo_sizeloss.yolo import trainer as trainer_module

    trainer = trainer_module.SizeAwareTrainer.with_loss(load_loss_config("feedback"))(overrides=dict(
        model="yolov8n.yaml", data=str(bccd_subset), imgsz=IMGSZ, device="cpu", project=str(tmp_path), name="ddp"))
    file = generate_ddp_file(trainer)
    try:
        state = torch_load(Path(file).with_suffix(".pt"), map_location="cpu")
    finally:
        ddp_cleanup(trainer, file)
    worker = state["trainer"](overrides=state["args"], _callbacks=state["callbacks"])  # as the worker file does
    assert worker.callbacks["on_pretrain_routine_end"].count(trainer_module.install_weighting) == 1
    assert worker.callbacks["on_train_batch_end"].count(trainer_module.end_weighting_step) == 1
    assert worker.callbacks["on_pretrain_routine_end"].count(trainer_module.install_assignment_counter) == 1
    assert worker.callbacks["on_train_batch_end"].count(trainer_module.end_assignment_step) == 1


@pytest.mark.slow
def test_nan_recovery_keeps_validation_losses_stock(bccd_subset, tmp_path):
    """Ultralytics' NaN recovery rebuilds the EMA from the live model; its criterion must stay the stock one."""
    from test_nan import bccd_training_batch

    from yolo_sizeloss.yolo.loss import stock_assigners
    from yolo_sizeloss.yolo.trainer import SizeAwareTrainer

    def poison_epoch_two_once(trainer):  # as a diverged step would, before the epoch's NaN check
        if started == [0, 1]:
            trainer.loss = torch.tensor(float("nan"))

    started = []
    trainer = SizeAwareTrainer.with_loss(load_loss_config("plb+nwd"))(overrides=dict(
        model="yolov8n.yaml", data=str(bccd_subset), epochs=2, imgsz=IMGSZ, batch=8, workers=0, device="cpu",
        plots=False, project=str(tmp_path), name="nan"))
    trainer.add_callback("on_train_epoch_start", lambda t: started.append(t.epoch))
    trainer.add_callback("on_train_epoch_end", poison_epoch_two_once)
    trainer.train()
    assert started == [0, 1, 1]  # epoch 2 recovered from last.pt and trained again
    assert [int(r["epoch"]) for r in results_rows(tmp_path / "nan")] == [1, 2]

    ema = trainer.ema.ema  # the EMA the recovery built, which validated the redone epoch
    assert not any(assigner._forward_hooks for assigner in stock_assigners(ema.criterion))  # its loss is not counted
    batch = bccd_training_batch()
    preds = ema(batch["img"])
    _, items = ema.loss(batch, preds)  # as the validator computes validation losses
    _, stock_items = ema.init_criterion()(preds, batch)
    assert items.keys() == stock_items.keys()
    assert all(torch.equal(items[k], stock_items[k]) for k in items), (items, stock_items)


@pytest.mark.slow
def test_ctrl_c_stops_a_training_with_one_line_that_says_how_to_continue(bccd_subset, tmp_path):
    """Ctrl-C (SIGINT) once printed Ultralytics' whole stack: now one line and the shell's exit code 130."""
    run_dir = tmp_path / "stopped"
    training = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--data", str(bccd_subset), "--model", "yolov8n.yaml", "--epochs", "50",
         "--imgsz", "64", "--batch", "8", "--workers", "0", "--device", "cpu", "--project", str(tmp_path),
         "--name", "stopped", "plots=False"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    while not (run_dir / "weights" / "last.pt").is_file() and training.poll() is None:  # an epoch finished
        time.sleep(0.5)
    training.send_signal(signal.SIGINT)
    _, err = training.communicate(timeout=120)
    assert training.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == ("train.py: interrupted (a training run continues from its last finished "
                                            "epoch: --resume RUN/weights/last.pt)")
    assert "Traceback" not in err
