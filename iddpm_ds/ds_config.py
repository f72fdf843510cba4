"""The DeepSpeed JSON: loading, validation, and the few seed flags that may override it.

The JSON is the single source of truth for micro-batch, accumulation,
precision, ZeRO, optimizer, clipping and compilation. improved-diffusion's flags
that map onto it (lr, weight_decay, batch_size/microbatch, use_fp16,
fp16_scale_growth) and --compile override it only when given explicitly on the
command line.
"""

import argparse
import copy
import json
import os
from typing import Dict, List, Set, Tuple

from .errors import ConfigError

# The command-line flags that override the JSON when given (resolve), with improved-diffusion's defaults.
OVERRIDE_FLAGS = dict(
    lr=1e-4,
    weight_decay=0.0,
    batch_size=1,
    microbatch=-1,
    use_fp16=False,
    fp16_scale_growth=1e-3,
    compile=False,
)

# Top-level keys DeepSpeed 0.19 understands; anything else is most likely a typo.
KNOWN_KEYS = {
    "train_batch_size": int,
    "train_micro_batch_size_per_gpu": int,
    "gradient_accumulation_steps": int,
    "optimizer": dict,
    "scheduler": dict,
    "fp16": dict,
    "bf16": dict,
    "zero_optimization": dict,
    "gradient_clipping": (int, float),
    "steps_per_print": int,
    "wall_clock_breakdown": bool,
    "tensorboard": dict,
    "csv_monitor": dict,
    "wandb": dict,
    "comet": dict,
    "checkpoint": dict,
    "activation_checkpointing": dict,
    "data_types": dict,
    "zero_allow_untested_optimizer": bool,
    "zero_force_ds_cpu_optimizer": bool,
    "communication_data_type": str,
    "prescale_gradients": bool,
    "gradient_predivide_factor": (int, float),
    "sparse_gradients": bool,
    "flops_profiler": dict,
    "amp": dict,
    "dump_state": bool,
    "memory_breakdown": bool,
    "torch_autocast": dict,
    "compile": dict,
    "elasticity": dict,
    "aio": dict,
    "comms_logger": dict,
    "seq_parallel_communication_data_type": str,
    "timers": dict,
    "graph_harvesting": bool,
    "use_data_before_expert_parallelism": bool,
}
PRECISION_KEYS = {
    "enabled",
    "auto_cast",
    "loss_scale",
    "initial_scale_power",
    "loss_scale_window",
    "hysteresis",
    "consecutive_hysteresis",
    "min_loss_scale",
    "fp16_master_weights_and_grads",
    "immediate_grad_update",
    "check_grad_overflow",
}


# The "compile" section's keys that iddpm_ds reads itself (DeepSpeed 0.12-0.14 named them the same): the
# UNet goes through engine.compile(backend, kwargs) when enabled. Its other keys are DeepSpeed's DeepCompile
# settings and are passed on.
COMPILE_KEYS = {"enabled": bool, "backend": str, "kwargs": dict}


# improved-diffusion's loss scaling: 2^20 at the start, halved at each overflow, doubled after
# 1000 good steps (its fp16_scale_growth of 1e-3 per step).
FP16_IDDPM_DEFAULTS = {
    "initial_scale_power": 20,
    "loss_scale_window": 1000,
    "hysteresis": 1,
    "min_loss_scale": 1,
}


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__


