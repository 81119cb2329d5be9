"""The pure weight functions and the feedback state, against values computed by hand."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.ops import box_iou

from yolo_sizeloss.methods.feedback import FeedbackBalancer, feedback_gain
from yolo_sizeloss.methods.gradlibra import gradlibra_weights
from yolo_sizeloss.methods.nwd import nwd, nwd_assigner_auto, nwd_constant
from yolo_sizeloss.methods.plb import plb_weights
from yolo_sizeloss.methods.scb import scb_weights

NAN, INF = float("nan"), float("inf")


def test_plb_hand_values():
    assert torch.allclose(plb_weights(torch.tensor([1.0, 3.0])), torch.tensor([4 / 3, 4 / 5]), atol=1e-6)
    assert torch.allclose(plb_weights(torch.tensor([7.0])), torch.tensor([1.0]))
    # range [2/(n+1), 2): one big box among many tiny ones
    w = plb_weights(torch.tensor([0.0, 0.0, 0.0, 100.0]))
    assert torch.allclose(w[3], torch.tensor(2 / 5), atol=1e-6) and torch.all(w[:3] < 2) and torch.all(w[:3] > 1.99)


def test_plb_degenerate_inputs_stay_finite():
    assert torch.equal(plb_weights(torch.zeros(3)), torch.ones(3))
    assert plb_weights(torch.zeros(0)).shape == (0,)
    assert torch.isfinite(plb_weights(torch.tensor([0.0, 1e-12, 5.0]))).all()


def test_plb_ignores_non_finite_areas():
    # the finite areas' mean is 200: 2*200/(100+200), 2*200/(200+200), 2*200/(300+200); NaN and inf get 1
    for bad in (NAN, INF):
        w = plb_weights(torch.tensor([100.0, 200.0, 300.0, bad]))
        assert torch.allclose(w, torch.tensor([4 / 3, 1.0, 0.8, 1.0]), atol=1e-6)
    assert torch.equal(plb_weights(torch.tensor([NAN, INF])), torch.ones(2))


def test_scb_hand_values():
    expected = [3.0, 3 * (math.log(2) + 1) / 2, 3 * (math.log(5) + 1) / 5, 3 * (math.log(10) + 1) / 10]
    got = scb_weights(torch.tensor([1, 2, 5, 10]))
    assert torch.allclose(got, torch.tensor(expected))
    assert torch.allclose(scb_weights(torch.tensor([20.0])), torch.tensor([3 * (math.log(20) + 1) / 20]))
    assert torch.isfinite(scb_weights(torch.tensor([0.0]))).all() and scb_weights(torch.zeros(0)).shape == (0,)


def test_scb_treats_non_finite_counts_as_no_information():
    got = scb_weights(torch.tensor([1.0, NAN, INF, 2.0]))
    assert torch.allclose(got, torch.tensor([3.0, 1.0, 1.0, 3 * (math.log(2) + 1) / 2]))


def test_gradlibra_hand_values():
    p = torch.tensor([0.9, 0.2, 0.7, 0.0, 0.5])
    t = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.6])  # 0.6: a soft positive
    g = torch.tensor([0.1, 0.8, 0.7, 0.0, 0.1])
    expected = g - torch.tensor([0.8, 0.8, 0.5, 0.5, 0.8]) * torch.sin(g)
    assert torch.allclose(gradlibra_weights(p, t, alpha_pos=0.8, alpha_neg=0.5), expected)
    assert torch.allclose(gradlibra_weights(torch.tensor([0.0]), torch.tensor([1.0])), torch.tensor([1 - 0.8 * math.sin(1)]))
    assert gradlibra_weights(torch.zeros(0), torch.zeros(0)).shape == (0,)


def test_feedback_gain_edges():
    r, q = torch.tensor(0.25, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    assert feedback_gain(r, q, 4.0) == 2.0
    assert feedback_gain(torch.tensor(0.0), torch.tensor(0.5), 4.0) == 4.0  # no small loss at all: the cap
    assert feedback_gain(torch.tensor(0.5), torch.tensor(0.0), 4.0) == 1.0
    assert feedback_gain(torch.tensor(0.6), torch.tensor(0.3), 4.0) == 1.0  # small objects already loud: 1
    assert feedback_gain(torch.tensor(0.01), torch.tensor(0.5), 4.0) == 4.0


def test_feedback_sequence_by_hand():
    b = FeedbackBalancer(momentum=0.5, g_max=4.0, small_area=1024)
    assert b.gain == 1.0  # before any step
    # step 1: small loss 1 of 4 (r=.25), 1 of 2 instances small (q=.5): EMA starts at the values, G=2
    assert b.update(1.0, 4.0, 1, 2) == 2.0
    assert (b.r, b.q, b.steps) == (0.25, 0.5, 1)
    # step 2: no small object: EMAs unchanged, G=1
    assert b.update(0.0, 4.0, 0, 2) == 1.0
    assert (b.r, b.q, b.steps) == (0.25, 0.5, 1)
    # step 3: r=.1, q=.5 -> r_ema=.175, q_ema=.5 -> G=.5/.175
    assert torch.isclose(b.update(0.4, 4.0, 2, 4), torch.tensor(0.5 / 0.175, dtype=torch.float64))
    assert torch.isclose(b.r, torch.tensor(0.175, dtype=torch.float64))
    # step 4: no box loss at all (r = 0/0): G=1, state kept
    assert b.update(0.0, 0.0, 1, 1) == 1.0 and b.steps == 2
    # step 5: r=.9 -> r_ema=.5375, q=.25 -> q_ema=.375: ratio < 1 -> G=1
    assert b.update(0.9, 1.0, 1, 4) == 1.0
    assert torch.isclose(b.q, torch.tensor(0.375, dtype=torch.float64))
    # momentum 0 is Stitcher's raw previous step; the state travels in state_dict
    s = FeedbackBalancer(momentum=0.0, g_max=3.0, small_area=1024)
    s.update(1.0, 4.0, 1, 2)
    assert s.update(0.1, 1.0, 1, 2) == 3.0  # q/r = 5, capped
    copy = FeedbackBalancer(momentum=0.0, g_max=3.0, small_area=1024)
    copy.load_state_dict(s.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), s.state_dict().values()))


def test_feedback_non_finite_steps_leave_the_state_and_are_counted():
    b = FeedbackBalancer(momentum=0.5, g_max=4.0, small_area=1024)
    # a NaN before any finite step: nothing changes but the count
    assert b.update(NAN, 4.0, 1, 2) == 1.0
    assert (b.r, b.q, b.gain, b.steps, b.nonfinite_steps) == (0.0, 0.0, 1.0, 0, 1)
    # the first finite step still sets the EMAs directly: r=.25, q=.5, G=2
    assert b.update(1.0, 4.0, 1, 2) == 2.0
    # a NaN small loss, an inf/inf ratio and an inf count: the state and its gain stay, the count grows
    for step in ((NAN, 4.0, 1, 2), (INF, INF, 1, 2), (1.0, 4.0, INF, 2)):
        assert b.update(*step) == 2.0
    assert (b.r, b.q, b.gain, b.steps, b.nonfinite_steps) == (0.25, 0.5, 2.0, 1, 4)
    # the next finite step continues from the kept EMAs: r=.5*.25+.5*.1=.175, q=.5
    assert torch.isclose(b.update(0.4, 4.0, 2, 4), torch.tensor(0.5 / 0.175, dtype=torch.float64))
    assert b.steps == 2 and b.nonfinite_steps == 4
    assert all(torch.isfinite(v).all() for v in b.state_dict().values())


def test_nwd_identical_boxes_give_one():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [10.0, 20.0, 110.0, 70.0], [5.0, 5.0, 5.0, 5.0]])
    assert torch.equal(nwd(boxes, boxes, 12.8, eps=0.0), torch.ones(3))
    # with the default eps under the square root: exp(-sqrt(1e-7) / C)
    assert torch.allclose(nwd(boxes, boxes, 12.8), torch.full((3,), math.exp(-math.sqrt(1e-7) / 12.8)))


def test_nwd_one_pixel_shift_costs_small_and_large_boxes_the_same():
    small = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    large = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    shift = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    # W2 = 1 (centre moved by 1, same size): NWD = exp(-1/C) for both
    got = torch.cat([nwd(small, small + shift, 12.8), nwd(large, large + shift, 12.8)])
    assert torch.allclose(got, torch.full((2,), math.exp(-1 / 12.8)), atol=1e-6)
    # while IoU is 12/20 = 0.6 for the 4x4 box and 9900/10100 = 0.98 for the 100x100 one
    assert torch.allclose(box_iou(small, small + shift), torch.tensor([[0.6]]))
    assert torch.allclose(box_iou(large, large + shift), torch.tensor([[9900 / 10100]]))


def test_nwd_hand_values_and_symmetry():
    a = torch.tensor([[0.0, 0.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    b = torch.tensor([[1.0, 2.0, 7.0, 8.0], [2.0, 1.0, 2.0, 1.0]])
    # pair 1: centres (2,2) and (4,5), half sizes (2,2) and (3,3): W2^2 = 4 + 9 + 1 + 1 = 15
    # pair 2: two points (zero-size boxes) 5 apart: W2^2 = 9 + 16 = 25
    expected = torch.tensor([math.exp(-math.sqrt(15 + 1e-7) / 2.0), math.exp(-math.sqrt(25 + 1e-7) / 2.0)])
    assert torch.allclose(nwd(a, b, 2.0), expected)
    assert torch.equal(nwd(a, b, 2.0), nwd(b, a, 2.0))
    assert torch.equal(nwd(a[None], b[None], 2.0), nwd(a, b, 2.0)[None])  # (B, A, 4) as the loss holds them
    assert nwd(a[:0], b[:0], 2.0).shape == (0,)


def test_nwd_is_finite_with_finite_gradients_on_zero_size_boxes():
    point = torch.tensor([[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0]], requires_grad=True)
    target = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    value = nwd(point, target, 12.8)
    assert torch.isfinite(value).all() and 0 < value.min() and value.max() <= 1
    (1 - value).sum().backward()
    assert torch.isfinite(point.grad).all()
    assert torch.equal(point.grad[0], torch.zeros(4))  # identical boxes: a minimum of the loss


def test_nwd_constant_is_the_mean_absolute_size():
    # sqrt(4*1), sqrt(9*4), sqrt(1*16) = 2, 6, 4: mean 4; a NaN box is left out
    widths, heights = torch.tensor([4.0, 9.0, 1.0, NAN]), torch.tensor([1.0, 4.0, 16.0, 3.0])
    assert nwd_constant(widths, heights) == 4.0
    with pytest.raises(ValueError, match="no box with a finite width and height"):
        nwd_constant(torch.tensor([NAN]), torch.tensor([1.0]))


def test_nwd_assigner_auto_needs_small_boxes_to_be_fewer_than_half():
    # areas 4, 36, 16 and 2000 (the NaN box is left out); below 20: 4 and 16, two of four
    widths, heights = torch.tensor([4.0, 9.0, 1.0, 40.0, NAN]), torch.tensor([1.0, 4.0, 16.0, 50.0, 3.0])
    assert nwd_assigner_auto(widths, heights, 20)[0] is False  # exactly half: not a minority
    assert nwd_assigner_auto(widths, heights, 10)[0] is True  # one of four
    assert nwd_assigner_auto(widths, heights, 40)[0] is False  # three of four
    assert nwd_assigner_auto(widths, heights, 10)[1].startswith("25.0% of 4 training boxes are small, below 10 input")
    with pytest.raises(ValueError, match="no box with a finite width and height"):
        nwd_assigner_auto(torch.tensor([NAN]), torch.tensor([1.0]), 10)


def _distributed_worker(rank: int, world: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = FeedbackBalancer(momentum=0.0, g_max=4.0, small_area=1024)
    # rank 0 sees small loss 1 of 2 and 1 of 1 instances; rank 1 sees 0 of 2 and 1 of 3
    step = [(1.0, 2.0, 1, 1), (0.0, 2.0, 1, 3)][rank]
    b.update(*step)
    results[rank] = [float(v) for v in b.state_dict().values()]
    dist.destroy_process_group()


@pytest.mark.slow
def test_feedback_state_is_averaged_across_two_gloo_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_distributed_worker, args=(2, port, results), nprocs=2, join=True)
    # summed: small loss 1 of 4 (r=.25), small 2 of 4 instances (q=.5) -> G=2, on both ranks
    assert results[0] == results[1] == [0.25, 0.5, 2.0, 1.0, 0.0]
