"""The count of small ground truths the task-aligned assigner leaves without a positive anchor."""

import csv

import pytest
import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.tal import TaskAlignedAssigner

from yolo_sizeloss.config import load_loss_config
from yolo_sizeloss.methods.base import box_areas
from yolo_sizeloss.results_csv import append_row, widen_header
from yolo_sizeloss.assignment import AssignmentCounter
from yolo_sizeloss.yolo.assignment import attach_counter, detach_counters, positives_per_slot
from yolo_sizeloss.yolo.loss import AnchorWeighting, build_size_aware_loss, stock_assigners

GRID = torch.arange(4, 64, 8.0)
ANCHORS = torch.stack(torch.meshgrid(GRID, GRID, indexing="xy"), -1).view(-1, 2)  # stride 8, 64 anchors
LARGE = [8.0, 8.0, 56.0, 56.0]  # 48 x 48
SMALL = [26.0, 26.0, 32.0, 32.0]  # 6 x 6, inside the large box


def test_positives_per_slot_and_the_counts_by_hand():
    fg = torch.tensor([[True, True, False, True], [False, False, False, False]])
    idx = torch.tensor([[0, 0, 1, 2], [1, 1, 1, 1]])  # image 0: slot 0 twice, slot 2 once; slot 1 only on a background
    positives = positives_per_slot(fg, idx, 3)
    assert positives.tolist() == [[2, 0, 1], [0, 0, 0]]
    valid = torch.tensor([[True, True, True], [True, False, False]])  # image 1 has one ground truth
    boxes = torch.tensor([[[0, 0, 40, 40], [0, 0, 10, 10], [0, 0, 31, 33]], [[0, 0, 8, 8], [0, 0, 1, 1], [0, 0, 1, 1]]])
    counter = AssignmentCounter()
    counter.add(positives, boxes, valid)  # small: slot 1 (unmatched) and slot 2 of image 0, image 1's (unmatched)
    counter.end_step()
    counter.end_step()
    assert counter.sums.tolist() == [3, 2, 4, 2, 2]
    assert counter.epoch_stats() == {"assign/small_no_pos": 1.0, "assign/small_no_pos_share": 2 / 3,
                                     "assign/no_pos_share": 0.5}


def assign(predicted_box: list[float]):
    """The stock assigner (top-k 10) on one image holding the large and the small box: the four anchors that are
    candidates for the small box (inside it once enlarged to the 16 px ``stride_val``) predict
    ``predicted_box``, every other anchor a 4 x 4 box in the corner; every score is the same."""
    assigner = TaskAlignedAssigner(topk=10, num_classes=1, alpha=0.5, beta=6.0)
    gt = torch.tensor([[LARGE, SMALL]])
    near_small = ((ANCHORS > 21) & (ANCHORS < 37)).all(-1)
    predictions = torch.where(near_small[:, None], torch.tensor(predicted_box), torch.tensor([0.0, 0.0, 4.0, 4.0]))
    scores = torch.full((1, len(ANCHORS), 1), 0.5)
    return assigner, (scores, predictions[None], ANCHORS, torch.zeros(1, 2, 1), gt, torch.ones(1, 2, 1))


@pytest.mark.parametrize("predicted, small_matched", [(LARGE, False), (SMALL, True)])
def test_a_small_object_inside_a_large_one_loses_its_anchors_when_they_overlap_the_large_one_more(
        predicted, small_matched):
    """An anchor candidate for two ground truths goes to the one its prediction overlaps most: predictions
    that fit the large box take every candidate of the small one."""
    assigner, inputs = assign(predicted)
    counter = AssignmentCounter()
    attach_counter(counter, [assigner])
    assigner(*inputs)
    counter.end_step()
    stats = counter.epoch_stats()
    assert stats == {"assign/small_no_pos": 0.0 if small_matched else 1.0,
                     "assign/small_no_pos_share": 0.0 if small_matched else 1.0,
                     "assign/no_pos_share": 0.0 if small_matched else 0.5}
    assert counter.epoch_stats()["assign/small_no_pos"] == 0.0  # the sums restarted


