#!/usr/bin/env bash
# The one prepared GPU run, at most 9 minutes (each step has its own time limit, 530 s in all), in order of
# value, each step printing its measurements as they land so a cut-off run still reports:
#   1. kernels/bench.py: copy-bandwidth and bf16-matmul ceilings; each kernel's output and every gradient
#      checked on the device against float64 (the kernels' self-check lines too); the kernels timed against
#      eager / torch.compile / SDPA; each kernel goal met / missed / not measured (kernels.json);
#   2. the engine end to end: launch/train.py under the deepspeed launcher, 30 steps of improved-diffusion's
#      64 px ImageNet model (128 channels, 3 res blocks, attention 16,8, learn_sigma, micro-batch 32) on the
#      built-in digits, with ds_configs/zero2.json (fp16, dynamic loss scaling) and ds_configs/bf16.json,
#      kernels on, then off: images/s, peak memory, the loss-scale trajectory, the self-check lines;
#   3. the fp16 run restarted: it resumes from its step-30 checkpoint for 5 more steps; 4 samples from it
#      with launch/sample.py on the GPU (samples.png); gpu_engine_summary.py writes engine.json;
#   4. benchmarks/bench_train.py --kernels True (the 64 px step, kernels off / on, same inputs) and --speed
#      --gpu (plain eager fp32, our engine eager / compiled / channels_last, bf16) (step.json, speed.json);
#   5. kernels/bench.py --sweep: every attention kernel's candidate tiles, checked and timed (sweep.json).
# The image lacks DeepSpeed, webdataset and the built-in digits' package: `bash benchmarks/gpu_wheels.sh` here
# first, then one device call from the repo root, carrying the wheels, with timeout_s 600:
#   bash benchmarks/gpu_check.sh                    (run: carry [".whl"]; everything lands in $OUT)
# and commit $OUT under benchmarks/ with the device name. `--dry-run` runs every command here, on the CPU, at
# tiny shapes (the Triton interpreter for the kernels, a CPU rank for the engine), writing the same files, and
# checks that the wheels install for the image's Python 3.12: so the one GPU call cannot fail on a typo or a
# missing wheel (tests/test_gpu_check.py runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-benchmarks/out}
RUNS=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.txt") 2>&1
export PYTHONUNBUFFERED=1
BUDGET=530
# A dry run checks commands, not speed: on a shared 2-core CPU (the test suite runs beside it) its steps get
# four times the GPU run's limits.
SLACK=1
[ "$DRY" = 1 ] && SLACK=4 && BUDGET=$((BUDGET * SLACK))
START=$SECONDS

# step NAME SECONDS CMD...: run CMD with at most SECONDS (less if the budget is nearly spent), and say how it
# ended.
step() {
  local name=$1 limit=$(($2 * SLACK)) left=$((BUDGET - (SECONDS - START)))
  shift 2
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped (the 9-minute budget is spent)"
    return
  fi
  echo "== $name (at most ${limit} s) $(date -u +%H:%M:%S)"
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "== $name: exit $? after $((SECONDS - t0)) s"
}

# Where the packages come from: the wheels on the GPU; here, the installed environment, after checking that
# the wheels install for Python 3.12.
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$RUNS/site" --python-version 3.12 \
      --only-binary=:all: "$WHEELS"/*.whl && echo "wheels: $(ls "$WHEELS" | tr '\n' ' ')install for Python 3.12"
  else
    echo "wheels: none in $WHEELS/ (bash benchmarks/gpu_wheels.sh makes them)"
  fi
  echo "device: cpu (dry run), $(date -u +%Y-%m-%d)"
  SMOKE=(--smoke)
  TINY=(--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1 --attention_resolutions 8
    --num_heads 2 --diffusion_steps 20 --noise_schedule cosine)
  MODEL=("${TINY[@]}" --learn_sigma True --batch_size 1)
  STEPS=1 MORE=1 RESPACING=ddim10  # a step with interpreted kernels takes seconds
  # Sampling and the speed rows run the UNet without the interpreter (it takes seconds a step).
  PLAIN=(env -u TRITON_INTERPRET)
  # aot_eager: the compiled rows without inductor's C++ build (minutes on a small CPU).
  python3 -c "import json; c = json.load(open('ds_configs/cpu.json')); c['compile'] = {'backend': 'aot_eager'}
