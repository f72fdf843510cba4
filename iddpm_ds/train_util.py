"""The training step and loop on a DeepSpeed engine: loss-aware timestep sampling, EMA, checkpoints. What the
run reports (records, previews, metrics) is train_log.py's.

One optimizer step is `gradient_accumulation_steps` micro-batches. After the
step DeepSpeed reports whether it applied the update (fp16 overflow skips
it); only an applied step updates the EMA and the loss-aware sampler, whose
per-sample (t, loss) pairs are all-gathered once per step so every rank
holds identical history.

What a checkpoint holds on disk, and how it is written atomically, is checkpointing.py's.
"""

import argparse
import contextlib
import logging
import os
import sys
import time
import types
from typing import TYPE_CHECKING, Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from .checkpointing import (
    atomic_torch_save,
    checkpoint_root,
    find_latest_checkpoint,
    load_state_dict_file,
    read_complete,
    rng_state,
    set_rng_state,
    verify_checkpoint_files,
    write_complete,
)
from .console import progress_bar
from .dist_util import accelerator_is_cpu
from .ds_config import split_compile
from .ema import EMA, MasterWeights, profile_key
from .errors import CheckpointError, ConfigError, TrainingDiverged, agreed, first_line
from .resample import LossAwareSampler, all_gather_columns
from .seeding import mix_seed, seed_everything
from .train_log import TrainLog

if TYPE_CHECKING:  # imported where the engine is built: DeepSpeed picks its accelerator on import
    import deepspeed

log = logging.getLogger("iddpm_ds")


# The JSON optimizer params an Adam/AdamW takes; torch_adam and fused choose DeepSpeed's implementation, which
# torch's fused one replaces.
ADAM_PARAMS = {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "fused"}


# DeepSpeed 0.19.8 imports its Muon optimizer's two modules on every ZeRO run: the optimizer class for
# isinstance checks (ZeRO's optimizer check, each gradient reduce) and muon_update in ZeRO-2's gradient copy,
# called there only for a Muon optimizer. Importing them runs torch.compile on Muon's kernels, which loads
# inductor: 1.5-2.5 s of CPU at each rank's start on a 2-core EPYC (a 2-step tiny run: 6.3-7.9 s ->
# 4.5-5.3 s), on every restart of a preempted run too.
_MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")


class _NoMuon:
    """Nothing is an instance of it: the optimizer is torch's AdamW."""


def _muon_update(*args, **kwargs):
    raise RuntimeError("iddpm_ds: DeepSpeed called Muon's update on a run whose optimizer is AdamW")


def _answer_muon_checks_without_importing_it(ours: bool) -> None:
    """Where the optimizer is built here (torch's AdamW), no Muon instance can exist, so stand-ins answer
    DeepSpeed's checks; where DeepSpeed builds the optimizer (another JSON type, on a GPU), its real modules
    come back."""
    for name in _MUON_MODULES:
        present = sys.modules.get(name)
        if ours and present is None:
            stand_in = types.ModuleType(name)
            stand_in.MuonWithAuxAdam, stand_in.muon_update = _NoMuon, _muon_update
            sys.modules[name] = stand_in
        elif not ours and getattr(present, "MuonWithAuxAdam", None) is _NoMuon:
            del sys.modules[name]


