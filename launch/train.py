"""Train an IDDPM UNet with DeepSpeed.

    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/zero2.json [flags]
    mpirun -n 2 python launch/train.py --deepspeed_config ds_configs/cpu.json [flags]
    python launch/train.py [flags]                      (one process; ds_configs/cpu.json by default)

Takes every flag of improved-diffusion's image_train.py. Batch size,
accumulation, precision, ZeRO, the optimizer and compilation come from the
DeepSpeed JSON; --lr, --weight_decay, --batch_size/--microbatch, --use_fp16 and
--compile override it only when given. Everything lands in --log_dir (else $OPENAI_LOGDIR, else
runs/<timestamp>), and a run resumes from its newest complete checkpoint.
"""

import importlib.util
import json
import logging
import os
import socket
import sys
import time
from typing import Optional

try:  # a rank on a host whose Python lacks the stack stops here, in one line
    # Before DeepSpeed loads: dist_util names DeepSpeed's accelerator, which DeepSpeed would otherwise guess
    # (and warn about) on import.
    import iddpm_ds.dist_util  # noqa: F401

    if importlib.util.find_spec("deepspeed") is None:
        raise ModuleNotFoundError(name="deepspeed")
except ModuleNotFoundError as e:
    sys.exit(
        f"train.py: error: {sys.executable} on host {socket.gethostname()} cannot import {e.name}: install "
        "the project for that Python there (bash setup.sh), or name one that has it in .deepspeed_env's PATH"
    )

import torch
from torch.utils.tensorboard import SummaryWriter

from iddpm_ds import dist_util
from iddpm_ds.checkpointing import (
    atomic_write_text,
    find_latest_checkpoint,
    load_official_state_dict,
    load_state_dict_file,
    prepare_resume,
)
from iddpm_ds.console import ConsoleHandler
from iddpm_ds.ds_config import OVERRIDE_FLAGS, precision, resolve
from iddpm_ds.ds_config import load as load_ds_config
from iddpm_ds.errors import CheckpointError, ConfigError, agreed
from iddpm_ds.flags import (
    merge_run_flags,
    model_family,
    parse_command_line,
    read_run_config,
    run_cli,
    validate_model_flags,
    validate_train_flags,
)
from iddpm_ds.image_datasets import SuperResStream, load_data
from iddpm_ds.preemption import STOPPED_EARLY, PreemptionWatch
from iddpm_ds.resample import create_named_schedule_sampler
from iddpm_ds.run_lock import RunLock
from iddpm_ds.sampling import make_grid, sample_images
from iddpm_ds.script_util import NULL_CLASS, NUM_CLASSES
from iddpm_ds.seeding import seed_everything
from iddpm_ds.train_util import TrainLoop, create_engine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_DEFAULTS = dict(
    data_dir="",
    schedule_sampler="uniform",
    **OVERRIDE_FLAGS,
    lr_anneal_steps=0,
    ema_rate="0.9999",
    ema_profiles="",
    ema_snapshot_interval=0,
    log_interval=10,
    save_interval=10000,
    resume_checkpoint="",
    # iddpm_ds additions
    max_steps=0,
    max_nonfinite_steps=10,
    sample_interval=0,
    eval_interval=0,
    eval_metrics="",
    eval_samples=256,
    eval_sampler="ddim",
    eval_steps=50,
    inception_weights="",
    log_dir="",
    seed=0,
    num_workers=1,
    master_port=0,
    override=False,
)
PREVIEW_SAMPLES, PREVIEW_STEPS = 16, 25  # DDIM


def resolve_run_dir(log_dir: str) -> str:
    run_dir = (
        log_dir or os.environ.get("OPENAI_LOGDIR") or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    )
    holder = [os.path.abspath(run_dir)]
    torch.distributed.broadcast_object_list(holder, src=0)  # one timestamp for all ranks
    return holder[0]


def lock_run_dir(run_dir: str, rank: int) -> Optional[RunLock]:
    """Rank 0 takes the run directory's lock (run_lock.py); if another live training holds it, every rank
    stops with the same one-line error, before anything is written."""
    lock, error = None, [""]
    if rank == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except ConfigError as e:
            error = [str(e)]
    torch.distributed.broadcast_object_list(error, src=0)
    if error[0]:
        raise agreed(ConfigError(error[0]))
    return lock


def make_ema_sampler(factory, model_flags: dict, data_classes, device, num: int, sampler: str, steps: int):
    """state_dict -> (uint8 [num, H, W, 3], labels or None): samples in `steps` steps (model evaluations) with
    fixed seeds and labels (0, 1, 2, ... cycled), so previews and metrics compare across steps."""
    respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    model, diffusion = factory(**{**model_flags, "timestep_respacing": respacing, "use_checkpoint": False})
    model.to(device).eval()
    labels = torch.arange(num) % (data_classes or NUM_CLASSES) if model_flags["class_cond"] else None
    kwargs = {"y": labels.to(device)} if labels is not None else {}

    def sample(state_dict):
        model.load_state_dict(state_dict)
        size = model_flags["image_size"]
        images = sample_images(
            model, diffusion, list(range(num)), size, seed=0, model_kwargs=kwargs, sampler=sampler
        )
        return images, None if labels is None else labels.numpy()

    return sample


