"""Reading a checkpoint of either detector family, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import torch

from yolo_sizeloss.config import with_new_settings

RCNN_ARCH = "faster_rcnn"
RCNN_KEYS = ("arch", "backbone", "num_classes", "names", "imgsz", "model", "loss")


def load_checkpoint(path: str | Path, arch: str | None = None) -> dict:
    """The checkpoint dict at ``path``; with ``arch="faster_rcnn"`` also checked to be this project's
    Faster R-CNN checkpoint. FileNotFoundError or ValueError naming the file and what is wrong.

    Ultralytics checkpoints pickle their modules, so the file is read with ``weights_only=False``:
    load only checkpoints you trust, as with Ultralytics itself.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a checkpoint dict (got {type(ckpt).__name__})")
    if arch == RCNN_ARCH:
        if ckpt.get("arch") != RCNN_ARCH:
            raise ValueError(f"{path}: not a Faster R-CNN checkpoint of this project (expected 'arch': '{RCNN_ARCH}')")
        missing = [k for k in RCNN_KEYS if k not in ckpt]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks {', '.join(missing)}")
        ckpt["loss"] = with_new_settings(ckpt["loss"])
        if "loss_config" in ckpt.get("train_args", {}):
            ckpt["train_args"]["loss_config"] = with_new_settings(ckpt["train_args"]["loss_config"])
    return ckpt


def is_yolo_checkpoint(ckpt: dict) -> bool:
    """Whether ``ckpt`` holds an Ultralytics network (an ``ema`` or ``model`` module)."""
    return isinstance(ckpt.get("ema"), torch.nn.Module) or isinstance(ckpt.get("model"), torch.nn.Module)


def checkpoint_kind(ckpt: dict, path: str | Path) -> str:
    """``"faster_rcnn"`` for this project's Faster R-CNN checkpoints, ``"yolo"`` for Ultralytics ones
    (an ``ema`` or ``model`` module); ValueError otherwise."""
    if ckpt.get("arch") == RCNN_ARCH:
        return RCNN_ARCH
    if is_yolo_checkpoint(ckpt):
        return "yolo"
    raise ValueError(f"{path} is neither an Ultralytics YOLO nor a Faster R-CNN checkpoint")


def yolo_module(checkpoint: dict) -> torch.nn.Module:
    """The network of a YOLO checkpoint, as Ultralytics loads it: its EMA where it kept one."""
    return checkpoint["ema"] if isinstance(checkpoint.get("ema"), torch.nn.Module) else checkpoint["model"]
