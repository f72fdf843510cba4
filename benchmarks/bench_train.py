"""Training throughput and per-rank memory: the DeepSpeed engine against a plain PyTorch loop.

    deepspeed --num_gpus 2 benchmarks/bench_train.py --deepspeed_config ds_configs/cpu.json [model flags]
    [--steps 20]
    deepspeed --num_gpus 4 benchmarks/bench_train.py --memory True --image_size 256 [--out mem.json]
    python benchmarks/bench_train.py --kernels True --batch_size 32    (GPU: the 64 px step, kernels off / on)
    python benchmarks/bench_train.py --speed True [--improved_diffusion DIR] [--gpu True] [--out speed.json]

--speed times, in one process and in alternating rounds (so drift of a shared
machine hits every row alike), improved-diffusion's way of training (its own
TrainLoop from DIR when given; our UNet with no fusion, no compile and its
plain AdamW), then our engine eager, compiled, compiled + channels_last, and
in bf16 where the device has it (AMX-BF16 / AVX512-BF16 on CPU): images/s,
seconds per step, the first step's (compile) seconds and the peak memory a
step adds. On improved-diffusion's small 32 px config and the README demo's
(--gpu: its 64 px ImageNet config), or on the one config that model flags on
the command line give (micro-batch --batch_size), ending with the speed goals
met or missed.

--memory instead measures, at ZeRO 0, 1, 2 and 3 in turn, the bytes each rank
holds in parameters, gradients (after backward, before the step), optimizer
state (fp32 master copies and Adam moments) and EMA. Those depend on the
parameters only, so the step runs on --memory_input_size inputs (default 32
px) whatever --image_size the model is built for.

Both loops train the same model on the same micro-batch with the same
diffusion loss and a fused AdamW; the plain loop uses torch DDP when there is
more than one rank. Reports images/s (all ranks), the engine's overhead, and
per-rank bytes of parameters, fp32 master + optimizer state, and EMA, as
measured from the tensors each rank holds. Prints a table, then one JSON line.
"""

