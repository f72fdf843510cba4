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


def load_state_dict_file(path: str, map_location="cpu") -> Dict[str, torch.Tensor]:
    """Load a tensor-only .pt file (weights_only: it never runs code from the file).

    Raises CheckpointError for a missing, truncated, corrupt or code-carrying file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refusing to load {path}: it holds more than tensors and plain values ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {first}") from None


def _describe_mismatch(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Name the model flags that explain a state_dict/model mismatch."""
    own = model.state_dict()
    hints = []

    def shape(sd, key):
        return tuple(sd[key].shape) if key in sd else None

    if shape(own, "out.2.weight") and shape(state_dict, "out.2.weight") and shape(own, "out.2.weight")[0] != shape(state_dict, "out.2.weight")[0]:
        hints.append(f"learn_sigma (checkpoint has {shape(state_dict, 'out.2.weight')[0]} output channels, model {shape(own, 'out.2.weight')[0]})")
    if ("label_emb.weight" in own) != ("label_emb.weight" in state_dict):
        hints.append(f"class_cond (checkpoint {'is' if 'label_emb.weight' in state_dict else 'is not'} class-conditional)")
    ck_in, my_in = shape(state_dict, "input_blocks.0.0.weight"), shape(own, "input_blocks.0.0.weight")
    if ck_in and my_in:
        if ck_in[0] != my_in[0]:
            hints.append(f"num_channels (checkpoint {ck_in[0]}, model {my_in[0]})")
        if ck_in[1] != my_in[1]:
            hints.append(f"model type: checkpoint takes {ck_in[1]} input channels, model {my_in[1]} (super-resolution vs base model?)")
    n_in = lambda sd: len({k.split(".")[1] for k in sd if k.startswith("input_blocks.")})
    if n_in(own) != n_in(state_dict):
        hints.append(f"image_size / channel_mult / num_res_blocks (checkpoint has {n_in(state_dict)} input blocks, model {n_in(own)})")
    attn = lambda sd: sorted(k[: -len(".qkv.weight")] for k in sd if k.endswith(".qkv.weight"))
    if attn(own) != attn(state_dict):
        hints.append(f"attention_resolutions (checkpoint has attention at {attn(state_dict)}, model at {attn(own)})")
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
        detail = "; ".join(hints) if hints else (
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped keys (first: {(missing + unexpected + wrong)[0]})"
        )
        raise CheckpointError(f"checkpoint does not match the model flags: {detail}")
    model.load_state_dict(state_dict, strict=True)
