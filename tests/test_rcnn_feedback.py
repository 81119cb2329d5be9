"""Feedback and Grad-Libra on the Faster R-CNN path: stock equality, hand-built batches, training, resume.

Run with YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0. Nothing is downloaded: models start from random weights.
The hand-built RPN and RoI batches are tests/test_rcnn.py's (described there).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

from conftest import make_subset
from test_rcnn import (
    IMGSZ,
    LN2,
    bccd_batch,
    roi_box_terms,
    roi_forward,
    rpn_box_terms,
    rpn_expected_objectness,
    rpn_forward,
    tiny_roi_heads,
    tiny_rpn,
)
from yolo_sizeloss.checkpoints import RCNN_ARCH, load_checkpoint
from yolo_sizeloss.config import METHODS, LossConfigError, load_loss_config
from yolo_sizeloss.rcnn.cli import build_parser, fill_defaults, loss_config, main
from yolo_sizeloss.methods.gradlibra import gradlibra_softmax_weights, gradlibra_weights
from yolo_sizeloss.rcnn.model import (
    build_model,
    end_feedback_step,
    feedback_columns,
    model_from_checkpoint,
    split_feedback_state,
)
from yolo_sizeloss.rcnn.switches import LossSwitches

STATE = ("r", "q", "gain", "steps", "nonfinite_steps")


def grad_libra(g: float, alpha: float = 0.8) -> float:
    """docs/methods.md, Grad-Libra: G = g - alpha sin g."""
    return g - alpha * math.sin(g)


def switches(**settings) -> LossSwitches:
    """Switches of ``feedback``/``gradlibra`` sections: the defaults with ``settings`` per method replaced."""
    config = load_loss_config("+".join(settings))
    for method, values in settings.items():
        config[method].update(values)
    return LossSwitches.from_config(config)


# ----------------------------------------------------------------------------------------------------------------
# Settings and the pure softmax form


def test_defaults_compile_to_both_stages():
    s = LossSwitches.from_config(load_loss_config("feedback+gradlibra"))
    assert s.terms("feedback") == ("rpn_box", "roi_box") and s.terms("gradlibra") == ("rpn_cls", "roi_cls")
    fb, gl = s.config["feedback"], s.config["gradlibra"]
    assert (fb["small_area"], fb["momentum"], fb["g_max"]) == (1024, 0.9, 4.0)
    assert (gl["alpha_pos"], gl["alpha_neg"]) == (0.8, 0.8)
    assert s.rpn_active and s.roi_active
    model = build_model("mobilenet_v3_large_fpn", 4, IMGSZ, s)
    assert "feedback" in model.rpn.states and "feedback" in model.roi_heads.states
    assert (model.rpn.feedback.small_area, model.rpn.feedback.momentum, model.rpn.feedback.g_max) == (1024, 0.9, 4.0)
    only_rpn = build_model("mobilenet_v3_large_fpn", 4, IMGSZ, switches(feedback={"rcnn_terms": ["rpn_cls"]}))
    assert "feedback" in only_rpn.rpn.states and only_rpn.roi_heads.states == {}
    assert not switches(feedback={"rcnn_terms": []}, gradlibra={"rcnn_terms": []}).rpn_active


def test_rcnn_terms_errors_name_file_line_and_range(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("gradlibra:\n  rcnn_terms: [rpn_box]\n")
    with pytest.raises(LossConfigError, match=r"o\.yaml:2: gradlibra\.rcnn_terms .*rpn_cls, roi_cls \("):
        load_loss_config("gradlibra", path)
    path.write_text("feedback:\n  g_max: 2\n  rcnn_terms: [rpn_cls, box]\n")
    with pytest.raises(LossConfigError, match=r"o\.yaml:3: feedback\.rcnn_terms .*rpn_cls, rpn_box, roi_cls, roi_box"):
        load_loss_config("feedback", path)


def test_every_method_together_is_accepted_by_the_command_line():
    # the loss as check_args resolves it from the parsed flags: every method, in the order given
    spec = "+".join(reversed(METHODS))
    config = loss_config(fill_defaults(build_parser().parse_args(["--loss", spec])))
    assert list(config) == list(reversed(METHODS))
    assert config == load_loss_config(spec)  # each with its default settings


def test_softmax_grad_libra_by_hand():
    # three equal logits: p_true = 1/3, g = 2/3 for every sample
    logits = torch.zeros(2, 3)
    assert gradlibra_softmax_weights(logits, torch.tensor([0, 2])).tolist() == pytest.approx([grad_libra(2 / 3)] * 2)
    # alpha_neg on the background class (0), alpha_pos elsewhere
    got = gradlibra_softmax_weights(logits, torch.tensor([0, 2]), alpha_pos=0.5, alpha_neg=0.9)
    assert got.tolist() == pytest.approx([grad_libra(2 / 3, 0.9), grad_libra(2 / 3, 0.5)])
    # p_true = e^2 / (e^2 + 2): g = 2 / (e^2 + 2)
    g = 2 / (math.e ** 2 + 2)
    assert gradlibra_softmax_weights(torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([1])).item() == pytest.approx(
        grad_libra(g), rel=1e-6)
    # two classes: the cross-entropy is the BCE of z1 - z0, and the weight is the paper's sigmoid one
    z = torch.tensor([[0.3, -1.2], [-0.7, 2.1], [1.5, 1.4]])
    labels = torch.tensor([1, 0, 1])
    sigmoid_form = gradlibra_weights(torch.sigmoid(z[:, 1] - z[:, 0]), labels.float(), 0.6, 0.9)
    assert torch.allclose(gradlibra_softmax_weights(z, labels, 0.6, 0.9), sigmoid_form, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Neutral settings equal stock torchvision


@pytest.mark.parametrize("settings", [
    {"feedback": {"g_max": 1.0, "rcnn_terms": ["rpn_cls", "rpn_box", "roi_cls", "roi_box"]}},  # gain exactly 1
    {"feedback": {"rcnn_terms": []}, "gradlibra": {"rcnn_terms": []}},  # no term: the stock code runs
])
def test_neutral_settings_equal_stock_torchvision_bit_for_bit(settings):
    images, targets = bccd_batch(2)
    torch.manual_seed(0)
    ours = build_model("mobilenet_v3_large_fpn", 4, IMGSZ, switches(**settings)).train()
    stock = fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=IMGSZ, max_size=IMGSZ).train()
    stock.load_state_dict(split_feedback_state(ours.state_dict())[0])  # ours adds only the feedback state
    for step in range(2):  # the second step runs with the feedback state the first one left
        torch.manual_seed(step)
        ours_losses = ours(images, targets)
        torch.manual_seed(step)
        stock_losses = stock(images, targets)
        for name in stock_losses:
            assert torch.equal(ours_losses[name], stock_losses[name]), (step, name)
        end_feedback_step(ours)
    columns = feedback_columns(ours)
    if "g_max" in settings["feedback"]:  # the feedback path ran and saw small objects, with gain 1
        assert columns["feedback/rpn/steps"] == columns["feedback/roi/steps"] == 2
        assert columns["feedback/rpn/gain"] == columns["feedback/roi/gain"] == 1.0
    else:
        assert columns == {}


# ----------------------------------------------------------------------------------------------------------------
# The hand-built RPN batch: ground truths g0 (area 8 x 9 = 72), g1 (16 x 17 = 272), g2 (16 x 16 = 256); the
# sampled positives are the anchors of g0, g1, g2, g2. With small_area 100 only g0 is small.

SMALL_AREA = 100.0


@pytest.mark.parametrize("g_max", [4.0, 1000.0])
def test_rpn_feedback_by_hand(g_max):
    stock, labels, anchors = rpn_forward(tiny_rpn(LossSwitches()))
    rpn = tiny_rpn(switches(feedback={"small_area": SMALL_AREA, "g_max": g_max, "rcnn_terms": ["rpn_cls", "rpn_box"]}))
    first, _, _ = rpn_forward(rpn)
    for name in stock:  # gain 1 before any feedback
        assert torch.equal(first[name], stock[name]), name
    rpn.feedback.end_step()
    terms = rpn_box_terms(anchors)
    r, q = terms[0] / sum(terms), 1 / 3  # g0's share of the box loss; 1 of the 3 matched ground truths
    gain = min(q / r, g_max)
    assert r < q and gain > 1
    state = rpn.feedback.state()
    assert (state["r"], state["q"], state["gain"]) == pytest.approx((r, q, gain), rel=1e-5)
    assert (state["steps"], state["nonfinite_steps"]) == (1, 0)

    second, _, _ = rpn_forward(rpn)  # g0's positive anchor now weighs `gain` in both terms
    sampled = int((labels >= 0).sum())
    expected_box = (gain * terms[0] + sum(terms[1:])) / sampled
    assert second["loss_rpn_box_reg"].item() == pytest.approx(expected_box, rel=1e-5)
    expected_objectness = rpn_expected_objectness(labels, "predicted", [gain, 1.0, 1.0, 1.0], plb=False)
    assert second["loss_objectness"].item() == pytest.approx(expected_objectness, rel=1e-5)
    rpn.feedback.end_step()  # the same batch again: the moving averages stay where they are
    assert rpn.feedback.state()["r"] == pytest.approx(r, rel=1e-5) and rpn.feedback.state()["steps"] == 2


def test_rpn_feedback_without_small_objects_keeps_the_averages_and_gain_one():
    rpn = tiny_rpn(switches(feedback={"small_area": 50.0, "rcnn_terms": ["rpn_box"]}))  # every object is larger
    stock, _, _ = rpn_forward(tiny_rpn(LossSwitches()))
    losses, _, _ = rpn_forward(rpn)
    rpn.feedback.end_step()
    assert rpn.feedback.state() == {"r": 0.0, "q": 0.0, "gain": 1.0, "steps": 0, "nonfinite_steps": 0}
    assert torch.equal(losses["loss_rpn_box_reg"], stock["loss_rpn_box_reg"])


def test_rpn_grad_libra_by_hand():
    """Every objectness logit is 0: p = 1/2, so g = 1/2 for positives (t = 1) and negatives (t = 0)."""
    stock, labels, anchors = rpn_forward(tiny_rpn(LossSwitches()))
    losses, _, _ = rpn_forward(tiny_rpn(switches(gradlibra={"alpha_pos": 0.5, "alpha_neg": 0.9, "rcnn_terms": ["rpn_cls"]})))
    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    expected = LN2 * (positives * grad_libra(0.5, 0.5) + negatives * grad_libra(0.5, 0.9)) / (positives + negatives)
    assert losses["loss_objectness"].item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(losses["loss_rpn_box_reg"], stock["loss_rpn_box_reg"])


# ----------------------------------------------------------------------------------------------------------------
# The hand-built RoI batch: sampled RoIs p0 (matched g0), p1 (g1), p2 (background), g0, g1; g0 (8 x 9 = 72) is
# small at small_area 100, g1 (16 x 17 = 272) is not. Every class logit is 0 (cross-entropy ln 3 each).


def test_roi_feedback_by_hand():
    stock = roi_forward(tiny_roi_heads(LossSwitches()))
    heads = tiny_roi_heads(switches(feedback={"small_area": SMALL_AREA, "rcnn_terms": ["roi_cls", "roi_box"]}))
    first = roi_forward(heads)
    for name in stock:
        assert torch.equal(first[name], stock[name]), name
    heads.feedback.end_step()
    terms = roi_box_terms()  # positives p0, p1, g0, g1; g0 as its own RoI has loss 0
    assert terms[2] == 0 and terms[0] > 0
    r, q = (terms[0] + terms[2]) / sum(terms), 1 / 2
    gain = min(q / r, 4.0)
    assert (heads.feedback.state()["r"], heads.feedback.state()["q"]) == pytest.approx((r, q), rel=1e-5)
    assert heads.feedback.state()["gain"] == pytest.approx(gain, rel=1e-5)

    second = roi_forward(heads)  # p0 and g0 (matched to the small g0) weigh `gain`; the background RoI p2 keeps 1
    assert second["loss_classifier"].item() == pytest.approx(math.log(3) * (2 * gain + 3) / 5, rel=1e-5)
    expected_box = (gain * terms[0] + terms[1] + gain * terms[2] + terms[3]) / 5
    assert second["loss_box_reg"].item() == pytest.approx(expected_box, rel=1e-5)


def test_roi_grad_libra_by_hand():
    """Three classes, logits 0: p_true = 1/3, g = 2/3; alpha_neg on the background RoI p2."""
    stock = roi_forward(tiny_roi_heads(LossSwitches()))
    losses = roi_forward(tiny_roi_heads(switches(gradlibra={"alpha_pos": 0.5, "alpha_neg": 0.9,
                                                           "rcnn_terms": ["roi_cls"]})))
    expected = math.log(3) * (4 * grad_libra(2 / 3, 0.5) + grad_libra(2 / 3, 0.9)) / 5
    assert losses["loss_classifier"].item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(losses["loss_box_reg"], stock["loss_box_reg"])


def test_feedback_and_grad_libra_multiply_with_plb():
    plb = LossSwitches.from_config({"plb": {"source": "gt", "terms": [], "rcnn_terms": ["roi_cls"]}})
    combined = LossSwitches.from_config({
        "plb": {"source": "gt", "terms": [], "rcnn_terms": ["roi_cls"]},
        "gradlibra": {"alpha_pos": 0.8, "alpha_neg": 0.8, "rcnn_terms": ["roi_cls"]},
    })
    alone = roi_forward(tiny_roi_heads(plb))["loss_classifier"].item()
    both = roi_forward(tiny_roi_heads(combined))["loss_classifier"].item()
    assert both == pytest.approx(alone * grad_libra(2 / 3), rel=1e-6)  # G is the same on every RoI here


# ----------------------------------------------------------------------------------------------------------------
# Training through the command line on real BCCD images


TRAIN_FLAGS = ["--backbone", "mobilenet_v3_large_fpn", "--imgsz", str(IMGSZ), "--epochs", "1", "--batch", "2",
               "--workers", "0", "--device", "cpu"]
ITERATIONS = 2  # 4 training images, batch 2


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_subset(tmp_path_factory.mktemp("bccd_feedback"), {"train": 4, "val": 2})


def train_modes(data: Path, project: Path, losses: tuple[str, ...]) -> dict[str, Path]:
    """Train each of ``losses`` for one epoch through the command line; the run folders, by loss."""
    done = {}
    for loss in losses:
        name = loss.replace("+", "_")
        assert main(["--data", str(data), "--project", str(project), "--name", name, "--loss", loss,
                     *TRAIN_FLAGS]) == 0, loss
        done[loss] = project / name
    return done


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    return train_modes(tiny_data, tmp_path_factory.mktemp("runs"), ("feedback", "gradlibra", "plb+feedback"))


def results(run: Path) -> list[dict[str, str]]:
    lines = (run / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["feedback", "gradlibra", "plb+feedback"])
def test_training_leaves_checkpoints_that_load(runs, loss):
    run = runs[loss]
    checkpoint = load_checkpoint(run / "weights" / "last.pt", RCNN_ARCH)
    assert checkpoint["loss"] == load_loss_config(loss)
    model = model_from_checkpoint(checkpoint)
    stock = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=4)
    stock.load_state_dict(checkpoint["model"])  # strict: the detector's tensors carry torchvision's keys only
    row = results(run)[0]
    # every column finite but a class's val AP, NaN where the tiny val split holds none of it
    assert all(math.isfinite(float(v)) for k, v in row.items() if not k.startswith("val/AP50-95 "))
    if "feedback" not in loss:
        assert checkpoint["feedback"] == {} and not any(k.startswith("feedback/") for k in row)
        return
    for stage, prefix in (("rpn", "rpn.feedback."), ("roi", "roi_heads.feedback.")):
        saved = {k: float(checkpoint["feedback"][prefix + k]) for k in STATE}
        assert saved == {k: float(row[f"feedback/{stage}/{k}"]) for k in STATE}  # logged = saved
        assert saved == getattr(model, {"rpn": "rpn", "roi": "roi_heads"}[stage]).feedback.state()  # restored
        assert saved["steps"] == ITERATIONS and saved["nonfinite_steps"] == 0  # every step saw small objects
        assert 0 < saved["r"] <= 1 and 0 < saved["q"] <= 1 and 1 <= saved["gain"] <= 4


def resumable_copy(run: Path, dst: Path, **changes) -> tuple[Path, dict]:
    """A copy at ``dst`` of a one-epoch run whose last.pt reads as if the run had been started for 2 epochs
    and stopped after 1, with ``changes`` to its checkpoint; that last.pt and the checkpoint."""
    shutil.copytree(run, dst)
    last = dst / "weights" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["train_args"]["epochs"] = 2
    checkpoint.update(changes)
    torch.save(checkpoint, last)
    return last, checkpoint


@pytest.mark.slow
def test_resume_restores_the_feedback_state(runs, tmp_path):
    run = tmp_path / "run"
    last, checkpoint = resumable_copy(runs["feedback"], run)
    before = {k: float(v) for k, v in checkpoint["feedback"].items()}
    assert main(["--resume", str(last)]) == 0
    after = load_checkpoint(last, RCNN_ARCH)["feedback"]
    # the steps count on from the saved state: a state that restarted would show ITERATIONS again
    assert float(after["rpn.feedback.steps"]) == float(after["roi_heads.feedback.steps"]) == 2 * ITERATIONS
    assert before["rpn.feedback.steps"] == ITERATIONS
    rows = results(run)
    assert len(rows) == 2 and float(rows[1]["feedback/rpn/steps"]) == 2 * ITERATIONS
