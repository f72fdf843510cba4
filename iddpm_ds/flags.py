"""The entry points' command lines: each flag's help, a parser that refuses abbreviations, the flags
of a run directory (its config.json merged with the command line), flag validation before any work
starts, and one-line errors instead of tracebacks.

Every check here raises ConfigError with a message meant for the user as is: it names the flag,
the value and what to do instead. Entry points call `run_cli(main)`, which prints such an error as
one `NAME: error: ...` line and exits with status 2.
"""

import argparse
import difflib
import json
import os
import re
import sys
from typing import Callable, Dict, Iterable, List, NoReturn, Optional, Set, Tuple

import numpy as np
import torch

from . import dist_util
from . import script_util as su
from .checkpointing import load_official_state_dict, load_state_dict_file, read_complete
from .errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from .respace import SpacedDiffusion

HELP = {
    # improved-diffusion's model and diffusion flags
    "image_size": "image side in pixels (the UNet's input and output resolution)",
    "num_channels": "base channel width of the UNet (a multiple of 32: GroupNorm uses 32 groups)",
    "num_res_blocks": "residual blocks per resolution level",
    "num_heads": "attention heads (used when num_head_channels is -1)",
    "num_heads_upsample": "attention heads in the upsampling path (-1 = num_heads)",
    "attention_resolutions": "comma-separated resolutions in pixels with self-attention, e.g. 16,8",
    "dropout": "dropout probability in the residual blocks",
    "learn_sigma": "learn the reverse-process variances (paper Eq. 15; 6 output channels)",
    "sigma_small": "fixed variances: beta~_t (True) instead of beta_t (False); ignored with learn_sigma",
    "class_cond": "condition on class labels (the data must carry labels)",
    "diffusion_steps": "T, the number of diffusion steps",
    "noise_schedule": "beta schedule: linear (DDPM) or cosine (paper Eq. 17)",
    "timestep_respacing": "respaced steps for sampling, e.g. 250, 10,15,20 or ddim50 ('' = all T)",
    "use_kl": "train on the variational bound L_vlb alone",
    "predict_xstart": "the model predicts x_0 instead of the noise",
    "rescale_timesteps": "feed the model t * 1000 / T, so any T spans the same range",
    "rescale_learned_sigmas": "L_hybrid: L_simple + L_vlb / 1000 (paper Eq. 16) instead of their plain sum",
    "use_checkpoint": "activation checkpointing in the UNet's blocks (less memory, more compute)",
    "use_scale_shift_norm": "timestep embedding as GroupNorm scale and shift (else added)",
    "channel_mult": "per-level channel multipliers, e.g. 1,2,2,2 ('' = the image size's default)",
    "num_head_channels": "channels per attention head (-1 = use num_heads)",
    "use_fused_kernels": "Triton GroupNorm+SiLU and attention kernels where they run (GPU); PyTorch "
    "elsewhere",
    "channels_last": "run the UNet's activations in channels-last (NHWC) memory order: faster convolutions "
    "where oneDNN/cuDNN prefer it (benchmarks/cpu_speed.md)",
    "class_dropout_prob": "classifier-free guidance: replace a label by the learned null class with this "
    "probability in training (0 = off: improved-diffusion's model and checkpoints)",
    "snr_gamma": "Min-SNR-gamma loss weighting (Hang et al. 2023): the mse term weighted by "
    "min(SNR_t, gamma) / SNR_t for eps prediction, min(SNR_t, gamma) for x_0 (0 = off: improved-diffusion's "
    "loss; 5 is the paper's)",
    "guidance_scale": "classifier-free guidance weight w: eps_uncond + w (eps_cond - eps_uncond); 1 = plain "
    "conditional (needs a model trained with class_dropout_prob > 0 otherwise)",
    "large_size": "super-resolution: output image side in pixels",
    "small_size": "super-resolution: low-resolution input side in pixels",
    # training
    "data_dir": "image folder, tar shard(s), builtin:NAME, or '' for the built-in MNIST",
    "schedule_sampler": "timestep sampler: uniform, loss-second-moment (paper Sec. 3.3; the same objective) "
    "or high-noise (p_t proportional to 1/2 + t/T, not weighted back: a changed objective, more weight where "
    "the class is decided)",
    "lr": "learning rate (default: the DeepSpeed JSON's optimizer.params.lr; given, it overrides it)",
    "weight_decay": "AdamW weight decay (default: the DeepSpeed JSON's optimizer.params.weight_decay; given, "
    "it overrides it)",
    "lr_anneal_steps": "decay the lr linearly to 0 over this many steps and stop there (0 = constant lr)",
    "batch_size": "images per rank per optimizer step (default: the DeepSpeed JSON's "
    "train_micro_batch_size_per_gpu x gradient_accumulation_steps; given, it overrides them)",
    "microbatch": "images per forward pass, batch_size / microbatch accumulation steps (default: the "
    "DeepSpeed JSON's train_micro_batch_size_per_gpu; given, it overrides it; -1 = batch_size)",
    "ema_rate": "comma-separated EMA decay rates of the weights, each in (0, 1)",
    "ema_profiles": "post-hoc EMA (Karras et al. 2024): comma-separated relative widths of power-function "
    "averages to track and snapshot, e.g. 0.05,0.1; launch/posthoc_ema.py makes any other width from them "
    "('' = off)",
    "ema_snapshot_interval": "steps between post-hoc EMA snapshots besides the checkpoints' (0 = with the "
    "checkpoints only)",
    "log_interval": "optimizer steps between log lines (console, log.txt, progress.jsonl, TensorBoard)",
    "save_interval": "optimizer steps between checkpoints (0 = only at the end)",
    "resume_checkpoint": "a run or checkpoint directory to resume, or an improved-diffusion modelNNNNNN.pt "
    "to start from",
    "use_fp16": "fp16 with dynamic loss scaling (default: the DeepSpeed JSON's precision; given, it "
    "overrides it)",
    "fp16_scale_growth": "log2 loss-scale growth per good step (default: 1 / the DeepSpeed JSON's "
    "fp16.loss_scale_window; given, it overrides it)",
    "compile": "torch.compile the UNet through engine.compile (default: the DeepSpeed JSON's "
    "compile.enabled; given, it overrides it)",
    "max_steps": "stop after this many optimizer steps (0 = no limit)",
    "max_nonfinite_steps": "stop after this many consecutive steps with a non-finite loss (each is skipped)",
    "sample_interval": "steps between EMA sample grids in TensorBoard (0 = never)",
    "eval_interval": "steps between sample-quality metrics of the EMA weights, logged to TensorBoard and "
    "progress.jsonl (0 = never)",
    "eval_metrics": "comma-separated metrics for --eval_interval (fid,isc,kid,prc,mnist_acc,mnist_fd; '' = "
    "mnist_acc,mnist_fd on the built-in MNIST, else fid)",
    "eval_samples": "EMA samples (fixed seeds and labels) per --eval_interval",
    "eval_sampler": "the sampler of --eval_interval's samples: ancestral, ddim or dpmpp_2m",
    "eval_steps": "model evaluations per --eval_interval sample (respaced steps)",
    "inception_weights": "a local InceptionV3 weights file for fid/isc/kid/prc ('' = "
    "$IDDPM_DS_INCEPTION_WEIGHTS, else downloaded once into torch hub's cache)",
    "log_dir": "the run directory ('' = $OPENAI_LOGDIR, else runs/<timestamp>)",
    "seed": "random seed (weights, data order, noise)",
    "num_workers": "data loader worker processes per rank",
    "master_port": "rendezvous port for mpirun and single-process runs (0 = 29500 under mpirun, else a free "
    "one)",
    "override": "let flags on the command line win over the run's saved config.json",
    "local_rank": "set by the deepspeed launcher; do not pass it yourself",
    # sampling and evaluation
    "run_dir": "a training run directory: flags from its config.json, weights from its newest EMA",
    "model_path": "a .pt weights file, a checkpoints/stepNNNNNN directory, or a run directory",
    "use_ema": "use the EMA weights (else the raw model weights)",
    "num_samples": "number of images",
    "clip_denoised": "clip each predicted x_0 to [-1, 1]",
    "use_ddim": "DDIM sampling (deterministic with eta 0) instead of ancestral (= --sampler ddim)",
    "sampler": "ancestral (improved-diffusion's), ddim, dpmpp_2m (DPM-Solver++(2M): --timestep_respacing N "
    "is its number of model evaluations) or dpmpp_2m_sde (its stochastic variant)",
    "guidance_interval": "LO,HI: classifier-free guidance only where the noise level sigma = "
    "sqrt((1 - abar_t) / abar_t) lies in (LO, HI], the conditional prediction alone elsewhere ('' = every "
    "step)",
    "eta": "DDIM noise: 0 is the deterministic ODE, 1 is ancestral-like",
    "precision": "the UNet's precision when sampling: fp32, bf16 (autocast), or auto (bf16 where the device "
    "computes it natively: a GPU with bf16, a CPU with AMX-BF16 or AVX512-BF16)",
    "class_labels": "comma-separated labels to sample, cycled ('' = drawn at random)",
    "out": "output file ('' = $OPENAI_LOGDIR, else beside the model)",
    "base_samples": "super-resolution: .npz of low-resolution images (arr_0 uint8 NHWC, optional labels "
    "arr_1)",
}


