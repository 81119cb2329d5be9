#!/usr/bin/env bash
# Download into .whl/ (ignored by git) the packages bench/gpu.sh installs on the GPU machine, whose image
# has Python 3.12, PyTorch, torchvision, OpenCV (headless), numpy, matplotlib, PyYAML, psutil, requests,
# Pillow and cloudpickle but no network. Run it once in the checkout the device call sends, then carry
# the folder: run(command="bash bench/gpu.sh $OUT", carry=[".whl"]).
#
#     bash bench/gpu_wheels.sh
#
# Exactly what this project needs there and the image lacks (its package list: the device's KINDS.md):
#   ultralytics 8.4.190      the supported version (pyproject.toml); installed with --no-deps
#   faster-coco-eval 1.8.x   the pinned range (yolo_sizeloss/paired.py reads its per-image evaluations)
#   polars 0.20.31           Ultralytics' trainer imports it to read results.csv into each checkpoint and
#                            to plot; 0.20.31 (28 MB) is the smallest that satisfies Ultralytics'
#                            polars>=0.20 and ran its training here with numpy 2 (today's polars wheels,
#                            polars + polars-runtime-32, are 55 MB: too much beside the checkout's ~35 MB
#                            under the 64 MiB a device call may carry); carried as polars.tar.xz (below)
#   ultralytics-thop 2.2.3   GFLOPs in Ultralytics' model summaries (without it they read 0)
# Not taken: ultralytics-platform (imported only for `from ultralytics import Platform`, which nothing
# here uses), opencv-python (the image's opencv-python-headless provides cv2). Ultralytics' other
# requirements (numpy, matplotlib, pillow, pyyaml, requests, torch, torchvision, psutil, nvidia-ml-py)
# and the project's (cloudpickle) are on the image.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(ultralytics==8.4.190 "faster-coco-eval>=1.8,<1.9" polars==0.20.31 ultralytics-thop==2.2.3)
rm -rf .whl
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
# polars travels unpacked and xz-compressed (17 MB against its 28 MB wheel): a wheel is a zip of members
# deflated one by one, so xz finds the redundancy only in the unpacked files; a wheel without a .data
# folder, as this one is, unpacks to exactly the files pip --target installs, which gpu.sh does there
POLARS=$(ls .whl/polars-*.whl)
python3 - "$POLARS" .whl/polars.tar.xz <<'PY'
import sys, tarfile, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, tarfile.open(sys.argv[2], "w:xz", preset=9) as packed:
    for member in wheel.infolist():
        if not member.is_dir():
            info = tarfile.TarInfo(member.filename)
            info.size, info.mode = member.file_size, member.external_attr >> 16 & 0o777  # the mode the wheel records
            with wheel.open(member) as data:
                packed.addfile(info, data)
PY
rm "$POLARS"
ls -l .whl
du -ch .whl/* | tail -n 1
git check-ignore -q .whl || echo "warning: .whl is not ignored by git here; add '.whl/' to .gitignore" >&2