json.dump(c, open('$RUNS/cpu_aot_eager.json', 'w'))"
  SPEED=(--deepspeed_config "$RUNS/cpu_aot_eager.json" --steps 1 --rounds 2 --warmup 1 --batch_size 2 "${TINY[@]}")
  KERNEL_STEP=(--batch_size 1 --steps 1 --warmup 0 "${TINY[@]}")
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || { echo "gpu_check.sh: the wheels did not install: bash benchmarks/gpu_wheels.sh, carry .whl"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  SMOKE=()
  MODEL=(--image_size 64 --num_channels 128 --num_res_blocks 3 --attention_resolutions 16,8 --learn_sigma True
    --diffusion_steps 4000 --noise_schedule cosine)
  STEPS=30 MORE=5 RESPACING=ddim25
  PLAIN=()
  SPEED=(--gpu True --steps 5 --rounds 3)
  KERNEL_STEP=(--batch_size 32 --steps 10)
fi
python3 -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}')"

# 1. The kernels on the device.
step kernels 150 python3 kernels/bench.py "${SMOKE[@]}" --out "$OUT/kernels.json"

# 2. The engine end to end: fp16 (dynamic loss scaling) and bf16, kernels on and off.
# A free port per run, not a fixed one: a fixed port was found held (EADDRINUSE) when the dry run ran beside
# the other tests, and a finished run's processes can hold theirs a while after it ends.
train() {  # train TITLE SECONDS RUN_NAME JSON KERNELS MAX_STEPS
  local port
  port=$(python3 -c "from iddpm_ds.dist_util import free_port; print(free_port())")
  step "$1" "$2" deepspeed --num_gpus 1 --master_port "$port" launch/train.py --deepspeed_config "ds_configs/$4" \
    --log_dir "$RUNS/$3" --data_dir builtin:mnist --num_workers 2 --max_steps "$6" --log_interval 1 \
    --save_interval "$STEPS" --use_fused_kernels "$5" "${MODEL[@]}"
}
train "engine fp16, kernels on" 80 fp16_kernels zero2.json True "$STEPS"
# The dry run skips both bf16 runs: each is an fp16 command with bf16.json instead of zero2.json, and every
# shipped JSON builds an engine in tests/test_ds_config.py; with the kernels on, interpreted, it would be the
# dry run's costliest step.
if [ "$DRY" = 1 ]; then
  echo "== engine bf16, kernels on and off: skipped (dry run: the fp16 commands with the bf16 run's JSON)"
else
  train "engine bf16, kernels on" 60 bf16_kernels bf16.json True "$STEPS"
fi
train "engine fp16, kernels off" 45 fp16_reference zero2.json False "$STEPS"
[ "$DRY" = 1 ] || train "engine bf16, kernels off" 45 bf16_reference bf16.json False "$STEPS"

# 3. Resume and sample.
train "engine fp16, resumed for $MORE more steps" 45 fp16_kernels zero2.json True $((STEPS + MORE))
step "4 samples on the device" 30 "${PLAIN[@]}" python3 launch/sample.py --run_dir "$RUNS/fp16_kernels" --num_samples 4 \
  --batch_size 4 --timestep_respacing "$RESPACING" --out "$RUNS/samples.npz"
cp "$RUNS/samples.png" "$OUT/samples.png"
python3 benchmarks/gpu_engine_summary.py "$RUNS" --out "$OUT/engine.json"

# 4. The training step's rows.
step "training step, kernels off / on" 35 python3 benchmarks/bench_train.py --kernels True "${KERNEL_STEP[@]}" \
  --out "$OUT/step.json"
step "speed rows" 60 "${PLAIN[@]}" python3 benchmarks/bench_train.py --speed True "${SPEED[@]}" --out "$OUT/speed.json"

# 5. Attention tiles.
step "attention tile sweep" 40 python3 kernels/bench.py --sweep "${SMOKE[@]}" --out "$OUT/sweep.json"
echo "== done in $((SECONDS - START)) s; outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$RUNS"
