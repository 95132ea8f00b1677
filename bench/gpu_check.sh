#!/usr/bin/env bash
# The training engine's GPU check, run once on a lent H100/H200 (see the issue note):
#   bash bench/gpu_check.sh smoke   # environment, eager bench, a 1-epoch study: about a minute
#   bash bench/gpu_check.sh full    # the chest X-ray study at real scale, then the compiled bench
#   bash bench/gpu_check.sh speed   # only the speed goals: eager bench, then compiled (networks and
#                                   # augmentation; compiling takes minutes), then the compiled
#                                   # augmentation's kernels (bench/augment_kernels.py); no data needed
# Expects the chest X-ray images under data/chest_xray and, where pydantic is missing, wheels in .whl/.
set -uo pipefail
mode=${1:-smoke}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if ! python3 -c "import pydantic" 2>/dev/null || [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
if [ "$mode" = speed ]; then
  python3 -m runner.cli bench --arch resnet50 --size 224 --batch 256 --steps 30 --warmup 10 | tee "$OUT/bench_eager_r50_224.json"
  timeout 420 python3 -m runner.cli bench --arch resnet50 --size 224 --batch 256 --steps 30 --warmup 10 --compile \
    | tee "$OUT/bench_compiled_r50_224.json"
  # the compiled augmentation alone: kernels, library calls, image-sized buffers, eager vs compiled ms
  timeout 120 python3 bench/augment_kernels.py --size 224 --batch 256 | tee "$OUT/augment_kernels_224.json"
elif [ "$mode" = smoke ]; then
  python3 -m runner.cli bench --arch resnet50 --size 224 --batch 256 --steps 30 --warmup 10 | tee "$OUT/bench_eager_r50_224.json"
  python3 bench/study.py --root data/chest_xray --out /tmp/smoke --size 64 --arch resnet18 --epochs 1 --finetune-epochs 1 --fractions 0.1 \
    2>&1 | tail -8 | tee "$OUT/smoke.log"
else
  python3 bench/study.py --root data/chest_xray --out /tmp/study --size 128 --epochs 80 2>&1 | tee "$OUT/study.log"
  cp /tmp/study/study.md /tmp/study/study.json "$OUT/" 2>/dev/null
  python3 -m runner.cli bench --arch resnet50 --size 128 --batch 256 --steps 30 --warmup 10 --parts byol | tee "$OUT/bench_eager_r50_128.json"
  timeout 200 python3 -m runner.cli bench --arch resnet50 --size 224 --batch 256 --steps 30 --warmup 10 --compile --parts byol,supervised \
    | tee "$OUT/bench_compiled_r50_224.json"
fi