def grid_of(sample):
    """state_dict -> one uint8 HWC grid of the sampler's images."""
    return lambda state_dict: make_grid(sample(state_dict)[0])


def make_eval_fn(factory, model_flags: dict, data_classes, device, args):
    """state_dict -> metrics of --eval_samples EMA samples against the training data."""
    from iddpm_ds.builtin_datasets import DEFAULT_DATASET
    from iddpm_ds.evaluation import Evaluator, training_metrics

    sample = make_ema_sampler(
        factory, model_flags, data_classes, device, args.eval_samples, args.eval_sampler, args.eval_steps
    )
    metrics = training_metrics(args.eval_metrics, args.data_dir, model_flags["class_cond"])
    evaluator = Evaluator(
        metrics,
        args.data_dir or DEFAULT_DATASET,
        model_flags["image_size"],
        args.inception_weights,
        device=str(device),
    )
    return lambda state_dict: evaluator(*sample(state_dict))


def parse_flags(super_res: bool):
    """The command line, checked before any rank starts work: (args, model flags, explicit flag names,
    DeepSpeed JSON)."""
    args, model_flags, explicit = parse_command_line(
        __doc__, TRAIN_DEFAULTS, super_res, deepspeed_config=True
    )
    validate_train_flags(args, explicit)
    validate_model_flags(model_flags, super_res)
    ds_cfg = load_ds_config(args.deepspeed_config or os.path.join(REPO, "ds_configs", "cpu.json"))
    return args, model_flags, explicit, ds_cfg


def start_logging(run_dir: str, rank: int, notes) -> logging.Logger:
    """Console and run_dir/log.txt on rank 0; other ranks print warnings only."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(message)s",
        handlers=[ConsoleHandler(sys.stdout)]
        + ([logging.FileHandler(os.path.join(run_dir, "log.txt"))] if rank == 0 else []),
    )
    log = logging.getLogger("iddpm_ds")
    for line in notes if rank == 0 else []:  # the same on every rank: said once
        log.warning(line) if line.startswith("WARNING") else log.info(line)
    return log


def run_model_flags(run_dir: str, args, model_flags: dict, explicit) -> dict:
    """The command line's model flags; continuing a run, its saved flags unless contradicted."""
    config = os.path.join(run_dir, "config.json")
    if os.path.isfile(config):
        saved = read_run_config(run_dir)["model_flags"]
        model_flags = merge_run_flags(saved, model_flags, explicit, config, args.override)
    return model_flags


def build_model(factory, model_flags: dict, args, rank: int, run_dir: str):
    """(model, diffusion, checkpoint dir to resume or None, weights file it started from or None)."""
    seed_everything(args.seed)  # same initial weights on every rank
    model, diffusion = factory(**model_flags)
    resume_dir = find_latest_checkpoint(args.resume_checkpoint or run_dir)
    init_weights_path = None
    if args.resume_checkpoint and resume_dir is None:
        if not args.resume_checkpoint.endswith(".pt"):
            raise CheckpointError(f"no complete checkpoint found at {args.resume_checkpoint}")
        init_weights_path = args.resume_checkpoint  # an improved-diffusion style modelNNNNNN.pt: weights only
        load_official_state_dict(model, load_state_dict_file(init_weights_path))
    seed_everything(args.seed + rank)  # per-rank noise, timesteps and dropout
    return model, diffusion, resume_dir, init_weights_path


def build_engine(model, ds_cfg: dict, args, resume_dir, world: int):
    """The DeepSpeed engine, and the tag to load when resuming on another number of ranks (else None)."""
    load_tag = prepare_resume(resume_dir, world) if resume_dir else None
    if load_tag:  # the rank count changed: load DeepSpeed's universal (world-size independent) copy
        ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
    args.deepspeed_config = None  # the resolved dict replaces the file
    engine = create_engine(
        model,
        ds_cfg,
        args=args,
        lr=args.lr,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
    )
    return engine, load_tag


def build_data(args, engine, model_flags: dict, super_res: bool):
    """This rank's stream of micro-batches, and the number of classes the data has (or None)."""
    data = load_data(
        data_dir=args.data_dir,
        batch_size=engine.train_micro_batch_size_per_gpu(),
        image_size=model_flags["large_size" if super_res else "image_size"],
        class_cond=model_flags["class_cond"],
        seed=args.seed,
        num_workers=args.num_workers,
        num_classes=NUM_CLASSES if model_flags["class_cond"] else None,
    )
    data_classes = len(data.source.classes) if data.source.classes else None
    if super_res:
        data = SuperResStream(data, model_flags["small_size"])
    return data, data_classes


