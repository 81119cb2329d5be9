"""The Faster R-CNN training loop and validation under a real two-process gloo group: losses reduced, NaN stops
every rank, predictions gathered on rank 0."""

from __future__ import annotations

import json
import multiprocessing
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from yolo_sizeloss.rcnn.engine import LOSS_NAMES, train_one_epoch

WORLD_SIZE = 2
TIMEOUT_S = 120  # a rank left waiting in a collective fails the test instead of blocking it


class LossItems(torch.nn.Module):
    """A stand-in detector: each of its four loss items is the mean pixel of the batch times one weight."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(len(LOSS_NAMES)))

    def forward(self, images, targets):
        return dict(zip(LOSS_NAMES, self.weight * torch.stack(images).mean()))


def batch(value: float) -> tuple[list[torch.Tensor], list[dict], list[int]]:
    """One image filled with ``value``, as ``collate_detection`` yields it (no boxes: the model needs none)."""
    return [torch.full((3, 4, 4), value)], [{}], [0]


def two_epochs(rank: int, store: str, report: str) -> None:
    """One clean epoch, then one in which rank 1's second batch holds a NaN; write what each returned or raised."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=TIMEOUT_S / 2))
    model = DistributedDataParallel(LossItems())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the items stay the pixel values
    outcome = {}
    try:
        clean = [batch(1.0 + rank), batch(3.0 + rank)]  # rank 0: 1, 3; rank 1: 2, 4
        outcome["clean"] = train_one_epoch(model, optimizer, clean, torch.device("cpu"), 0, "clean", False)
        poisoned = [batch(1.0), batch(float("nan") if rank == 1 else 1.0), batch(1.0)]
        train_one_epoch(model, optimizer, poisoned, torch.device("cpu"), 0, "2/2", False)
        outcome["poisoned"] = "finished"
    except Exception as e:  # noqa: BLE001  what each rank raised is the result
        outcome["poisoned"] = f"{type(e).__name__}: {e}"
    Path(report).write_text(json.dumps(outcome))
    dist.destroy_process_group()


def run_ranks(target, tmp_path: Path, *args) -> list:
    """Run ``target(rank, store, report, *args)`` in WORLD_SIZE spawned processes of one gloo group (its file
    store in ``tmp_path``) and return what each rank wrote to its JSON report; a rank still running after
    TIMEOUT_S fails the test."""
    context = multiprocessing.get_context("spawn")
    reports = [tmp_path / f"rank{rank}.json" for rank in range(WORLD_SIZE)]
    workers = [context.Process(target=target, args=(rank, str(tmp_path / "store"), str(reports[rank]), *args))
               for rank in range(WORLD_SIZE)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(TIMEOUT_S)
    hung = [rank for rank, worker in enumerate(workers) if worker.is_alive()]
    for worker in workers:
        worker.kill()
    assert not hung, f"ranks {hung} still running after {TIMEOUT_S} s"
    return [json.loads(report.read_text()) for report in reports]


def test_nan_on_one_rank_stops_every_rank_with_one_error(tmp_path):
    outcomes = run_ranks(two_epochs, tmp_path)

    # the epoch's mean over both ranks' steps: (1 + 3 + 2 + 4) / 4 per item
    assert all(o["clean"] == dict.fromkeys(LOSS_NAMES, 2.5) for o in outcomes)
    assert outcomes[0]["poisoned"] == outcomes[1]["poisoned"]
    assert outcomes[0]["poisoned"] == ("FloatingPointError: 2/2: non-finite loss at iteration 1 (summed over "
                                       "processes: loss_objectness=nan, loss_rpn_box_reg=nan, loss_classifier=nan, "
                                       "loss_box_reg=nan)")


def test_validation_shards_cover_every_image_once_across_ranks():
    """Each rank validates a strided shard; together the shards are every image, none twice."""
    from yolo_sizeloss.rcnn.engine import DistContext, shard_indices

    cpu = torch.device("cpu")
    assert shard_indices(5, DistContext(1, 2, cpu, False)) == [1, 3]
    for world in (1, 2, 3, 8):
        shards = [shard_indices(7, DistContext(rank, world, cpu, False)) for rank in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(7)), world


HIT_BOX, MISS_BOX = [2.0, 2.0, 10.0, 10.0], [20.0, 20.0, 28.0, 28.0]
# rank 0 of two validates images 0, 2, 4 (all found), rank 1 images 1 and 3 (both missed)
BRIGHTNESS = [0.9, 0.2, 0.8, 0.1, 0.7]


class ScoreByBrightness(torch.nn.Module):
    """A stand-in detector: one box per image, scored by the image's mean pixel; a bright image (> 0.5) gets
    the box every record's ground truth holds, a dark one a box beside it."""

    def forward(self, images):
        outputs = []
        for image in images:
            score = image.mean()
            box = HIT_BOX if score > 0.5 else MISS_BOX
            outputs.append({"boxes": torch.tensor([box]), "scores": score[None], "labels": torch.tensor([1])})
        return outputs


def write_brightness_images(folder: Path) -> None:
    """One grey image per BRIGHTNESS value, written once by the test: ranks that wrote them too would read
    a file another rank is rewriting."""
    import numpy as np
    from PIL import Image

    for index, value in enumerate(BRIGHTNESS):
        Image.fromarray(np.full((32, 32, 3), round(value * 255), dtype=np.uint8)).save(folder / f"{index}.png")


def brightness_records(folder: Path) -> list:
    """The records of ``write_brightness_images``' images, one cell each."""
    import numpy as np

    from yolo_sizeloss.detections import ImageRecord

    return [ImageRecord(str(folder / f"{index}.png"), 32, 32, np.array([HIT_BOX], dtype=np.float32), np.array([0]))
            for index in range(len(BRIGHTNESS))]


def validate_on_rank(rank: int, store: str, report: str, folder: str) -> None:
    from yolo_sizeloss.rcnn.engine import DistContext, validate

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=TIMEOUT_S / 2))
    ctx = DistContext(rank, WORLD_SIZE, torch.device("cpu"), False)
    metrics = validate(ScoreByBrightness(), brightness_records(Path(folder)), ["cell"], ctx, batch=2, workers=0)
    Path(report).write_text(json.dumps(metrics))
    dist.destroy_process_group()


def test_two_rank_validation_gathers_every_image_and_equals_one_process(tmp_path):
    """Rank 0 scores the whole split from both shards: the same mAPs as one process, by hand 61/101 (three of
    five cells found, each ranked above both misses: precision 1 up to recall 0.6); rank 0's shard alone
    would give 1.0. Rank 1 returns nothing."""
    from yolo_sizeloss.rcnn.engine import DistContext, validate

    write_brightness_images(tmp_path)
    one = validate(ScoreByBrightness(), brightness_records(tmp_path), ["cell"],
                   DistContext(0, 1, torch.device("cpu"), False), batch=2, workers=0)
    assert one["mAP50"] == one["mAP50-95"] == one["class_ap"][0] == round(61 / 101, 6)  # reports keep 6 places

    two = run_ranks(validate_on_rank, tmp_path, str(tmp_path))
    assert two[1] is None
    assert two[0] == {"mAP50": one["mAP50"], "mAP50-95": one["mAP50-95"], "class_ap": {"0": one["class_ap"][0]}}
