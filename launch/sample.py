"""Sample images from a trained model: improved-diffusion's .npz plus a PNG grid.

    python launch/sample.py --run_dir runs/demo                       (flags from its config.json, newest EMA)
    python launch/sample.py --model_path ema_0.9999_200000.pt --image_size 64 ...   (a bare .pt: give the flags)
    deepspeed --num_gpus 2 launch/sample.py --run_dir runs/demo       (each rank samples its share)

--model_path may also be a DeepSpeed checkpoint directory (checkpoints/stepNNNNNN).
Sampling is ancestral with --timestep_respacing ("250", "ddim50", ...) or DDIM
(--use_ddim, --eta). The same --seed gives the same images.
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from iddpm_ds import dist_util  # noqa: E402
from iddpm_ds.checkpoint import CheckpointError, load_official_state_dict, load_state_dict_file  # noqa: E402
from iddpm_ds.ds_config import ConfigError, explicit_flags  # noqa: E402
from iddpm_ds.script_util import NUM_CLASSES, add_dict_to_argparser, args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults  # noqa: E402

SAMPLE_DEFAULTS = dict(run_dir="", model_path="", use_ema=True, num_samples=64, batch_size=16, clip_denoised=True, use_ddim=False,
                       eta=0.0, class_labels="", seed=0, out="", override=False, master_port=0)
# Flags that only change how we sample, never what the weights mean.
SAMPLING_ONLY = {"timestep_respacing", "use_fused_kernels", "use_checkpoint", "dropout"}


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(parser, {**SAMPLE_DEFAULTS, **model_and_diffusion_defaults()})
    parser.add_argument("--local_rank", type=int, default=-1)
    return parser


def newest(run_dir: str, prefix: str) -> str:
    files = sorted(f for f in os.listdir(run_dir) if f.startswith(prefix) and f.endswith(".pt") and ".tmp" not in f)
    if not files:
        raise CheckpointError(f"no {prefix}*.pt in {run_dir}")
    return os.path.join(run_dir, files[-1])


def resolve_weights_and_flags(args, explicit):
    """(weights path, model flags, number of data classes or None) from --run_dir / --model_path and the command line."""
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    data_classes = None
    run_dir, path = args.run_dir, args.model_path
    if path and os.path.isdir(path):  # a DeepSpeed checkpoint dir: use the consolidated files it lists
        with open(os.path.join(path, "COMPLETE")) as f:
            meta = json.load(f)
        run_dir = os.path.dirname(os.path.dirname(os.path.normpath(path)))
        path = os.path.join(run_dir, next(iter(meta["ema"].values())) if args.use_ema else meta["model"])
    if run_dir:
        cfg_path = os.path.join(run_dir, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"{run_dir} has no config.json (not a training run directory?)")
        with open(cfg_path) as f:
            config = json.load(f)
        saved, data_classes = config["model_flags"], config.get("data_classes")
        for k, v in saved.items():
            if k not in explicit:
                flags[k] = v
            elif k not in SAMPLING_ONLY and flags[k] != v and not args.override:
                raise ConfigError(f"--{k} {flags[k]} contradicts {v!r} in {cfg_path} (add --override True to force)")
        if not path:
            path = newest(run_dir, "ema_") if args.use_ema else newest(run_dir, "model")
    if not path:
        raise ConfigError("give --run_dir or --model_path")
    return path, flags, data_classes


def save_grid(images: np.ndarray, path: str) -> None:
    """images: uint8 [N, H, W, 3] -> one PNG, as square a grid as N allows."""
    from PIL import Image

    n, h, w, _ = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = img
    Image.fromarray(grid).save(path)


def main() -> None:
    argv = sys.argv[1:]
    args = create_argparser().parse_args(argv)
    explicit = explicit_flags(argv)
    path, flags, data_classes = resolve_weights_and_flags(args, explicit)
    distributed = "RANK" in os.environ or dist_util.launched_by_mpi()
    if distributed:
        dist_util.setup_dist(args.master_port or None)
        dist_util.set_threads_per_rank()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = dist_util.dev()

    model, diffusion = create_model_and_diffusion(**flags)
    load_official_state_dict(model, load_state_dict_file(path))
    model.to(device).eval()
    if rank == 0:
        print(f"sampling {args.num_samples} images from {path} ({diffusion.num_timesteps} steps, {'DDIM' if args.use_ddim else 'ancestral'})")

    labels_all = None
    if flags["class_cond"]:
        if args.class_labels:
            given = [int(c) for c in args.class_labels.split(",")]
            if max(given) >= NUM_CLASSES or min(given) < 0:
                raise ConfigError(f"--class_labels must lie in [0, {NUM_CLASSES})")
            labels_all = np.resize(np.array(given), args.num_samples)
        else:
            labels_all = np.random.default_rng(args.seed).integers(0, data_classes or NUM_CLASSES, args.num_samples)
    # Sample i is drawn from its own seed, so the images do not depend on the rank count or batch size.
    mine = list(range(rank, args.num_samples, world))
    sample_fn = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    images, labels = [], []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(mine), args.batch_size), disable=rank != 0, unit="batch"):
        idx = mine[start : start + args.batch_size]
        noise = torch.stack([torch.randn(3, flags["image_size"], flags["image_size"], generator=torch.Generator().manual_seed(args.seed * 1_000_003 + i)) for i in idx]).to(device)
        kwargs = {}
        if labels_all is not None:
            kwargs["y"] = torch.from_numpy(labels_all[idx]).long().to(device)
        torch.manual_seed(args.seed * 1_000_003 + idx[0])
        extra = {"eta": args.eta} if args.use_ddim else {}
        with torch.no_grad():
            x = sample_fn(model, noise.shape, noise=noise, clip_denoised=args.clip_denoised, model_kwargs=kwargs, **extra)
        images.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        labels.append(np.asarray(labels_all[idx]) if labels_all is not None else np.zeros(len(idx), dtype=np.int64))
    local = (np.array(mine, dtype=np.int64), np.concatenate(images) if images else np.zeros((0,)), np.concatenate(labels) if labels else np.zeros(0))
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    if rank != 0:
        return
    order = np.concatenate([g[0] for g in gathered])
    if len(set(order.tolist())) != len(order):
        raise RuntimeError("duplicate sample indices across ranks")
    arr = np.concatenate([g[1] for g in gathered if len(g[0])])[np.argsort(order)]
    lab = np.concatenate([g[2] for g in gathered if len(g[0])])[np.argsort(order)]
    out = args.out or os.path.join(args.run_dir or os.path.dirname(os.path.abspath(path)), f"samples_{arr.shape[0]}x{arr.shape[1]}x{arr.shape[2]}x3.npz")
    if flags["class_cond"]:
        np.savez(out, arr, lab)
    else:
        np.savez(out, arr)
    grid = out[: -len(".npz")] + ".png"
    save_grid(arr, grid)
    print(f"saved {out} and {grid}")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
