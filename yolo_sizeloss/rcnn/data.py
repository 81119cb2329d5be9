"""YOLO-format splits as torchvision detection samples: an image tensor and a target dict per image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from yolo_sizeloss.detections import ImageRecord, gt_in_image, read_upright


def read_image(file: str) -> Tensor:
    """An RGB image as a float tensor (3, H, W) in [0, 1], turned upright by its EXIF orientation."""
    try:
        pixels = np.array(read_upright(file))
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{file}: cannot read image ({e})") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)


def training_target(record: ImageRecord) -> dict[str, Tensor]:
    """torchvision target of one image: boxes xyxy (``gt_in_image``) and labels = YOLO class id + 1
    (0 is torchvision's background)."""
    boxes, classes = gt_in_image(record)
    return {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(classes.astype(np.int64)) + 1}


def hflip(image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror an image and its boxes left-right."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


class DetectionDataset(Dataset):
    """Images and targets of a list of ``ImageRecord``; ``flip_p`` is the horizontal-flip probability
    (the paper's only augmentation; 0 for validation). Item: (image, target, index into records)."""

    def __init__(self, records: list[ImageRecord], flip_p: float):
        self.records = records
        self.flip_p = flip_p

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor], int]:
        record = self.records[index]
        image, target = read_image(record.file), training_target(record)
        if image.shape[-2:] != (record.height, record.width):
            raise ValueError(f"{record.file}: decoded size {tuple(image.shape[-2:])} != header size "
                             f"{(record.height, record.width)}")
        if self.flip_p > 0 and torch.rand(()) < self.flip_p:
            image, target = hflip(image, target)
        return image, target, index


def collate_detection(batch: list) -> tuple[list[Tensor], list[dict[str, Tensor]], list[int]]:
    """Keep images of different sizes as lists (torchvision batches them itself)."""
    images, targets, indices = zip(*batch)
    return list(images), list(targets), list(indices)