def explicit_flags(argv: List[str]) -> Set[str]:
    """Names of the --flags present on a command line (with or without '=value')."""
    return {tok[2:].split("=", 1)[0] for tok in argv if tok.startswith("--")}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default after its help, unless the help says where
    the default comes from (the DeepSpeed JSON)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if "(default: " in (action.help or "") else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """A command-line mistake in one `NAME: error: ...` line, no usage block, printed by rank 0 alone under a
    launcher (every rank parses the same command line), with the closest known flag for an unknown one."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            for flag in re.findall(r"--[A-Za-z0-9_-]+", message):
                # A flag's start (an abbreviation) first, else the nearest spelling.
                close = [k for k in known if k.startswith(flag)] or difflib.get_close_matches(
                    flag, known, 1, 0.6
                )
                if close:
                    message += f"; did you mean {close[0]}?"
        if dist_util.env_rank() == 0:
            print(f"{self.prog}: error: {message} (--help lists every flag)", file=sys.stderr)
        sys.exit(2)


def make_parser(description: Optional[str]) -> argparse.ArgumentParser:
    """An entry point's parser: the docstring as description, no abbreviated flags.

    With abbreviations `--batch 8` would set batch_size while the explicit-flag detection sees
    `batch`, and the DeepSpeed JSON would silently win; a misspelt flag must be an error.
    """
    return Parser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)


def model_family(super_res: bool = False) -> Tuple[Dict, Callable]:
    """(defaults, factory) of the model flags: improved-diffusion's image models, or its
    super-resolution ones."""
    if super_res:
        return su.sr_model_and_diffusion_defaults(), su.sr_create_model_and_diffusion
    return su.model_and_diffusion_defaults(), su.create_model_and_diffusion


def parse_command_line(
    description: Optional[str],
    defaults: Dict,
    super_res: bool = False,
    help: Dict = HELP,
    deepspeed_config: bool = False,
) -> Tuple[argparse.Namespace, Dict, Set[str]]:
    """An entry point's command line: its own flags (defaults), the model's, --local_rank (which the
    deepspeed launcher passes) and, with deepspeed_config, DeepSpeed's --deepspeed_config.

    Returns (args, the model flags as a dict, the names of the flags given on the command line).
    """
    model_defaults, _ = model_family(super_res)
    parser = make_parser(description)
    su.add_dict_to_argparser(parser, {**defaults, **model_defaults}, help)
    parser.add_argument("--local_rank", type=int, default=-1, help=HELP["local_rank"])
    if deepspeed_config:
        import deepspeed  # here: sampling and evaluation run without it

        deepspeed.add_config_arguments(parser)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    return args, su.args_to_dict(args, model_defaults.keys()), explicit_flags(argv)


def prints_here(error: Exception) -> bool:
    """Whether this rank prints a user error: rank 0 alone for one every rank meets alike (the command line
    and configuration, checked before the ranks meet; an error they agreed on); every rank for its own."""
    if not torch.distributed.is_initialized():
        return dist_util.env_rank() == 0
    return torch.distributed.get_rank() == 0 or not getattr(error, "every_rank", False)


def run_cli(main: Callable[[], Optional[int]]) -> None:
    """Run an entry point's main: a user error becomes one `NAME: error: ...` line (prints_here) and exit
    status 2 (3 for a diverged run), this rank's process-group connections closed so that the exit status is
    that one; after success the process group is left together and the exit status is main's return value
    (None: 0)."""
    name = os.path.basename(sys.argv[0])
    try:
        status = main()
        dist_util.shutdown()
        if status:
            sys.exit(status)
    except (ConfigError, DataError, CheckpointError, TrainingDiverged) as e:
        if prints_here(e):
            print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        dist_util.close()
        sys.exit(3 if isinstance(e, TrainingDiverged) else 2)


# --------------------------------------------------------------------------- run directories
# Flags that change how a model is run, never what its weights mean.
RUNTIME_ONLY_FLAGS = {
    "timestep_respacing",
    "use_fused_kernels",
    "channels_last",
    "use_checkpoint",
    "dropout",
    "snr_gamma",
}


def read_run_config(run_dir: str) -> Dict:
    """The config.json that launch/train.py writes into a run directory."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir} has no config.json (not a training run directory?)")
    with open(path) as f:
        return json.load(f)


