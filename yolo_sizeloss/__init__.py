"""Size-aware loss weightings for Ultralytics YOLO and torchvision Faster R-CNN."""
