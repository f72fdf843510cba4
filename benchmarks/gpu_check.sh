#!/usr/bin/env bash
# One prepared GPU run (at most 9 minutes: every step has its own timeout, 540 s in all; fits one device call), in order of value so a cut-off run still reports:
#   1. the device, and each benchmark launch compiled by the image's Triton (registers, spills, shared memory);
#   2. kernels/bench.py: on-device correctness, the kernels against eager / torch.compile / SDPA, the copy-bandwidth
#      ceiling and the 64 px training step with kernels on and off (kernels.json, kernels.txt);
#   3. kernels/bench.py --sweep: every attention kernel's candidate tiles (sweep.json, sweep.txt), to retune configs().
# Needs neither deepspeed nor webdataset. Run through the device tool from the repo root:
#   bash benchmarks/gpu_check.sh            (writes under $OUT)
# then commit the outputs under benchmarks/ with the device name in the file names.
set -uo pipefail
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$OUT/device.txt"
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
export PYTHONUNBUFFERED=1
timeout 60 python3 kernels/compile_report.py --arch "$arch" --out "$OUT/compile.json" 2>&1 | tee "$OUT/compile.txt"
timeout 360 python3 kernels/bench.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
timeout 120 python3 kernels/bench.py --sweep --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.txt"