def write_run_config(
    run_dir: str, args, model_flags: dict, ds_cfg: dict, world: int, super_res: bool, data_classes
):
    """config.json: everything sampling and resuming need, so no flag is typed twice."""
    config = {
        "model_flags": model_flags,
        "train_flags": {k: getattr(args, k) for k in TRAIN_DEFAULTS},
        "deepspeed": ds_cfg,
        "world_size": world,
        "precision": precision(ds_cfg),
        "super_res": super_res,
        "data_classes": data_classes,
    }
    atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(config, indent=1, default=str))


def main(super_res: bool = False) -> Optional[int]:
    """Train; returns preemption.STOPPED_EARLY (75) when a signal stopped the run before its end (a complete
    checkpoint is saved: rerun to resume), else None (0)."""
    args, model_flags, explicit, ds_cfg = parse_flags(super_res)

    # Join the other ranks.
    dist_util.abort_all_ranks_on_error()
    preemption = PreemptionWatch()  # before the slow set-up, so an early SIGTERM is not lost
    dist_util.setup_dist(args.master_port or None)
    threads = dist_util.set_threads_per_rank()
    from deepspeed.accelerator import get_accelerator

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    fp16_supported = get_accelerator().is_fp16_supported()
    native = dist_util.native_bf16()
    ds_cfg, notes = resolve(
        ds_cfg, args, explicit, world, fp16_supported, native, dist_util.accelerator_is_cpu()
    )
    run_dir = resolve_run_dir(args.log_dir)
    os.makedirs(run_dir, exist_ok=True)
    run_lock = lock_run_dir(run_dir, rank)  # noqa: F841  (held until the process ends)
    log = start_logging(run_dir, rank, notes)

    # Model, engine and data.
    model_flags = run_model_flags(run_dir, args, model_flags, explicit)
    _, factory = model_family(super_res)
    model, diffusion, resume_dir, init_weights_path = build_model(factory, model_flags, args, rank, run_dir)
    engine, load_tag = build_engine(model, ds_cfg, args, resume_dir, world)
    data, data_classes = build_data(args, engine, model_flags, super_res)

    # What rank 0 writes besides checkpoints: config.json, TensorBoard, sample previews and metrics.
    writer, preview_fn, eval_fn = None, None, None
    if rank == 0:
        log.info(
            "run dir %s | %d ranks x %d threads | rendezvous %s:%s | %s | ZeRO-%d | micro-batch %d x "
            "accumulation %d | %.2fM params",
            run_dir,
            world,
            threads,
            os.environ.get("MASTER_ADDR"),
            os.environ.get("MASTER_PORT"),
            precision(ds_cfg),
            engine.zero_optimization_stage(),
            engine.train_micro_batch_size_per_gpu(),
            engine.gradient_accumulation_steps(),
            sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) / 1e6,  # ZeRO-3: partitioned
        )
        write_run_config(run_dir, args, model_flags, ds_cfg, world, super_res, data_classes)
        writer = SummaryWriter(os.path.join(run_dir, "tb"))
        if args.sample_interval and not super_res:
            sample = make_ema_sampler(
                factory, model_flags, data_classes, engine.device, PREVIEW_SAMPLES, "ddim", PREVIEW_STEPS
            )
            preview_fn = grid_of(sample)
        if args.eval_interval and not super_res:
            eval_fn = make_eval_fn(factory, model_flags, data_classes, engine.device, args)

    # Train.
    loop = TrainLoop(
        engine=engine,
        diffusion=diffusion,
        data=data,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        ema_rate=args.ema_rate,
        run_dir=run_dir,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        max_steps=args.max_steps,
        lr_anneal_steps=args.lr_anneal_steps,
        writer=writer,
        sample_interval=args.sample_interval if not super_res else 0,
        preview_fn=preview_fn,
        eval_interval=args.eval_interval if not super_res else 0,
        eval_fn=eval_fn,
        max_nonfinite_steps=args.max_nonfinite_steps,
        preemption=preemption,
        class_dropout_prob=model_flags["class_dropout_prob"],
        null_label=NULL_CLASS,
        ema_profiles=args.ema_profiles,
        ema_snapshot_interval=args.ema_snapshot_interval,
    )
    if resume_dir:
        loop.resume(resume_dir, load_tag)
    elif init_weights_path:
        log.info("initialised weights from %s", init_weights_path)
    loop.run_loop()
    data.close()
    if writer is not None:
        writer.close()
    if loop.stop_reason:
        preemption.stand_down()
        if rank == 0:
            log.warning(
                "stopped at step %d (%s) with a complete checkpoint; rerun the same command to resume (exit "
                "status %d)",
                loop.step,
                loop.stop_reason,
                STOPPED_EARLY,
            )
        return STOPPED_EARLY
    log.info("done at step %d; checkpoints in %s", loop.step, run_dir)
    return None


def cli(super_res: bool = False) -> None:
    run_cli(lambda: main(super_res))


if __name__ == "__main__":
    cli()
