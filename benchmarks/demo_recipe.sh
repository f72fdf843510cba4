#!/usr/bin/env bash
# The README demo's training recipe, varied one setting at a time (2 CPU ranks, bf16 where native, x_0
# prediction, label dropout 0.1; 1,000 steps of batch 32 unless the variant says otherwise): each variant
# trained from scratch, then sampled as the demo samples (ancestral 50, guidance 2 in sigma (0.3, 5]) from its
# post-hoc EMA profiles at its last step, and scored by launch/evaluate.py at the demo's 64 samples (its seeds)
# and at 500 (where class accuracy has a standard error of about 0.01 and mnist_fd is no longer mostly sampling
# noise).
#
#   bash benchmarks/demo_recipe.sh OUT_DIR [VARIANT...]     (about 10 minutes a variant on 2 cores)
#
# Without VARIANTs it runs the first table's six (linear_constant ... cosine_anneal); the levers tried at the
# demo's minutes (cosine_anneal_seed1, _loss_aware, _batch16, _batch16_lr7e-4, _batch16_loss_aware[_seed1],
# _batch8), with more steps (cosine_anneal_1500, _1500_seed1, _2000) and with improved-diffusion's 32 px
# channel_mult 1,2,2,2 (cosine_anneal_mult2222[_seed1], its _batch16[_seed1], _1500[_seed1], _3000 and label
# dropout 0.2, _drop0.2[_seed1]; the demo's shape since the fourth session: the base command below keeps the
# 1,2,2 the earlier tables measured), and the fifth session's attention at 4 px too (_mult2222_att84), a 4 px
# level of 128 channels (cosine_anneal_mult2224) and the high-noise timestep sampler (_mult2222_high_noise),
# each with _seed1 (and _seed2 for cosine_anneal_mult2222 and its _high_noise; the latter also at 3,000 steps,
# _high_noise_3000, and, in the sixth session, at 1,250: _high_noise_1250[_seed1,_seed2]; the seventh session's
# fp32 runs of the high-noise recipe at 1,000 and 1,250 steps: _high_noise_fp32, _high_noise_1250_fp32), run
# when named.
#
# Prints one "EVAL variant weights samples: ..." line per evaluation; the results are benchmarks/demo_recipe.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/demo_recipe.sh OUT_DIR [VARIANT...]}
shift
mkdir -p "$OUT"
derive_config() {  # derive_config NAME PYTHON_STATEMENT: the demo's JSON with one change, as $OUT/NAME.json
  python3 -c "import json; c = json.load(open('ds_configs/cpu_bf16_auto.json')); $2
json.dump(c, open('$OUT/$1.json', 'w'))"
}
derive_config betas_0.9_0.99 "c['optimizer']['params']['betas'] = [0.9, 0.99]"
derive_config micro_batch_8 "c['train_micro_batch_size_per_gpu'] = 8"  # batch 16 on the 2 ranks
derive_config micro_batch_4 "c['train_micro_batch_size_per_gpu'] = 4"  # batch 8
COSINE="--lr 1e-3 --noise_schedule cosine"
MULT2222="--channel_mult 1,2,2,2"  # improved-diffusion's 32 px shape, the demo's since the fourth session

