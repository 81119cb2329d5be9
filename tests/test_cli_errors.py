"""Ordinary mistakes on the command line: one error line, the right exit code, no run folder left behind."""

import re
import shutil
from pathlib import Path

import pytest

from yolo_sizeloss.cli import main, train_main

from conftest import BCCD, ROOT

FINISHED = ROOT / "tests" / "assets" / "yolov8n_bccd_baseline.pt"  # a finished run's stripped checkpoint


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "\x1b" not in err, err  # no terminal colour codes
    return err


@pytest.fixture
def logged():
    """The lines Ultralytics' logger writes while the test runs (it writes to the streams it found at
    import, past pytest's capture)."""
    import logging

    from ultralytics.utils import LOGGER

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    handler = Lines()
    LOGGER.addHandler(handler)
    yield handler.lines
    LOGGER.removeHandler(handler)


@pytest.fixture
def bad_yamls(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    shutil.copy(next((BCCD / "images" / "train").glob("*.jpg")), tmp_path / "images" / "train")
    (tmp_path / "missing_split.yaml").write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: {{0: a}}\n")
    (tmp_path / "broken.yaml").write_text("train: [images/train\nnames: {0: a\n")
    (tmp_path / "no_val.yaml").write_text(f"path: {tmp_path}\ntrain: images/train\nnames: {{0: a}}\n")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    return tmp_path


@pytest.mark.parametrize("argv, code, message", [
    (["--epochs", "0"], 2, "--epochs 0: must be at least 1"),
    (["--fraction", "2"], 2, "--fraction 2.0: must be in (0, 1]"),
    (["--imgsz", "0"], 2, "--imgsz 0: must be at least 1"),
    (["--batch", "0"], 2, "--batch 0"),
    (["--seed", "-2"], 2, "--seed -2: must not be negative"),
    (["--device", "5"], 2, "--device 5:"),
    (["foo=1"], 2, "'foo' is not an Ultralytics argument"),
    (["mosiac=0"], 2, "did you mean 'mosaic'"),
    (["notapair"], 2, "'notapair': expected an Ultralytics argument as key=value"),
    (["epochs=5"], 2, "use the --epochs flag instead"),
    (["--loss", "focal"], 2, "unknown loss 'focal'"),
    (["--model", "nothere.pt"], 2, "--model nothere.pt: no such file"),
    (["--model", "yolov8q-nothere.yaml"], 2, "--model yolov8q-nothere.yaml: no such file, nor one of Ultralytics'"),
    (["--model", "{dir}/broken.yaml"], 1, "broken.yaml: "),
    # Ultralytics guesses 'detect' for it and fails on it after making the run folder
    (["--model", "{dir}/missing_split.yaml"], 2, "missing_split.yaml: not a model yaml, which names a backbone and a "
                                                 "head (it reads as a data yaml: give it to --data)"),
    (["pretrained=nothere.pt"], 2, "'pretrained=nothere.pt': give a local .pt checkpoint (nothing is downloaded)"),
    (["pretrained={dir}/notes.txt"], 2, "notes.txt': give a local .pt checkpoint"),
    (["--model", "{dir}/notes.txt"], 2, "notes.txt: give a model yaml (such as yolov8n.yaml) or a local .pt checkpoint"),
    (["--model", "{dir}"], 2, ": give a model yaml (such as yolov8n.yaml) or a local .pt checkpoint"),
    (["task=segment"], 2, "'task=segment': yolo-sizeloss trains detection models only"),
    (["mode=val"], 2, "'mode=val': this command trains"),
    (["cfg={dir}/notes.txt"], 2, "notes.txt': a settings file is not read by this command"),
    (["optimizer=Foo"], 2, "'optimizer=Foo': Optimizer 'Foo' not found in list of available optimizers"),
    (["cls=abc"], 2, "'cls=abc' is of invalid type str"),
    (["mosaic=2"], 2, "'mosaic=2' is an invalid value"),
    (["--data", "{dir}/missing_split.yaml"], 1, "images not found, missing path"),
    (["--data", "{dir}/broken.yaml"], 1, "broken.yaml: YAML syntax error"),
    (["--data", "nosuch"], 2, "data yaml 'nosuch' not found (tried nosuch, nosuch.yaml); shipped: bccd.yaml"),
    # Ultralytics ships this yaml and downloads its images; nothing is downloaded here, and the error says so
    (["--data", "coco8.yaml"], 2, "data yaml 'coco8.yaml' not found (tried coco8.yaml); shipped: bccd.yaml; coco8.yaml "
                                  "is one of Ultralytics' data yamls, whose images stock Ultralytics downloads: nothing"),
    (["--resume", "{dir}/notes.txt"], 1, "notes.txt: not a readable checkpoint ("),
    (["--resume", str(FINISHED)], 1, "this run finished its"),
    # the checkpoint's run trained on a bccd.yaml since moved, so the shipped one is another file
    (["--resume", str(FINISHED), "--data", "bccd.yaml"], 2, "--data bccd.yaml (the run's: /work/main/cfg/bccd.yaml) "
                                                            "cannot change on resume"),
    (["--resume", str(FINISHED), "--seed", "1"], 2, "--seed 1 (the run's: 0) cannot change on resume"),
    # the run's own values are no change: the next check speaks (the run is finished)
    (["--resume", str(FINISHED), "--seed", "0", "--fraction", "1", "--model", "yolov8n.yaml", "--name", "baseline-s0",
      "--exist-ok"], 1, "this run finished its"),
    (["--name", ""], 2, "--name '': must name a folder inside --project"),
    (["--name", "."], 2, "--name '.': must name a folder inside --project"),
    (["--name", "../beside"], 2, "--name '../beside': must name a folder inside --project"),
    (["--arch", "faster_rcnn", "--name", "a/../../beside"], 2, "--name 'a/../../beside': must name a folder inside"),
    (["--arch", "faster_rcnn", "--name", ""], 2, "--name '': must name a folder inside --project"),
    (["--arch", "faster_rcnn", "--loss", "focal"], 2, "unknown loss 'focal'"),
    (["--arch", "faster_rcnn", "--epochs", "0"], 2, "--epochs 0: must be at least 1"),
    (["--arch", "faster_rcnn", "--device", "5"], 2, "--device 5:"),
    (["--arch", "faster_rcnn", "--momentum", "-1"], 2, "--momentum -1.0: must be in [0, 1)"),
    (["--arch", "faster_rcnn", "--weight-decay", "-0.1"], 2, "--weight-decay -0.1: must be non-negative and finite"),
    (["--arch", "faster_rcnn", "--lr-gamma", "2"], 2, "--lr-gamma 2.0: must be in (0, 1]"),
    (["--arch", "faster_rcnn", "--lr", "nan"], 2, "--lr nan: must be positive and finite"),
    (["--arch", "faster_rcnn", "--data", "{dir}/missing_split.yaml"], 1, "images not found, missing path"),
    (["--arch", "faster_rcnn", "--data", "{dir}/broken.yaml"], 1, "broken.yaml: YAML syntax error"),
    # Ultralytics' message names the yaml itself: once in the line (it was twice)
    (["--data", "{dir}/no_val.yaml"], 1, "no_val.yaml: 'val:' key missing"),
    (["--arch", "faster_rcnn", "--data", "{dir}/no_val.yaml"], 1, "no_val.yaml: 'val:' key missing"),
])
def test_train_mistakes_are_one_line_and_leave_nothing(bad_yamls, tmp_path, capsys, logged, argv, code, message):
    project = tmp_path / "runs"
    argv = [a.replace("{dir}", str(bad_yamls)) for a in argv]
    if "--resume" not in argv:  # a resume keeps its run's folder
        argv += ["--project", str(project)]
    if "--device" not in argv:
        argv += ["--device", "cpu"]
    assert train_main(argv) == code
    error = one_error_line(capsys)
    assert message in error and "download directory" not in error  # nothing is downloaded here
    assert logged == []  # nothing of Ultralytics' before the error (a data scan before a --model mistake)
    assert not project.exists()


def test_a_known_optimizer_passes_the_early_check_silently(logged):
    from yolo_sizeloss.cli import parse_pairs

    assert parse_pairs(["optimizer=SGD", "task=detect", "mode=train"]) == {"optimizer": "SGD", "task": "detect",
                                                                           "mode": "train"}
    assert parse_pairs(["optimizer=auto"]) == {"optimizer": "auto"}
    assert parse_pairs(["optimizer=MuSGD"]) == {"optimizer": "MuSGD"}  # the one that reads the model's last layer
    assert logged == []


def test_a_check_failing_inside_a_library_is_one_line_and_does_no_work(capsys):
    from yolo_sizeloss.checks import run_guarded

    def check():
        raise AttributeError("'Linear' object has no attribute 'model'")

    worked = []
    assert run_guarded("yolo-sizeloss train", check, worked.append, verbose=False) == 1
    assert one_error_line(capsys) == ("yolo-sizeloss train: error: 'Linear' object has no attribute 'model' "
                                      "(--verbose shows the traceback)")
    assert worked == []


def test_verbose_shows_the_traceback_and_keeps_the_exit_code(capsys):
    assert train_main(["--epochs", "0", "--verbose"]) == 2  # a usage mistake, with or without the traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and err[-2] == "ValueError: --epochs 0: must be at least 1"
    assert err[-1] == "yolo-sizeloss train: error: --epochs 0: must be at least 1"


def test_console_command_dispatches(capsys):
    assert main([]) == 2 and "usage: yolo-sizeloss COMMAND" in capsys.readouterr().err
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    for command in ("train", "val", "convert", "path"):  # each command on a line of its own, with what it does
        assert any(line.split()[:1] == [command] and len(line.split()) > 3 for line in listed.splitlines()), listed
    assert main(["train", "--epochs", "0"]) == 2
    assert one_error_line(capsys).startswith("yolo-sizeloss train: error: --epochs 0")
    assert main(["trian"]) == 2
    assert one_error_line(capsys) == ("yolo-sizeloss: error: unknown command 'trian' (commands: train, val, convert, "
                                      "path; yolo-sizeloss --help)")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0


def tiny_bccd(root, mutate=None):
    """Two train and two val BCCD images with their labels; ``mutate(root)`` spoils them as a user's data might."""
    for split in ("train", "val"):
        for sub in ("images", "labels"):
            (root / sub / split).mkdir(parents=True)
        for image in sorted((BCCD / "images" / split).glob("*.jpg"))[:2]:
            shutil.copy(image, root / "images" / split)
            shutil.copy(BCCD / "labels" / split / f"{image.stem}.txt", root / "labels" / split)
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\n"
                                    "names: {0: RBC, 1: WBC, 2: Platelets}\n")
    if mutate:
        mutate(root)
    return root / "data.yaml"


