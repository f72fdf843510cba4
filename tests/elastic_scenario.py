"""Used by test_faults: `train RUN OUT` (2 ranks) trains 3 steps at ZeRO-2 and saves; `resume RUN OUT`
(any rank count) resumes that checkpoint. Both dump the full fp32 master, EMA, a post-hoc EMA profile,
Adam moments, sampler history and data position to OUT (rank 0)."""

import os
import sys

import torch
import torch.distributed as dist
from conftest import tiny_flags
from deepspeed.utils import safe_get_full_optimizer_state

from iddpm_ds import dist_util
from iddpm_ds.checkpointing import find_latest_checkpoint, prepare_resume
from iddpm_ds.ema import profile_key
from iddpm_ds.image_datasets import load_data
from iddpm_ds.resample import LossSecondMomentResampler
from iddpm_ds.script_util import create_model_and_diffusion
from iddpm_ds.seeding import seed_everything
from iddpm_ds.train_util import TrainLoop, create_engine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
dist_util.setup_dist()
torch.set_num_threads(1)

mode, run_dir, out = sys.argv[-3:]
os.makedirs(run_dir, exist_ok=True)
world = dist.get_world_size()
seed_everything(0)
model, diffusion = create_model_and_diffusion(**tiny_flags())
cfg = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "steps_per_print": 10**9,
}
resume_dir = find_latest_checkpoint(run_dir) if mode == "resume" else None
load_tag = prepare_resume(resume_dir, world) if resume_dir else None
if load_tag:
    cfg["checkpoint"] = {"load_universal": True}
engine = create_engine(model, cfg)
seed_everything(1 + dist.get_rank())
data = load_data(data_dir="builtin:mnist", batch_size=4, image_size=8, num_workers=0)
loop = TrainLoop(
    engine=engine,
    diffusion=diffusion,
    data=data,
    schedule_sampler=LossSecondMomentResampler(diffusion, history_per_term=2),
    ema_rate="0.9",
    ema_profiles="0.05,0.1",
    run_dir=run_dir,
    log_interval=10**9,
    save_interval=0,
    progress=False,
)
if mode == "train":
    for _ in range(3):
        loop.run_step()
    loop.save()
else:
    loop.resume(resume_dir, load_tag)
state = {
    "master": loop.master.full_state_dict(),
    "ema": loop.ema.full_state_dicts()[0.9],
    "phema": loop.ema.full_state_dicts()[profile_key(0.1)],
    "exp_avg": {n: safe_get_full_optimizer_state(p, "exp_avg").clone() for n, p in loop.master.named},
    "exp_avg_sq": {n: safe_get_full_optimizer_state(p, "exp_avg_sq").clone() for n, p in loop.master.named},
    "sampler": torch.from_numpy(loop.sampler._loss_history.copy()),
    "position": data.position,
    "step": loop.step,
}
if dist.get_rank() == 0:
    torch.save(state, out)
dist.barrier()