def test_the_counter_hooks_every_branch_of_the_stock_and_the_size_aware_loss_and_changes_no_assignment():
    torch.manual_seed(0)
    model = DetectionModel("yolo26n.yaml", nc=2, verbose=False)  # end-to-end: two branches, two assigners
    model.args = get_cfg()
    config = load_loss_config("nwd")
    config["nwd"]["constant"] = 12.0
    _, inputs = assign(LARGE)
    for criterion in (model.init_criterion(), build_size_aware_loss(model, AnchorWeighting(config))):
        assigners = stock_assigners(criterion)
        assert len(assigners) == 2 and all(type(a) is TaskAlignedAssigner for a in assigners)
        counter = AssignmentCounter()
        attach_counter(counter, assigners)
        counted = [assigner(*inputs) for assigner in assigners]
        assert counter.sums[0] == 2  # the small box, once per branch
        detach_counters(assigners)
        assert not any(a._forward_hooks for a in assigners)
        uncounted = [assigner(*inputs) for assigner in assigners]
        assert counter.sums[0] == 2  # detached: no longer counted
        assert all(torch.equal(a, b) for outs_a, outs_b in zip(counted, uncounted) for a, b in zip(outs_a, outs_b))


def test_faster_rcnn_counts_the_anchors_the_matcher_gave_each_ground_truth():
    from yolo_sizeloss.rcnn.heads import positives_per_gt

    matches = torch.tensor([-1, 0, 2, 2, -2, 0])  # -1, -2: below and between the thresholds
    assert positives_per_gt(matches, 4).tolist() == [2, 0, 2, 0]
    assert positives_per_gt(torch.full((5,), -1), 0).tolist() == []  # an image without boxes


def test_the_stock_rpn_of_faster_rcnn_is_counted_too():
    from test_rcnn import RPN_GT, rpn_forward, tiny_rpn

    from yolo_sizeloss.rcnn.switches import LossSwitches

    rpn = tiny_rpn(LossSwitches())  # the stock loss: no method acts, the matcher's counts are still kept
    rpn_forward(rpn)
    small = int((box_areas(RPN_GT) < 1024).sum())
    assert rpn.assignments.sums[0] == small and rpn.assignments.sums[2] == len(RPN_GT)
    assert rpn.assignments.sums[3] == 0  # the hand-built batch gives every ground truth a positive anchor
    assert "assignments.sums" not in "".join(rpn.state_dict())  # kept out of checkpoints


def read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_a_resumed_results_csv_gets_the_new_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("epoch,time,train/box_loss,old/col\n1,10,2.5,7\n")
    append_row(path, {"epoch": 2, "time": 20, "train/box_loss": 2.0, "assign/small_no_pos": 0.5})
    assert read(path) == [["epoch", "time", "train/box_loss", "assign/small_no_pos", "old/col"],
                          ["1", "10", "2.5", "", "7"], ["2", "20", "2.0", "0.5", ""]]
    # a writer that writes values in its own column order (Ultralytics' save_metrics) lines up after widening
    names = ["epoch", "time", "train/box_loss", "assign/small_no_pos"]
    assert widen_header(path, names)[:4] == names
    before = path.read_text()
    widen_header(path, names)
    assert path.read_text() == before  # already widened: untouched


def test_counting_has_no_data_dependent_shape_so_no_host_synchronisation_on_a_gpu():
    """Under FakeTensorMode an op whose output shape or value the host must read (what makes a GPU
    synchronise: ``nonzero``, ``bincount``, boolean indexing, ``.item()``) raises; the counts use none."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

    from yolo_sizeloss.methods.base import count_per_gt

    ids = torch.tensor([0, 2, 2, 4, 0, 0])
    assert count_per_gt(ids, 6).tolist() == torch.bincount(ids, minlength=6).tolist() == [3, 0, 2, 0, 1, 0]
    assert count_per_gt(ids, 6, ids > 0).tolist() == [0, 0, 2, 0, 1, 0]
    with FakeTensorMode():
        fake_ids = torch.randint(0, 6, (50,))
        with pytest.raises(DynamicOutputShapeException):
            torch.bincount(fake_ids, minlength=6)  # the detector works
        assert count_per_gt(fake_ids, 6).shape == (6,)
        counter = AssignmentCounter()
        counter.add(positives_per_slot(torch.rand(2, 30) > 0.5, torch.randint(0, 3, (2, 30)), 3),
                    torch.rand(2, 3, 4) * 50, torch.rand(2, 3) > 0.2)
        counter.end_step()
