"""Multi-rank checks of the DeepSpeed training step, run by test_engine.py as
`deepspeed --num_gpus 2 tests/ds_scenarios.py [--compiled] OUT.json`. Rank 0 writes the measurements to
OUT.json. With --compiled, the checks of a UNet compiled through the JSON's compile section instead."""

import copy
import hashlib
import json
import os
import sys

import deepspeed.runtime.engine as ds_engine
import numpy as np
import torch
import torch.distributed as dist
from conftest import ONE_LEVEL, tiny_flags
from deepspeed.accelerator import get_accelerator

from iddpm_ds import dist_util
from iddpm_ds.image_datasets import load_data
from iddpm_ds.resample import LossSecondMomentResampler, UniformSampler
from iddpm_ds.script_util import create_model_and_diffusion
from iddpm_ds.seeding import seed_everything
from iddpm_ds.train_util import TrainLoop, create_engine

dist_util.setup_dist()
torch.set_num_threads(1)
# DeepSpeed refuses fp16 on CPU; the loss-scaler logic itself runs fine, so the test lets it.
get_accelerator().is_fp16_supported = lambda: True

RANK, WORLD = dist.get_rank(), dist.get_world_size()
OUT = sys.argv[-1]  # the deepspeed launcher puts --local_rank first
COMPILED = "--compiled" in sys.argv
RUN_DIR = os.path.join(os.path.dirname(OUT), "run")


def tiny():
    seed_everything(0)
    # One level: inductor's code generation (compiled) and every engine step grow with the graph.
    return create_model_and_diffusion(**tiny_flags(learn_sigma=True, **ONE_LEVEL))


def make_loop(
    stage, prec, micro_batch=4, grad_accum_steps=1, sampler=None, lr=1e-3, data=None, eps=1e-8, compiled=""
):
    """compiled: '' (eager) or the torch.compile backend the JSON's compile section names."""
    model, diffusion = tiny()
    cfg = {
        "compile": {"enabled": bool(compiled), "backend": compiled or "inductor"},
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum_steps,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "eps": eps}},
        "steps_per_print": 10**9,
        "fp16": {"enabled": prec == "fp16", "initial_scale_power": 8, "hysteresis": 1},
        "bf16": {"enabled": prec == "bf16"},
    }
    engine = create_engine(model, cfg)
    seed_everything(1 + RANK)
    data = data or load_data(
        data_dir="builtin:mnist", batch_size=micro_batch, image_size=8, num_workers=0, seed=0
    )
    loop = TrainLoop(
        engine=engine,
        diffusion=diffusion,
        data=data,
        schedule_sampler=sampler(diffusion) if sampler else UniformSampler(diffusion),
        ema_rate="0.9,0.5",
        run_dir=RUN_DIR,
        log_interval=10**9,
        save_interval=0,
        progress=False,
    )
    return loop


