"""The size-aware Ultralytics loss: stock equality to the last bit, and the direction of each method."""

import copy

import pytest
import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.loss import E2ELoss, v8DetectionLoss

from yolo_sizeloss.config import load_loss_config
from yolo_sizeloss.yolo.loss import (
    AnchorWeighting,
    build_size_aware_loss,
    install_size_aware_loss,
    loss_branches,
    remove_size_aware_loss,
)

from conftest import BCCD

IMGSZ = 256


def bccd_batch(n_images=2, seed=0) -> dict:
    """A training batch of real BCCD labels (normalised xywh) over seeded random pixels."""
    torch.manual_seed(seed)
    files = sorted((BCCD / "labels" / "train").glob("*.txt"))[:n_images]
    idx, cls, boxes = [], [], []
    for i, f in enumerate(files):
        for line in f.read_text().splitlines():
            c, *xywh = map(float, line.split())
            idx.append(i), cls.append(c), boxes.append(xywh)
    return {
        "img": torch.rand(n_images, 3, IMGSZ, IMGSZ),
        "batch_idx": torch.tensor(idx),
        "cls": torch.tensor(cls).view(-1, 1),
        "bboxes": torch.tensor(boxes),
    }


def build_model(yaml_name: str) -> DetectionModel:
    torch.manual_seed(0)
    model = DetectionModel(yaml_name, nc=3, verbose=False)
    model.args = get_cfg()
    return model.train()


def same_items(a, b) -> bool:
    """Loss items equal to the last bit (a dict of tensors from Ultralytics 8.4.x, a tensor from 8.4.0)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def neutral_configs() -> dict[str, dict]:
    """Every method configured to give weight 1 (Grad-Libra has no such setting: G < 1 always)."""
    cfg = load_loss_config("plb+scb+feedback")
    cfg["plb"]["terms"] = []
    cfg["scb"]["terms"] = []
    cfg["feedback"]["g_max"] = 1.0  # the gain is exactly 1, multiplied into both terms
    cfg["feedback"]["terms"] = ["box", "cls"]
    return {"plb": {"plb": cfg["plb"]}, "scb": {"scb": cfg["scb"]}, "feedback": {"feedback": cfg["feedback"]}, "all": cfg}


@pytest.mark.parametrize("yaml_name, stock_type", [("yolov8n.yaml", v8DetectionLoss), ("yolo26n.yaml", E2ELoss)])
def test_neutral_weights_give_the_stock_loss_bit_for_bit(yaml_name, stock_type):
    model = build_model(yaml_name)
    batch = bccd_batch()
    preds = model(batch["img"])
    stock = model.init_criterion()
    assert type(stock) is stock_type
    expected_loss, expected_items = stock(preds, batch)
    for name, cfg in neutral_configs().items():
        weighting = AnchorWeighting(cfg)
        ours = build_size_aware_loss(model, weighting)
        assert type(ours) is stock_type  # the stock criterion, its assigner, BCE and box loss wrapped
        for _ in range(2):  # the second call runs with the feedback state of the first
            loss, items = ours(preds, batch)
            weighting.end_step()
            assert torch.equal(loss, expected_loss), name
            assert same_items(items, expected_items), name
        if "feedback" in cfg:
            assert int(weighting.feedback.steps) == 2


EVERY_MODE = ("plb", "scb", "feedback", "gradlibra", "nwd", "plb+scb+feedback+gradlibra+nwd")


@pytest.mark.parametrize("yaml_name", ["yolov8n.yaml", "yolo26n.yaml"])
@pytest.mark.parametrize("boxes", ["none in the batch", "none in one image"])
def test_every_mode_takes_images_without_boxes(yaml_name, boxes):
    """Background images are ordinary training data: a batch without a box, or an image without one."""
    model = build_model(yaml_name)
    batch = bccd_batch()
    keep = batch["batch_idx"] == 0 if boxes == "none in one image" else torch.zeros_like(batch["batch_idx"], dtype=bool)
    batch = {**batch, "batch_idx": batch["batch_idx"][keep], "cls": batch["cls"][keep], "bboxes": batch["bboxes"][keep]}
    preds = model(batch["img"])
    stock_loss, _ = model.init_criterion()(preds, batch)
    for spec in EVERY_MODE:
        config = load_loss_config(spec)
        if "nwd" in config:
            config["nwd"].update(constant=12.8, assigner=True)  # 'auto' needs training labels
        weighting = AnchorWeighting(config)
        loss, _ = build_size_aware_loss(model, weighting)(preds, batch)
        weighting.end_step()
        assert torch.isfinite(loss).all(), spec
        if boxes == "none in the batch" and "gradlibra" not in config:  # only Grad-Libra weighs background anchors
            assert torch.equal(loss, stock_loss), spec


def test_stock_class_weights_are_kept():
    """Ultralytics' own ``class_weights`` option (added in 8.4) still multiplies the class BCE under our weights."""
    model = build_model("yolov8n.yaml")
    model.class_weights = torch.tensor([1.0, 2.0, 5.0])
    batch = bccd_batch()
    preds = model(batch["img"])
    stock = model.init_criterion()
    assert stock.class_weights is not None
    stock_loss, stock_items = stock(preds, batch)
    plain_items = (lambda m: (setattr(m, "class_weights", None), m.init_criterion()(preds, batch)[1])[1])(build_model("yolov8n.yaml"))
    assert not torch.equal(stock_items["cls_loss"], plain_items["cls_loss"])  # the option changes the loss
    cfg = neutral_configs()["all"]
    loss, items = build_size_aware_loss(model, AnchorWeighting(cfg))(preds, batch)
    assert torch.equal(loss, stock_loss) and torch.equal(items["cls_loss"], stock_items["cls_loss"])
    # with a real weighting the class weights still act: PLB on the class term of each class x its class weight
    cfg = load_loss_config("plb")
    weighted = build_size_aware_loss(model, AnchorWeighting(cfg))(preds, batch)[1]["cls_loss"]
    model.class_weights = None
    unweighted = build_size_aware_loss(model, AnchorWeighting(cfg))(preds, batch)[1]["cls_loss"]
    assert not torch.isclose(weighted, unweighted)
    model.class_weights = torch.full((3,), 2.0)  # every class twice: the PLB-weighted term twice, exactly
    doubled = build_size_aware_loss(model, AnchorWeighting(cfg))(preds, batch)[1]["cls_loss"]
    assert torch.equal(doubled, 2 * unweighted)


