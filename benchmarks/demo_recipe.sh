#!/usr/bin/env bash
# The README demo's training recipe, varied one setting at a time at its fixed 1,000 steps (2 CPU ranks, bf16
# where native, x_0 prediction, label dropout 0.1): each variant trained from scratch, then sampled as the demo
# samples (ancestral 50, guidance 2 in sigma (0.3, 5]) from its post-hoc EMA profiles, and scored by
# launch/evaluate.py at the demo's 64 samples (its seeds) and at 500 (where class accuracy has a standard
# error of about 0.01 and mnist_fd is no longer mostly sampling noise).
#
#   bash benchmarks/demo_recipe.sh OUT_DIR [VARIANT...]     (about 10 minutes a variant on 2 cores)
#
# Prints one "EVAL variant weights samples: ..." line per evaluation; the results are benchmarks/demo_recipe.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/demo_recipe.sh OUT_DIR [VARIANT...]}
shift
mkdir -p "$OUT"
BETAS99="$OUT/betas_0.9_0.99.json"
python3 -c "import json; c = json.load(open('ds_configs/cpu_bf16_auto.json'))
c['optimizer']['params']['betas'] = [0.9, 0.99]; json.dump(c, open('$BETAS99', 'w'))"

declare -A VARIANTS=(
  [linear_constant]="--lr 1e-3"  # the previous demo
  [linear_anneal]="--lr 1e-3 --lr_anneal_steps 1000"
  [linear_anneal_lr2e-3]="--lr 2e-3 --lr_anneal_steps 1000"
  [linear_anneal_betas99]="--lr 1e-3 --lr_anneal_steps 1000"
  [cosine_constant]="--lr 1e-3 --noise_schedule cosine"
  [cosine_anneal]="--lr 1e-3 --lr_anneal_steps 1000 --noise_schedule cosine"  # the demo now
)
declare -A CONFIG=([linear_anneal_betas99]="$BETAS99")  # the others: the demo's JSON
[ $# -gt 0 ] || set -- linear_constant linear_anneal linear_anneal_lr2e-3 linear_anneal_betas99 cosine_constant \
  cosine_anneal

evaluate() {  # evaluate VARIANT WEIGHTS SAMPLES
  local npz="$OUT/$1_$2_$3.npz"
  python3 launch/sample.py --run_dir "$OUT/$1" --model_path "$OUT/$1/$2.pt" --num_samples "$3" --batch_size 100 \
    --timestep_respacing 50 --guidance_scale 2 --guidance_interval 0.3,5 --precision auto --out "$npz" >/dev/null
  echo "EVAL $1 $2 $3: $(python3 launch/evaluate.py --samples "$npz" --metrics mnist_acc,mnist_fd,colour | tr '\n' ' ')"
}

for v in "$@"; do
  # shellcheck disable=SC2086  # the variant's flags are words
  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train.py \
    --deepspeed_config "${CONFIG[$v]:-ds_configs/cpu_bf16_auto.json}" \
    --log_dir "$OUT/$v" --image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2 \
    --attention_resolutions 8 --class_cond True --class_dropout_prob 0.1 --predict_xstart True --ema_rate 0.995 \
    --ema_profiles 0.05,0.1 --max_steps 1000 --log_interval 100 --save_interval 500 ${VARIANTS[$v]} \
    >"$OUT/$v.log" 2>&1
  for w in phema_0.05_001000 phema_0.1_001000; do
    evaluate "$v" "$w" 64
    evaluate "$v" "$w" 500
  done
done
