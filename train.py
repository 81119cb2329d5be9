"""Train a detector with a size-aware loss: ``python train.py --data bccd.yaml --loss feedback``.

See ``python train.py --help`` and README.md; the code lives in ``yolo_sizeloss.cli``.
"""

import sys

from yolo_sizeloss.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