def test_wrapping_twice_is_refused_and_the_stock_loss_method_computes_every_branch(monkeypatch):
    model = build_model("yolo26n.yaml")
    weighting = AnchorWeighting(load_loss_config("plb"))
    criterion = build_size_aware_loss(model, weighting)
    with pytest.raises(ValueError, match="already"):
        install_size_aware_loss(criterion, weighting)
    # no copy of Ultralytics' loss method computes a branch: the stock one runs, on each branch once
    stock_method, ran = v8DetectionLoss.get_assigned_targets_and_loss, []

    def observed(self, *args, **kwargs):
        ran.append(self)
        return stock_method(self, *args, **kwargs)

    monkeypatch.setattr(v8DetectionLoss, "get_assigned_targets_and_loss", observed)
    batch = bccd_batch()
    criterion(model(batch["img"]), batch)
    assert ran == list(loss_branches(criterion)) and len(ran) == 2


def test_removing_the_size_aware_loss_gives_back_the_stock_loss_with_its_branch_gains():
    """What the EMA copy of a NaN recovery gets (``SizeAwareTrainer._load_checkpoint_state``)."""
    model = build_model("yolo26n.yaml")
    batch = bccd_batch()
    preds = model(batch["img"])
    stock = model.init_criterion()
    stock.update()  # one epoch into the schedule: the one-to-many gain is below the 0.8 it starts at
    assert stock.o2m < 0.8
    expected_loss, expected_items = stock(preds, batch)
    config = load_loss_config("plb+nwd")  # every wrapper, NWD's overlap in the assigner included
    config["nwd"]["constant"] = 40.0
    weighted = install_size_aware_loss(copy.deepcopy(stock), AnchorWeighting(config))
    assert not torch.equal(weighted(preds, batch)[0], expected_loss)
    removed = remove_size_aware_loss(copy.deepcopy(weighted))  # a deep copy, as ModelEMA makes
    loss, items = removed(preds, batch)
    assert torch.equal(loss, expected_loss) and same_items(items, expected_items)
    assert remove_size_aware_loss(stock)(preds, batch)[0].equal(expected_loss)  # a stock one stays as it is


