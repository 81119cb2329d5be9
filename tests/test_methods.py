"""The method registry, the common description of matched samples, the overlap objects and the shared feedback state."""

import pytest
import torch
from torchvision.ops import box_iou

from yolo_sizeloss.config import METHODS, load_loss_config
from yolo_sizeloss.methods import FAMILY_TERMS, REGISTRY, WEIGHT_ORDER, MatchedSamples, plb, scb
from yolo_sizeloss.methods.feedback import FeedbackBalancer
from yolo_sizeloss.methods.nwd import nwd, nwd_matrix
from yolo_sizeloss.methods.overlaps import IoU, NWDOverlap
from yolo_sizeloss.methods.plb import plb_weights
from yolo_sizeloss.methods.scb import scb_weights


def samples(**changes) -> MatchedSamples:
    """Three positives (ground truths 0, 0 and 2 of three) among five class-term samples (at 0, 2 and 3)."""
    gt = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 40, 40]])
    pred = torch.tensor([[0.0, 0, 20, 10], [0, 0, 10, 5], [0, 0, 30, 40]])
    fields = dict(
        gt_boxes=gt, pred_boxes=pred, gt_ids=torch.tensor([0, 0, 2]), box_loss=lambda: torch.tensor([1.0, 2.0, 4.0]),
        gt_areas=torch.tensor([100.0, 2500.0, 1600.0]), gt_counts=torch.tensor([2, 0, 1]),
        cls_gt_boxes=torch.cat([gt[:1], torch.zeros(1, 4), gt[1:], torch.ones(1, 4)]),
        cls_pred_boxes=torch.cat([pred[:1], torch.zeros(1, 4), pred[1:], torch.ones(1, 4)]),
        cls_positives=torch.tensor([0, 2, 3]),
    )
    return MatchedSamples(**{**fields, **changes})


def test_config_reads_the_registry():
    assert METHODS == tuple(REGISTRY) == ("feedback", "scb", "plb", "gradlibra", "nwd")  # the order messages list
    assert set(WEIGHT_ORDER) == {name for name, m in REGISTRY.items() if m.weights is not None}
    for name, method in REGISTRY.items():
        assert method.name == name
        assert list(load_loss_config(name)[name]) == list(method.schema)  # the yaml holds every setting, in order


def test_terms_per_family():
    config = load_loss_config("plb+gradlibra+nwd")
    assert REGISTRY["plb"].terms(config["plb"], "yolo") == ("box", "cls")
    assert REGISTRY["plb"].terms(config["plb"], "faster_rcnn") == ("rpn_cls", "rpn_box")
    assert REGISTRY["gradlibra"].terms(config["gradlibra"], "yolo") == ("cls",)  # fixed: no 'terms' setting
    assert REGISTRY["nwd"].terms(config["nwd"], "yolo") == ("box",)
    assert "terms" not in REGISTRY["gradlibra"].schema and "rcnn_terms" in REGISTRY["gradlibra"].schema
    for method in REGISTRY.values():
        for family, allowed in method.family_terms.items():
            assert set(allowed) <= set(FAMILY_TERMS[family][1])


def test_positive_weights_spread_over_the_class_samples():
    assert samples().on_class_samples(torch.tensor([2.0, 3.0, 4.0])).tolist() == [2.0, 1.0, 3.0, 4.0, 1.0]


def test_methods_return_the_configured_kinds_only():
    s = samples()
    box_only = plb.weights(s, {"source": "gt"}, ("box",))
    assert box_only.cls is None and box_only.cls_all is None
    assert torch.equal(box_only.box, plb_weights(torch.tensor([100.0, 100.0, 1600.0])))
    both = plb.weights(s, {"source": "predicted"}, ("box", "cls"))
    assert torch.equal(both.cls, plb_weights(torch.tensor([200.0, 0.0, 50.0, 1200.0, 0.0])))
    w = scb.weights(s, {"alpha": 1.0, "beta": 3.0}, ("box", "cls"))
    expected = scb_weights(torch.tensor([2, 0, 1]))[[0, 0, 2]]
    assert torch.equal(w.box, expected) and torch.equal(w.cls, s.on_class_samples(expected))


def test_one_feedback_state_gathers_the_sums_of_any_family():
    state = FeedbackBalancer(momentum=0.0, g_max=4.0, small_area=1024)
    weights = REGISTRY["feedback"].weights(samples(), {}, ("box", "cls"), state)
    assert weights.box.tolist() == [1.0, 1.0, 1.0]  # no step ended yet: gain 1
    # small: ground truth 0 (area 100); matched: 0 and 2 (1 is not); box losses 1 + 2 of 7
    assert state.step_sums.tolist() == [3.0, 7.0, 1.0, 2.0]
    state.end_step()
    assert state.r.item() == pytest.approx(3 / 7) and state.q.item() == 0.5 and state.step_sums.tolist() == [0.0] * 4
    weights = REGISTRY["feedback"].weights(samples(), {}, ("cls",), state)
    assert weights.box is None and weights.cls.tolist() == pytest.approx([3.5 / 3, 1, 3.5 / 3, 1, 1])
    assert "step_sums" not in state.state_dict()  # a checkpoint holds the state proper


def test_overlaps_measure_pairwise_and_elementwise():
    a = torch.tensor([[0.0, 0, 4, 4], [0, 0, 100, 100], [10, 10, 30, 20]])
    b = torch.tensor([[1.0, 0, 5, 4], [50, 50, 150, 150], [10, 10, 30, 20]])
    assert IoU().pairwise is box_iou  # the RPN's stock similarity itself
    assert torch.allclose(IoU().elementwise(a, b), box_iou(a, b).diagonal())
    empty = torch.tensor([[5.0, 5, 5, 5]])  # no area on either side: no overlap, as the other measures say
    assert IoU().elementwise(empty, empty).tolist() == [0.0]
    measure = NWDOverlap(12.8, "set it")
    assert torch.equal(measure.pairwise(a, b), nwd_matrix(a, b, 12.8))
    assert torch.equal(measure.elementwise(a, b), nwd(a, b, 12.8))
    assert measure.elementwise(a.half(), b.half()).dtype == torch.float16  # computed in float32, handed back
    with pytest.raises(RuntimeError, match="nwd.constant is auto but was not resolved: set it"):
        NWDOverlap(None, "set it").pairwise(a, b)