def merge_run_flags(
    saved: Dict, flags: Dict, explicit: Iterable[str], source: str, override: bool = False
) -> Dict:
    """Model flags for reusing a run: saved values fill in every flag not given on the command line;
    a given flag that contradicts a saved one is an error (unless override or runtime-only)."""
    merged = dict(flags)
    for k, v in saved.items():
        if k not in explicit:
            merged[k] = v
        elif k not in RUNTIME_ONLY_FLAGS and flags.get(k) != v and not override:
            raise CheckpointError(
                f"--{k} {flags.get(k)} contradicts {v!r} in {source} (use the same flags, or --override True "
                "to force)"
            )
    return merged


def _newest(run_dir: str, prefix: str) -> str:
    """The newest PREFIX[RATE_]STEP.pt of a run by step: model000100.pt, ema_0.9999_000100.pt (not the
    post-hoc ema_sigma*.pt, which are asked for by name)."""
    pattern = re.compile(re.escape(prefix) + r"(?:\d*\.?\d+_)?(\d+)\.pt$")
    files = [(int(m.group(1)), f) for f in os.listdir(run_dir) for m in [pattern.match(f)] if m]
    if not files:
        raise CheckpointError(f"no {prefix}*.pt in {run_dir}")
    return os.path.join(run_dir, max(files)[1])