def test_each_method_changes_the_loss_on_a_real_model():
    model = build_model("yolov8n.yaml")
    batch = bccd_batch()
    preds = model(batch["img"])
    stock_loss, _ = model.init_criterion()(preds, batch)
    for spec in ("plb", "scb", "gradlibra"):
        loss, _ = build_size_aware_loss(model, AnchorWeighting(load_loss_config(spec)))(preds, batch)
        assert torch.isfinite(loss).all() and not torch.equal(loss, stock_loss), spec
    # Grad-Libra shrinks the class term (G <= 1 - 0.8 sin 1 ~ 0.33) and leaves the box terms alone
    stock_items = model.init_criterion()(preds, batch)[1]
    items = build_size_aware_loss(model, AnchorWeighting(load_loss_config("gradlibra")))(preds, batch)[1]
    assert items["cls_loss"] < 0.34 * stock_items["cls_loss"]
    assert torch.equal(items["box_loss"], stock_items["box_loss"]) and torch.equal(items["dfl_loss"], stock_items["dfl_loss"])


def one_small_one_large():
    """Hand-built assignment: one image, anchors 0-1 on a 10x10 object, anchors 2-7 on a 60x60 one."""
    fg = torch.tensor([[True] * 8 + [False] * 2])
    gt_idx = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0]])
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 160.0, 160.0]]])
    target = gt[0][gt_idx[0]][None]
    scores = torch.zeros(1, 10, 3)
    scores[0, :8, 2] = 0.5
    pred = target.clone()  # a little off everywhere, the large object more: a nonzero box loss on both
    pred[0, :2] += torch.tensor([0.0, 0.0, 1.0, 1.0])
    pred[0, 2:] += torch.tensor([3.0, 3.0, 9.0, 9.0])
    logits = torch.full((1, 10, 3), -2.0)
    return fg, gt_idx, target, scores, pred, logits, gt


def small_share(weights: torch.Tensor, losses: torch.Tensor, small: torch.Tensor) -> float:
    return float((weights * losses)[small].sum() / (weights * losses).sum())


def test_each_method_raises_the_small_objects_share_as_its_paper_claims():
    from ultralytics.utils.metrics import bbox_iou

    fg, gt_idx, target, scores, pred, logits, gt = one_small_one_large()
    small = torch.tensor([True, True] + [False] * 6)
    # the stock per-anchor losses of the foreground: CIoU box loss weighted by target score, class BCE
    box_loss = (1 - bbox_iou(pred[0, :8], target[0, :8], xywh=False, CIoU=True).squeeze(-1)) * scores[0, :8].sum(-1)
    cls_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, scores, reduction="none")[0, :8].sum(-1)
    stock_box, stock_cls = small_share(1, box_loss, small), small_share(1, cls_loss, small)

    w_box, w_cls = AnchorWeighting(load_loss_config("plb"))(fg, gt_idx, target, scores, pred, logits.sigmoid(), gt)
    areas = torch.tensor([121.0] * 2 + [4356.0] * 6)  # predicted 11x11 and 66x66
    m = areas.mean()
    assert torch.allclose(w_box[0, :8], 2 * m / (areas + m), rtol=1e-5)
    assert torch.equal(w_box[0, 8:], torch.ones(2)) and torch.equal(w_cls[0, :, 0], w_box[0])
    assert small_share(w_box[0, :8], box_loss, small) > stock_box
    assert small_share(w_cls[0, :8, 0], cls_loss, small) > stock_cls

    w_box, w_cls = AnchorWeighting(load_loss_config("scb"))(fg, gt_idx, target, scores, pred, logits.sigmoid(), gt)
    assert w_box is None  # SCB: class term only, by default
    expected = torch.tensor([3 * (torch.log(torch.tensor(2.0)) + 1) / 2] * 2 + [3 * (torch.log(torch.tensor(6.0)) + 1) / 6] * 6)
    assert torch.allclose(w_cls[0, :8, 0], expected)
    assert small_share(w_cls[0, :8, 0], cls_loss, small) > stock_cls

    weighting = AnchorWeighting(load_loss_config("feedback"))
    w_box, _ = weighting(fg, gt_idx, target, scores, pred, logits.sigmoid(), gt)
    assert torch.equal(w_box, torch.ones(1, 10))  # gain 1 before any feedback
    weighting.end_step()
    # the small object is half the instances; its (well-fitted) share of the box loss is below half: G = q / r > 1
    r, q = float(weighting.feedback.r), float(weighting.feedback.q)
    assert r == pytest.approx(stock_box) and q == 0.5 and float(weighting.feedback.gain) == pytest.approx(min(q / r, 4.0))
    w_box, _ = weighting(fg, gt_idx, target, scores, pred, logits.sigmoid(), gt)
    assert torch.allclose(w_box[0, :2], weighting.feedback.gain.float()) and torch.equal(w_box[0, 2:], torch.ones(8))
    assert small_share(w_box[0, :8], box_loss, small) > stock_box

    # Grad-Libra is a hardness weight: the harder of two positives gets the larger share
    logits = logits.clone()
    logits[0, :2, 2], logits[0, 2:8, 2] = -3.0, 0.0  # the small object's anchors are the hard ones
    _, g = AnchorWeighting(load_loss_config("gradlibra"))(fg, gt_idx, target, scores, pred, logits.sigmoid(), gt)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, scores, reduction="none")
    stock = float(bce[0, :2, 2].sum() / bce[0, :8, 2].sum())
    assert float((g * bce)[0, :2, 2].sum() / (g * bce)[0, :8, 2].sum()) > stock


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weighting_takes_half_precision_as_mixed_precision_feeds_it(dtype):
    """Under autocast the assigner's tensors arrive in half precision; the weights match float32's."""
    fg, gt_idx, target, scores, pred, logits, gt = one_small_one_large()
    for spec in ("plb", "scb", "gradlibra", "feedback", "plb+scb+feedback+gradlibra"):
        config = load_loss_config(spec)
        expected = AnchorWeighting(config)(fg, gt_idx, target, scores, pred, logits.sigmoid(), gt)
        got = AnchorWeighting(config)(fg, gt_idx, target.to(dtype), scores.to(dtype), pred.to(dtype),
                                      logits.sigmoid().to(dtype), gt.to(dtype))
        for w, e in zip(got, expected):
            assert (w is None) == (e is None), spec
            if w is not None:
                assert w.dtype == torch.float32 and torch.allclose(w, e, rtol=2e-2), spec


