"""Build torchvision Faster R-CNN with the size-aware loss heads, and read and write its checkpoints.

Image size: ``GeneralizedRCNNTransform`` gets ``min_size = max_size = imgsz``. torchvision scales an
image by ``min(min_size / short_side, max_size / long_side)``, so the long side becomes ``imgsz`` with
the aspect ratio kept (BCCD's 640x480 at ``imgsz`` 416 runs at 416x312), as YOLO's letterbox does.
The same rule serves training, validation, ``predict_records`` and ONNX export, and the checkpoint
records ``imgsz``. Detections come back in the pixels of the image that was passed in.

Checkpoints: ``model`` holds the detector's state dict with torchvision's keys only, so a stock
``FasterRCNN`` of the same backbone loads it; the feedback state of the loss heads (buffers under
``rpn.feedback.`` and ``roi_heads.feedback.``) is saved beside it as ``feedback`` and comes back with
``model_from_checkpoint`` (so ``--resume`` continues it), as does the NWD constant that
``nwd.constant: auto`` resolved to (``nwd_constant``).
"""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path

import torch
from torchvision.models.detection import (
    FasterRCNN,
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from ultralytics.utils import LOGGER

from yolo_sizeloss.checks import DataError
from yolo_sizeloss.methods.feedback import FeedbackBalancer
from yolo_sizeloss.methods.nwd import ResolvedSettings
from yolo_sizeloss.rcnn.heads import SizeBalancedRoIHeads, SizeBalancedRPN
from yolo_sizeloss.rcnn.switches import LossSwitches

FEEDBACK_PREFIXES = ("rpn.feedback.", "roi_heads.feedback.")  # where the loss heads keep their feedback state
BACKBONES = {
    "resnet50_fpn": (fasterrcnn_resnet50_fpn, FasterRCNN_ResNet50_FPN_Weights),
    "mobilenet_v3_large_fpn": (fasterrcnn_mobilenet_v3_large_fpn, FasterRCNN_MobileNet_V3_Large_FPN_Weights),
}


RCNN_NMS_IOU = inspect.signature(FasterRCNN).parameters["box_nms_thresh"].default  # torchvision's


def check_architecture(backbone: str, imgsz: int) -> None:
    """A backbone and image size ``build_model`` can make; ValueError naming the flag."""
    if backbone not in BACKBONES:
        raise ValueError(f"--backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
    check_imgsz(imgsz)


def check_imgsz(imgsz: int) -> None:
    """An image size torchvision's Faster R-CNN can take (training or evaluating); ValueError naming the flag."""
    if imgsz < 32:
        raise ValueError(f"--imgsz {imgsz}: must be at least 32")


def build_model(
    backbone: str, num_classes: int, imgsz: int, switches: LossSwitches, weights: str = "none"
) -> FasterRCNN:
    """Faster R-CNN with ``num_classes`` outputs (background included) and the size-aware loss heads.

    ``weights``: ``none`` (random init, nothing is downloaded; torchvision then trains BatchNorm and
    every backbone layer), ``DEFAULT`` (torchvision's COCO weights, downloaded once, with its frozen
    BatchNorm and 3 trainable backbone layers; the class predictor is new) or the path of a file
    holding a state dict or one of this project's checkpoints (tensors whose name and shape match are
    loaded into the ``none`` architecture; the rest are listed in the log).
    """
    check_architecture(backbone, imgsz)
    builder, weights_enum = BACKBONES[backbone]
    size = {"min_size": imgsz, "max_size": imgsz}
    if weights.upper() == "DEFAULT":
        try:
            model = builder(weights=weights_enum.DEFAULT, **size)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # a cached download that does not load
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.DEFAULT.url).name
            raise DataError(f"--weights DEFAULT: torchvision's COCO weights at {cached} do not load ({e}); "
                             "delete the file to download it again") from e
        in_features = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
    else:
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **size)
        if weights.lower() != "none":
            load_matching_weights(model, Path(weights))
    model.rpn = SizeBalancedRPN.from_stock(model.rpn, switches)
    model.roi_heads = SizeBalancedRoIHeads.from_stock(model.roi_heads, switches)
    return model