def create_engine(
    model: torch.nn.Module,
    ds_cfg: Dict,
    *,
    args: Optional[argparse.Namespace] = None,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    lr_anneal_steps: int = 0,
) -> "deepspeed.DeepSpeedEngine":
    """deepspeed.initialize with torch's fused AdamW and improved-diffusion's LR annealing.

    The JSON's Adam/AdamW (DeepSpeed's Adam is AdamW by default) is built as torch's fused AdamW from the
    JSON's params on every device: on CPU about 3x faster per step than DeepSpeed's torch_adam, on a GPU
    one multi-tensor kernel like DeepSpeed's FusedAdam but with no CUDA extension to JIT-build at the first
    run (a minute, and nvcc, on every new machine), and the same optimizer code the CPU tests run. Other
    optimizer types go to DeepSpeed on a GPU and are refused on CPU. With lr_anneal_steps the LR decays
    linearly to 0 over that many optimizer steps. With the JSON's compile.enabled
    the UNet goes through engine.compile (compile.backend, compile.kwargs); the loss
    stays outside the compiled region (compiling it too measured no faster).
    """
    import deepspeed

    cfg, compile_cfg = split_compile(ds_cfg)
    if compile_cfg["enabled"] and cfg.get("compile", {}).get("deepcompile") and accelerator_is_cpu():
        raise ConfigError("compile.deepcompile builds a CUDA extension and cannot run on CPU; remove it")
    optimizer = None
    json_type = cfg.get("optimizer", {}).get("type", "AdamW")
    if json_type.lower() not in ("adamw", "adam") and accelerator_is_cpu():
        raise ConfigError(f"optimizer type {json_type!r} is not supported on CPU (use AdamW)")
    if json_type.lower() in ("adamw", "adam"):
        opt = cfg.pop("optimizer", None) or {}
        params = opt.get("params", {})
        unknown = sorted(set(params) - ADAM_PARAMS)
        if unknown:
            raise ConfigError(
                f"optimizer.params {unknown} are not Adam's (known: {', '.join(sorted(ADAM_PARAMS))})"
            )
        # DeepSpeed's Adam is AdamW unless adam_w_mode is false.
        adam = torch.optim.AdamW if params.get("adam_w_mode", True) else torch.optim.Adam
        kwargs = dict(
            lr=params.get("lr", lr),
            betas=tuple(params.get("betas", (0.9, 0.999))),
            eps=params.get("eps", 1e-8),
            weight_decay=params.get("weight_decay", weight_decay),
        )

        def optimizer(ps):
            return adam(ps, fused=True, **kwargs)

    _answer_muon_checks_without_importing_it(optimizer is not None)

    if lr_anneal_steps and "scheduler" in cfg:
        raise ConfigError("--lr_anneal_steps and a JSON 'scheduler' both set the learning rate; keep one")
    scheduler = None
    if lr_anneal_steps:

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / lr_anneal_steps))

    engine, _, _, _ = deepspeed.initialize(
        args=args,
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=cfg,
    )
    if compile_cfg["enabled"]:
        engine.compile(backend=compile_cfg["backend"], compile_kwargs=dict(compile_cfg["kwargs"]))
    return engine


def drop_labels(y: torch.Tensor, prob: float, null_label: int) -> torch.Tensor:
    """Classifier-free guidance's training: each label becomes null_label with probability prob, so one
    model learns both p(x | y) and p(x). Draws from the global torch RNG (saved with each checkpoint)."""
    if prob <= 0:
        return y
    return torch.where(torch.rand(y.shape, device=y.device) < prob, torch.full_like(y, null_label), y)


def profile_file(sigma_rel: float, step: int) -> str:
    """The snapshot file of a post-hoc EMA profile, in the run directory."""
    return f"phema_{sigma_rel}_{step:06d}.pt"