def test_resume_restores_feedback_saved_before_the_nonfinite_counter():
    """Runs saved before ``feedback/nonfinite_steps`` existed still restore their state (the counter starts at 0)."""
    weighting = AnchorWeighting(load_loss_config("feedback"))
    old = {"feedback/r": 0.05, "feedback/q": 0.1, "feedback/gain": 2.0, "feedback/steps": 40.0}
    assert weighting.load_feedback_state(old)
    assert weighting.feedback_state() == {**old, "feedback/nonfinite_steps": 0.0}
    assert not weighting.load_feedback_state({"feedback/r": 0.05})


# --- the dense layout a GPU uses ----------------------------------------------------------------

def losses_and_state(model, preds, batch, config, dense: bool, steps: int = 2):
    """Loss, items, gradient of every parameter and the weighting's state after ``steps`` loss calls."""
    weighting = AnchorWeighting(copy.deepcopy(config))
    weighting.dense = dense
    criterion = build_size_aware_loss(model, weighting)
    out = []
    for _ in range(steps):
        model.zero_grad()
        loss, items = criterion(preds, batch)
        loss.sum().backward(retain_graph=True)
        weighting.end_step()
        out.append((loss.detach(), {k: v.detach() for k, v in items.items()},
                    [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    return out, weighting.epoch_stats()


@pytest.mark.parametrize("yaml_name", ["yolov8n.yaml", "yolo26n.yaml"])
@pytest.mark.parametrize("spec, settings", [
    ("plb+scb+feedback+gradlibra", None), ("plb", "gt_areas"), ("nwd", None), ("nwd", "safit"), ("nwd", "simd_assigner"),
    ("nwd+feedback", None),
])
def test_every_anchor_with_the_foreground_marked_gives_the_gathered_losses(yaml_name, spec, settings):
    """A GPU sees every anchor (no host synchronisation to count the foreground); the CPU gathers the
    foreground. Losses, gradients and the feedback state agree to float rounding."""
    config = load_loss_config(spec, settings)
    if "nwd" in config:
        config["nwd"]["constant"] = 12.8
    if "feedback" in config:
        config["feedback"]["small_area"] = 40.0 ** 2  # some of BCCD's boxes at 256 px are small then
    model = build_model(yaml_name)
    batch = bccd_batch(n_images=3)
    preds = model(batch["img"])
    gathered, gathered_stats = losses_and_state(model, preds, batch, config, dense=False)
    dense, dense_stats = losses_and_state(model, preds, batch, config, dense=True)
    for (loss_g, items_g, grads_g), (loss_d, items_d, grads_d) in zip(gathered, dense):
        assert torch.allclose(loss_g, loss_d, rtol=1e-5, atol=1e-6), (loss_g, loss_d)
        assert all(torch.allclose(items_g[k], items_d[k], rtol=1e-5, atol=1e-6) for k in items_g)
        scale = max(a.abs().max() for a in grads_g)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale) for a, b in zip(grads_g, grads_d))
    assert gathered_stats.keys() == dense_stats.keys()
    assert all(gathered_stats[k] == pytest.approx(dense_stats[k], rel=1e-5) for k in gathered_stats)
    if "feedback" in config:
        assert gathered_stats["feedback/steps"] == 2 and 0 < gathered_stats["feedback/q"] < 1  # the state moved


def test_the_dense_weighting_has_no_data_dependent_shape():
    """Under FakeTensorMode an op whose output the host must read first (what makes a GPU step wait:
    ``nonzero``, boolean indexing, ``bincount``, ``.item()``) raises; the dense weighting and box loss use none.
    The gathered layout does use one (``nonzero``), which is what the dense one replaces."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

    from yolo_sizeloss.yolo.loss import MeasureBboxLoss

    class StockTermStandIn(torch.nn.Module):
        def forward(self, pred_dist, pred_bboxes, *args):
            return pred_bboxes.sum() * 0, pred_dist.sum() * 0

    b, a, g, c = 2, 50, 3, 3
    config = load_loss_config("plb+scb+feedback+gradlibra+nwd")
    config["nwd"].update(constant=12.8, box_measure="safit")
    with FakeTensorMode():
        corners = torch.rand(b, a, 2) * 100
        target = torch.cat([corners, corners + 5 + torch.rand(b, a, 2) * 30], -1)
        gt = torch.cat([corners[:, :g], corners[:, :g] + 20], -1)
        inputs = (torch.rand(b, a) > 0.7, torch.randint(0, g, (b, a)), target, torch.rand(b, a, c), target + 1,
                  torch.rand(b, a, c), gt)
        for dense in (True, False):
            weighting = AnchorWeighting(config)
            weighting.dense = dense
            if not dense:
                with pytest.raises(DynamicOutputShapeException):
                    weighting(*inputs)
                continue
            w_box, w_cls = weighting(*inputs)
            weighting.end_step()
            assert w_box.shape == (b, a) and w_cls.shape == (b, a, c)
            box_loss = MeasureBboxLoss(StockTermStandIn(), weighting)  # the stock BboxLoss itself indexes by mask
            stride = torch.full((a, 1), 8.0)
            pred = (target / 8 + 0.1).requires_grad_()
            loss_iou, _ = box_loss(torch.rand(b, a, 64), pred, torch.rand(a, 2) * 12, target / 8,
                                   torch.rand(b, a, c), torch.tensor(5.0), inputs[0], torch.tensor([96.0, 96.0]), stride)
            loss_iou.backward()


def test_where_the_device_holds_no_float64_the_running_sums_are_float32_and_no_step_makes_one():
    """Apple's MPS holds no float64 (moving a float64 buffer there raises): there the weighting's and the
    assignment counter's sums are float32, and a training step of every method makes no float64 tensor."""
    from torch.overrides import TorchFunctionMode

    from yolo_sizeloss.assignment import AssignmentCounter
    from yolo_sizeloss.yolo.assignment import attach_counter
    from yolo_sizeloss.yolo.loss import stock_assigners
    from yolo_sizeloss.yolo.trainer import running_sums_dtype

    class NoFloat64(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                assert not (isinstance(t, torch.Tensor) and t.dtype == torch.float64), func
            return out

    assert running_sums_dtype(torch.device("cpu")) is None  # their own float64 where the device has it
    dtype = running_sums_dtype(torch.device("mps"))
    model = build_model("yolov8n.yaml")
    batch = bccd_batch()
    preds = model(batch["img"])
    config = load_loss_config("plb+scb+feedback+gradlibra+nwd")
    config["nwd"].update(constant=12.8, assigner=True)  # 'auto' needs training labels
    weighting, counter = AnchorWeighting(config).to("cpu", dtype), AssignmentCounter().to("cpu", dtype)
    criterion = build_size_aware_loss(model, weighting)
    attach_counter(counter, stock_assigners(criterion))
    assert {b.dtype for m in (weighting, counter) for b in m.buffers() if b.is_floating_point()} == {torch.float32}
    with NoFloat64():
        for _ in range(2):
            loss, _ = criterion(preds, batch)
            weighting.end_step(), counter.end_step()
        weighting.epoch_stats(), counter.epoch_stats()
    assert int(weighting.feedback.steps) == 2 and torch.isfinite(loss).all()