def matching_weights(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` whose name and shape match ``model``'s; ValueError naming ``--weights``
    when the file holds no state dict or none of its tensors match."""
    if not path.is_file():
        raise FileNotFoundError(f"--weights {path}: no such file (use a checkpoint path, DEFAULT or none)")
    expected = f"--weights {path}: expected a state dict or a checkpoint with a 'model' state dict"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # objects weights_only refuses: no state dict of ours holds them
        raise ValueError(expected) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(expected)
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise ValueError(f"--weights {path}: no tensor matches this model's names and shapes")
    return matching


def check_weights_match(path: Path, backbone: str, num_classes: int) -> None:
    """``matching_weights``' verdict for the model ``build_model`` would make, before a run folder exists.
    Names and shapes are all it needs, so the model is made on the meta device: nothing allocated or
    initialised."""
    with torch.device("meta"):
        model = BACKBONES[backbone][0](weights=None, weights_backbone=None, num_classes=num_classes)
    matching_weights(model, path)


def load_matching_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy the tensors of ``path`` whose name and shape match into ``model``; the log names those it has not."""
    own = model.state_dict()
    matching = matching_weights(model, path)
    model.load_state_dict(matching, strict=False)
    skipped = sorted(set(own) - set(matching))
    LOGGER.info(f"Loaded {len(matching)}/{len(own)} tensors from {path}" + (f"; new: {', '.join(skipped)}" if skipped else ""))


def split_feedback_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A model state dict split into (the detector's tensors, the feedback state of the loss heads)."""
    feedback = {k: v for k, v in state.items() if k.startswith(FEEDBACK_PREFIXES)}
    return {k: v for k, v in state.items() if k not in feedback}, feedback


def set_inference_limits(model: FasterRCNN, conf: float, max_det: int, iou: float = RCNN_NMS_IOU) -> None:
    """Keep detections with class score above ``conf``, at most ``max_det`` per image, after a per-class
    NMS at ``iou``."""
    model.roi_heads.score_thresh = conf
    model.roi_heads.detections_per_img = max_det
    model.roi_heads.nms_thresh = iou


def unwrap(model: torch.nn.Module) -> FasterRCNN:
    """The Faster R-CNN inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def model_from_checkpoint(
    checkpoint: dict, imgsz: int | None = None, switches: LossSwitches | None = None
) -> FasterRCNN:
    """Rebuild the checkpoint's model (at its own ``imgsz`` unless one is given) with its weights,
    feedback state and resolved NWD settings (``nwd.constant``/``nwd.assigner: auto``, whether
    ``nwd.max_small_share`` left NWD on, a checkpoint without that record had it on, and the classes of
    ``nwd.assigner_classes: small``) loaded, or
    with ``switches``: a resumed run's, resolved by the engine."""
    switches = switches or LossSwitches.from_config(checkpoint["loss"], ResolvedSettings(
        checkpoint.get("nwd_constant"), checkpoint.get("nwd_assigner"), checkpoint.get("nwd_active", True),
        checkpoint.get("nwd_classes")))
    model = build_model(checkpoint["backbone"], checkpoint["num_classes"], imgsz or checkpoint["imgsz"], switches)
    model.load_state_dict({**checkpoint["model"], **checkpoint.get("feedback", {})})
    return model


def feedback_stages(model: torch.nn.Module) -> dict[str, FeedbackBalancer]:
    """The feedback states of a Faster R-CNN's stages, by stage name (``rpn``, ``roi``; empty without feedback)."""
    heads = {"rpn": getattr(model, "rpn", None), "roi": getattr(model, "roi_heads", None)}
    return {name: head.states["feedback"] for name, head in heads.items() if "feedback" in getattr(head, "states", {})}


def end_feedback_step(model: torch.nn.Module) -> None:
    """End a training iteration: every stage folds its step's feedback sums into its state."""
    for stage in feedback_stages(model).values():
        stage.end_step()


def end_assignment_step(model: torch.nn.Module) -> None:
    """End a training iteration for the RPN's assignment counts (a model without our RPN has none)."""
    counter = getattr(getattr(model, "rpn", None), "assignments", None)
    if counter is not None:
        counter.end_step()


def assignment_columns(model: torch.nn.Module) -> dict[str, float]:
    """The epoch's RPN assignment counts as results.csv columns (``yolo_sizeloss.assignment``); they restart."""
    counter = getattr(getattr(model, "rpn", None), "assignments", None)
    return {} if counter is None else counter.epoch_stats()


def feedback_columns(model: torch.nn.Module) -> dict[str, float]:
    """The feedback state of every stage as ``feedback/<stage>/<name>`` floats (results.csv columns)."""
    return {f"feedback/{name}/{k}": v for name, stage in feedback_stages(model).items() for k, v in stage.state().items()}