def validate(cfg: Dict, path: str = "config") -> None:
    """Reject unknown top-level keys and wrong types, naming the key."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the DeepSpeed config must be a JSON object")
    for key, value in cfg.items():
        if key.startswith("_"):  # comments
            continue
        if key not in KNOWN_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}")
        want = KNOWN_KEYS[key]
        if isinstance(value, bool) and want in (int, (int, float)) or not isinstance(value, want):
            raise ConfigError(
                f"{path}: {key!r} must be {_type_name(want)}, got {type(value).__name__} {value!r}"
            )
    for section in ("fp16", "bf16"):
        for key in cfg.get(section, {}):
            if key not in PRECISION_KEYS:
                raise ConfigError(f"{path}: unknown key {section}.{key!r}")
        enabled = cfg.get(section, {}).get("enabled", False)
        if not isinstance(enabled, bool) and not (section == "bf16" and enabled == "auto"):
            raise ConfigError(
                f"{path}: {section}.enabled must be true or false"
                + (' or "auto"' if section == "bf16" else "")
            )
    _validate_compile(cfg.get("compile", {}), path)
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in cfg and cfg[key] <= 0:
            raise ConfigError(f"{path}: {key!r} must be positive, got {cfg[key]}")


def _validate_compile(section: Dict, path: str) -> None:
    for key, value in section.items():
        if key in COMPILE_KEYS:
            if not isinstance(value, COMPILE_KEYS[key]):
                raise ConfigError(
                    f"{path}: compile.{key} must be {_type_name(COMPILE_KEYS[key])}, got {value!r}"
                )
            continue
        from deepspeed.compile.config import CompileConfig  # DeepCompile's keys, which DeepSpeed reads

        if key not in CompileConfig.model_fields:
            known = sorted(set(COMPILE_KEYS) | set(CompileConfig.model_fields))
            raise ConfigError(f"{path}: unknown key compile.{key!r} (known: {', '.join(known)})")
    if "backend" in section.get("kwargs", {}):
        raise ConfigError(f"{path}: set the backend as compile.backend, not inside compile.kwargs")


def split_compile(cfg: Dict) -> Tuple[Dict, Dict]:
    """(the config DeepSpeed gets, iddpm_ds's compile settings {enabled, backend, kwargs}).

    DeepSpeed 0.19 refuses the enabled/backend/kwargs keys in its "compile" section, so they are taken out;
    DeepCompile's own keys stay.
    """
    cfg = copy.deepcopy(cfg)
    section = cfg.pop("compile", {})
    ours = {k: section.pop(k) for k in list(section) if k in COMPILE_KEYS}
    if section:
        cfg["compile"] = section
    return cfg, {"enabled": False, "backend": "inductor", "kwargs": {}, **ours}


def load(path: str) -> Dict:
    """Read and validate a DeepSpeed JSON file."""
    if not path:
        raise ConfigError("no DeepSpeed config: pass --deepspeed_config ds_configs/<file>.json")
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    validate(cfg, path)
    return cfg


def resolve(
    cfg: Dict,
    args: argparse.Namespace,
    explicit: Set[str],
    world_size: int,
    fp16_supported: bool,
    native_bf16: bool = False,
    on_cpu: bool = False,
) -> Tuple[Dict, List[str]]:
    """Apply explicit seed flags to a validated config and fill in batch sizes.

    :param args: namespace with the OVERRIDE_FLAGS.
    :param explicit: flags given on the command line (explicit_flags).
    :param on_cpu: the ranks run on CPUs (a fp16 config there gets a warning where bf16 is native).
    :param native_bf16: the device computes bf16 in hardware (dist_util.native_bf16): bf16.enabled "auto"
        becomes true there and false elsewhere, where bf16 would be emulated and slower than fp32.
    :return: (resolved config, log lines saying what was overridden or changed).
    """
    cfg = copy.deepcopy(cfg)
    notes = []

    micro_batch = cfg.get("train_micro_batch_size_per_gpu")
    grad_accum_steps = cfg.get("gradient_accumulation_steps", 1)
    if "batch_size" in explicit or "microbatch" in explicit:
        batch = args.batch_size
        micro_flag = args.microbatch if args.microbatch > 0 else batch
        if batch % micro_flag:
            raise ConfigError(f"--batch_size {batch} is not a multiple of --microbatch {micro_flag}")
        micro_batch, grad_accum_steps = micro_flag, batch // micro_flag
        cfg.pop("train_batch_size", None)
        notes.append(
            f"--batch_size/--microbatch override the JSON: micro-batch {micro_batch} x accumulation "
            f"{grad_accum_steps} per rank"
        )
    if micro_batch is None:
        if "train_batch_size" not in cfg:
            raise ConfigError(
                "the DeepSpeed config sets no batch size: add train_micro_batch_size_per_gpu (or pass "
                "--batch_size)"
            )
        total = cfg["train_batch_size"]
        if total % (grad_accum_steps * world_size):
            raise ConfigError(
                f"train_batch_size {total} is not divisible by gradient_accumulation_steps "
                f"{grad_accum_steps} x {world_size} ranks"
            )
        micro_batch = total // (grad_accum_steps * world_size)
    if "train_batch_size" in cfg and cfg["train_batch_size"] != micro_batch * grad_accum_steps * world_size:
        raise ConfigError(
            f"train_batch_size {cfg['train_batch_size']} != micro-batch {micro_batch} x accumulation "
            f"{grad_accum_steps} x {world_size} ranks; remove train_batch_size or make them agree"
        )
    cfg.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=grad_accum_steps,
        train_batch_size=micro_batch * grad_accum_steps * world_size,
    )

    for flag in ("lr", "weight_decay"):
        if flag in explicit:
            opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
            opt.setdefault("params", {})[flag] = getattr(args, flag)
            notes.append(f"--{flag} {getattr(args, flag)} overrides the JSON optimizer")

    if "use_fp16" in explicit:
        cfg.setdefault("fp16", {})["enabled"] = bool(args.use_fp16)
        if args.use_fp16:
            cfg.setdefault("bf16", {})["enabled"] = False
        notes.append(f"--use_fp16 {args.use_fp16} overrides the JSON precision")
    if "compile" in explicit:
        cfg.setdefault("compile", {})["enabled"] = bool(args.compile)
        notes.append(f"--compile {args.compile} overrides the JSON's compile.enabled")
    compile_section = cfg.get("compile", {})
    if compile_section.get("enabled") and cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        if not compile_section.get("deepcompile"):
            notes.append(
                "compile with ZeRO-3: DeepSpeed gathers each module's parameters in hooks between compiled "
                "pieces (a graph break per module), so expect little speed-up; DeepCompile "
                "(compile.deepcompile, CUDA) compiles ZeRO-3 whole"
            )
    if "fp16_scale_growth" in explicit:
        # improved-diffusion grows log2(scale) by this much per good step: doubling every 1/growth steps.
        cfg.setdefault("fp16", {})["loss_scale_window"] = max(1, round(1 / args.fp16_scale_growth))
        notes.append(
            f"--fp16_scale_growth {args.fp16_scale_growth} -> fp16.loss_scale_window "
            f"{cfg['fp16']['loss_scale_window']}"
        )

    # DeepSpeed's defaults where the JSON is silent differ from improved-diffusion's training:
    # it would clip the global gradient norm at 1.0 and start fp16 loss scaling at 2^16 with a
    # hysteresis of 2. improved-diffusion never clips, starts at 2^20 and halves on every overflow.
    if "gradient_clipping" not in cfg:
        cfg["gradient_clipping"] = 0.0
    clip = cfg["gradient_clipping"]
    notes.append(
        f"gradient clipping: {f'global norm {clip:g}' if clip > 0 else 'off'} (the JSON's gradient_clipping)"
    )
    if cfg.get("fp16", {}).get("enabled"):
        for key, value in FP16_IDDPM_DEFAULTS.items():
            cfg["fp16"].setdefault(key, value)

    if cfg.get("bf16", {}).get("enabled") == "auto":
        cfg["bf16"]["enabled"] = native_bf16
        notes.append(
            "bf16.enabled auto: "
            + ("bf16 (the device computes bf16 natively)" if native_bf16 else "fp32 (no native bf16 here)")
        )
    if cfg.get("fp16", {}).get("enabled") and not fp16_supported:
        cfg["fp16"]["enabled"] = False
        cfg.setdefault("bf16", {})["enabled"] = True
        notes.append(
            "WARNING: this accelerator cannot train in fp16 (CPU); running the fp16 config in bf16 instead"
        )
    if cfg.get("fp16", {}).get("enabled") and on_cpu and native_bf16:
        # A CPU computes fp16 at best in AVX512-FP16 vectors, bf16 in AMX tiles or AVX512-BF16 dot products.
        notes.append(
            "WARNING: training in fp16 on a CPU that computes bf16 natively: fp16 is the far slower one here "
            "(the GPU configs zero0-3.json are fp16); ds_configs/cpu_bf16_auto.json or --use_fp16 False "
            "trains in bf16"
        )
    if cfg.get("fp16", {}).get("enabled") and cfg.get("bf16", {}).get("enabled"):
        raise ConfigError("fp16 and bf16 are both enabled in the DeepSpeed config; enable one")
    cfg.setdefault("steps_per_print", 10**9)  # we log ourselves; keep DeepSpeed's per-step prints off
    return cfg, notes


def precision(cfg: Dict) -> str:
    if cfg.get("fp16", {}).get("enabled"):
        return "fp16"
    if cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp32"