import contextlib
import json
import os
import platform
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from iddpm_ds import dist_util
from iddpm_ds.ds_config import OVERRIDE_FLAGS, precision, resolve
from iddpm_ds.ds_config import load as load_ds_config
from iddpm_ds.flags import HELP, ConfigError, parse_command_line, run_cli, validate_model_flags
from iddpm_ds.resample import UniformSampler
from iddpm_ds.script_util import (
    NUM_CLASSES,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from iddpm_ds.seeding import seed_everything
from iddpm_ds.train_log import state_bytes, tensor_bytes
from iddpm_ds.train_util import TrainLoop, create_engine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULTS = dict(
    steps=20,
    warmup=3,
    ema_rate="0.9999",
    **OVERRIDE_FLAGS,
    memory=False,
    memory_input_size=32,
    kernels=False,
    speed=False,
    improved_diffusion="",
    rounds=5,
    gpu=False,
    out="",
)

BENCH_HELP = {
    "steps": "timed optimizer steps per row",
    "warmup": "untimed steps first",
    "ema_rate": "EMA rates kept by the engine",
    "memory": "measure per-rank bytes at ZeRO 0-3 instead of speed",
    "memory_input_size": "input side for --memory",
    "kernels": "instead time the UNet's bf16 step with the fused kernels off and on (one process, no "
    "DeepSpeed; --batch_size images)",
    "speed": "instead time the rows of the speed goals (see above): --steps per round, --rounds rounds",
    "improved_diffusion": "--speed: a checkout of openai/improved-diffusion (its TrainLoop is the anchor "
    "row)",
    "rounds": "--speed: timed rounds per row, alternating between rows (the median counts)",
    "gpu": "--speed: the 64 px ImageNet config instead of the CPU configs",
    "out": "also write the JSON here",
}


class SyntheticData:
    """Endless fixed random batches for the model the flags describe (with labels where it is
    class-conditional): the benchmark measures the step, not the loader. size: the input side, default
    the model's image_size."""

    skipped, epoch = 0, 0.0

    def __init__(self, flags: dict, micro_batch: int, size: Optional[int] = None):
        g = torch.Generator().manual_seed(0)
        size = size or flags["image_size"]
        self.x = torch.rand(micro_batch, 3, size, size, generator=g) * 2 - 1
        labels = torch.randint(0, NUM_CLASSES, (micro_batch,), generator=g)
        self.cond = {"y": labels} if flags["class_cond"] else {}

    def __next__(self):
        return self.x, self.cond


def report(result, out: str) -> None:
    """The benchmark's result as one JSON line, and in the file out when given."""
    print(json.dumps(result))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


def bench_loop(engine, diffusion, data, ema_rate: str) -> TrainLoop:
    """The training loop the benchmarks step by hand: uniform timesteps, no logging, saving or progress."""
    return TrainLoop(
        engine=engine,
        diffusion=diffusion,
        data=data,
        schedule_sampler=UniformSampler(diffusion),
        ema_rate=ema_rate,
        run_dir=".",
        log_interval=10**9,
        save_interval=0,
        progress=False,
    )


def loop_bytes(loop: TrainLoop) -> dict:
    """The bytes a TrainLoop's rank holds (train_log.state_bytes)."""
    return state_bytes(loop.engine, (t for shadow in loop.ema.shadow.values() for t in shadow.values()))


def optimizer_state_bytes(opt) -> int:
    """fp32 master copies and Adam moments held by this rank (DeepSpeed wraps a torch optimizer)."""
    inner = getattr(opt, "optimizer", opt)
    total = tensor_bytes(
        v for state in inner.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0
    )
    masters = [p for g in inner.param_groups for p in g["params"]]
    return total + tensor_bytes(masters)


def time_steps(step_fn, steps, warmup) -> float:
    """Wall seconds of `steps` calls after `warmup` untimed ones, every rank and the GPU caught up."""

    def settle():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()

    for _ in range(warmup):
        step_fn()
    settle()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    settle()
    return time.perf_counter() - t0


KERNEL_STEP_GOAL = 1.3  # the UNet step's speed-up with the fused kernels on, bf16 on a GPU


def kernels_step(flags: dict, batch: int, steps: int, warmup: int) -> dict:
    """images/s of the UNet's training step (bf16 weights, AdamW, one process) with the fused kernels off
    and on, and the loss and gradients of one fixed batch each way (same weights, t and noise), which
    show that both paths train the same model."""
    from kernels import dispatch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = flags["image_size"]
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)
    noise = torch.randn(batch, 3, size, size, generator=gen).to(device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "batch": batch}
    grads = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model, diffusion = create_model_and_diffusion(**{**flags, "use_fused_kernels": fused})
        weights = torch.Generator().manual_seed(2)
        # Zero-initialised output convs make the output 0 and the loss mean(noise^2), whatever the blocks
        # compute: random ones make the comparison see every block.
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=weights) * 0.02)
        model.to(device=device, dtype=torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        t_fixed = torch.linspace(0, diffusion.num_timesteps - 1, batch, device=device).long()
        loss = diffusion.training_losses(model, x, t_fixed, noise=noise)["loss"].mean()
        loss.backward()
        grads[fused] = torch.cat([p.grad.float().flatten() for p in model.parameters()])

        def step():
            t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
            opt.zero_grad(set_to_none=True)
            diffusion.training_losses(model, x, t)["loss"].mean().backward()
            opt.step()

        seconds = time_steps(step, steps, warmup)
        result["kernels_on" if fused else "kernels_off"] = {
            "images_per_s": steps * batch / seconds,
            "loss_fixed_batch": loss.item(),
        }
    result["fell_back_to_reference"] = dispatch.fallbacks()
    result["speedup"] = result["kernels_on"]["images_per_s"] / result["kernels_off"]["images_per_s"]
    off, on = result["kernels_off"]["loss_fixed_batch"], result["kernels_on"]["loss_fixed_batch"]
    result["loss_rel_diff"] = abs(on - off) / abs(off)
    result["grad_rel_diff"] = float((grads[True] - grads[False]).abs().max() / grads[False].abs().max())
    return result


def kernels_step_verdict(r: dict) -> Optional[bool]:
    """The speed-up goal met / missed, or None where the kernels did not run on a GPU throughout."""
    if r["device"] == "cpu" or r["fell_back_to_reference"]:
        return None
    return r["speedup"] >= KERNEL_STEP_GOAL


def print_kernels_step(r: dict, size: int) -> None:
    on, off = r["kernels_on"], r["kernels_off"]
    print(
        f"{size} px training step on {r['device']}, batch {r['batch']}, bf16: kernels off "
        f"{off['images_per_s']:.1f} img/s, on {on['images_per_s']:.1f} img/s, speed-up {r['speedup']:.2f}x; "
        f"fixed-batch loss off {off['loss_fixed_batch']:.6f} on {on['loss_fixed_batch']:.6f}, gradients "
        f"differ by {r['grad_rel_diff']:.1e} of their max; fell back: {r['fell_back_to_reference'] or 'none'}"
    )
    verdict = {True: "met", False: "MISSED", None: "not measured (no GPU kernels ran)"}[
        kernels_step_verdict(r)
    ]
    print(f"goal: speed-up with kernels on >= {KERNEL_STEP_GOAL}x: {verdict}")


def plain_pytorch(flags, cfg, args, device, world):
    """Seconds for args.steps steps of a plain loop (same model, batch, loss, fused AdamW; DDP), and its
    tensor bytes."""
    micro_batch, grad_accum_steps = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    seed_everything(0)
    model, diffusion = create_model_and_diffusion(**flags)
    model.to(device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision(cfg))
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    sampler = UniformSampler(diffusion)
    data = SyntheticData(flags, micro_batch)

    def step():
        opt.zero_grad(set_to_none=True)
        for _ in range(grad_accum_steps):
            x, cond = next(data)
            t, w = sampler.sample(micro_batch, device)
            cond = {k: v.to(device) for k, v in cond.items()}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                losses = diffusion.training_losses(net, x.to(device), t, model_kwargs=cond)
                loss = (losses["loss"] * w).mean() / grad_accum_steps
            loss.backward()
        opt.step()

    seconds = time_steps(step, args.steps, args.warmup)
    return seconds, {"params": tensor_bytes(model.parameters()), "optimizer": optimizer_state_bytes(opt)}


def grad_bytes(engine) -> int:
    """Gradient bytes this rank holds: module .grad plus the ZeRO optimizer's gradient partitions."""
    opt = engine.optimizer
    tensors = [p.grad for p in engine.module.parameters()]
    inner = getattr(opt, "optimizer", opt)
    tensors += [p.grad for g in inner.param_groups for p in g["params"]]
    for attr in ("averaged_gradients", "ipg_buffer", "grads_in_partition"):
        held = getattr(opt, attr, None)
        if isinstance(held, dict):
            held = [t for v in held.values() for t in (v if isinstance(v, (list, tuple)) else [v])]
        if isinstance(held, (list, tuple)):
            tensors += [t for t in held if torch.is_tensor(t)]
        elif torch.is_tensor(held):
            tensors.append(held)
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def memory_table(flags, base_cfg, args, world) -> list:
    """Per-rank state bytes at each ZeRO stage after one step (rank 0's; ZeRO shards are equal up to
    padding)."""
    rows = []
    for stage in (0, 1, 2, 3):
        cfg = {**base_cfg, "zero_optimization": {**base_cfg.get("zero_optimization", {}), "stage": stage}}
        seed_everything(0)
        model, diffusion = create_model_and_diffusion(**flags)
        engine = create_engine(model, cfg, lr=args.lr)
        data = SyntheticData(flags, cfg["train_micro_batch_size_per_gpu"], args.memory_input_size)
        loop = bench_loop(engine, diffusion, data, args.ema_rate)
        x, cond = next(loop.data)
        t, _ = loop.sampler.sample(x.shape[0], engine.device)
        cond = {k: v.to(engine.device) for k, v in cond.items()}
        losses = diffusion.training_losses(engine, x.to(engine.device), t, model_kwargs=cond)
        engine.backward(losses["loss"].mean())
        grads = grad_bytes(engine)
        engine.step()
        rows.append({"zero_stage": stage, "world_size": world, "grads": grads, **loop_bytes(loop)})
        del loop, engine, model
    return rows


# ---------------------------------------------------------------------------------------------- --speed
# improved-diffusion's small 32 px config (64 channels), the README demo's, and (--gpu) its 64 px ImageNet
# config; micro-batches per process.
SPEED_CONFIGS = {
    "small32": (
        dict(
            image_size=32,
            num_channels=64,
            num_res_blocks=2,
            attention_resolutions="16,8",
            learn_sigma=True,
            noise_schedule="cosine",
        ),
        16,
    ),
    "demo": (
        dict(
            image_size=32,
            num_channels=32,
            num_res_blocks=1,
            channel_mult="1,2,2",
            attention_resolutions="8",
            class_cond=True,
            class_dropout_prob=0.1,
        ),
        16,
    ),
}
GPU_SPEED_CONFIGS = {
    "imagenet64": (
        dict(
            image_size=64,
            num_channels=128,
            num_res_blocks=3,
            learn_sigma=True,
            noise_schedule="cosine",
            diffusion_steps=4000,
        ),
        32,
    ),
}
# (row, precision, compiled, channels_last) of our engine, after improved-diffusion's way.
ENGINE_ROWS = (
    ("engine fp32", "fp32", False, False),
    ("engine fp32 compiled", "fp32", True, False),
    ("engine fp32 compiled channels_last", "fp32", True, True),
    ("engine bf16", "bf16", False, False),
    ("engine bf16 compiled", "bf16", True, False),
    ("engine bf16 compiled channels_last", "bf16", True, True),
)
FP32_SPEED_GOAL, BF16_SPEED_GOAL = 1.5, 2.5  # x the plain eager fp32 loop's images/s, small32 config


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


class StepMemory:
    """The peak memory a step adds to what is resident: CUDA's allocator peak, or the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs) on a CPU."""

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = self._status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def added_mb(self) -> float:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else self._status("VmHWM")
        return (peak - self.base) / 2**20

    @staticmethod
    def _status(key: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {key} in /proc/self/status")


def improved_diffusion_row(code_dir: str, flags: dict, micro_batch: int, device):
    """A step of improved-diffusion's own TrainLoop (fp32, AdamW, EMA 0.9999) from a checkout at code_dir,
    on our synthetic batch; None where the checkout cannot express the config."""
    import tempfile

    sys.path.insert(0, code_dir)
    try:
        from improved_diffusion import logger
        from improved_diffusion import script_util as theirs
        from improved_diffusion.train_util import TrainLoop as TheirLoop
    except ModuleNotFoundError as e:
        raise ConfigError(f"--improved_diffusion {code_dir}: cannot import {e.name} (pip install {e.name})")
    their_flags = theirs.model_and_diffusion_defaults()
    ours = model_and_diffusion_defaults()
    if any(flags[k] != ours[k] for k in set(flags) - set(their_flags)):  # one of our additions in use
        return None
    flags = {k: v for k, v in flags.items() if k in their_flags}
    logger.configure(dir=tempfile.mkdtemp(), format_strs=[])
    seed_everything(0)
    model, diffusion = theirs.create_model_and_diffusion(**{**their_flags, **flags})
    model.to(device)
    loop = TheirLoop(
        model=model,
        diffusion=diffusion,
        data=None,
        batch_size=micro_batch,
        microbatch=-1,
        lr=1e-4,
        ema_rate="0.9999",
        log_interval=10**9,
        save_interval=10**9,
        resume_checkpoint="",
    )
    x, cond = next(SyntheticData(flags, micro_batch))
    return lambda: loop.run_step(x, cond)


def plain_row(flags: dict, micro_batch: int, device):
    """improved-diffusion's way with our UNet: no fused kernels, no compile, torch's default AdamW, an EMA
    of the weights after each step."""
    seed_everything(0)
    model, diffusion = create_model_and_diffusion(**{**flags, "use_fused_kernels": False})
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = [p.detach().clone() for p in model.parameters()]
    sampler = UniformSampler(diffusion)
    data = SyntheticData(flags, micro_batch)

    def step():
        x, cond = next(data)
        t, w = sampler.sample(micro_batch, device)
        cond = {k: v.to(device) for k, v in cond.items()}
        opt.zero_grad(set_to_none=True)
        (diffusion.training_losses(model, x.to(device), t, model_kwargs=cond)["loss"] * w).mean().backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.mul_(0.9999).add_(p, alpha=1 - 0.9999)

    return step


def engine_row(flags: dict, micro_batch: int, base_cfg: dict, prec: str, compiled: bool, channels_last: bool):
    """One optimizer step of our engine (TrainLoop.run_step) in precision prec."""
    seed_everything(0)
    model, diffusion = create_model_and_diffusion(**{**flags, "channels_last": channels_last})
    cfg = {
        **base_cfg,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * dist.get_world_size(),
        "fp16": {"enabled": False},
        "bf16": {"enabled": prec == "bf16"},
        "compile": {**base_cfg.get("compile", {}), "enabled": compiled},  # the JSON may name the backend
    }
    data = SyntheticData(flags, micro_batch)
    return bench_loop(create_engine(model, cfg, lr=1e-4), diffusion, data, "0.9999").run_step


def graph_breaks(flags: dict, device) -> int:
    """Graph breaks torch.compile meets in the UNet's forward on device with the fused kernels on."""
    model, _ = create_model_and_diffusion(**flags)
    model.to(device)
    x = torch.rand(2, 3, flags["image_size"], flags["image_size"], device=device)
    kwargs = {"y": torch.zeros(2, dtype=torch.long, device=device)} if flags.get("class_cond") else {}
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(x, torch.tensor([1, 2], device=device), **kwargs).graph_break_count


def speed_table(flags: dict, micro_batch: int, base_cfg: dict, args, device) -> dict:
    """Every row of one config: built, warmed up (timing the first step, which compiles), then timed in
    args.rounds alternating rounds of args.steps steps."""
    builders = [("improved-diffusion (its TrainLoop)", None)] if args.improved_diffusion else []
    builders.append(("plain fp32 (improved-diffusion's way)", lambda: plain_row(flags, micro_batch, device)))
    for name, prec, compiled, channels_last in ENGINE_ROWS:
        if prec == "fp32" or dist_util.native_bf16():
            builders.append(
                (
                    name,
                    lambda p=prec, c=compiled, cl=channels_last: engine_row(
                        flags, micro_batch, base_cfg, p, c, cl
                    ),
                )
            )
    rows, memory = {}, StepMemory()
    for name, build in builders:
        step = (
            improved_diffusion_row(args.improved_diffusion, flags, micro_batch, device)
            if build is None
            else build()
        )
        if step is None:
            continue
        first = time_steps(step, 1, 0)  # compiles, in a compiled row
        time_steps(step, max(0, args.warmup - 1), 0)
        memory.start()
        step()
        rows[name] = {"step": step, "first_step_s": first, "step_memory_mb": memory.added_mb(), "times": []}
        if dist.get_rank() == 0:  # as each row is ready: a run cut short still tells what it built
            print(
                f"built {name}: first step {first:.1f} s, step memory {rows[name]['step_memory_mb']:.0f} MB"
            )
    for _ in range(args.rounds):
        for row in rows.values():
            row["times"].append(time_steps(row["step"], args.steps, 0) / args.steps)
    world = dist.get_world_size()
    table = {}
    for name, row in rows.items():
        per_step = float(np.median(row["times"]))
        table[name] = {
            "images_per_s": micro_batch * world / per_step,
            "step_s": per_step,
            "step_s_rounds": row["times"],
            "first_step_s": row["first_step_s"],
            "step_memory_mb": row["step_memory_mb"],
        }
    base = table["plain fp32 (improved-diffusion's way)"]["images_per_s"]
    for row in table.values():
        row["vs_plain"] = row["images_per_s"] / base
    return table


def speed_verdicts(result: dict) -> dict:
    """The speed goals on the small 32 px config: met (True), missed (False) or not measured (None)."""
    table = result["configs"].get("small32", {}).get("rows", {})

    def best(prec):
        ratios = [r["vs_plain"] for name, r in table.items() if name.startswith(f"engine {prec}")]
        return max(ratios) if ratios else None

    fp32, bf16 = best("fp32"), best("bf16")
    return {
        f"fp32 best >= {FP32_SPEED_GOAL}x plain": None if fp32 is None else fp32 >= FP32_SPEED_GOAL,
        f"bf16 best >= {BF16_SPEED_GOAL}x plain fp32": None if bf16 is None else bf16 >= BF16_SPEED_GOAL,
        "no graph breaks with fused kernels": all(c["graph_breaks"] == 0 for c in result["configs"].values()),
    }


def run_speed(args, base_cfg: dict, device, custom_flags: dict) -> dict:
    """All rows of the speed configs, or of the one config the command line's model flags give."""
    configs = GPU_SPEED_CONFIGS if args.gpu else SPEED_CONFIGS
    if custom_flags:
        configs = {"custom": (custom_flags, args.batch_size)}
    result = {
        "device": device_name(),
        "native_bf16": dist_util.native_bf16(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ranks": dist.get_world_size(),
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "configs": {},
    }
    for config, (overrides, micro_batch) in configs.items():
        flags = {**model_and_diffusion_defaults(), **overrides}
        result["configs"][config] = {
            "flags": overrides,
            "micro_batch": micro_batch,
            "graph_breaks": graph_breaks(flags, device),
            "rows": speed_table(flags, micro_batch, base_cfg, args, device),
        }
        torch._dynamo.reset()  # each config's compiled graphs stay out of the next one's cache
        if dist.get_rank() == 0:
            print_speed_table(config, result["configs"][config], result)
    result["goals"] = speed_verdicts(result)
    return result


def print_speed_table(config: str, entry: dict, result: dict) -> None:
    print(
        f"\n{config}: {entry['flags']} micro-batch {entry['micro_batch']} x {result['ranks']} ranks, "
        f"{result['threads']} threads, {result['device']}; graph breaks with fused kernels: "
        f"{entry['graph_breaks']}"
    )
    print(f"{'row':<40} {'images/s':>9} {'s/step':>8} {'x plain':>8} {'first step s':>13} {'step MB':>8}")
    for name, r in entry["rows"].items():
        print(
            f"{name:<40} {r['images_per_s']:>9.1f} {r['step_s']:>8.3f} {r['vs_plain']:>8.2f} "
            f"{r['first_step_s']:>13.1f} {r['step_memory_mb']:>8.0f}"
        )


def main() -> None:
    args, flags, explicit = parse_command_line(
        __doc__, DEFAULTS, help={**HELP, **BENCH_HELP}, deepspeed_config=True
    )
    validate_model_flags(flags)
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(
            f"--steps must be at least 1 and --warmup not negative, got {args.steps} and {args.warmup}"
        )
    if args.kernels:
        result = kernels_step(flags, args.batch_size, args.steps, args.warmup)
        print_kernels_step(result, flags["image_size"])
        report(result, args.out)
        return
    dist_util.setup_dist()
    dist_util.set_threads_per_rank()
    from deepspeed.accelerator import get_accelerator

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, _ = resolve(
        load_ds_config(args.deepspeed_config or os.path.join(REPO, "ds_configs", "cpu.json")),
        args,
        explicit,
        world,
        get_accelerator().is_fp16_supported(),
        dist_util.native_bf16(),
    )
    if args.speed:
        custom = {k: v for k, v in flags.items() if k in explicit}
        result = run_speed(args, cfg, dist_util.dev(), custom)
        if dist.get_rank() == 0:
            verdict = {True: "met", False: "MISSED", None: "not measured"}
            for goal, met in result["goals"].items():
                print(f"goal: {goal}: {verdict[met]}")
            report(result, args.out)
        return
    micro_batch, grad_accum_steps = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    device = dist_util.dev()
    images_per_step = micro_batch * grad_accum_steps * world

    if args.memory:
        rows = memory_table(flags, cfg, args, world)
        if rank == 0:
            n_params = sum(p.numel() for p in create_model_and_diffusion(**flags)[0].parameters())
            print(
                f"# {n_params / 1e6:.1f}M params ({flags['image_size']} px config), {world} ranks, "
                f"{precision(cfg)}; bytes per rank"
            )
            print(
                f"{'ZeRO':>4} {'params MB':>10} {'grads MB':>9} {'optim MB':>9} {'EMA MB':>8} "
                f"{'optim+EMA B/param':>18}"
            )
            for r in rows:
                r["params_count"] = n_params
                print(
                    f"{r['zero_stage']:>4} {r['params'] / 2**20:>10.1f} {r['grads'] / 2**20:>9.1f} "
                    f"{r['optimizer'] / 2**20:>9.1f} "
                    f"{r['ema'] / 2**20:>8.1f} {(r['optimizer'] + r['ema']) / n_params:>18.2f}"
                )
            report(rows, args.out)
        return
    plain_s, plain_mem = plain_pytorch(flags, cfg, args, device, world)
    seed_everything(0)
    model, diffusion = create_model_and_diffusion(**flags)
    engine = create_engine(model, cfg, lr=args.lr)
    loop = bench_loop(engine, diffusion, SyntheticData(flags, micro_batch), args.ema_rate)
    ds_s = time_steps(loop.run_step, args.steps, args.warmup)
    ds_mem = loop_bytes(loop)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"plain": plain_mem, "deepspeed": ds_mem})
    if rank != 0:
        return
    result = {
        "world_size": world,
        "zero_stage": engine.zero_optimization_stage(),
        "precision": precision(cfg),
        "micro_batch": micro_batch,
        "accumulation": grad_accum_steps,
        "image_size": flags["image_size"],
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "steps": args.steps,
        "plain_images_per_s": args.steps * images_per_step / plain_s,
        "deepspeed_images_per_s": args.steps * images_per_step / ds_s,
        "per_rank_bytes": gathered,
    }
    result["engine_overhead_pct"] = 100 * (ds_s / plain_s - 1)
    print(
        f"{'loop':<10} {'images/s':>10} {'params MB':>10} {'opt+master MB':>14} {'EMA MB':>8}   (rank 0, "
        f"{world} ranks, ZeRO-{result['zero_stage']}, {result['precision']})"
    )
    for name, mem, speed in (
        ("plain", gathered[0]["plain"], result["plain_images_per_s"]),
        ("deepspeed", gathered[0]["deepspeed"], result["deepspeed_images_per_s"]),
    ):
        print(
            f"{name:<10} {speed:>10.1f} {mem['params'] / 2**20:>10.1f} {mem['optimizer'] / 2**20:>14.1f} "
            f"{mem.get('ema', 0) / 2**20:>8.1f}"
        )
    print(f"engine overhead: {result['engine_overhead_pct']:+.1f}%")
    report(result, args.out)


if __name__ == "__main__":
    run_cli(main)
