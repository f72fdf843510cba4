#!/usr/bin/env bash
# One prepared GPU run (about 7 minutes on an H100): on-device correctness, the kernel
# benchmarks against eager / torch.compile / SDPA, copy-bandwidth ceiling, and the 64 px
# training step with kernels on and off. Run through the device tool from the repo root:
#   bash benchmarks/gpu_check.sh            (writes $OUT/kernels.json and $OUT/kernels.txt)
# then commit both under benchmarks/ with the device name in the file name.
set -euo pipefail
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
PYTHONUNBUFFERED=1 python3 kernels/bench.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