declare -A VARIANTS=(
  [linear_constant]="--lr 1e-3"  # the previous demo
  [linear_anneal]="--lr 1e-3 --lr_anneal_steps 1000"
  [linear_anneal_lr2e-3]="--lr 2e-3 --lr_anneal_steps 1000"
  [linear_anneal_betas99]="--lr 1e-3 --lr_anneal_steps 1000"
  [cosine_constant]="--lr 1e-3 --noise_schedule cosine"
  [cosine_anneal]="$COSINE --lr_anneal_steps 1000"  # the demo now
  [cosine_anneal_seed1]="$COSINE --lr_anneal_steps 1000 --seed 1"  # the run-to-run spread
  [cosine_anneal_loss_aware]="$COSINE --lr_anneal_steps 1000 --schedule_sampler loss-second-moment"
  [cosine_anneal_batch16]="$COSINE --lr_anneal_steps 2000"
  [cosine_anneal_batch16_lr7e-4]="--lr 7e-4 --noise_schedule cosine --lr_anneal_steps 2000"
  [cosine_anneal_batch16_loss_aware]="$COSINE --lr_anneal_steps 2000 --schedule_sampler loss-second-moment"
  [cosine_anneal_batch16_loss_aware_seed1]="$COSINE --lr_anneal_steps 2000 --schedule_sampler loss-second-moment
    --seed 1"
  [cosine_anneal_batch8]="$COSINE --lr_anneal_steps 4000"
  [cosine_anneal_1500]="$COSINE --lr_anneal_steps 1500"  # more training: 1.5x and 2x the demo's
  [cosine_anneal_1500_seed1]="$COSINE --lr_anneal_steps 1500 --seed 1"
  [cosine_anneal_2000]="$COSINE --lr_anneal_steps 2000"
  [cosine_anneal_mult2222]="$COSINE --lr_anneal_steps 1000 $MULT2222"  # a 4 px level: about 4% slower a step
  [cosine_anneal_mult2222_seed1]="$COSINE --lr_anneal_steps 1000 $MULT2222 --seed 1"
  [cosine_anneal_mult2222_batch16]="$COSINE --lr_anneal_steps 2000 $MULT2222"
  [cosine_anneal_mult2222_batch16_seed1]="$COSINE --lr_anneal_steps 2000 $MULT2222 --seed 1"
  [cosine_anneal_mult2222_1500]="$COSINE --lr_anneal_steps 1500 $MULT2222"
  [cosine_anneal_mult2222_1500_seed1]="$COSINE --lr_anneal_steps 1500 $MULT2222 --seed 1"
  [cosine_anneal_mult2222_3000]="$COSINE --lr_anneal_steps 3000 $MULT2222"
  [cosine_anneal_mult2222_drop0.2]="$COSINE --lr_anneal_steps 1000 $MULT2222 --class_dropout_prob 0.2"
  [cosine_anneal_mult2222_drop0.2_seed1]="$COSINE --lr_anneal_steps 1000 $MULT2222 --class_dropout_prob 0.2
    --seed 1"
  [cosine_anneal_mult2222_att84]="$COSINE --lr_anneal_steps 1000 $MULT2222 --attention_resolutions 8,4"
  [cosine_anneal_mult2222_att84_seed1]="$COSINE --lr_anneal_steps 1000 $MULT2222 --attention_resolutions 8,4
    --seed 1"
  [cosine_anneal_mult2224]="$COSINE --lr_anneal_steps 1000 --channel_mult 1,2,2,4"
  [cosine_anneal_mult2224_seed1]="$COSINE --lr_anneal_steps 1000 --channel_mult 1,2,2,4 --seed 1"
  [cosine_anneal_mult2222_high_noise]="$COSINE --lr_anneal_steps 1000 $MULT2222 --schedule_sampler high-noise"
  [cosine_anneal_mult2222_high_noise_seed1]="$COSINE --lr_anneal_steps 1000 $MULT2222 --schedule_sampler high-noise
    --seed 1"
  [cosine_anneal_mult2222_high_noise_3000]="$COSINE --lr_anneal_steps 3000 $MULT2222 --schedule_sampler high-noise"
  [cosine_anneal_mult2222_seed2]="$COSINE --lr_anneal_steps 1000 $MULT2222 --seed 2"
  [cosine_anneal_mult2222_high_noise_seed2]="$COSINE --lr_anneal_steps 1000 $MULT2222 --schedule_sampler high-noise
    --seed 2"
  [cosine_anneal_mult2222_high_noise_1250]="$COSINE --lr_anneal_steps 1250 $MULT2222 --schedule_sampler high-noise"
  [cosine_anneal_mult2222_high_noise_1250_seed1]="$COSINE --lr_anneal_steps 1250 $MULT2222
    --schedule_sampler high-noise --seed 1"
  [cosine_anneal_mult2222_high_noise_1250_seed2]="$COSINE --lr_anneal_steps 1250 $MULT2222
    --schedule_sampler high-noise --seed 2"
  [cosine_anneal_mult2222_high_noise_fp32]="$COSINE --lr_anneal_steps 1000 $MULT2222 --schedule_sampler high-noise"
  [cosine_anneal_mult2222_high_noise_1250_fp32]="$COSINE --lr_anneal_steps 1250 $MULT2222
    --schedule_sampler high-noise"
)
declare -A CONFIG=(  # the others: the demo's JSON
  [linear_anneal_betas99]="$OUT/betas_0.9_0.99.json"
  [cosine_anneal_batch16]="$OUT/micro_batch_8.json"
  [cosine_anneal_batch16_lr7e-4]="$OUT/micro_batch_8.json"
  [cosine_anneal_batch16_loss_aware]="$OUT/micro_batch_8.json"
  [cosine_anneal_batch16_loss_aware_seed1]="$OUT/micro_batch_8.json"
  [cosine_anneal_batch8]="$OUT/micro_batch_4.json"
  [cosine_anneal_mult2222_batch16]="$OUT/micro_batch_8.json"
  [cosine_anneal_mult2222_batch16_seed1]="$OUT/micro_batch_8.json"
  [cosine_anneal_mult2222_high_noise_fp32]="ds_configs/cpu.json"  # fp32 on any CPU: another trajectory
  [cosine_anneal_mult2222_high_noise_1250_fp32]="ds_configs/cpu.json"
)
[ $# -gt 0 ] || set -- linear_constant linear_anneal linear_anneal_lr2e-3 linear_anneal_betas99 cosine_constant \
  cosine_anneal

evaluate() {  # evaluate VARIANT WEIGHTS SAMPLES
  local npz="$OUT/$1_$2_$3.npz"
  python3 launch/sample.py --run_dir "$OUT/$1" --model_path "$OUT/$1/$2.pt" --num_samples "$3" --batch_size 100 \
    --timestep_respacing 50 --guidance_scale 2 --guidance_interval 0.3,5 --precision auto --out "$npz" >/dev/null
  echo "EVAL $1 $2 $3: $(python3 launch/evaluate.py --samples "$npz" --metrics mnist_acc,mnist_fd,colour | tr '\n' ' ')"
}

for v in "$@"; do
  [ -n "${VARIANTS[$v]+set}" ] || { echo "demo_recipe.sh: unknown variant $v (known: ${!VARIANTS[*]})" >&2; exit 2; }
done
for v in "$@"; do
  steps=1000  # a variant that anneals the lr trains to the end of its schedule
  [[ ${VARIANTS[$v]} =~ --lr_anneal_steps\ ([0-9]+) ]] && steps=${BASH_REMATCH[1]}
  start=$SECONDS
  # shellcheck disable=SC2086  # the variant's flags are words
  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train.py \
    --deepspeed_config "${CONFIG[$v]:-ds_configs/cpu_bf16_auto.json}" \
    --log_dir "$OUT/$v" --image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2 \
    --attention_resolutions 8 --class_cond True --class_dropout_prob 0.1 --predict_xstart True --ema_rate 0.995 \
    --ema_profiles 0.05,0.1 --max_steps "$steps" --log_interval 100 --save_interval $((steps / 2)) ${VARIANTS[$v]} \
    >"$OUT/$v.log" 2>&1
  echo "TRAIN $v: $steps steps in $((SECONDS - start)) s (launch to exit)"
  for w in $(printf 'phema_0.05_%06d phema_0.1_%06d' "$steps" "$steps"); do
    evaluate "$v" "$w" 64
    evaluate "$v" "$w" 500
  done
done
