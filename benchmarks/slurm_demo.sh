#!/usr/bin/env bash
# The recorded SLURM run of benchmarks/SLURM.md: on a private one-node SLURM (launch/slurm/local_cluster.sh),
# the README demo's model trained by launch/slurm/train.sbatch under a 1-minute time limit, for a run that
# needs several minutes: it must finish through its own requeues, with no one watching. Needs root and
# Debian's slurm-wlm and munge.
#   sudo bash benchmarks/slurm_demo.sh [STEPS]        (prints the markdown; STEPS defaults to 600)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-600}
WORK=$(mktemp -d)
trap 'bash launch/slurm/local_cluster.sh stop "$WORK/slurm" >/dev/null; rm -rf "$WORK"' EXIT
bash launch/slurm/local_cluster.sh start "$WORK/slurm" >/dev/null
export SLURM_CONF=$WORK/slurm/slurm.conf
SUBMIT=(sbatch --wait --time=1 --signal=B:USR1@10 --output="$WORK/job.out" launch/slurm/train.sbatch
  --log_dir "$WORK/run" --deepspeed_config ds_configs/cpu_bf16_auto.json --image_size 32 --num_channels 32
  --num_res_blocks 1 --channel_mult 1,2,2 --attention_resolutions 8 --class_cond True --class_dropout_prob 0.1
  --lr 1e-3 --ema_rate 0.995 --max_steps "$STEPS" --log_interval 50 --save_interval 200)
start=$SECONDS
"${SUBMIT[@]}" >/dev/null
seconds=$((SECONDS - start))
echo "# A SLURM job that outlives its time limit"
echo
echo "$(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; SLURM $(sinfo -V | cut -d' ' -f2) on"
echo "one node (\`launch/slurm/local_cluster.sh\`), \`bash benchmarks/slurm_demo.sh $STEPS\`. The command:"
echo
echo '```'
echo "${SUBMIT[*]}" | sed "s|$WORK|\$WORK|g"
echo '```'
echo
echo "The job ran $STEPS optimizer steps of the README demo's model through $(grep -c ' start [0-9]* on ' "$WORK/job.out")"
echo "allocations of at most one minute each in $seconds s of wall time, requeueing itself each time (the"
echo "lines below are the batch script's and train.py's own, progress lines left out; \`sbatch --wait\`"
echo "returned when the job ended). Resumed steps and checkpoints:"
echo
echo '```'
grep -E ' start [0-9]+ on |SIGUSR1|stopping after|saved checkpoint|requeued|resumed from|ended with|done at' \
  "$WORK/job.out" | sed "s|$WORK|\$WORK|g" | cut -c1-160
echo '```'
