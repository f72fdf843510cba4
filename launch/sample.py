"""Sample images from a trained model: improved-diffusion's .npz plus a PNG grid.

    python launch/sample.py --run_dir runs/demo                       (flags from its config.json, newest EMA)
    python launch/sample.py --model_path ema_0.9999_200000.pt --image_size 64 ...   (a bare .pt: give the
    flags)
    deepspeed --num_gpus 2 launch/sample.py --run_dir runs/demo       (each rank samples its share)

--model_path may also be a DeepSpeed checkpoint directory (checkpoints/stepNNNNNN).
--sampler is ancestral (improved-diffusion's; over the --timestep_respacing steps, "250", "ddim50", ...),
ddim (--eta; --use_ddim True is the same), dpmpp_2m (DPM-Solver++(2M): --timestep_respacing N, a plain
count, is its number of model evaluations) or dpmpp_2m_sde (its stochastic variant: fresh noise each step,
which corrects a model's errors; better than the ODE on an eps-prediction model, no better on an x_0 one:
benchmarks/sampling_eps.md, benchmarks/sampling.md). Classifier-free guidance: --guidance_scale W for a
model trained with --class_dropout_prob > 0, at every step or, with --guidance_interval LO,HI, only where
the noise level sigma = sqrt((1 - abar_t) / abar_t) lies in (LO, HI]. Image i is drawn from (--seed, i)
alone, so the same seed gives the same images whatever the batch size or number of ranks.
"""

import os

import numpy as np
import torch
import torch.distributed as dist

from iddpm_ds import dist_util
from iddpm_ds.console import progress_bar
from iddpm_ds.flags import (
    HELP,
    ConfigError,
    guidance_interval,
    load_trained_model,
    parse_command_line,
    resolve_trained_model,
    run_cli,
    validate_sample_flags,
)
from iddpm_ds.sampling import (
    classifier_free_guidance,
    describe_sampler,
    fast_model,
    make_grid,
    noise_level,
    sample_images,
)
from iddpm_ds.script_util import NULL_CLASS, NUM_CLASSES

SAMPLE_HELP = {
    **HELP,
    "batch_size": "images per sampling forward pass, per rank (memory, not the result)",
    "compile": "torch.compile the UNet (each batch shape compiles on its first call: for long runs)",
}
SAMPLE_DEFAULTS = dict(
    run_dir="",
    model_path="",
    use_ema=True,
    num_samples=64,
    batch_size=16,
    clip_denoised=True,
    sampler="ancestral",
    use_ddim=False,
    eta=0.0,
    class_labels="",
    guidance_scale=1.0,
    guidance_interval="",
    precision="fp32",
    compile=False,
    seed=0,
    out="",
    override=False,
    master_port=0,
)


def main(super_res: bool = False) -> None:
    defaults = {**SAMPLE_DEFAULTS, **({"base_samples": ""} if super_res else {})}
    args, flags, explicit = parse_command_line(__doc__, defaults, super_res, help=SAMPLE_HELP)
    path, flags, data_classes = resolve_trained_model(
        args.run_dir, args.model_path, args.use_ema, flags, explicit, args.override, super_res
    )
    validate_sample_flags(args, flags, data_classes or NUM_CLASSES)
    image_size = flags["large_size" if super_res else "image_size"]

    base, base_labels = None, None
    if super_res:
        if not args.base_samples or not os.path.isfile(args.base_samples):
            raise ConfigError(
                "super-resolution sampling needs --base_samples: an .npz of low-resolution samples (arr_0 "
                "uint8 NHWC)"
            )
        with np.load(args.base_samples) as f:
            base = f["arr_0"]
            base_labels = f["arr_1"] if "arr_1" in f.files else None
        if base.shape[1] != flags["small_size"]:
            raise ConfigError(
                f"--base_samples are {base.shape[1]} px, the model expects small_size={flags['small_size']}"
            )
        args.num_samples = min(args.num_samples, len(base))

    rank, world, distributed = dist_util.setup_if_launched(args.master_port or None)
    device = dist_util.dev()

    model, diffusion = load_trained_model(path, flags, super_res, device)
    model = fast_model(model, args.precision, args.compile)
    interval = guidance_interval(args.guidance_interval)
    if args.guidance_scale != 1.0:
        model = classifier_free_guidance(
            model, args.guidance_scale, NULL_CLASS, interval=interval, sigma=noise_level(diffusion)
        )
    sampler = "ddim" if args.use_ddim else args.sampler
    if rank == 0:
        how = describe_sampler(
            diffusion, sampler, flags["timestep_respacing"], args.eta, args.guidance_scale, interval
        )
        print(f"sampling {args.num_samples} images from {path}: {how}")

    labels = None
    if flags["class_cond"]:
        if base_labels is not None:
            labels = np.asarray(base_labels[: args.num_samples])
        elif args.class_labels:
            labels = np.resize(np.array([int(c) for c in args.class_labels.split(",")]), args.num_samples)
        else:
            labels = np.random.default_rng(args.seed).integers(
                0, data_classes or NUM_CLASSES, args.num_samples
            )

    mine = list(range(rank, args.num_samples, world))
    images = []
    starts = range(0, len(mine), args.batch_size)
    # Denoising steps, not batches: one batch of 64 images is minutes of steps on a CPU.
    bar = progress_bar(total=len(starts) * diffusion.num_timesteps, disable=rank != 0, unit="step")
    for done, start in enumerate(starts, 1):
        idx = mine[start : start + args.batch_size]
        kwargs = {}
        if labels is not None:
            kwargs["y"] = torch.from_numpy(labels[idx]).long().to(device)
        if base is not None:
            kwargs["low_res"] = (
                torch.from_numpy(base[idx]).float().div(127.5).sub(1).permute(0, 3, 1, 2).to(device)
            )
        images.append(
            sample_images(
                model,
                diffusion,
                idx,
                image_size,
                args.seed,
                model_kwargs=kwargs,
                sampler=sampler,
                eta=args.eta,
                clip_denoised=args.clip_denoised,
                device=device,
                on_step=lambda: bar.update(1),
            )
        )
        if bar.disable and rank == 0:
            # Without a terminal (a batch job's file), one line per batch is the progress report.
            print(f"created {min(done * args.batch_size * world, args.num_samples)} samples", flush=True)
    bar.close()
    local = (
        mine,
        np.concatenate(images) if images else np.zeros((0, image_size, image_size, 3), dtype=np.uint8),
    )
    gathered = [None] * world
    if distributed:
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    if rank != 0:
        return
    order = np.concatenate([np.asarray(g[0], dtype=np.int64) for g in gathered])
    if len(np.unique(order)) != len(order) or len(order) != args.num_samples:
        raise RuntimeError("sample indices across ranks are not a partition of range(num_samples)")
    arr = np.concatenate([g[1] for g in gathered])[np.argsort(order)]
    # improved-diffusion's image_sample.py writes into $OPENAI_LOGDIR; so do we when it is set.
    out_dir = os.environ.get("OPENAI_LOGDIR") or args.run_dir or os.path.dirname(os.path.abspath(path))
    out = args.out or os.path.join(out_dir, f"samples_{arr.shape[0]}x{image_size}x{image_size}x3.npz")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if labels is not None:
        np.savez(out, arr, labels)
    else:
        np.savez(out, arr)
    grid = out[: -len(".npz")] + ".png"
    from PIL import Image

    Image.fromarray(make_grid(arr)).save(grid)
    print(f"saved {out} and {grid}")


def cli(super_res: bool = False) -> None:
    run_cli(lambda: main(super_res))


if __name__ == "__main__":
    cli()
