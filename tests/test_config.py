"""Loss settings as data: defaults from cfg/losses, overrides, and errors naming file, line and range."""

import re
from pathlib import Path

import pytest
import yaml

from yolo_sizeloss.config import METHODS, LossConfigError, load_loss_config, parse_loss_names

from conftest import BCCD


def test_defaults_follow_the_methods_document():
    assert load_loss_config("baseline") == {}
    cfg = load_loss_config("feedback+scb+plb+gradlibra")
    assert list(cfg) == ["feedback", "scb", "plb", "gradlibra"]
    assert cfg["feedback"] == {"small_area": 1024, "momentum": 0.9, "g_max": 4.0, "terms": ["box"],
                               "rcnn_terms": ["rpn_box", "roi_box"]}
    assert cfg["scb"] == {"alpha": 1.0, "beta": 3.0, "terms": ["cls"], "rcnn_terms": ["rpn_cls"]}
    # the PLB paper's two-stage choice: the RPN stage (its switches 1C and 1B)
    assert cfg["plb"] == {"source": "predicted", "terms": ["box", "cls"], "rcnn_terms": ["rpn_cls", "rpn_box"]}
    assert cfg["gradlibra"] == {"alpha_pos": 0.8, "alpha_neg": 0.8, "rcnn_terms": ["rpn_cls", "roi_cls"]}


@pytest.mark.parametrize("spec, message", [
    ("focal", r"^unknown loss 'focal' in 'focal': valid names are baseline, feedback, scb, plb, gradlibra, nwd, "),
    ("plb+foo", r"^unknown loss 'foo' in 'plb\+foo': valid names are "),
    ("plb+plb", r"^loss 'plb\+plb' names a method twice$"),
    ("baseline+scb", r"^loss 'baseline\+scb': 'baseline' is the stock loss and cannot be combined$"),
    ("", r"^--loss '': empty; give baseline or methods joined by '\+' \(feedback, scb, plb, gradlibra, nwd\)$"),
])
def test_bad_loss_names(spec, message):
    with pytest.raises(LossConfigError, match=message):
        parse_loss_names(spec)


