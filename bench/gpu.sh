#!/usr/bin/env bash
# One benchmark run on one GPU (issue 21, items 2 and 3): about 8 minutes on an H200 with 16 cores.
#
#     bash bench/gpu.sh OUT            # on the GPU machine, in the repository root, .whl/ carried
#     bash bench/gpu.sh --smoke OUT    # the same steps on the CPU, one tiny epoch (tests/test_bench.py)
#
# On the device machine (its README): run(command="bash bench/gpu.sh $OUT", carry=[".whl"], timeout_s=600),
# after `bash bench/gpu_wheels.sh` here. The package is used from the checkout (PYTHONPATH), not installed.
#
# What it runs, in this order:
#  1. installs the carried packages into /tmp/site (Ultralytics, faster-coco-eval, ultralytics-thop as wheels,
#     polars unpacked from polars.tar.xz: what the device image lacks) and prints the versions; --smoke uses
#     this machine's packages;
#  2. bench/gpu.py prepare: Ultralytics' settings, matplotlib's font cache and the label caches made
#     once, before trainings that start together could race on writing them (--smoke first links an
#     8/4/8-image BCCD subset, bench/gpu.py subset, and runs one harness per family);
#  3. YOLO (yolov8n from scratch, BCCD, compare.py --preset gpu: baseline, nwd and nwd:safit_small_classes,
#     100 epochs, imgsz 416, batch 16) x seeds 0-2: nine bench/compare.py harnesses at once, one per
#     (mode, seed), all with --only runs into WORK/yolo;
#     Faster R-CNN (mobilenet_v3_large_fpn from scratch; baseline, plb, nwd, nwd:safit_sharp_auto) at the
#     RCNN_* schedule below (the CPU comparison's): four harnesses at once, one per loss, its seeds in turn
#     (RCNN_SEEDS: 1, 2, then 0, which the CPU comparison already has), under `nice`;
#     every 30 s one line of measured throughput (bench/gpu.py progress);
#  4. at TRAIN_DEADLINE_S (400 s) after the start the harnesses still running are stopped (a stopped run
#     is left out of the tables with its seed; summary.md says which);
#  5. compare.py --only table per family (paired by seed; --bootstrap BOOTSTRAP draws per seed) while
#     bench/overhead.py times every loss against stock with CUDA events and counts host
#     synchronisations per loss call and training step (set_sync_debug_mode("warn")), each given at
#     most 75 s, so that the whole run ends within 8 minutes;
#  6. bench/gpu.py pack: OUT/ gets at most 8 files, one level deep: gpu.log (this output),
#     summary.md (each run's epochs and s/epoch), yolo_results.md, rcnn_results.md, overhead.md,
#     records.tar.gz (each run's small record and val report, with detections: tabulate again with
#     `python bench/compare.py ... --only table --out <unpacked>/yolo`), logs.tar.gz (every harness's log).
#
# Why nine YOLO trainings at once. A yolov8n training at imgsz 416 on BCCD is not GPU-bound: an epoch is
# 13 batches of 16 (about 5 ms of H200 work each under AMP), a validation of 87 images and a checkpoint;
# its time is the host's: mosaic augmentation (0.7 CPU-s per epoch of 205 images, measured on this
# project's 2-core CI machine; 0.15 CPU-s to letterbox the 87 validation images), kernel launches of the
# forward, loss, backward and EMA (~0.5 s), validation with NMS and metrics (~0.6 s), the checkpoint
# (~0.2 s). Assumed: 2.5 s per epoch per training with nine at once, 1.5-2 CPU-s each, so nine
# trainings keep 13-14 of the 16 cores busy and the GPU mostly idle: 100 epochs take about 250 s, plus
# about 30 s to start and to evaluate on the test split. Run in turns of three, the same nine would
# need 750 s. The Faster R-CNN harnesses, niced, take the 2-3 cores YOLO leaves (and more once its
# trainings end): assumed 6 CPU-s per epoch at imgsz 640 (52 batches of 4 decoded and resized on the
# host, their kernel launches, 87 validation images, a 150 MB checkpoint) and 52 x ~20 ms of GPU work,
# so one seed of the four losses (30 epochs) is about 720 CPU-s and 120 GPU-s: the deadline should let
# the first seed finish and cut a later one. Seeds in turn, not at once: twelve runs at once would share
# the GPU and the cores evenly, all be cut near the end, and leave no Faster R-CNN table at all. The first
# seeds are 1 and 2 because the CPU comparison (docs/results.md section 5) has seed 0.
# These are estimates, not readings (no GPU has run this yet): the progress lines and summary.md give
# the measured s/epoch; size RCNN_EPOCHS (and the deadline) from them.
#
# Any variable below can be set in the environment: RCNN_SEEDS="1" TRAIN_DEADLINE_S=450 bash bench/gpu.sh OUT.
set -uo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
if [[ $# -ne 1 ]]; then echo "usage: bash bench/gpu.sh [--smoke] OUT" >&2; exit 2; fi
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 2
START=$(date +%s)
PYTHON=${PYTHON:-python3}
SEEDS=${SEEDS:-"0 1 2"}
YOLO_MODES=${YOLO_MODES:-"baseline nwd nwd:safit_small_classes"}  # compare.py --preset gpu's
YOLO_WORKERS=${YOLO_WORKERS:-2}           # dataloader processes per YOLO training (compare.py's default)
RCNN_MODES=${RCNN_MODES:-"baseline plb nwd nwd:safit_sharp_auto"}
RCNN_SEEDS=${RCNN_SEEDS:-"1 2 0"}          # in this order, each loss's harness running them in turn
# Faster R-CNN schedule: the CPU comparison's (docs/results.md section 5). imgsz 640 puts BCCD's
# platelets (~30 px there) above the mobilenet FPN's smallest anchor, lr 0.01 at batch 4 learns from
# scratch at once, and the stock loss's 30-epoch val curve rose until the tenfold decay at epoch 20 and
# was flat after it (val mAP50-95 53.4 at 22, 51.8 at 30): a shorter schedule stops before that decay
RCNN_EPOCHS=${RCNN_EPOCHS:-30}
RCNN_IMGSZ=${RCNN_IMGSZ:-640}
RCNN_LR=${RCNN_LR:-0.01}
RCNN_LR_STEP=${RCNN_LR_STEP:-20}
RCNN_BATCH=${RCNN_BATCH:-4}
RCNN_WORKERS=${RCNN_WORKERS:-2}
RCNN_NICE=${RCNN_NICE:-10}                # Faster R-CNN yields the CPU to YOLO's 100-epoch schedule
BOOTSTRAP=${BOOTSTRAP:-200}               # paired bootstrap draws per seed in the tables (1000: ~2 min more)
TRAIN_DEADLINE_S=${TRAIN_DEADLINE_S:-400} # seconds after the start when trainings still running are stopped
TABLE_TIMEOUT_S=${TABLE_TIMEOUT_S:-75}    # the tables and overhead.py run side by side after the trainings:
OVERHEAD_TIMEOUT_S=${OVERHEAD_TIMEOUT_S:-75}  # 400 + 75 + packing stays inside 8 minutes
PROGRESS_S=${PROGRESS_S:-30}
SPLIT=${SPLIT:-}                          # runs: harnesses as above; family: one per family, its runs in turn
if (( SMOKE )); then  # every step and mode, tiny: one epoch of a few images at imgsz 32, one seed
    # one harness per family: on 2 cores and little memory, 7 at once (each ~0.7 GB beside its training) thrash
    # and BCCD's first 8 train, 4 val and 8 test images (bench/gpu.py subset), so that validation is cheap
    SEEDS=0; RCNN_SEEDS=0; DEVICE=cpu; SPLIT=${SPLIT:-family}; YOLO_WORKERS=1; RCNN_WORKERS=1; RCNN_NICE=0; BOOTSTRAP=100; PROGRESS_S=10
    YOLO_SCHEDULE=(--preset gpu --epochs 1 --imgsz 32 --batch 4)
    RCNN_SCHEDULE=(--epochs 1 --imgsz 32 --batch 2 --lr "$RCNN_LR" --lr-step 1)
    OVERHEAD=(--device cpu --imgsz 32 --batch 2 --repeats 1)
    WORK=${GPU_WORK:-$(mktemp -d /tmp/yolo_sizeloss_smoke.XXXXXX)}
    [[ -n ${GPU_WORK:-} ]] || REMOVE_WORK=1  # its checkpoints take 1.3 GB; OUT has what matters
    DATA=$WORK/data/data.yaml
else
    DEVICE=0; SPLIT=${SPLIT:-runs}
    YOLO_SCHEDULE=(--preset gpu)
    RCNN_SCHEDULE=(--epochs "$RCNN_EPOCHS" --imgsz "$RCNN_IMGSZ" --batch "$RCNN_BATCH" --lr "$RCNN_LR"
                   --lr-step "$RCNN_LR_STEP")
    OVERHEAD=(--device cuda:0 --imgsz 416 --batch 16 --repeats 10)
    WORK=${GPU_WORK:-/tmp/yolo_sizeloss_gpu}
    DATA=bccd.yaml
fi
YOLO_ARGS=("${YOLO_SCHEDULE[@]}" --data "$DATA" --device "$DEVICE" --workers "$YOLO_WORKERS" --bootstrap "$BOOTSTRAP"
           --out "$WORK/yolo")
RCNN_ARGS=(--arch faster_rcnn --backbone mobilenet_v3_large_fpn "${RCNN_SCHEDULE[@]}" --data "$DATA" --device "$DEVICE"
           --workers "$RCNN_WORKERS" --bootstrap "$BOOTSTRAP" --out "$WORK/rcnn")
mkdir -p "$WORK/logs"
exec > >(tee -a "$OUT/gpu.log") 2>&1
TEE=$!

PIDS=(); NAMES=(); FAILED=(); PACKED=0; REMOVE_WORK=${REMOVE_WORK:-0}
say() { echo "[$(( $(date +%s) - START )) s] $*"; }
pack() {  # OUT's files; once, also when the script stops early
    (( PACKED )) && return
    PACKED=1
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    say "packing $WORK into $OUT"
    "$PYTHON" bench/gpu.py pack "$WORK" "$OUT" || FAILED+=("pack")
}
finish() {
    local rc=$?
    pack
    (( ${#FAILED[@]} )) && { say "FAILED: ${FAILED[*]}"; rc=1; }
    (( REMOVE_WORK )) && rm -rf "$WORK"
    say "done in $(( $(date +%s) - START )) s; OUT: $(ls "$OUT" | tr '\n' ' ')"
    exec 1>&- 2>&-
    wait "$TEE" 2>/dev/null
    exit "$rc"
}
trap finish EXIT
die() { say "stopped: $2"; FAILED+=("$1"); exit 1; }  # STEP MESSAGE

# ---- 1. packages
say "$( ((SMOKE)) && echo "smoke run on the CPU" || echo "GPU run" ), work folder $WORK"
if (( SMOKE )); then
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
    ls .whl/*.whl .whl/polars.tar.xz >/dev/null 2>&1 \
        || die "wheels" "no .whl/*.whl or .whl/polars.tar.xz: run 'bash bench/gpu_wheels.sh' in the checkout and carry .whl"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || die "wheels" "pip could not install .whl/*.whl"
    "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
        .whl/polars.tar.xz /tmp/site || die "wheels" "could not unpack .whl/polars.tar.xz into /tmp/site"
    export PYTHONPATH=/tmp/site:$ROOT
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader || true
fi
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# one intra-op thread per process: more trainings than cores, and OpenMP's spinning threads on oversubscribed
# cores made a Faster R-CNN epoch 7 times slower on the 2-core CI machine (15 s against 2 s)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
echo "cores $(getconf _NPROCESSORS_ONLN); seeds $SEEDS; YOLO ${YOLO_SCHEDULE[*]}: $YOLO_MODES; Faster R-CNN ${RCNN_SCHEDULE[*]}, seeds $RCNN_SEEDS: $RCNN_MODES;" \
     "deadline ${TRAIN_DEADLINE_S} s"

# ---- 2. once, before the trainings start together
if (( SMOKE )); then
    "$PYTHON" bench/gpu.py subset "$WORK/data" >"$WORK/logs/subset.log" 2>&1 \
        || { tail -n 5 "$WORK/logs/subset.log"; die "subset" "bench/gpu.py subset failed"; }
fi
"$PYTHON" bench/gpu.py prepare --data "$DATA" >"$WORK/logs/prepare.log" 2>&1 \
    || { tail -n 5 "$WORK/logs/prepare.log"; die "prepare" "bench/gpu.py prepare failed"; }
grep -E "^(python|GPU|Ultralytics. data check)" "$WORK/logs/prepare.log"
say "prepared"

# ---- 3. trainings
launch() {  # NAME NICENESS COMPARE-ARGS...: one harness in the background, logged to WORK/logs/NAME.log
    local name=$1 niceness=$2
    shift 2
    nice -n "$niceness" "$PYTHON" bench/compare.py "$@" --only runs >"$WORK/logs/$name.log" 2>&1 &
    PIDS+=($!); NAMES+=("$name")
}
# shellcheck disable=SC2086  # the modes and seeds are words
if [[ $SPLIT == family ]]; then
    launch yolo 0 "${YOLO_ARGS[@]}" --losses $YOLO_MODES --seeds $SEEDS
    launch rcnn "$RCNN_NICE" "${RCNN_ARGS[@]}" --losses $RCNN_MODES --seeds $RCNN_SEEDS
else
    for mode in $YOLO_MODES; do
        for seed in $SEEDS; do
            launch "yolo-${mode//:/-}-s$seed" 0 "${YOLO_ARGS[@]}" --losses "$mode" --seeds "$seed"
        done
    done
    for mode in $RCNN_MODES; do
        launch "rcnn-${mode//:/-}" "$RCNN_NICE" "${RCNN_ARGS[@]}" --losses "$mode" --seeds $RCNN_SEEDS
    done
fi
say "${#PIDS[@]} harnesses started"
running() { for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }
next=$(( $(date +%s) + PROGRESS_S ))
while running; do
    now=$(date +%s)
    if (( now - START >= TRAIN_DEADLINE_S )); then
        say "deadline: stopping the harnesses still running"
        for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
        break
    fi
    if (( now >= next )); then
        "$PYTHON" bench/gpu.py progress "$WORK" --start "$START"
        next=$(( now + PROGRESS_S ))
    fi
    sleep 1
done
for i in "${!PIDS[@]}"; do
    wait "${PIDS[$i]}"
    rc=$?
    if (( rc != 0 )); then
        FAILED+=("${NAMES[$i]}")
        say "${NAMES[$i]} ended with exit $rc; the end of its log:"
        tail -n 5 "$WORK/logs/${NAMES[$i]}.log" | cut -c1-300
    fi
done
"$PYTHON" bench/gpu.py progress "$WORK" --start "$START"
say "trainings over"

# ---- 4. tables (CPU) while the loss is timed (GPU)
# shellcheck disable=SC2086
timeout "$TABLE_TIMEOUT_S" "$PYTHON" bench/compare.py "${YOLO_ARGS[@]}" --losses $YOLO_MODES --seeds $SEEDS \
    --only table >"$WORK/logs/table-yolo.log" 2>&1 &
table_yolo=$!
# shellcheck disable=SC2086
timeout "$TABLE_TIMEOUT_S" "$PYTHON" bench/compare.py "${RCNN_ARGS[@]}" --losses $RCNN_MODES --seeds $RCNN_SEEDS \
    --only table >"$WORK/logs/table-rcnn.log" 2>&1 &
table_rcnn=$!
timeout "$OVERHEAD_TIMEOUT_S" "$PYTHON" bench/overhead.py "${OVERHEAD[@]}" --sync-count \
    --out "$WORK/overhead.md" >"$WORK/logs/overhead.log" 2>&1 || FAILED+=("overhead")
wait "$table_yolo" || FAILED+=("table-yolo")
wait "$table_rcnn" || FAILED+=("table-rcnn")
for family in yolo rcnn; do
    if [[ -f "$WORK/$family/results.md" ]]; then
        echo; echo "## $family"; echo; cat "$WORK/$family/results.md"
    else
        say "no $family table; the end of its log:"; tail -n 5 "$WORK/logs/table-$family.log" | cut -c1-300
    fi
done
echo; echo "## overhead"; echo
cat "$WORK/overhead.md" 2>/dev/null || tail -n 5 "$WORK/logs/overhead.log" | cut -c1-300
echo