def resolve_trained_model(
    run_dir: str,
    model_path: str,
    use_ema: bool,
    flags: Dict,
    explicit: Iterable[str],
    override: bool = False,
    super_res: bool = False,
) -> Tuple[str, Dict, Optional[int]]:
    """(weights file, validated model flags, number of data classes or None) for sampling or evaluation.

    :param run_dir: a training run directory (flags from its config.json, newest EMA or model file).
    :param model_path: a .pt file, a checkpoints/stepNNNNNN directory (its consolidated files), or a
        run directory (taken as run_dir).
    :param flags: the command line's model flags; explicit: the names given on it.
    """
    data_classes = None
    path = model_path
    if path and os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        run_dir, path = path, ""  # a run directory where a checkpoint was expected: same as --run_dir
    if path and os.path.isdir(path):
        meta = read_complete(path)
        if meta is None:
            raise CheckpointError(
                f"{path} is neither a run directory (no config.json) nor a complete checkpoint "
                "directory (no COMPLETE): pass --run_dir RUN_DIR, or --model_path with a .pt file "
                "or RUN_DIR/checkpoints/stepNNNNNN"
            )
        run_dir = os.path.dirname(os.path.dirname(os.path.normpath(path)))
        path = os.path.join(run_dir, next(iter(meta["ema"].values())) if use_ema else meta["model"])
    if run_dir:
        config = read_run_config(run_dir)
        flags = merge_run_flags(
            config["model_flags"], flags, explicit, os.path.join(run_dir, "config.json"), override
        )
        data_classes = config.get("data_classes")
        if not path:
            path = _newest(run_dir, "ema_") if use_ema else _newest(run_dir, "model")
    if not path:
        raise CheckpointError("give --run_dir or --model_path")
    validate_model_flags(flags, super_res)
    return path, flags, data_classes


