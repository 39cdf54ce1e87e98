#!/usr/bin/env bash
# Issue 5's GPU measurements in one call of a lent GPU machine; about 5-6 minutes on an H200.
#
# Prepare on the development machine (the photos are not part of the repository; 37 MB):
#     cp -r ../shared/data/oxford-pets-sample .photos && echo /.photos/ >> .git/info/exclude
# then run it with the device tool: command "bash benchmarks/gpu_run.sh", carry [".photos"],
# timeout_s 600 (each step has its own cap; together at most 570 s). It needs only the
# machine's own python3 with torch and torchvision (the package is used from src/, nothing is
# installed). Every number and log lands in $OUT; the tables are
# printed last. Without .photos, both benchmarks fall back to synthetic JPEGs (slower to decode
# per byte than photos, so the file-to-checkpoint time is then pessimistic).
#
# SMOKE=1 bash benchmarks/gpu_run.sh checks the script itself on a CPU in a few minutes (tiny sizes).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu FILES=200 E2E=(--image-size 32 --epochs 2 --arch vgg11_bn)
    BENCH=(--size 32 --images 16 --batch-size 8 --fine-tune-steps 1 --epochs 2)
else
    DEVICE=cuda FILES=25000 E2E=(--epochs 10)
    BENCH=(--size 224 --images 4096 --batch-size 64 --fine-tune-steps 20)
fi
OUT=${OUT:-$(mktemp -d)}
PHOTOS=${PHOTOS:-.photos}
PY=${PYTHON:-python3}  # the machine's own Python, with torch
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# a fresh compile cache (outside $OUT, which brings back only 8 files): compile time is measured
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
export TORCHINDUCTOR_CACHE_DIR

{
    date -u +"%Y-%m-%dT%H:%MZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
    "$PY" -c "import os, torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cpus', os.cpu_count())"
} 2>&1 | tee "$OUT/machine.txt"

# 1. The 10-epoch frozen run over 25,000 JPEG files, from files on disk to a saved checkpoint
#    (eager: compiling would cost more than it saves at this size).
timeout 120 "$PY" benchmarks/end_to_end.py --device $DEVICE --files $FILES "${E2E[@]}" \
    --photos "$PHOTOS" --out "$OUT/end_to_end.json" 2>&1 | tee "$OUT/end_to_end.log"

# 2. The seed's loop against the Trainer, eager and compiled, with the bf16 matmul rate.
timeout 270 "$PY" benchmarks/seed_vs_vggtransfer.py --device $DEVICE "${BENCH[@]}" --compile \
    --data "$PHOTOS" --out "$OUT/seed_vs_vggtransfer.json" 2>&1 | tee "$OUT/seed_vs_vggtransfer.log"

# 3. The CUDA-only tests (tests/test_cuda.py and the GPU checkpoint round trip).
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests 2>&1 | tail -15 | tee "$OUT/cuda_tests.log"

echo "== end to end"; tail -n 12 "$OUT/end_to_end.log"
echo "== seed vs vggtransfer"; grep '^|' "$OUT/seed_vs_vggtransfer.log"