def eval_loss(loop, eager=False):
    """Loss on a fixed batch, timesteps and noise (same on every rank); eager=True bypasses a compiled
    UNet (the gradient-free graph would be one more compilation)."""
    g = torch.Generator().manual_seed(123)
    x = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    t = torch.randint(0, 20, (8,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        model = loop.engine.module.forward if eager else loop.engine
        return float(loop.diffusion.training_losses(model, x, t, noise=noise)["loss"].mean())


def master(loop):
    return loop.master.full_state_dict()


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def digest(arr) -> str:
    return hashlib.md5(np.ascontiguousarray(arr).tobytes()).hexdigest()


def ema_formula_error(loop, steps):
    """Run steps optimizer steps; the largest gap between the EMA and rate * ema + (1 - rate) * master applied
    after every applied step."""
    expected = {rate: master(loop) for rate in loop.ema_rates}
    for _ in range(steps):
        if loop.run_step():
            current = master(loop)
            for rate in loop.ema_rates:
                expected[rate] = {k: rate * expected[rate][k] + (1 - rate) * current[k] for k in current}
    got = loop.ema.full_state_dicts()
    return max(max_diff(expected[r], got[r]) for r in loop.ema_rates)


def all_equal_across_ranks(s: str) -> bool:
    out = [None] * WORLD
    dist.all_gather_object(out, s)
    return len(set(out)) == 1


results = {}


class Poisoned:
    """Wraps a data stream; the next micro-batch after arm() has one non-finite image."""

    def __init__(self, inner):
        self.inner, self.armed = inner, False
        self.skipped, self.epoch = 0, 0.0

    def arm(self):
        self.armed = True

    def __next__(self):
        x, cond = next(self.inner)
        if self.armed:
            x = x.clone()
            x[0] = float("inf")
            self.armed = False
        return x, cond


# A non-finite loss in fp32 / bf16 skips the step (DeepSpeed's ZeRO-0 fp32 optimizer would apply it) and is
# counted.
def nonfinite_case(stage, prec, compiled=""):
    stream = Poisoned(load_data(data_dir="builtin:mnist", batch_size=4, image_size=8, num_workers=0, seed=0))
    loop = make_loop(stage, prec, data=stream, compiled=compiled)
    loop.run_step()
    before, ema_before = master(loop), loop.ema.full_state_dicts()
    stream.arm()
    applied = loop.run_step()
    result = {
        "applied": bool(applied),
        "counted": loop.nonfinite_steps,
        "consecutive": loop.consecutive_nonfinite,
        "master_diff": max_diff(before, master(loop)),
        "ema_diff": max_diff(ema_before[0.9], loop.ema.full_state_dicts()[0.9]),
    }
    loop.run_step()
    result["consecutive_after_good_step"] = loop.consecutive_nonfinite
    return result


def eager_scenarios():
    # Every stage and precision trains: finite losses, and the loss on a fixed batch falls.
    for stage in (0, 1, 2, 3):
        for prec in ("fp32", "bf16", "fp16"):
            loop = make_loop(stage, prec)
            before = eval_loss(loop)
            for _ in range(15):
                loop.run_step()
            results[f"train_z{stage}_{prec}"] = {
                "before": before,
                "after": eval_loss(loop),
                "skipped": int(loop.engine.skipped_steps),
            }

    # fp32 ZeRO-2 matches ZeRO-0. (A larger Adam eps keeps near-zero gradients, whose reduction
    # order differs between stages, from being blown up to full-size updates.)
    finals = {}
    for stage in (0, 2):
        loop = make_loop(stage, "fp32", eps=1e-3)
        for _ in range(4):
            loop.run_step()
        finals[stage] = master(loop)
    results["zero2_vs_zero0"] = max_diff(finals[0], finals[2])

    # Micro-batch 4 x accumulation 2 == micro-batch 8 x 1 (same samples, timesteps and noise).
    finals = {}
    for micro_batch, grad_accum_steps in ((4, 2), (8, 1)):
        loop = make_loop(2, "fp32", micro_batch=micro_batch, grad_accum_steps=grad_accum_steps, eps=1e-3)
        for _ in range(3):
            loop.run_step()
        finals[(micro_batch, grad_accum_steps)] = master(loop)
    results["accumulation_vs_batch"] = max_diff(finals[(4, 2)], finals[(8, 1)])

    # Loss-aware sampler: identical on every rank, warmed up; EMA follows its formula at ZeRO-2 and ZeRO-3.
    for stage in (2, 3):
        loop = make_loop(
            stage, "fp32", micro_batch=8, sampler=lambda d: LossSecondMomentResampler(d, history_per_term=1)
        )
        results[f"ema_formula_z{stage}"] = ema_formula_error(loop, 10)
        results[f"sampler_identical_z{stage}"] = all_equal_across_ranks(
            digest(loop.sampler.weights()) + digest(loop.sampler._loss_history)
        )
        results[f"sampler_warm_z{stage}"] = bool(loop.sampler._warmed_up())
        # EMA memory per rank is a shard: about 1/WORLD of the parameters.
        results[f"ema_shard_fraction_z{stage}"] = sum(v.numel() for v in loop.ema.shadow[0.9].values()) / sum(
            p.numel() for _, p in loop.master.named
        )

    # An fp16 overflow skips the step and touches neither weights, EMA nor sampler.
    stream = Poisoned(load_data(data_dir="builtin:mnist", batch_size=4, image_size=8, num_workers=0, seed=0))
    loop = make_loop(
        2,
        "fp16",
        grad_accum_steps=2,
        sampler=lambda d: LossSecondMomentResampler(d, history_per_term=2),
        data=stream,
    )
    for _ in range(3):
        loop.run_step()
    snap_master, snap_ema = master(loop), copy.deepcopy(loop.ema.full_state_dicts())
    snap_hist, snap_counts = loop.sampler._loss_history.copy(), loop.sampler._loss_counts.copy()
    skipped_before, scale_before = int(loop.engine.skipped_steps), loop.engine.optimizer.cur_scale
    stream.arm()
    applied = loop.run_step()
    after_ema = loop.ema.full_state_dicts()
    results["fp16_overflow"] = {
        "applied": bool(applied),
        "skipped_delta": int(loop.engine.skipped_steps) - skipped_before,
        "scale_halved": float(loop.engine.optimizer.cur_scale) < float(scale_before),
        "master_diff": max_diff(snap_master, master(loop)),
        "ema_diff": max(max_diff(snap_ema[r], after_ema[r]) for r in loop.ema_rates),
        "sampler_unchanged": bool(
            np.array_equal(snap_hist, loop.sampler._loss_history)
            and np.array_equal(snap_counts, loop.sampler._loss_counts)
        ),
    }
    applied_next = loop.run_step()
    results["fp16_overflow"]["next_step_applied"] = bool(applied_next)

    for stage, prec in ((0, "fp32"), (2, "bf16")):
        results[f"nonfinite_z{stage}_{prec}"] = nonfinite_case(stage, prec)

    # ZeRO-0 fp16/bf16 as a GPU runs it: DeepSpeed's FusedAdam gets the FP16_Optimizer wrapper (one flat
    # fp32 master per parameter group) instead of the FP16_UnfusedOptimizer a CPU optimizer gets. AdamW
    # stands in for FusedAdam here, so this CPU run takes the GPU's path: the master weights must be found,
    # and the EMA must follow its formula.

    fused_adam, ds_engine.FusedAdam = ds_engine.FusedAdam, torch.optim.AdamW
    for prec in ("fp16", "bf16"):
        loop = make_loop(0, prec)
        before = eval_loss(loop)
        error = ema_formula_error(loop, 15)
        results[f"fused_wrapper_z0_{prec}"] = {
            "wrapper": type(loop.engine.optimizer).__name__,
            "before": before,
            "after": eval_loss(loop),
            "ema_formula": error,
        }
    results["nonfinite_z0_bf16_fused_wrapper"] = nonfinite_case(0, "bf16")
    ds_engine.FusedAdam = fused_adam


def compiled_scenarios():
    """A UNet compiled through the JSON's compile section, at fixed shapes: it matches the eager engine step
    for step at ZeRO 0-3 with accumulation, keeps the EMA formula and skips a non-finite step; in bf16 it
    trains and compiles once (no graph built after the first step). Inductor builds one graph of the
    one-level UNet (its C++ build takes most of a minute here), used at ZeRO-2 and for the EMA and the
    non-finite step; the other stages and bf16 go through aot_eager, the same traced graphs without code
    generation (what the stage changes is DeepSpeed's handling of the gradients the graph gives back)."""
    # Before ZeRO-3, which swaps torch.nn.functional.linear for its own (a guard on it would recompile).
    results["compiled_nonfinite_z0_fp32"] = nonfinite_case(0, "fp32", compiled="inductor")
    for stage, backend, steps in (
        (0, "aot_eager", 4),
        (1, "aot_eager", 4),
        (2, "inductor", 4),
        (3, "aot_eager", 2),
    ):
        finals = {}
        for compiled in ("", backend):
            loop = make_loop(stage, "fp32", grad_accum_steps=2, eps=1e-3, compiled=compiled)
            if compiled == "inductor":
                results["compiled_ema_formula_z2"] = ema_formula_error(loop, steps)
            else:
                for _ in range(steps):
                    loop.run_step()
            finals[compiled] = master(loop)
        results[f"compiled_vs_eager_z{stage}"] = max_diff(finals[""], finals[backend])
    loop = make_loop(2, "bf16", compiled="aot_eager")
    before = eval_loss(loop, eager=True)
    loop.run_step()
    graphs_after_first_step = loop.log.compiled_graphs()
    for _ in range(14):
        loop.run_step()
    results["compiled_train_z2_bf16"] = {
        "before": before,
        "after": eval_loss(loop, eager=True),
        "graphs_after_first_step": graphs_after_first_step,
        "graphs_after_15_steps": loop.log.compiled_graphs(),
    }


compiled_scenarios() if COMPILED else eager_scenarios()
if RANK == 0:
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1)
dist.barrier()