def rewrite_train_labels(text):
    def mutate(root):
        for label in (root / "labels" / "train").glob("*.txt"):
            label.write_text(text)
    return mutate


def empty_val(root):
    for image in (root / "images" / "val").glob("*.jpg"):
        image.unlink()


@pytest.mark.parametrize("mutate, loss, message", [
    (rewrite_train_labels("7 0.5 0.5 0.1 0.1\n"), "baseline", "Label class 7 exceeds dataset class count 3"),
    (rewrite_train_labels("0 nan 0.5 0.1 0.1\n"), "baseline", "split 'train' has no valid images"),
    (rewrite_train_labels("0 0.5 inf 0.1 0.1\n"), "feedback", "split 'train' has no valid images"),
    (empty_val, "baseline", "split 'val'"),
    (rewrite_train_labels(""), "nwd", "nwd: auto settings, max_small_share and assigner_classes small need boxes"),
])
def test_bad_data_is_one_line_before_any_run_folder(tmp_path, capsys, mutate, loss, message):
    """Each of these made Ultralytics write PROJECT/NAME and print its set-up before failing."""
    data = tiny_bccd(tmp_path / "data", mutate)
    project = tmp_path / "runs"
    assert train_main(["--data", str(data), "--loss", loss, "--project", str(project), "--device", "cpu"]) == 1
    assert message in one_error_line(capsys)
    assert not project.exists()