def test_override_file_changes_only_what_it_names(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("plb:\n  source: gt\nscb:\n  terms: [box, cls]\n")
    cfg = load_loss_config("plb+scb", path)
    assert cfg["plb"] == {"source": "gt", "terms": ["box", "cls"], "rcnn_terms": ["rpn_cls", "rpn_box"]}
    assert cfg["scb"] == {"alpha": 1.0, "beta": 3.0, "terms": ["box", "cls"], "rcnn_terms": ["rpn_cls"]}


@pytest.mark.parametrize(
    "spec, text, message",
    [
        ("gradlibra", "gradlibra:\n  alpha_pos: 0.8\n  alpha_neg: 0\n", r"o\.yaml:3: gradlibra\.alpha_neg = 0 .*\(0, 1\]"),
        ("gradlibra", "gradlibra:\n  alpha_pos: 1.5\n", r"o\.yaml:2: gradlibra\.alpha_pos = 1\.5 .*\(0, 1\]"),
        ("scb", "scb:\n  beta: -1\n", r"o\.yaml:2: scb\.beta = -1 .*> 0"),
        ("feedback", "feedback:\n  g_max: 0.5\n", r"o\.yaml:2: feedback\.g_max = 0\.5 .*>= 1"),
        ("feedback", "feedback:\n  small_area: -4\n", r"o\.yaml:2: feedback\.small_area = -4 .*>= 0"),
        ("feedback", "feedback:\n  momentum: 1\n", r"o\.yaml:2: feedback\.momentum = 1 .*\[0, 1\)"),
        ("plb", "plb:\n  source: anchors\n", r"o\.yaml:2: plb\.source = 'anchors' .*predicted, gt"),
        ("plb", "plb:\n  terms: [box, obj]\n", r"o\.yaml:2: plb\.terms .*box, cls"),
        ("plb", "plb:\n  sorce: gt\n", r"o\.yaml:2: unknown key 'plb\.sorce' \(known: source, terms, rcnn_terms\)"),
        ("plb", "plb:\n  rcnn_terms: [rpn_cls, box]\n", r"o\.yaml:2: plb\.rcnn_terms .*rpn_cls, rpn_box, roi_cls, roi_box"),
        ("scb", "scb:\n  rcnn_terms: [roi_cls]\n", r"o\.yaml:2: scb\.rcnn_terms .*rpn_cls, rpn_box \("),
        ("plb", "scb:\n  beta: 2\n", r"o\.yaml:1: section 'scb' is not selected by --loss plb \(selected: plb; "
                                      r"select it with --loss plb\+scb\)"),
        ("baseline", "nwd:\n  ratio: 0.5\n", r"section 'nwd' is not selected by --loss baseline \(selected: "
                                              r"baseline; select it with --loss nwd\)"),
        ("plb", "plb:\n  source: gt\nfocal:\n  gamma: 2\n", r"o\.yaml:3: unknown method 'focal' \(valid: feedback, scb"),
        ("plb", "plb: [1, 2\n", r"o\.yaml:\d+: not valid YAML"),
        # PyYAML reads an exponent without a dot and a sign as text; the error said "out of range"
        ("nwd", "nwd:\n  ratio: 0.5\n  constant: 1e1\n", r"o\.yaml:3: nwd\.constant = '1e1' is text to YAML, which "
                                                      r"reads an exponent as a number only with a dot and a sign: "
                                                      r"write 10\.0$"),
        # an int too large for a float raised OverflowError, a traceback past the one-line error
        ("feedback", "feedback:\n  g_max: 1" + "0" * 400 + "\n", r"o\.yaml:2: feedback\.g_max = 10+ is out of range"),
    ],
)
def test_override_errors_name_file_line_and_range(tmp_path, spec, text, message):
    path = tmp_path / "o.yaml"
    path.write_text(text)
    with pytest.raises(LossConfigError, match=message):
        load_loss_config(spec, path)


def test_every_method_has_a_default_file():
    for method in METHODS:
        assert load_loss_config(method)[method]


def test_data_names_resolve_from_any_working_directory(tmp_path, monkeypatch):
    from yolo_sizeloss.paths import CFG_DIR, resolve_data

    monkeypatch.chdir(tmp_path)
    assert resolve_data("bccd.yaml") == resolve_data("bccd") == str(CFG_DIR / "bccd.yaml")
    (tmp_path / "mine.yaml").write_text("names: {0: a}\n")
    assert resolve_data("mine.yaml") == resolve_data("mine") == str(tmp_path / "mine.yaml")  # a file here wins
    (tmp_path / "bccd").mkdir()  # a data set's folder is not its yaml: the shipped one is still found
    assert resolve_data("bccd") == str(CFG_DIR / "bccd.yaml")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        resolve_data("nope.yaml")
    # the run defaults live beside the shipped data yaml but are not one
    with pytest.raises(FileNotFoundError, match=r"^data yaml 'defaults' not found \(tried defaults, defaults.yaml\); shipped: bccd.yaml$"):
        resolve_data("defaults")
    # a path with a folder is only that path: a yaml gone from old/ must not train on the shipped one
    with pytest.raises(FileNotFoundError, match=r"^data yaml 'old/bccd.yaml' not found \(tried old/bccd.yaml\)$"):
        resolve_data("old/bccd.yaml")
    with pytest.raises(LossConfigError, match=r"loss settings 'old/safit.yaml' not found \(tried old/safit.yaml\)"):
        load_loss_config("nwd", "old/safit.yaml")


def test_loss_cfg_names_a_shipped_variant_unless_a_file_of_that_name_is_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_loss_config("nwd", "box_only")["nwd"]["assigner"] is False
    assert load_loss_config("nwd+plb", "gt_areas.yaml")["plb"]["source"] == "gt"
    assert load_loss_config("nwd")["nwd"]["assigner"] is True  # the paper's default stays the default
    (tmp_path / "box_only").write_text("nwd:\n  ratio: 0.25\n")
    assert load_loss_config("nwd", "box_only")["nwd"] == {**load_loss_config("nwd")["nwd"], "ratio": 0.25}
    (tmp_path / "safit.yaml").write_text("nwd:\n  ratio: 0.3\n")  # the name as typed, found as the shipped are
    assert load_loss_config("nwd", "safit")["nwd"] == {**load_loss_config("nwd")["nwd"], "ratio": 0.3}
    assert load_loss_config("safit")["nwd"]["ratio"] == 1.0  # a loss name is the shipped mode, whatever is here
    with pytest.raises(LossConfigError, match=r"loss settings 'boxonly' not found .*; shipped variants: assigner_auto, assigner_only, box_only, gt_areas, nwd_targets, safit, safit_assigner, safit_sharp, safit_sharp_assigner_auto, safit_sharp_auto, safit_sharp_auto_late, safit_sharp_auto_norm, safit_sharp_auto_warmup, safit_sharp_ciou_assigner_auto, safit_small_classes, simd_assigner$"):
        load_loss_config("nwd", "boxonly")


def test_bccd_yaml_resolves_its_splits_against_its_own_folder(tmp_path, monkeypatch):
    from ultralytics.data.utils import check_det_dataset

    from yolo_sizeloss.paths import resolve_data

    monkeypatch.chdir(tmp_path)
    data = check_det_dataset(resolve_data("bccd.yaml"))
    for split, count in (("train", 205), ("val", 87), ("test", 72)):
        assert data[split] == str(BCCD / "images" / split)
        assert len(list((BCCD / "images" / split).glob("*.jpg"))) == count


def test_loss_differences_name_each_changed_setting():
    from yolo_sizeloss.config import loss_differences

    saved = load_loss_config("feedback+plb")
    asked = load_loss_config("feedback+scb")
    asked["feedback"]["momentum"] = 0.5
    assert loss_differences(saved, asked) == ["plb (only in the run)", "scb (only requested)",
                                             "feedback.momentum (0.9 -> 0.5)"]
    assert loss_differences(saved, saved) == []


def test_run_defaults_are_one_table_per_family():
    from yolo_sizeloss.config import run_defaults

    assert run_defaults("yolo") == {"epochs": 50, "imgsz": 416, "batch": 16, "workers": 2, "seed": 0, "fraction": 1.0}
    rcnn = run_defaults("faster_rcnn")
    assert (rcnn["epochs"], rcnn["batch"], rcnn["lr"], rcnn["lr_step"]) == (15, 4, 0.005, 3)  # the PLB paper's


def test_a_run_saved_before_a_setting_existed_resumes_with_its_old_behaviour(tmp_path):
    """loss.yaml of a run trained before nwd.box_measure existed: the setting reads as its default, NWD, which is
    what that run trained with, and the stock request for its loss is the same loss."""
    from yolo_sizeloss.config import LOSS_FILE, check_resumed_loss, read_loss_record

    old = load_loss_config("nwd")
    del old["nwd"]["box_measure"]
    (tmp_path / LOSS_FILE).write_text(yaml.safe_dump({"loss": "nwd", "settings": old}))
    saved = read_loss_record(tmp_path)
    assert saved == load_loss_config("nwd") and saved["nwd"]["box_measure"] == "nwd"
    assert check_resumed_loss(saved, load_loss_config("nwd"), "resuming") is None


def test_a_shipped_mode_is_a_loss_name_of_its_own(tmp_path):
    """``--loss safit`` is ``--loss nwd --loss-cfg safit``: one name for a shipped combination of settings;
    it combines with methods and takes a user's --loss-cfg on top."""
    from yolo_sizeloss.paths import shipped_variants

    assert load_loss_config("safit") == load_loss_config("nwd", "safit")
    assert load_loss_config("safit")["nwd"]["box_measure"] == "safit"
    both = load_loss_config("safit+feedback")
    assert both == {**load_loss_config("nwd", "safit"), "feedback": load_loss_config("feedback")["feedback"]}
    (tmp_path / "ratio.yaml").write_text("nwd:\n  ratio: 0.5\n")
    assert load_loss_config("safit", tmp_path / "ratio.yaml")["nwd"] == {**load_loss_config("safit")["nwd"], "ratio": 0.5}
    with pytest.raises(LossConfigError, match=r"^loss 'safit\+nwd' names a method twice \(safit and nwd each set nwd\)$"):
        load_loss_config("safit+nwd")
    with pytest.raises(LossConfigError, match=r"^loss 'assigner_auto\+feedback\+safit' names a method twice "
                                              r"\(assigner_auto and safit each set nwd\)$"):
        load_loss_config("assigner_auto+feedback+safit")
    with pytest.raises(LossConfigError, match=r"or a shipped mode: .*safit"):
        load_loss_config("safitt")
    assert not set(shipped_variants()) & {"baseline", *METHODS}  # a method's name always means the method


def test_faster_rcnn_shorthands_keep_a_modes_settings():
    from yolo_sizeloss.rcnn.cli import build_parser, loss_config

    config = loss_config(build_parser("train").parse_args(["--loss", "safit", "--plb", "1C,1B"]))
    assert config["nwd"] == load_loss_config("safit")["nwd"] and config["plb"]["rcnn_terms"] == ["rpn_cls", "rpn_box"]


def test_every_shipped_mode_is_documented_for_users():
    """A variant added to cfg/variants is a new --loss name: README's table and docs/methods.md's list of
    defaults name each one."""
    from yolo_sizeloss.paths import shipped_variants

    root = Path(__file__).resolve().parent.parent
    readme, methods = (root / "README.md").read_text(), (root / "docs" / "methods.md").read_text()
    for name in shipped_variants():
        assert f"| `{name}`" in readme or f", `{name}` |" in readme, name
        assert f"`{name}`" in methods, name


def test_every_setting_has_a_row_in_the_defaults_table():
    """docs/methods.md's Defaults table, which README points users to, names every setting of each method."""
    root = Path(__file__).resolve().parent.parent
    table = (root / "docs" / "methods.md").read_text().split("## Defaults", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] in METHODS:
            documented.setdefault(cells[0], set()).update(re.findall(r"`(\w+)`", cells[1]))
    for method in METHODS:
        assert set(load_loss_config(method)[method]) <= documented.get(method, set()), method


def test_a_loss_configuration_given_in_python_is_checked_and_completed():
    from yolo_sizeloss.config import check_loss_config
    from yolo_sizeloss.yolo import SizeAwareTrainer

    assert check_loss_config("plb+scb") == load_loss_config("plb+scb")
    assert check_loss_config({}) == {}
    given = check_loss_config({"plb": {"source": "gt"}})
    assert given == {"plb": {**load_loss_config("plb")["plb"], "source": "gt"}}
    assert SizeAwareTrainer.with_loss("feedback").loss_config == load_loss_config("feedback")
    for bad, message in [
        # settings given in Python have no file lines to name
        ({"nosuch": {}}, r"^loss configuration: unknown method 'nosuch' \(valid: feedback"),
        ({"plb": {"sorce": "gt"}}, r"^loss configuration: unknown key 'plb\.sorce' \(known: source, terms, rcnn_terms\)"),
        ({"feedback": {"g_max": 0.5}}, r"^loss configuration: feedback\.g_max = 0\.5 is out of range"),
        ({"plb": ["gt"]}, r"^loss configuration: section 'plb' must be a mapping of settings"),
        (["plb"], r"a loss name or a mapping \{method: settings\}, not list"),
        ("plb+nosuch", r"unknown loss 'nosuch'"),
    ]:
        with pytest.raises(LossConfigError, match=message):
            SizeAwareTrainer.with_loss(bad)


def test_a_loss_cfg_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_bytes(b"nwd:\n  ratio: 0.5\n\xff\xfe")
    with pytest.raises(LossConfigError, match=rf"^{path}: not a text file \(byte 19 is not UTF-8\)$"):
        load_loss_config("nwd", path)
