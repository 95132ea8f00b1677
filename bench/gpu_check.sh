#!/usr/bin/env bash
# The training engine's GPU check, run once on a lent H100/H200 (see the issue note):
#   bash bench/gpu_check.sh smoke   # environment, eager bench, a 1-epoch study: about a minute
#   bash bench/gpu_check.sh full    # the chest X-ray study at real scale, then the compiled bench
#   bash bench/gpu_check.sh product # the product itself: `byol-runner doctor`, then `byol-runner run` of a
#                                   # small real-data manifest (head CT and chest X-ray, 1 seed, 10%/100%) on the
#                                   # GPU with the local executor (CUDA slot, bf16, channels_last, compile on);
#                                   # BYOL_DATA: the folder holding head_ct/ and chest_xray/. Tested on the CPU
#                                   # with DEVICE=cpu PRECISION=fp32 COMPILE=false ARCH=resnet18 SIZE=32
#                                   # PRE_STEPS=4 FT_STEPS=4 (and OUT=...)
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
nvidia-smi -L || [ "${DEVICE:-cuda}" = cpu ]
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
if [ "$mode" = product ]; then
  export BYOL_DATA=${BYOL_DATA:-data}
  cat > "$OUT/gpu-product.yaml" <<EOF
name: gpu-product
datasets:
  hemorrhage:
    source: csv
    root: \${BYOL_DATA}/head_ct
    labels_csv: labels.csv
    image_column: id
    label_column: hemorrhage
    image_pattern: '{}.png'
    classes: {normal: ['0'], hemorrhage: ['1']}
    positive: hemorrhage
    split: {strategy: stratified, val: 0.2, test: 0.2}
    image_size: ${SIZE:-128}
  pneumonia:
    source: imagefolder
    root: \${BYOL_DATA}/chest_xray
    split_dirs: {train: train, val: val, test: test}
    classes: {normal: [NORMAL], pneumonia: [PNEUMONIA]}
    positive: pneumonia
    split: {strategy: stratified, val: 0.15, test: 0.15, group_pattern: '(person\d+)_|((?:NORMAL2-)?IM-\d+)-'}
    image_size: ${SIZE:-128}
methods: [byol-finetune, byol-linear, supervised, random-linear]
labels: {fractions: [0.1, 1.0]}
seeds: [0]
model: {arch: ${ARCH:-resnet50}}
pretrain: {epochs: 1, min_steps: ${PRE_STEPS:-300}, batch_size: 256, warmup_epochs: 0.5}
finetune: {epochs: 1, min_steps: ${FT_STEPS:-100}, batch_size: 64}
run: {device: ${DEVICE:-cuda}, precision: ${PRECISION:-bf16}, compile: ${COMPILE:-true}, channels_last: true}
executor: {kind: local, max_parallel: 1}
EOF
  python3 -m runner.cli doctor "$OUT/gpu-product.yaml" 2>&1 | tee "$OUT/doctor.txt"
  start=$(date +%s)
  # the GPU's utilisation and memory once a second while the run lasts (the issue's "during pretraining")
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$OUT/gpu_util.csv" 2>/dev/null &
    smi=$!
  fi
  timeout "${RUN_TIMEOUT:-480}" python3 -m runner.cli run "$OUT/gpu-product.yaml" --results /tmp/gpu-results > "$OUT/product_run.log" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/product_run.log"
  [ -n "${smi:-}" ] && kill "$smi" 2>/dev/null
  tail -40 "$OUT/product_run.log"
  python3 -m runner.cli status --results /tmp/gpu-results > "$OUT/product_status.txt" 2>&1
  cp /tmp/gpu-results/gpu-product/results.md /tmp/gpu-results/gpu-product/results.json "$OUT/" 2>/dev/null
  # per task: kind, dataset, method, wall seconds and images/s of its last progress line, for the note
  python3 - "$OUT/task_speeds.txt" <<'PY'
import json, sys
from pathlib import Path
rows = []
for d in sorted(Path("/tmp/gpu-results/tasks").iterdir()):
    spec = json.loads((d / "task.json").read_text())
    ev = [json.loads(l) for l in (d / "events.jsonl").read_text().splitlines() if l.strip()] if (d / "events.jsonl").is_file() else []
    rates = [e["img_per_s"] for e in ev if e.get("kind") == "progress" and "img_per_s" in e]
    ts = [e["ts"] for e in ev if "ts" in e]
    fraction = (spec.get("budget") or {}).get("fraction")
    budget = f"{fraction:.0%}" if fraction is not None else ""
    rows.append(f"{spec['kind']:14} {spec['dataset']:11} {budget:6} {(ts[-1] - ts[0]) if len(ts) > 1 else 0:7.1f} s  "
                f"img/s median {sorted(rates)[len(rates) // 2] if rates else 0}")
Path(sys.argv[1]).write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
elif [ "$mode" = speed ]; then
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