@pytest.mark.parametrize("arch", [[], ["--arch", "faster_rcnn"]])
def test_a_training_split_without_any_label_file_is_refused_before_any_run_folder(tmp_path, capsys, arch):
    """YOLO made the run folder and then failed in Ultralytics' trainer; Faster R-CNN trained on background."""
    data = tiny_bccd(tmp_path / "data", lambda root: shutil.rmtree(root / "labels"))
    project = tmp_path / "runs"
    assert train_main([*arch, "--data", str(data), "--project", str(project), "--device", "cpu"]) == 1
    first = sorted((tmp_path / "data" / "images" / "train").glob("*.jpg"))[0]
    assert one_error_line(capsys).endswith(
        f"error: {data} split 'train': none of its 2 images has a label file "
        f"(for {first} Ultralytics reads {tmp_path / 'data' / 'labels' / 'train' / first.with_suffix('.txt').name})")
    assert not project.exists()


def test_nwd_auto_is_checked_on_the_fraction_the_run_trains_on(tmp_path, capsys):
    """--fraction 0.5 trains on the first of the two images, which has no box: the check of the whole
    split passed, and the trainer stopped after making the run folder."""
    def empty_first_label(root):
        sorted((root / "labels" / "train").glob("*.txt"))[0].write_text("")

    data = tiny_bccd(tmp_path / "data", empty_first_label)
    project = tmp_path / "runs"
    assert train_main(["--data", str(data), "--loss", "nwd", "--fraction", "0.5", "--project", str(project),
                       "--device", "cpu"]) == 1
    assert "nwd: auto settings, max_small_share and assigner_classes small need boxes" in one_error_line(capsys)
    assert not project.exists()


def test_a_faster_rcnn_checkpoint_given_to_yolo_names_its_family(tmp_path, capsys):
    import torch

    checkpoint = tmp_path / "rcnn.pt"
    torch.save({"arch": "faster_rcnn", "model": {}}, checkpoint)
    assert train_main(["--model", str(checkpoint), "--project", str(tmp_path / "runs")]) == 2
    assert "is a Faster R-CNN checkpoint: train from it with --arch faster_rcnn" in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", ["yaml", "pt"])
def test_a_model_of_another_task_is_refused_before_any_run_folder(tmp_path, capsys, kind):
    """A classify network passed the file checks, then Ultralytics made the run folder before the
    detection loss failed on it."""
    model = "yolov8n-cls.yaml"
    if kind == "pt":
        import torch
        from ultralytics.nn.tasks import ClassificationModel

        model = str(tmp_path / "cls.pt")
        torch.save({"model": ClassificationModel("yolov8n-cls.yaml", nc=4, verbose=False)}, model)
    assert train_main(["--model", model, "--project", str(tmp_path / "runs"), "--device", "cpu"]) == 1
    assert one_error_line(capsys) == (f"yolo-sizeloss train: error: --model {model} is a 'classify' model; "
                                      "train trains detection models only")
    assert not (tmp_path / "runs").exists()
    if kind == "pt":  # val reads the same network from the checkpoint
        from yolo_sizeloss.cli import val_main

        assert val_main(["--model", model, "--data", "bccd.yaml", "--project", str(tmp_path / "runs")]) == 1
        assert one_error_line(capsys).endswith(f"{model} is a 'classify' model; val evaluates detection models only")
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("arch", [[], ["--arch", "faster_rcnn"]])
def test_a_missing_mps_device_is_a_usage_error_in_both_families(tmp_path, capsys, arch):
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert train_main([*arch, "--device", "mps", "--project", str(tmp_path / "runs")]) == 2
    assert "--device mps:" in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_device_list_is_one_cuda_device_per_faster_rcnn_process(monkeypatch):
    import torch

    from yolo_sizeloss.checks import Device, parse_process_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # two GPUs, which this machine lacks
    assert parse_process_device("0,1", world_size=2) == Device("cuda", (0, 1))
    assert parse_process_device("1", world_size=1) == Device("cuda", (1,))
    assert parse_process_device("", world_size=2) == Device("auto")  # each process takes its local rank's
    for device, world_size in (("0,1", 1), ("0", 2)):
        with pytest.raises(ValueError, match=rf"^--device {device}: {len(device.split(','))} device\(s\) for "
                                             rf"{world_size} process\(es\) \(one CUDA device per torchrun process"):
            parse_process_device(device, world_size)