def load_trained_model(
    path: str, flags: Dict, super_res: bool, device: torch.device
) -> Tuple[torch.nn.Module, SpacedDiffusion]:
    """(model, diffusion) built from the model flags, the model with path's weights on device, in eval
    mode; path as resolve_trained_model returns it."""
    model, diffusion = model_family(super_res)[1](**flags)
    load_official_state_dict(model, load_state_dict_file(path))
    return model.to(device).eval(), diffusion


# --------------------------------------------------------------------------- validation
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _int_list(flag: str, text: str) -> list:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{flag} {text!r} must be comma-separated integers") from None


def validate_model_flags(flags: Dict, super_res: bool = False) -> None:
    """Reject model and diffusion flags that could not build, or would build something else than asked.

    :param flags: model_and_diffusion_defaults()-style keywords (sr_ variants with super_res).
    """
    from .gaussian_diffusion import get_named_beta_schedule
    from .respace import space_timesteps
    from .script_util import DEFAULT_CHANNEL_MULT

    size_flag = "large_size" if super_res else "image_size"
    size = flags[size_flag]
    _require(size > 0, f"--{size_flag} must be positive, got {size}")
    if super_res:
        small = flags["small_size"]
        _require(0 < small <= size, f"--small_size {small} must be positive and at most --large_size {size}")
    _require(flags["num_channels"] > 0, f"--num_channels must be positive, got {flags['num_channels']}")
    _require(
        flags["num_res_blocks"] >= 1, f"--num_res_blocks must be at least 1, got {flags['num_res_blocks']}"
    )
    if flags["channel_mult"]:
        mult = _int_list("channel_mult", flags["channel_mult"])
        _require(
            len(mult) > 0 and min(mult) > 0,
            f"--channel_mult {flags['channel_mult']!r} needs positive integers",
        )
    else:
        _require(
            size in DEFAULT_CHANNEL_MULT,
            f"--{size_flag} {size} has no default channel_mult (defaults exist for "
            f"{sorted(DEFAULT_CHANNEL_MULT)}): "
            "pass --channel_mult, e.g. 1,2,2 for 16 px or 1,1,2,2,4,4,4 for 512 px",
        )
        mult = list(DEFAULT_CHANNEL_MULT[size])
    levels = len(mult)
    factor = 2 ** (levels - 1)
    below, above = size // factor * factor, (size // factor + 1) * factor
    _require(
        size % factor == 0,
        f"--{size_flag} {size} is not divisible by 2^{levels - 1}, as {levels} levels of channel_mult {mult} "
        f"need: use a multiple of {factor}, e.g. {f'{below} or ' if below else ''}{above}",
    )
    widths = sorted({flags["num_channels"] * m for m in mult})
    bad = [w for w in widths if w % 32]
    _require(
        not bad,
        f"--num_channels {flags['num_channels']} with channel_mult {mult} gives widths {bad} that are not "
        "multiples of 32, which GroupNorm's 32 groups need: use a multiple of 32",
    )
    reached = [size // 2**level for level in range(levels)]
    attention = _int_list("attention_resolutions", flags["attention_resolutions"])
    never = [r for r in attention if r not in reached]
    _require(
        not never,
        f"--attention_resolutions {','.join(map(str, never))} is never reached: this model's "
        f"resolutions are {','.join(map(str, reached))} px",
    )
    # Attention widths are level widths (each block's output width is its level's); the middle
    # block always attends, at the deepest width, with num_heads.
    attention_widths = {flags["num_channels"] * mult[reached.index(r)] for r in attention}
    deepest = flags["num_channels"] * mult[-1]
    if flags["num_head_channels"] != -1:
        head_ch = flags["num_head_channels"]
        _require(head_ch > 0, f"--num_head_channels must be positive or -1, got {head_ch}")
        bad = sorted(w for w in attention_widths | {deepest} if w % head_ch)
        _require(not bad, f"--num_head_channels {head_ch} does not divide the attention widths {bad}")
    else:
        upsample = flags["num_heads_upsample"]
        for flag, value, widths in (
            ("num_heads", flags["num_heads"], attention_widths | {deepest}),
            ("num_heads_upsample", upsample, attention_widths if upsample != -1 else set()),
        ):
            _require(
                value >= 1 or (flag == "num_heads_upsample" and value == -1),
                f"--{flag} must be at least 1{' (or -1)' if flag == 'num_heads_upsample' else ''}, got "
                f"{value}",
            )
            bad = sorted(w for w in widths if w % value)
            _require(not bad, f"--{flag} {value} does not divide the attention widths {bad}")
    _require(0.0 <= flags["dropout"] < 1.0, f"--dropout must lie in [0, 1), got {flags['dropout']}")
    p = flags["class_dropout_prob"]
    _require(0.0 <= p < 1.0, f"--class_dropout_prob must lie in [0, 1), got {p}")
    _require(
        p == 0 or flags["class_cond"], f"--class_dropout_prob {p} needs --class_cond True (labels to drop)"
    )

    gamma = flags.get("snr_gamma", 0.0)
    _require(gamma >= 0, f"--snr_gamma must not be negative (0 = off), got {gamma}")
    _require(
        not (gamma and flags["use_kl"]),
        f"--snr_gamma {gamma} weights the mse term, and --use_kl True trains on the bound alone: drop one",
    )
    steps, schedule = flags["diffusion_steps"], flags["noise_schedule"]
    _require(steps >= 1, f"--diffusion_steps must be at least 1, got {steps}")
    _require(schedule in ("linear", "cosine"), f"--noise_schedule must be linear or cosine, got {schedule!r}")
    betas = get_named_beta_schedule(schedule, steps)
    # A beta of exactly 1 (the linear schedule at T = 20) passes improved-diffusion's check but makes
    # alpha_bar 0 at the last step, and every x_0 prediction there infinite.
    _require(
        bool((betas > 0).all() and (betas < 1).all()),
        f"--diffusion_steps {steps} with --noise_schedule {schedule} gives betas of 1 or more (its betas "
        f"scale as 1000/T and need T > 20): use --diffusion_steps 21 or more, or --noise_schedule cosine",
    )
    if flags["timestep_respacing"]:
        try:
            space_timesteps(steps, flags["timestep_respacing"])
        except ValueError as e:
            raise ConfigError(
                f"--timestep_respacing {flags['timestep_respacing']!r} does not fit --diffusion_steps "
                f"{steps}: {e}"
            ) from None


def validate_train_flags(args: argparse.Namespace, explicit: Iterable[str]) -> None:
    """Reject training flags with values that make no sense (sizes, intervals, rates, names)."""
    from .resample import SAMPLER_NAMES

    explicit = set(explicit)
    _require(
        args.schedule_sampler in SAMPLER_NAMES,
        f"--schedule_sampler must be one of {', '.join(SAMPLER_NAMES)}, got {args.schedule_sampler!r}",
    )
    _require(args.lr >= 0, f"--lr must not be negative, got {args.lr}")
    _require(args.weight_decay >= 0, f"--weight_decay must not be negative, got {args.weight_decay}")
    if "batch_size" in explicit or "microbatch" in explicit:
        _require(args.batch_size >= 1, f"--batch_size must be at least 1, got {args.batch_size}")
        _require(
            args.microbatch == -1 or 1 <= args.microbatch <= args.batch_size,
            f"--microbatch must be -1 or between 1 and --batch_size {args.batch_size}, got {args.microbatch}",
        )
    rates = [r for r in str(args.ema_rate).split(",") if r.strip()]
    _require(len(rates) > 0, "--ema_rate needs at least one rate, e.g. 0.9999")
    for rate in rates:
        try:
            value = float(rate)
        except ValueError:
            raise ConfigError(f"--ema_rate {args.ema_rate!r} must be comma-separated numbers") from None
        _require(0.0 < value < 1.0, f"--ema_rate {rate} must lie strictly between 0 and 1")
    _require(args.log_interval >= 1, f"--log_interval must be at least 1, got {args.log_interval}")
    for width in [w for w in str(args.ema_profiles).split(",") if w.strip()]:
        try:
            value = float(width)
        except ValueError:
            raise ConfigError(
                f"--ema_profiles {args.ema_profiles!r} must be comma-separated numbers"
            ) from None
        _require(
            0.0 < value < 0.289, f"--ema_profiles {width}: a relative width lies in (0, 0.289), e.g. 0.05"
        )
    if args.eval_interval:
        from .evaluation import training_metrics

        training_metrics(args.eval_metrics, args.data_dir, args.class_cond)
        _require(args.eval_samples >= 2, f"--eval_samples must be at least 2, got {args.eval_samples}")
        from .sampling import SAMPLERS

        _require(
            args.eval_sampler in SAMPLERS,
            f"--eval_sampler must be one of {', '.join(SAMPLERS)}, got {args.eval_sampler!r}",
        )
        _require(args.eval_steps >= 2, f"--eval_steps must be at least 2, got {args.eval_steps}")
    flags = ("save_interval", "sample_interval", "eval_interval", "max_steps", "lr_anneal_steps")
    flags += ("ema_snapshot_interval",)
    for flag in (*flags, "num_workers", "seed"):
        _require(getattr(args, flag) >= 0, f"--{flag} must not be negative, got {getattr(args, flag)}")
    _require(
        args.max_nonfinite_steps >= 1,
        f"--max_nonfinite_steps must be at least 1, got {args.max_nonfinite_steps}",
    )
    _require(
        args.fp16_scale_growth > 0, f"--fp16_scale_growth must be positive, got {args.fp16_scale_growth}"
    )
    _require(
        0 <= args.master_port <= 65535, f"--master_port must be a TCP port (0-65535), got {args.master_port}"
    )


def guidance_interval(text: str) -> Optional[Tuple[float, float]]:
    """--guidance_interval "LO,HI" -> (LO, HI); '' -> None (guidance at every step)."""
    if not text:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--guidance_interval {text!r} must be two noise levels LO,HI, e.g. 0.3,5"
        ) from None
    _require(0 <= lo < hi, f"--guidance_interval {text}: needs 0 <= LO < HI (sigma runs from 0 to about 160)")
    return lo, hi


