#!/usr/bin/env bash
# The one prepared GPU run: at most 9 minutes (each step has its own timeout, 520 s in all), in order
# of value, each step printing every measurement as it lands so a cut-off run still reports:
#   1. kernels/bench.py: the copy-bandwidth and bf16-matmul ceilings; each kernel's output and every gradient
#      checked on the device against float64; the kernels timed against eager / torch.compile / SDPA; then each
#      kernel goal as met / missed / not measured (kernels.json, rewritten after each section, and kernels.txt);
#   2. benchmarks/bench_train.py --kernels True: the 64 px training step with the kernels off and on, and its goal
#      (step.json, step.txt); it imports the package, so it needs deepspeed: carry the pure-Python wheel
#      (`pip wheel --no-deps deepspeed==0.19.8 -w wheels`), installed below with --no-deps;
#   3. benchmarks/bench_train.py --speed True --gpu True: the speed-goal rows on the 64 px ImageNet config (plain
#      eager fp32, our engine eager / compiled / compiled + channels_last, bf16), images/s, compile seconds and
#      step memory (speed.json, speed.txt); also needs the deepspeed wheel;
#   4. kernels/bench.py --sweep: every attention kernel's candidate tiles, checked and timed (sweep.json,
#      sweep.txt), to retune attention_triton.configs() from measurements.
# Steps 1 and 3 need neither deepspeed nor webdataset (the GPU image has neither). Registers and spills are already known
# for the image's Triton (benchmarks/compile_report.md, built on CPU), so they take no device time here.
# Run through the device tool from the repo root, with timeout_s 600 (the run ends by itself after 520 s):
#   bash benchmarks/gpu_check.sh            (writes under $OUT)
# then commit the outputs under benchmarks/ with the device name in the file names.
set -uo pipefail
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$OUT/device.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the GPU image has the repo, not the installed package
timeout 200 python3 kernels/bench.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
ls wheels/deepspeed-*.whl >/dev/null 2>&1 && pip install -q --no-deps wheels/deepspeed-*.whl
timeout 60 python3 benchmarks/bench_train.py --kernels True --batch_size 32 --steps 10 --out "$OUT/step.json" 2>&1 \
  | tee "$OUT/step.txt"
timeout 180 python3 benchmarks/bench_train.py --speed True --gpu True --steps 5 --rounds 3 --out "$OUT/speed.json" 2>&1 \
  | tee "$OUT/speed.txt"
timeout 80 python3 kernels/bench.py --sweep --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.txt"
