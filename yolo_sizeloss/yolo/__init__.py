"""The Ultralytics YOLO side: the size-aware detection loss and the trainer that installs it."""

from yolo_sizeloss.yolo.loss import AnchorWeighting, SizeAwareDetectionLoss, SizeAwareE2ELoss
from yolo_sizeloss.yolo.trainer import SizeAwareTrainer

__all__ = ["AnchorWeighting", "SizeAwareDetectionLoss", "SizeAwareE2ELoss", "SizeAwareTrainer"]
