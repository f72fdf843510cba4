"""Checkpoints on disk: their layout, atomic writes, the COMPLETE marker, per-rank RNG state, safe
loading, conversion for a new rank count, and improved-diffusion interop.

Layout under a run directory:

    modelNNNNNN.pt, ema_RATE_NNNNNN.pt   consolidated fp32 weights (improved-diffusion's names)
    checkpoints/stepNNNNNN/              DeepSpeed state + rng_rankRRR.pt + COMPLETE
    checkpoints/stepNNNNNN_universal/    the same, world-size independent (made when the rank count changes)
    checkpoints/latest                   tag of the newest COMPLETE checkpoint (atomic)

COMPLETE is written by rank 0 after every rank has finished writing, so a checkpoint without it (a
save that died) is never resumed from. Our UNet keeps improved-diffusion's module and parameter
names, so one of its state_dicts loads with `load_official_state_dict` (or plain
`model.load_state_dict`) unchanged, and ours load in improved-diffusion.
"""

import json
import os
import pickle
import random
import zipfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import CheckpointError, first_line

COMPLETE = "COMPLETE"


def atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def find_latest_checkpoint(path: str) -> Optional[str]:
    """The newest complete checkpoint directory under a run dir, a checkpoints/ dir, or a tag dir itself."""
    if read_complete(path) is not None:
        return path
    root = checkpoint_root(path) if os.path.isdir(checkpoint_root(path)) else path
    if not os.path.isdir(root):
        return None
    latest = os.path.join(root, "latest")
    if os.path.isfile(latest):
        tag = open(latest).read().strip()
        if read_complete(os.path.join(root, tag)) is not None:
            return os.path.join(root, tag)
    complete = sorted(
        d
        for d in os.listdir(root)
        if d.startswith("step") and read_complete(os.path.join(root, d)) is not None
    )
    return os.path.join(root, complete[-1]) if complete else None


def read_complete(ckpt_dir: str) -> Optional[Dict]:
    """The metadata in ckpt_dir's COMPLETE marker (step, world_size, zero_stage, model, ema), or None
    if the directory holds no complete checkpoint."""
    path = os.path.join(ckpt_dir, COMPLETE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_complete(ckpt_dir: str, meta: Dict) -> None:
    """Mark ckpt_dir complete, then point `latest` at it (rank 0, once every rank has written)."""
    atomic_write_text(os.path.join(ckpt_dir, COMPLETE), json.dumps(meta))
    root, tag = os.path.split(os.path.normpath(ckpt_dir))
    atomic_write_text(os.path.join(root, "latest"), tag)


def rng_state(device: torch.device) -> Dict:
    """Every random stream of this process: Python, numpy, torch's CPU generator and, on a GPU, the generator
    of `device` (the rank's own, which draws its noise and timesteps)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "np_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "np_pos": int(np_state[2]),
        "np_has_gauss": int(np_state[3]),
        "np_gauss": float(np_state[4]),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict, device: torch.device) -> None:
    """Restore what rng_state saved; a saved CUDA stream goes to `device`'s generator."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    np.random.set_state(
        (
            "MT19937",
            state["np_keys"].numpy().astype(np.uint32),
            state["np_pos"],
            state["np_has_gauss"],
            state["np_gauss"],
        )
    )
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def prepare_resume(ckpt_dir: str, world_size: int) -> Optional[str]:
    """Before building the engine: None if ckpt_dir matches this world size, else the tag of a
    universal copy (made once by rank 0 with DeepSpeed's ds_to_universal) that loads on any
    number of ranks; the engine must then be built with checkpoint.load_universal = true.
    Collective."""
    import subprocess
    import sys

    meta = read_complete(ckpt_dir)
    if meta["world_size"] == world_size:
        return None
    universal = os.path.normpath(ckpt_dir) + "_universal"
    error = ""
    if dist.get_rank() == 0 and not os.path.isdir(universal):
        verify_checkpoint_files(ckpt_dir)
        tmp = universal + ".tmp"
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            ckpt_dir,
            "--output_folder",
            tmp,
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
            error = f"converting {ckpt_dir} to a universal checkpoint failed: {why}"
        else:
            os.replace(tmp, universal)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if any(errors):
        raise CheckpointError(next(e for e in errors if e))
    return os.path.basename(universal)


def load_state_dict_file(path: str, map_location: str = "cpu") -> Dict[str, torch.Tensor]:
    """Load a tensor-only .pt file (weights_only: it never runs code from the file).

    Raises CheckpointError for a missing, truncated, corrupt or code-carrying file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    return _safe_load(path, map_location, "more than tensors and plain values")


def _safe_load(path: str, map_location, holds: str, allowed: Sequence = ()):
    """torch.load with weights_only (and `allowed` classes); a refused or broken file is a CheckpointError."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it holds {holds} ({first_line(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt?): {first_line(e)}"
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
        _safe_load(os.path.join(ckpt_dir, name), "cpu", "objects that could run code", allowed)


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
