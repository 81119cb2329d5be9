"""torchvision Faster R-CNN with the size-aware losses (PLB, SCB, feedback, Grad-Libra and NWD on the RPN and RoI
terms).

Public entry points: ``yolo_sizeloss.rcnn.cli.main`` (``train --arch faster_rcnn``),
``predict_records`` (detections of a data split for a checkpoint, in original image pixels) and
``export_onnx``.
"""

from yolo_sizeloss.rcnn.engine import predict_records
from yolo_sizeloss.rcnn.export import export_onnx
from yolo_sizeloss.rcnn.model import build_model
from yolo_sizeloss.rcnn.switches import LossSwitches

__all__ = ["LossSwitches", "build_model", "export_onnx", "predict_records"]
