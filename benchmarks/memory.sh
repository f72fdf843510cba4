#!/usr/bin/env bash
# Per-rank state bytes at ZeRO 0-3 for 1, 2 and 4 CPU ranks, for improved-diffusion's 64 px and
# 256 px default UNets (fp32). Writes benchmarks/MEMORY.md. About 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/MEMORY.md
{
  echo "# Per-rank memory by ZeRO stage"
  echo
  echo "\`bash benchmarks/memory.sh\` on a 2-core CPU VM, $(date -u +%F), DeepSpeed 0.19.8, fp32, fused AdamW, one EMA rate."
  echo "Bytes each rank holds after one step, measured from its tensors (benchmarks/bench_train.py --memory)."
  for size in 64 256; do
    for ranks in 1 2 4; do
      echo; echo "## ${size} px config, ${ranks} rank(s)"; echo; echo '```'
      OMP_NUM_THREADS=1 deepspeed --num_gpus "$ranks" --master_port $((29960 + ranks)) benchmarks/bench_train.py --memory True \
        --image_size "$size" --deepspeed_config ds_configs/cpu.json 2>/dev/null | grep -vE '^\[20|^\{|^\[\{'
      echo '```'
    done
  done
} > "$out"
cat "$out"