def validate_sample_flags(args: argparse.Namespace, flags: Dict, num_classes: Optional[int]) -> None:
    """Reject sampling flags that cannot work with the model's flags."""
    from .sampling import PRECISIONS, SAMPLERS

    _require(
        args.sampler in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}, got {args.sampler!r}"
    )
    _require(
        args.precision in PRECISIONS,
        f"--precision must be one of {', '.join(PRECISIONS)}, got {args.precision!r}",
    )
    _require(
        not args.use_ddim or args.sampler in ("ancestral", "ddim"),
        f"--use_ddim True contradicts --sampler {args.sampler}: give one of them",
    )
    respacing = str(flags["timestep_respacing"])
    if args.sampler.startswith("dpmpp"):
        _require(
            respacing.isdigit() and int(respacing) >= 2,
            f"--sampler {args.sampler} takes --timestep_respacing N, its number of model evaluations (a "
            f"plain count of 2 or more, e.g. 20), not {respacing!r}",
        )
    if guidance_interval(args.guidance_interval) is not None:
        _require(
            args.guidance_scale != 1.0,
            f"--guidance_interval {args.guidance_interval} limits guidance, but --guidance_scale is 1 "
            "(none): give a scale, e.g. --guidance_scale 3",
        )
    _require(args.num_samples >= 1, f"--num_samples must be at least 1, got {args.num_samples}")
    _require(args.batch_size >= 1, f"--batch_size must be at least 1, got {args.batch_size}")
    _require(args.eta >= 0, f"--eta must not be negative, got {args.eta}")
    _require(args.seed >= 0, f"--seed must not be negative, got {args.seed}")
    if args.guidance_scale != 1.0:
        _require(
            flags["class_cond"] and flags["class_dropout_prob"] > 0,
            f"--guidance_scale {args.guidance_scale} needs a model trained with a null class "
            "(--class_cond True --class_dropout_prob > 0); this one has none: use --guidance_scale 1",
        )
    if args.class_labels:
        _require(
            flags["class_cond"],
            "--class_labels needs a class-conditional model (this one has class_cond False)",
        )
        labels = np.array(_int_list("class_labels", args.class_labels))
        _require(
            len(labels) > 0 and labels.min() >= 0 and labels.max() < num_classes,
            f"--class_labels must lie in [0, {num_classes})",
        )