def test_cuda_without_an_index_is_the_first_cuda_device_as_in_ultralytics(monkeypatch):
    import torch

    from yolo_sizeloss.checks import Device, parse_device

    if torch.cuda.device_count() == 0:  # this machine as it is: the same error as for index 0
        for device in ("cuda", "0"):
            with pytest.raises(ValueError, match=rf"^--device {device}: this machine has no CUDA device; use --device cpu"):
                parse_device(device)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU, which this machine lacks
    assert parse_device("cuda") == parse_device("CUDA") == parse_device("0") == Device("cuda", (0,))

@pytest.mark.parametrize("world_size, batch, message", [
    ("1", "0", "--batch 0: must be at least 1"),  # not "(or -1: auto)": YOLO's automatic batch is not offered here
    ("2", "1", "--batch 1: must be at least the number of processes (2)"),  # once found after the scan
])
def test_a_faster_rcnn_batch_too_small_is_a_usage_error_before_the_data_scan(tmp_path, capsys, logged, monkeypatch,
                                                                              world_size, batch, message):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    assert train_main(["--arch", "faster_rcnn", "--batch", batch, "--device", "cpu",
                       "--project", str(tmp_path / "runs")]) == 2
    assert one_error_line(capsys).endswith(message)
    assert logged == [] and not (tmp_path / "runs").exists()


