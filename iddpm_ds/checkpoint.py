"""Loading model weights safely, and improved-diffusion interop.

Our UNet keeps improved-diffusion's module and parameter names, so one of
its state_dicts loads with `load_official_state_dict` (or plain
`model.load_state_dict`) unchanged, and ours load in improved-diffusion.
"""

import os
import pickle
import zipfile
from typing import Dict, List

import torch
import torch.nn as nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is meant for the user as is."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_state_dict_file(path: str, map_location="cpu") -> Dict[str, torch.Tensor]:
    """Load a tensor-only .pt file (weights_only: it never runs code from the file).

    Raises CheckpointError for a missing, truncated, corrupt or code-carrying file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds more than tensors and plain values ({_first_line(e)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt?): {_first_line(e)}"
        ) from None


def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its own checkpoint files pickle (plain data holders, no code on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def verify_checkpoint_files(ckpt_dir: str) -> None:
    """Refuse a DeepSpeed checkpoint directory if any of its .pt files holds more than tensors,
    plain values and DeepSpeed's own data classes.

    DeepSpeed loads its files with weights_only=False, which runs whatever a
    tampered pickle asks for; loading each file here first with weights_only
    (and that short allowlist) stops such a file before DeepSpeed opens it.
    """
    allowed = _deepspeed_safe_globals()
    for name in sorted(os.listdir(ckpt_dir)):
        if not name.endswith(".pt"):
            continue
        path = os.path.join(ckpt_dir, name)
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"refusing to load {path}: it holds objects that could run code ({_first_line(e)})"
            ) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(
                f"checkpoint file {path} is unreadable (truncated or corrupt?): {_first_line(e)}"
            ) from None


def _describe_mismatch(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Name the model flags that explain a state_dict/model mismatch."""
    own = model.state_dict()
    hints = []

    def shape(sd, key):
        return tuple(sd[key].shape) if key in sd else None

    if (
        shape(own, "out.2.weight")
        and shape(state_dict, "out.2.weight")
        and shape(own, "out.2.weight")[0] != shape(state_dict, "out.2.weight")[0]
    ):
        hints.append(
            f"learn_sigma (checkpoint has {shape(state_dict, 'out.2.weight')[0]} output channels, model "
            f"{shape(own, 'out.2.weight')[0]})"
        )
    if ("label_emb.weight" in own) != ("label_emb.weight" in state_dict):
        hints.append(
            f"class_cond (checkpoint {'is' if 'label_emb.weight' in state_dict else 'is not'} "
            "class-conditional)"
        )
    ck_in, my_in = shape(state_dict, "input_blocks.0.0.weight"), shape(own, "input_blocks.0.0.weight")
    if ck_in and my_in:
        if ck_in[0] != my_in[0]:
            hints.append(f"num_channels (checkpoint {ck_in[0]}, model {my_in[0]})")
        if ck_in[1] != my_in[1]:
            hints.append(
                f"model type: checkpoint takes {ck_in[1]} input channels, model {my_in[1]} (super-resolution "
                "vs base model?)"
            )

    def n_in(sd):
        return len({k.split(".")[1] for k in sd if k.startswith("input_blocks.")})

    if n_in(own) != n_in(state_dict):
        hints.append(
            f"image_size / channel_mult / num_res_blocks (checkpoint has {n_in(state_dict)} input blocks, "
            f"model {n_in(own)})"
        )

    def attn(sd):
        return sorted(k[: -len(".qkv.weight")] for k in sd if k.endswith(".qkv.weight"))

    if attn(own) != attn(state_dict):
        hints.append(
            f"attention_resolutions (checkpoint has attention at {attn(state_dict)}, model at {attn(own)})"
        )
    return hints


def load_official_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load an improved-diffusion (or iddpm_ds) state_dict into our UNet, strictly.

    Raises CheckpointError naming the mismatched flag(s) instead of listing keys.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        hints = _describe_mismatch(model, state_dict)
        detail = (
            "; ".join(hints)
            if hints
            else (
                f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped keys (first: "
                f"{(missing + unexpected + wrong)[0]})"
            )
        )
        raise CheckpointError(f"checkpoint does not match the model flags: {detail}")
    model.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- run directories
# Flags that change how a model is run, never what its weights mean.
RUNTIME_ONLY_FLAGS = {"timestep_respacing", "use_fused_kernels", "use_checkpoint", "dropout"}


def read_run_config(run_dir: str) -> Dict:
    """The config.json that launch/train.py writes into a run directory."""
    import json

    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir} has no config.json (not a training run directory?)")
    with open(path) as f:
        return json.load(f)


def merge_run_flags(saved: Dict, flags: Dict, explicit, source: str, override: bool = False) -> Dict:
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
    files = sorted(
        f for f in os.listdir(run_dir) if f.startswith(prefix) and f.endswith(".pt") and ".tmp" not in f
    )
    if not files:
        raise CheckpointError(f"no {prefix}*.pt in {run_dir}")
    return os.path.join(run_dir, files[-1])


def resolve_trained_model(
    run_dir: str, model_path: str, use_ema: bool, flags: Dict, explicit, override: bool = False
):
    """(weights file, model flags, number of data classes or None) for sampling or evaluation.

    :param run_dir: a training run directory (flags from its config.json, newest EMA or model file).
    :param model_path: a .pt file, a checkpoints/stepNNNNNN directory (its consolidated files), or a
        run directory (taken as run_dir).
    :param flags: the command line's model flags; explicit: the names given on it.
    """
    import json

    data_classes = None
    path = model_path
    if path and os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        run_dir, path = path, ""  # a run directory where a checkpoint was expected: same as --run_dir
    if path and os.path.isdir(path):
        marker = os.path.join(path, "COMPLETE")
        if not os.path.isfile(marker):
            raise CheckpointError(
                f"{path} is neither a run directory (no config.json) nor a complete checkpoint "
                "directory (no COMPLETE): pass --run_dir RUN_DIR, or --model_path with a .pt file "
                "or RUN_DIR/checkpoints/stepNNNNNN"
            )
        with open(marker) as f:
            meta = json.load(f)
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
    return path, flags, data_classes