class TrainLoop:
    """Runs training on a DeepSpeed engine until max_steps / lr_anneal_steps, saving as it goes.

    :param engine: the deepspeed engine wrapping the UNet.
    :param diffusion: a GaussianDiffusion (training_losses).
    :param data: a DataStream yielding (images, model_kwargs) micro-batches.
    :param schedule_sampler: a ScheduleSampler (uniform, loss-aware or high-noise).
    :param ema_rate: comma-separated EMA rates, e.g. "0.9999,0.999".
    :param ema_profiles: comma-separated relative widths of post-hoc EMA's power-function averages (phema.py),
        e.g. "0.05,0.1" ('' = none); each is saved (phema_WIDTH_STEP.pt) with every checkpoint and every
        ema_snapshot_interval steps, the snapshots launch/posthoc_ema.py combines.
    :param run_dir: where checkpoints, logs and TensorBoard events go.
    :param max_steps: stop after this many optimizer steps (0 = no limit).
    :param lr_anneal_steps: the LR decays linearly to 0 and training stops there (0 = off).
    :param sample_interval, preview_fn: every sample_interval steps, rank 0 calls preview_fn
        with the first EMA rate's full state_dict and logs the returned uint8 HWC grid.
    :param eval_interval, eval_fn: every eval_interval steps, rank 0 calls eval_fn with the first EMA
        rate's full state_dict and logs the returned metrics (progress.jsonl, TensorBoard, the log).
    :param max_nonfinite_steps: a step whose loss is non-finite on any rank is skipped (no update,
        no EMA, no sampler); this many in a row save a checkpoint (of the weights from before
        the divergence, as every such step was skipped) and stop the run with TrainingDiverged.
    :param preemption: a PreemptionWatch; when any rank reports a reason, every rank stops after
        the same step with a complete checkpoint.
    :param class_dropout_prob, null_label: classifier-free guidance's label dropout (drop_labels).
    """

    def __init__(
        self,
        *,
        engine,
        diffusion,
        data,
        schedule_sampler,
        ema_rate: str,
        run_dir: str,
        log_interval: int,
        save_interval: int,
        max_steps: int = 0,
        lr_anneal_steps: int = 0,
        writer=None,
        progress: bool = True,
        sample_interval: int = 0,
        preview_fn: Optional[Callable[[Dict[str, torch.Tensor]], np.ndarray]] = None,
        eval_interval: int = 0,
        eval_fn: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, float]]] = None,
        max_nonfinite_steps: int = 10,
        preemption=None,
        class_dropout_prob: float = 0.0,
        null_label: int = -1,
        ema_profiles: str = "",
        ema_snapshot_interval: int = 0,
    ):
        self.engine, self.diffusion, self.data, self.sampler = engine, diffusion, data, schedule_sampler
        self.ema_rates = [float(r) for r in str(ema_rate).split(",") if r.strip()]
        self.run_dir, self.log_interval, self.save_interval = run_dir, log_interval, save_interval
        self.max_steps, self.lr_anneal_steps = max_steps, lr_anneal_steps
        self.sample_interval, self.eval_interval = sample_interval, eval_interval
        self.max_nonfinite_steps, self.preemption = max_nonfinite_steps, preemption
        self.class_dropout_prob, self.null_label = class_dropout_prob, null_label
        self.nonfinite_steps, self.consecutive_nonfinite = 0, 0
        self.stop_reason = ""
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = engine.device
        self.grad_accum_steps = engine.gradient_accumulation_steps()
        self.master = MasterWeights(engine)
        self.ema_profiles = [float(s) for s in str(ema_profiles).split(",") if s.strip()]
        self.ema_snapshot_interval = ema_snapshot_interval
        self.ema = EMA(self.master, self.ema_rates, self.ema_profiles)
        self.log = TrainLog(engine, diffusion.num_timesteps, data, run_dir, writer, preview_fn, eval_fn)
        self.progress = progress and self.rank == 0
        self.last_saved_step = -1
        self._pending = []
        self._grad_norm: Optional[float] = None
        self._stop_agreed, self._own_stop_reason = False, ""

    # ------------------------------------------------------------------ step
    @property
    def step(self) -> int:
        """Optimizer steps taken so far, skipped (fp16 overflow) ones included, as improved-diffusion
        counts."""
        return self.engine.global_steps

    def done(self) -> bool:
        return bool(
            (self.max_steps and self.step >= self.max_steps)
            or (self.lr_anneal_steps and self.step >= self.lr_anneal_steps)
        )

    def run_step(self) -> bool:
        """One optimizer step over grad_accum_steps micro-batches; returns whether the update was applied."""
        finite = torch.ones((), device=self.device)
        for i in range(self.grad_accum_steps):
            batch, cond = self._next_micro_batch()
            t, weights = self.sampler.sample(batch.shape[0], self.device)
            losses = self.diffusion.training_losses(self.engine, batch, t, model_kwargs=cond)
            loss = (losses["loss"] * weights).mean()
            finite = finite * torch.isfinite(loss.detach())
            self.engine.backward(loss)  # DeepSpeed all-reduces the gradients at the last micro-batch
            boundary = i == self.grad_accum_steps - 1
            if boundary:
                # Before the update: a non-finite loss on any rank skips the step on every rank.
                all_finite = self._agree(finite)
                if self.master.plain_fp32:
                    self._grad_norm = self._plain_grad_norm()  # DeepSpeed reports none at ZeRO-0 fp32
            with self._update_suppressed(boundary and not all_finite):
                self.engine.step()  # weights change only at the boundary
            self._record(t, losses, weights)
        applied = self.engine.was_step_applied() and all_finite  # False on an fp16 overflow too
        self._count_nonfinite(all_finite)
        # Only an applied update may move the sampler's history and the EMA.
        self._sync_sampler(applied)
        if applied:
            self.ema.update(self.step)
        return applied

    def _next_micro_batch(self):
        batch, cond = next(self.data)
        cond = {k: v.to(self.device) for k, v in cond.items()}
        if "y" in cond:
            cond["y"] = drop_labels(cond["y"], self.class_dropout_prob, self.null_label)
        return batch.to(self.device), cond

    def _record(self, t: torch.Tensor, losses: Dict[str, torch.Tensor], weights: torch.Tensor) -> None:
        """Keep the micro-batch's (t, loss) pairs for the sampler and its weighted losses for the log."""
        self._pending.append(torch.stack([t.to(torch.float64), losses["loss"].detach().to(torch.float64)]))
        self.log.accumulate({k: v.detach() * weights for k, v in losses.items()}, t)

    def _count_nonfinite(self, all_finite: bool) -> None:
        if all_finite:
            self.consecutive_nonfinite = 0
        else:
            self.nonfinite_steps += 1
            self.consecutive_nonfinite += 1

    def _plain_grad_norm(self) -> float:
        """The global gradient norm, before any clipping, for the one engine that does not report it
        (ZeRO-0 fp32: its gradients are all-reduced into the parameters' .grad by the last backward)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0

    def _agree(self, finite: torch.Tensor) -> bool:
        """The ranks' one agreement of the step, before its update: whether every rank's losses were
        finite, and whether any rank was asked to stop (a signal, a launcher gone), in one all-reduce and
        one host sync. Returns the first; _preempted() reads the second after the step."""
        self._own_stop_reason = self.preemption.reason() if self.preemption is not None else ""
        asked = torch.tensor(float(bool(self._own_stop_reason)), device=finite.device)
        flags = torch.stack([1.0 - finite.detach().float(), asked])
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, stop = flags.tolist()
        self._stop_agreed = bool(stop)
        return not nonfinite

    @contextlib.contextmanager
    def _update_suppressed(self, suppress: bool):
        """DeepSpeed's fp16/bf16 and ZeRO 1-3 optimizers skip a step with non-finite gradients
        themselves; a plain fp32 ZeRO-0 optimizer would apply it. For that one, make this
        engine.step() leave weights, optimizer state and LR schedule untouched (DeepSpeed still
        counts the step and clears the gradients), as an fp16 overflow step does."""
        if not (suppress and self.master.plain_fp32):
            yield
            return
        targets = [obj for obj in (self.engine.optimizer, self.engine.lr_scheduler) if obj is not None]
        for obj in targets:
            obj.step = lambda *args, **kwargs: None  # instance attribute shadows the method
        try:
            yield
        finally:
            for obj in targets:
                del obj.step

    def _sync_sampler(self, apply: bool) -> None:
        """All-gather this step's (t, loss) pairs (one fixed-size collective) into the loss-aware sampler."""
        local = torch.cat(self._pending, dim=1)  # [2, grad_accum_steps * micro_batch]
        self._pending = []
        if not isinstance(self.sampler, LossAwareSampler):
            return
        if self.world > 1:
            local = all_gather_columns(local)
        if apply:
            pairs = local.cpu().numpy()
            self.sampler.update_with_all_losses(pairs[0].astype(np.int64), pairs[1])

    def _preempted(self) -> bool:
        """True on every rank once any rank's PreemptionWatch had a reason at this step's agreement."""
        if not self._stop_agreed:
            return False
        self.stop_reason = self._own_stop_reason or "another rank was asked to stop"
        log.warning(
            "stopping after step %d: %s (rank %d); saving a checkpoint",
            self.step,
            self.stop_reason,
            self.rank,
        )
        return True

    # ------------------------------------------------------------------ loop
    def run_loop(self) -> None:
        bar = progress_bar(
            total=self.max_steps or self.lr_anneal_steps or None,
            initial=self.step,
            disable=not self.progress,
            unit="step",
        )
        self.log.start()
        try:
            self._loop(bar)
        finally:
            bar.close()

    def _ema_of_first_rate(self) -> Dict[str, torch.Tensor]:
        """The first EMA rate's full state_dict, for previews and metrics. Collective (gathers the EMA)."""
        return self.ema.full_state_dicts()[self.ema_rates[0]]

    def _loop(self, bar) -> None:
        first = True
        while not self.done():
            start = time.perf_counter()
            self.run_step()
            if first:
                shadows = [t for shadow in self.ema.shadow.values() for t in shadow.values()]
                self.log.first_step(time.perf_counter() - start, shadows)
                first = False
            bar.update(1)
            if self.step % self.log_interval == 0:
                record = self.log.record(self.step, self.nonfinite_steps, self._grad_norm)
                if record is not None:
                    bar.set_postfix(
                        loss=f"{record.get('loss', float('nan')):.4f}", img_s=f"{record['images_per_s']:.1f}"
                    )
            if self.consecutive_nonfinite >= self.max_nonfinite_steps:
                self.save()
                raise agreed(
                    TrainingDiverged(
                        f"{self.consecutive_nonfinite} optimizer steps in a row had a non-finite loss (step "
                        f"{self.step}); they were skipped, and {checkpoint_root(self.run_dir)} holds the "
                        "weights from before: lower the lr or check the data"
                    )
                )
            if self.sample_interval and self.step % self.sample_interval == 0:
                self.log.preview(self.step, str(self.ema_rates[0]), self._ema_of_first_rate())
            if self.eval_interval and self.step % self.eval_interval == 0:
                self.log.evaluate(self.step, str(self.ema_rates[0]), self._ema_of_first_rate())
            if self.save_interval and self.step % self.save_interval == 0:
                self.save()
            elif self.ema_snapshot_interval and self.step % self.ema_snapshot_interval == 0:
                self.save_profiles()
            if self._preempted():
                break
        if self.last_saved_step != self.step:
            self.save()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Write a complete checkpoint of this step; collective. Returns its directory.

        A failure on any rank (disk full, I/O error) raises CheckpointError on
        every rank naming the newest complete checkpoint, which stays the one
        resume picks: this one never gets its COMPLETE marker.
        """
        step = self.step
        root = checkpoint_root(self.run_dir)
        tag = f"step{step:06d}"
        ckpt_dir = os.path.join(root, tag)
        model_sd = self.master.full_state_dict()
        ema_sds = self.ema.full_state_dicts()
        ema_files = {str(rate): f"ema_{rate}_{step:06d}.pt" for rate in self.ema_rates}
        profile_files = {str(s): profile_file(s, step) for s in self.ema_profiles}
        client_state = {
            "data": self.data.state_dict(),
            "iddpm_ds_step": step,
            "nonfinite_steps": self.nonfinite_steps,
            "universal_checkpoint_info": {},  # lets deepspeed.checkpoint.ds_to_universal convert it
        }
        if isinstance(self.sampler, LossAwareSampler):
            client_state["sampler"] = {k: torch.from_numpy(v) for k, v in self.sampler.state_dict().items()}
        error = ""
        try:
            # DeepSpeed's save runs collectives before its writes; our writes below are local, so a
            # failure on one rank cannot leave the others waiting in a collective.
            self.engine.save_checkpoint(root, tag, client_state=client_state, save_latest=False)
            atomic_torch_save(rng_state(self.device), os.path.join(ckpt_dir, f"rng_rank{self.rank:03d}.pt"))
            if self.rank == 0:
                atomic_torch_save(model_sd, os.path.join(self.run_dir, f"model{step:06d}.pt"))
                for rate in self.ema_rates:
                    atomic_torch_save(ema_sds[rate], os.path.join(self.run_dir, ema_files[str(rate)]))
                for s in self.ema_profiles:
                    atomic_torch_save(
                        ema_sds[profile_key(s)], os.path.join(self.run_dir, profile_files[str(s)])
                    )
        except (OSError, RuntimeError) as e:
            error = f"rank {self.rank}: {first_line(e)}"
        errors = [None] * self.world
        dist.all_gather_object(errors, error)  # also the barrier: every rank's files are on disk
        errors = [e for e in errors if e]
        if errors:
            last = find_latest_checkpoint(self.run_dir)
            raise agreed(
                CheckpointError(
                    f"saving checkpoint {tag} failed ({errors[0]}); resume will use "
                    f"{last or 'no checkpoint (none complete)'}"
                )
            )
        if self.rank == 0:
            meta = {
                "step": step,
                "world_size": self.world,
                "zero_stage": self.master.stage,
                "model": f"model{step:06d}.pt",
                "ema": ema_files,
                "phema": profile_files,
            }
            write_complete(ckpt_dir, meta)
            log.info("saved checkpoint %s", ckpt_dir)
        dist.barrier()
        self.last_saved_step = step
        return ckpt_dir

    def save_profiles(self) -> None:
        """A snapshot of the post-hoc EMA profiles between checkpoints (rank 0 writes). Collective."""
        sds = self.ema.full_state_dicts()
        if self.rank == 0:
            for s in self.ema_profiles:
                atomic_torch_save(sds[profile_key(s)], os.path.join(self.run_dir, profile_file(s, self.step)))

    def resume(self, ckpt_dir: str, load_tag: Optional[str] = None) -> None:
        """Restore everything from a COMPLETE checkpoint directory written by save().

        :param load_tag: the DeepSpeed tag to load instead of ckpt_dir's own (the universal
            copy made by prepare_resume when the number of ranks changed).
        """
        meta = read_complete(ckpt_dir)
        root, tag = os.path.split(os.path.normpath(ckpt_dir))
        if meta["world_size"] != self.world and load_tag is None:
            raise CheckpointError(
                f"{ckpt_dir} was written by {meta['world_size']} ranks; this run has {self.world} (use "
                "prepare_resume)"
            )
        verify_checkpoint_files(ckpt_dir)
        load_path, client = self.engine.load_checkpoint(
            root, load_tag or tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")
        self.data.load_state_dict(client["data"])
        self.nonfinite_steps = int(client.get("nonfinite_steps", 0))
        if isinstance(self.sampler, LossAwareSampler):
            if "sampler" not in client:
                raise CheckpointError(
                    f"{ckpt_dir} has no loss-aware sampler state (it was trained with --schedule_sampler "
                    "uniform)"
                )
            self.sampler.load_state_dict({k: v.numpy() for k, v in client["sampler"].items()})
        run_dir = os.path.dirname(os.path.dirname(os.path.normpath(ckpt_dir)))
        for rate in self.ema_rates:
            name = meta["ema"].get(str(rate))
            if name is None:
                raise CheckpointError(
                    f"{ckpt_dir} has no EMA for rate {rate} (it has {', '.join(meta['ema'])})"
                )
            self.ema.load_full(rate, load_state_dict_file(os.path.join(run_dir, name)))
        for s in self.ema_profiles:
            name = meta.get("phema", {}).get(str(s))
            if name is None:
                raise CheckpointError(
                    f"{ckpt_dir} has no post-hoc EMA profile of width {s} (it has "
                    f"{', '.join(meta.get('phema', {})) or 'none'}): resume with the --ema_profiles it had"
                )
            self.ema.load_full(profile_key(s), load_state_dict_file(os.path.join(run_dir, name)))
        rng_file = os.path.join(ckpt_dir, f"rng_rank{self.rank:03d}.pt")
        if meta["world_size"] == self.world:
            set_rng_state(torch.load(rng_file, weights_only=True), self.device)
        else:  # a new rank layout has no saved per-rank streams: fresh ones, distinct per rank and step
            seed_everything(mix_seed(self.step, self.rank))
            log.warning(
                "resumed %d-rank checkpoint on %d ranks: weights, optimizer, EMA, sampler and data position "
                "are exact; random streams restart",
                meta["world_size"],
                self.world,
            )
        self.last_saved_step = self.step
        log.info("resumed from %s at step %d", ckpt_dir, self.step)