def test_two_devices_without_torchrun_are_refused_before_the_data_scan(tmp_path, capsys, logged, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train_main(["--arch", "faster_rcnn", "--device", "0,1", "--project", str(tmp_path / "runs")]) == 2
    assert "--device 0,1: 2 device(s) for 1 process(es)" in one_error_line(capsys)
    assert logged == [] and not (tmp_path / "runs").exists()
    from yolo_sizeloss.validate import main as val_main

    checkpoint = tmp_path / "rcnn.pt"  # val evaluates a Faster R-CNN checkpoint in one process
    torch.save({"arch": "faster_rcnn"}, checkpoint)
    assert val_main(["--model", str(checkpoint), "--data", "bccd.yaml", "--device", "0,1",
                     "--project", str(tmp_path / "runs")]) == 2
    assert "--device 0,1: 2 device(s) for 1 process(es)" in one_error_line(capsys)
    assert logged == [] and not (tmp_path / "runs").exists()


def test_val_of_a_faster_rcnn_checkpoint_at_an_image_size_it_cannot_take_is_a_usage_error(tmp_path, capsys, logged):
    """torchvision's model refused it only once built (exit 1, pointing to the traceback), where train's
    --imgsz is a usage error; YOLO's validator rounds a small size up instead."""
    import torch

    from yolo_sizeloss.validate import main as val_main

    checkpoint = tmp_path / "rcnn.pt"
    torch.save({"arch": "faster_rcnn", "train_args": {"data": "bccd.yaml"}}, checkpoint)
    assert val_main(["--model", str(checkpoint), "--imgsz", "16", "--device", "cpu",
                     "--project", str(tmp_path / "runs")]) == 2
    assert one_error_line(capsys).endswith("error: --imgsz 16: must be at least 32")
    assert logged == [] and not (tmp_path / "runs").exists()


def test_faster_rcnn_checks_its_default_runs_folder_before_the_data_scan(tmp_path, capsys, logged, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the runs folder would be\n")
    assert train_main(["--arch", "faster_rcnn", "--device", "cpu", "--epochs", "1"]) == 2
    assert one_error_line(capsys).endswith(f"--project runs/rcnn: {tmp_path / 'runs'} is a file, not a folder")
    assert logged == []


@pytest.mark.parametrize("argv, message", [
    (["--arch", "faster_rcnn", "--model", "x.pt"], "--model is YOLO's: Faster R-CNN is built from --backbone"),
    (["--arch", "faster_rcnn", "--nonsense"], "unrecognized arguments: --nonsense"),
    (["--nonsense"], "unrecognized arguments: --nonsense"),
    (["--arch"], "yolo-sizeloss train: error: argument --arch: expected one argument"),
    (["--resume"], "yolo-sizeloss train: error: argument --resume: expected one argument"),
    (["--loss", ""], "argument --loss: an empty value (leave the flag out for its default)"),
    (["--loss-cfg", "{dir}"], "is a folder; give a YAML file"),
    (["--loss", "nwd", "--loss-cfg", "{dir}/twice.yaml"], "twice.yaml:3: 'nwd.ratio' is given twice (first on line 2)"),
])
def test_usage_mistakes_are_one_line_naming_the_flag(tmp_path, capsys, argv, message):
    (tmp_path / "twice.yaml").write_text("nwd:\n  ratio: 0.5\n  ratio: 1.0\n")
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    argparse_stops = {"--nonsense", "x.pt", "--arch", "--resume", ""} & set(argv)
    try:
        code = train_main([*argv, "--project", str(tmp_path / "runs")])
    except SystemExit as stop:  # argparse's own stop, for the mistakes it finds itself
        assert argparse_stops
        code = stop.code
    assert code == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_val_given_arch_says_it_is_not_needed(capsys):
    from yolo_sizeloss.cli import val_main

    with pytest.raises(SystemExit) as exit_info:
        val_main(["--arch", "faster_rcnn", "--model", "x.pt"])
    assert exit_info.value.code == 2
    assert "--arch is not needed: val reads the detector family from the checkpoint" in one_error_line(capsys)


def test_a_yolo_checkpoint_as_faster_rcnn_weights_says_which_flag_it_belongs_to(tmp_path, capsys):
    assert train_main(["--arch", "faster_rcnn", "--weights", str(FINISHED), "--project", str(tmp_path / "runs")]) == 2
    error = one_error_line(capsys)
    assert f"--weights {FINISHED} is a YOLO checkpoint: give it to YOLO as --model" in error and len(error) < 300


def test_an_empty_loss_cfg_file_warns_and_trains_the_defaults(tmp_path, logged):
    from yolo_sizeloss.config import load_loss_config

    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert load_loss_config("plb", tmp_path / "empty.yaml") == load_loss_config("plb")
    assert any("empty.yaml is empty: the defaults of --loss plb apply" in line for line in logged)


def interrupted_run(folder, data: str):
    """``folder``/weights/last.pt: the finished test checkpoint made to look interrupted at epoch 1 of 5
    (an optimizer state and a non-negative epoch, what a resume needs), trained on ``data``."""
    import torch

    ckpt = torch.load(FINISHED, weights_only=False)
    ckpt.update(epoch=1, optimizer={"state": {}, "param_groups": []})
    ckpt["train_args"].update(epochs=5, data=data, save_dir=str(folder))
    (folder / "weights").mkdir(parents=True)
    torch.save(ckpt, folder / "weights" / "last.pt")
    return folder / "weights" / "last.pt"


def test_a_resume_whose_data_yaml_is_gone_is_one_line_naming_it_and_writes_nothing(tmp_path, capsys):
    last = interrupted_run(tmp_path / "run", str(tmp_path / "gone" / "data.yaml"))
    assert train_main(["--resume", str(last)]) == 1
    assert one_error_line(capsys).startswith(f"yolo-sizeloss train: error: --resume {last}: the run's data: "
                                             f"data yaml '{tmp_path / 'gone' / 'data.yaml'}' not found")
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["last.pt", "weights"]


def test_a_resume_whose_training_images_moved_is_one_line_and_writes_nothing(tmp_path, capsys):
    data = tiny_bccd(tmp_path / "data")
    last = interrupted_run(tmp_path / "run", str(data))
    (tmp_path / "data" / "images" / "train").rename(tmp_path / "data" / "images" / "moved")
    assert train_main(["--resume", str(last)]) == 1
    assert one_error_line(capsys).startswith(f"yolo-sizeloss train: error: --resume {last}: the run's data: data yaml "
                                             f"{data}: split 'train': ")
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["last.pt", "weights"]


def test_resuming_a_checkpoint_older_than_the_runs_last_pt_is_refused(tmp_path, capsys):
    # best.pt of an unfinished run keeps its optimizer: resumed, it cut results.csv back to its epoch and
    # saved over the later last.pt
    import torch

    last = interrupted_run(tmp_path / "run", "bccd.yaml")  # epoch 1 (0-based): 2 epochs trained
    best = last.parent / "best.pt"
    ckpt = torch.load(last, weights_only=False)
    ckpt["epoch"] = 0
    torch.save(ckpt, best)
    (tmp_path / "run" / "results.csv").write_text("epoch,time\n1,10\n2,20\n")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert train_main(["--resume", str(best)]) == 2
    assert one_error_line(capsys) == (f"yolo-sizeloss train: error: --resume {best}: holds 1 trained epochs and the "
                                      f"run's last.pt 2; resuming it would drop the later epochs: resume {last}, "
                                      "or resume a copy of the run folder")
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    ckpt["epoch"] = 1  # best.pt of the latest epoch: the same point as last.pt
    torch.save(ckpt, best)
    from yolo_sizeloss.cli import build_yolo_parser, check_yolo_request

    assert check_yolo_request(build_yolo_parser().parse_args(["--resume", str(best)])).overrides["resume"] == str(best)


def test_a_resume_continues_in_the_folder_holding_the_checkpoint(tmp_path, capsys):
    from yolo_sizeloss.cli import build_yolo_parser, check_yolo_request

    interrupted_run(tmp_path / "moved", "bccd.yaml")  # trained in "moved", now elsewhere:
    moved = tmp_path / "copy"
    shutil.copytree(tmp_path / "moved", moved)
    shutil.rmtree(tmp_path / "moved")
    request = check_yolo_request(build_yolo_parser().parse_args(["--resume", str(moved / "weights" / "last.pt")]))
    assert request.overrides["save_dir"] == str(moved)  # not the folder it was first saved to

    loose = tmp_path / "last.pt"
    shutil.copy(moved / "weights" / "last.pt", loose)
    assert train_main(["--resume", str(loose)]) == 2
    assert one_error_line(capsys) == (f"yolo-sizeloss train: error: --resume {loose}: a resumed run continues in its "
                                      f"run folder, and this checkpoint is not in one (RUN/weights/last.pt)")
    assert not (tmp_path / "moved").exists()


def test_a_faster_rcnn_checkpoint_outside_a_run_folder_is_refused(tmp_path, capsys):
    import torch

    loose = tmp_path / "last.pt"
    torch.save({"arch": "faster_rcnn", "epoch": 1}, loose)
    assert train_main(["--arch", "faster_rcnn", "--resume", str(loose)]) == 2
    assert one_error_line(capsys) == (f"yolo-sizeloss train: error: --resume {loose}: a resumed run continues in "
                                      "its run folder, and this checkpoint is not in one (RUN/weights/last.pt)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("name", ["/etc/hostname", "../cfg/bccd.yaml", "losses/plb.yaml", "defaults.yaml"])
def test_path_prints_shipped_files_only(capsys, name):
    from yolo_sizeloss.paths import CFG_DIR

    assert main(["path", "bccd.yaml"]) == 0 and capsys.readouterr().out.strip() == str((CFG_DIR / "bccd.yaml").resolve())
    assert main(["path", name]) == 2
    assert one_error_line(capsys).startswith(f"yolo-sizeloss path: error: '{name}' is not shipped (data: bccd.yaml;")


def test_a_resume_refuses_a_setting_ultralytics_would_ignore_and_writes_nothing(tmp_path, capsys, logged):
    import torch

    last = interrupted_run(tmp_path / "run", "bccd.yaml")  # trained with mosaic=1.0
    fliplr = torch.load(last, weights_only=False)["train_args"]["fliplr"]  # the run's own value: no change
    assert train_main(["--resume", str(last), "mosaic=0.5", f"fliplr={fliplr}", "patience=7"]) == 2
    assert one_error_line(capsys) == ("yolo-sizeloss train: error: mosaic=0.5: a resumed run keeps its own settings "
                                      "(mosaic=1.0); start a new run to change them")
    assert not any("Resume ignores" in line for line in logged)  # the stock warning would say it first
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["last.pt", "weights"]


@pytest.mark.parametrize("record, message", [
    ("loss: nwd\nsettings: [oops\n", "{file}:3: not valid YAML"),
    ("loss: nwd\n", "{file}: not a loss record (no 'settings': damaged?)"),
    ("loss: nwd\nsettings:\n  nwd: {ratio: 3}\n", "{file}: nwd.ratio = 3 is out of range"),
])
@pytest.mark.parametrize("loss", [[], ["--loss", "nwd"]])  # without --loss the trainer found it, after args.yaml
def test_a_resume_with_a_damaged_loss_record_is_one_line_naming_it(tmp_path, capsys, record, message, loss):
    last = interrupted_run(tmp_path / "run", "bccd.yaml")
    (tmp_path / "run" / "loss.yaml").write_text(record)
    assert train_main(["--resume", str(last), *loss]) == 2
    assert one_error_line(capsys).startswith(
        "yolo-sizeloss train: error: " + message.format(file=tmp_path / "run" / "loss.yaml"))
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["last.pt", "loss.yaml", "weights"]


def test_a_loss_cfg_alone_on_resume_is_read_for_the_runs_own_methods(tmp_path, capsys):
    from yolo_sizeloss.cli import build_yolo_parser, check_yolo_request
    from yolo_sizeloss.config import load_loss_config, write_loss_record

    last = interrupted_run(tmp_path / "run", "bccd.yaml")
    write_loss_record(tmp_path / "run", load_loss_config("nwd"))
    # the run's settings again: accepted (it resumes with its own loss)
    (tmp_path / "same.yaml").write_text("nwd:\n  assigner: true\n")
    request = check_yolo_request(build_yolo_parser().parse_args(["--resume", str(last), "--loss-cfg",
                                                                 str(tmp_path / "same.yaml")]))
    assert request.loss_config == load_loss_config("nwd")
    # other settings of its methods: the difference, not a '--loss baseline' the user never gave
    assert train_main(["--resume", str(last), "--loss-cfg", "assigner_auto"]) == 2
    assert one_error_line(capsys) == (f"yolo-sizeloss train: error: --resume {last}: a resumed run keeps its loss "
                                      "(nwd); the request differs in nwd.assigner (True -> auto); leave --loss and "
                                      "--loss-cfg out to resume with the run's own")
    (tmp_path / "plb.yaml").write_text("plb:\n  source: gt\n")
    assert train_main(["--resume", str(last), "--loss-cfg", str(tmp_path / "plb.yaml")]) == 2
    assert "section 'plb' is not selected by --loss nwd" in one_error_line(capsys)
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["last.pt", "loss.yaml", "weights"]


def test_a_new_imgsz_on_resume_is_refused_where_nwd_was_resolved_from_the_boxes(tmp_path, capsys):
    # resolved again at another size, the assigner decision and NWD's constant could change mid-run
    import torch

    from yolo_sizeloss.cli import build_yolo_parser, check_yolo_request
    from yolo_sizeloss.config import load_loss_config, write_loss_record

    last = interrupted_run(tmp_path / "run", "bccd.yaml")
    trained = torch.load(last, weights_only=False)["train_args"]["imgsz"]
    write_loss_record(tmp_path / "run", load_loss_config("assigner_auto"))
    assert train_main(["--resume", str(last), "--imgsz", str(trained + 32)]) == 2
    assert one_error_line(capsys) == (f"yolo-sizeloss train: error: --imgsz {trained + 32}: the run's nwd settings were "
                                      f"resolved from its boxes at imgsz {trained} and a resume keeps them; start a "
                                      "new run to train at another size")
    same = check_yolo_request(build_yolo_parser().parse_args(["--resume", str(last), "--imgsz", str(trained)]))
    assert same.overrides["imgsz"] == trained
    write_loss_record(tmp_path / "run", {})  # the stock loss: Ultralytics' own resume at a new size
    larger = check_yolo_request(build_yolo_parser().parse_args(["--resume", str(last), "--imgsz", str(trained + 32)]))
    assert larger.overrides["imgsz"] == trained + 32


def test_a_run_on_the_shipped_data_resumes_and_validates_after_the_package_moved(tmp_path):
    import argparse

    from yolo_sizeloss.cli import build_yolo_parser, check_yolo_request
    from yolo_sizeloss.paths import CFG_DIR
    from yolo_sizeloss.rcnn.engine import resumed_args
    from yolo_sizeloss.validate import training_data

    moved = str(tmp_path / "old_checkout" / "yolo_sizeloss" / "cfg" / "bccd.yaml")  # gone with its checkout
    last = interrupted_run(tmp_path / "run", moved)
    request = check_yolo_request(build_yolo_parser().parse_args(["--resume", str(last)]))
    assert request.overrides["data"] == str((CFG_DIR / "bccd.yaml").resolve())
    # the Faster R-CNN path reads the run's data through the same rule
    checkpoint = {"epoch": 1, "train_args": {"data": moved, "epochs": 5}}
    run = resumed_args(checkpoint, argparse.Namespace(resume=str(last), epochs=None, device=None, workers=None))
    assert run.data == str((CFG_DIR / "bccd.yaml").resolve())
    # a data yaml of the user's that is gone is not replaced by a shipped file of the same name
    other = str(tmp_path / "mine" / "cfg" / "bccd.yaml")
    assert resumed_args({**checkpoint, "train_args": {"data": other, "epochs": 5}},
                        argparse.Namespace(resume=str(last), epochs=None, device=None, workers=None)).data == other
    # val without --data takes the checkpoint's data through the same rule
    assert training_data(checkpoint, "best.pt") == str((CFG_DIR / "bccd.yaml").resolve())
    with pytest.raises(FileNotFoundError, match=f"--model best.pt was trained on {other}, which is not there"):
        training_data({"train_args": {"data": other}}, "best.pt")


@pytest.mark.parametrize("arch", [[], ["--arch", "faster_rcnn"]])
def test_a_project_under_a_file_is_refused_naming_the_flag(bad_yamls, capsys, arch):
    project = bad_yamls / "notes.txt" / "runs"  # notes.txt is a file
    assert train_main([*arch, "--project", str(project), "--device", "cpu"]) == 2
    assert one_error_line(capsys) == (f"yolo-sizeloss train: error: --project {project}: {bad_yamls / 'notes.txt'} "
                                      "is a file, not a folder")
    from yolo_sizeloss.validate import main as val_main

    assert val_main(["--model", str(FINISHED), "--data", "bccd.yaml", "--project", str(project)]) == 2
    assert one_error_line(capsys).endswith(f"error: --project {project}: {bad_yamls / 'notes.txt'} is a file, not a folder")


@pytest.mark.parametrize("arch", [[], ["--arch", "faster_rcnn"]])
def test_a_project_where_no_folder_can_be_made_is_refused_before_the_data_scan(capsys, arch):
    # /proc passes a permission check for root, yet refuses mkdir: the check must try, not read mode bits
    assert train_main([*arch, "--project", "/proc/sizeloss-runs", "--device", "cpu"]) == 2
    assert one_error_line(capsys).startswith("yolo-sizeloss train: error: --project /proc/sizeloss-runs: "
                                             "cannot make a folder in /proc (")


def test_faster_rcnn_weights_that_do_not_load_leave_no_run_folder(tmp_path, capsys, monkeypatch):
    """torchvision's COCO weights, cached but corrupt: the build fails, and it must fail before the run
    folder is made (an empty runs/rcnn/train was left behind)."""
    from torchvision.models.detection import FasterRCNN_MobileNet_V3_Large_FPN_Weights

    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / Path(FasterRCNN_MobileNet_V3_Large_FPN_Weights.DEFAULT.url).name).write_bytes(b"not a checkpoint")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # the cached file is read; nothing is downloaded
    project = tmp_path / "runs"
    code = train_main(["--arch", "faster_rcnn", "--backbone", "mobilenet_v3_large_fpn", "--weights", "DEFAULT",
                       "--epochs", "1", "--device", "cpu", "--project", str(project)])
    cached = cache / Path(FasterRCNN_MobileNet_V3_Large_FPN_Weights.DEFAULT.url).name
    assert code == 1
    assert one_error_line(capsys) == (f"yolo-sizeloss train: error: --weights DEFAULT: torchvision's COCO weights at "
                                      f"{cached} do not load (invalid load key, 'n'.); delete the file to download it "
                                      "again")
    assert not project.exists()


@pytest.mark.parametrize("arch", ["yolo", "faster_rcnn"])
def test_train_help_names_the_shipped_run_defaults(capsys, arch):
    from yolo_sizeloss.config import run_defaults

    with pytest.raises(SystemExit):
        train_main(["--arch", arch, "--help"])
    entries = re.split(r"\n(?=  -)", capsys.readouterr().out)  # one per option: its lines of help
    for key, value in run_defaults(arch).items():
        entry = next(e for e in entries if re.match(rf"\s*--{key.replace('_', '-')}\b", e))
        assert re.search(rf"default {value}\b", " ".join(entry.split())), (key, entry)


def test_a_project_given_with_a_tilde_is_the_home_folder_for_train_and_val(tmp_path, monkeypatch):
    # `--project=~/runs` reaches the command unexpanded; the check looked in the home folder while the run
    # was written to a folder named '~' in the working directory
    from yolo_sizeloss import validate
    from yolo_sizeloss.cli import build_yolo_parser, check_yolo_request

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    request = check_yolo_request(build_yolo_parser().parse_args(["--project=~/runs"]))
    assert request.overrides["project"] == str(tmp_path / "home" / "runs")
    val_args = validate.build_parser().parse_args(["--model", str(FINISHED), "--data", "bccd.yaml", "--project=~/val"])
    assert validate.check_args(val_args).project == str(tmp_path / "home" / "val")
    assert not (tmp_path / "~").exists()


def test_a_val_split_with_two_images_of_one_stem_is_refused_before_the_stock_validator_writes(tmp_path, capsys):
    # Ultralytics names predictions by file stem: the clash was found only after the whole validation
    from yolo_sizeloss.validate import main as val_main

    def second_folder(root):
        (root / "images" / "val2").mkdir()
        (root / "labels" / "val2").mkdir()
        image = sorted((root / "images" / "val").glob("*.jpg"))[0]
        shutil.copy(image, root / "images" / "val2")
        shutil.copy(root / "labels" / "val" / f"{image.stem}.txt", root / "labels" / "val2")
        text = (root / "data.yaml").read_text().replace("val: images/val", "val: [images/val, images/val2]")
        (root / "data.yaml").write_text(text)

    data = tiny_bccd(tmp_path / "data", second_folder)
    stem = sorted((tmp_path / "data" / "images" / "val").glob("*.jpg"))[0].stem
    project = tmp_path / "runs"
    assert val_main(["--model", str(FINISHED), "--data", str(data), "--split", "val", "--project", str(project)]) == 1
    error = one_error_line(capsys)
    assert error.startswith(f"yolo-sizeloss val: error: --data {data}: split 'val': images ")
    assert error.endswith(f"share the id '{stem}' (Ultralytics names predictions by file stem): rename one")
    assert not project.exists()


@pytest.mark.parametrize("argv", [
    ["train", "--data", ""],  # without the check, the default data set: a whole training on BCCD
    ["train", "--loss-cfg", " "],
    ["train", "--arch", "faster_rcnn", "--data", ""],
    ["train", "--arch", "faster_rcnn", "--weights", ""],
    ["val", "--model", "best.pt", "--data", ""],
])
def test_an_empty_value_for_a_flag_that_names_something_is_one_error_line(capsys, argv, tmp_path, monkeypatch):
    """`--data "$DATA"` with the variable unset: an error naming the flag, not the flag's default."""
    monkeypatch.chdir(tmp_path)
    flag = argv[-2]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert one_error_line(capsys) == (f"yolo-sizeloss {argv[0]}: error: argument {flag}: an empty value (leave the "
                                      "flag out for its default) (see --help)")
    assert list(tmp_path.iterdir()) == []


def test_a_resume_of_a_missing_file_or_of_a_run_folder_names_the_flag_and_the_checkpoint_to_give(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    for arch in ([], ["--arch", "faster_rcnn"]):
        assert train_main([*arch, "--resume", str(tmp_path / "nope.pt")]) == 2
        assert one_error_line(capsys) == f"yolo-sizeloss train: error: --resume {tmp_path / 'nope.pt'}: no such checkpoint"
        assert train_main([*arch, "--resume", str(run)]) == 2
        assert one_error_line(capsys) == (f"yolo-sizeloss train: error: --resume {run}: a folder; give the checkpoint "
                                          f"to continue, such as {run / 'weights' / 'last.pt'}")
    assert list(tmp_path.iterdir()) == [run] and list(run.rglob("*")) == [run / "weights"]


def test_a_file_that_is_no_checkpoint_is_named_once_after_its_flag(tmp_path, capsys):
    junk = tmp_path / "run" / "weights" / "last.pt"
    junk.parent.mkdir(parents=True)
    junk.write_text("not a checkpoint\n")
    for argv in (["--model", str(junk)], ["--arch", "faster_rcnn", "--weights", str(junk)], ["--resume", str(junk)],
                 ["--arch", "faster_rcnn", "--resume", str(junk)]):
        flag = argv[-2]
        project = [] if flag == "--resume" else ["--project", str(tmp_path / "runs")]
        assert train_main([*argv, *project, "--device", "cpu"]) == 1
        error = one_error_line(capsys)
        assert error.startswith(f"yolo-sizeloss train: error: {flag} {junk}: not a readable checkpoint ("), error
        assert error.count(str(junk)) == 1, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("flags, message", [
    (["--conf", "1"], "--conf 1.0: must be in [0, 1)"),
    (["--iou", "0"], "--iou 0.0: must be in (0, 1]"),
])
def test_a_val_threshold_out_of_range_names_its_own_flag_only(tmp_path, capsys, flags, message):
    assert main(["val", "--model", str(FINISHED), *flags, "--project", str(tmp_path / "runs")]) == 2
    assert one_error_line(capsys) == f"yolo-sizeloss val: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_path_help_says_what_the_command_prints(capsys):
    with pytest.raises(SystemExit) as done:
        main(["path", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    assert "Print the absolute path of a file the package ships" in out and "``" not in out


def test_pretrained_weights_are_checked_as_model_weights_are(tmp_path):
    """``pretrained=PATH`` was loaded only after the run folder existed, and Ultralytics downloads a name it
    lacks; a local YOLO checkpoint is taken, by its absolute path, and a Faster R-CNN one named."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from yolo_sizeloss.cli import parse_pairs

    weights = tmp_path / "start.pt"
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=3, verbose=False)}, weights)
    assert parse_pairs([f"pretrained={weights}"]) == {"pretrained": str(weights.resolve())}
    assert parse_pairs(["pretrained=True"]) == {"pretrained": True}
    torch.save({"arch": "faster_rcnn"}, tmp_path / "rcnn.pt")
    rcnn = tmp_path / "rcnn.pt"
    with pytest.raises(ValueError, match=re.escape(f"'pretrained={rcnn}' is a Faster R-CNN checkpoint: train from it "
                                                   "with --arch faster_rcnn")):
        parse_pairs([f"pretrained={rcnn}"])
