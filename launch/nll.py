"""Bits/dim of a trained model on a dataset: the full variational bound (calc_bpd_loop).

    python launch/nll.py --run_dir runs/demo --data_dir builtin:mnist --num_samples 1000
    deepspeed --num_gpus 2 launch/nll.py --run_dir runs/demo ...      (each rank evaluates its share)

Prints the running bpd on rank 0 and, at the end, the total with its terms:
the prior KL(q(x_T|x_0) || N(0, I)), the sum of the per-step terms, the
decoder term L_0, and the mean x_0 / eps MSEs. Use the full, unrespaced
process for a paper-comparable number (the model's own diffusion_steps).
"""

import json

import torch
import torch.distributed as dist

from iddpm_ds import dist_util
from iddpm_ds.flags import ConfigError, load_trained_model, parse_command_line, resolve_trained_model, run_cli
from iddpm_ds.image_datasets import load_data

NLL_DEFAULTS = dict(
    run_dir="",
    model_path="",
    use_ema=True,
    data_dir="",
    num_samples=1000,
    batch_size=16,
    clip_denoised=True,
    seed=0,
    override=False,
    master_port=0,
    out="",
)


def main() -> None:
    args, flags, explicit = parse_command_line(__doc__, NLL_DEFAULTS)
    for flag in ("num_samples", "batch_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    path, flags, _ = resolve_trained_model(
        args.run_dir, args.model_path, args.use_ema, flags, explicit, args.override
    )
    rank, world, distributed = dist_util.setup_if_launched(args.master_port or None)
    device = dist_util.dev()
    model, diffusion = load_trained_model(path, flags, False, device)
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=flags["image_size"],
        class_cond=flags["class_cond"],
        deterministic=True,
        num_workers=0,
        rank=rank,
        world_size=world,
    )
    num_samples = min(args.num_samples, len(data.source))
    # [count, total_bpd, prior_bpd, vb_sum, L_0, xstart_mse, mse] summed over images, on the device:
    # NCCL all-reduces no CPU tensors.
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    steps = -(-num_samples // (args.batch_size * world))
    torch.manual_seed(args.seed + rank)  # the q_sample noise of every term
    for step in range(steps):
        x, cond = next(data)
        first = step * args.batch_size * world
        # Row i of this rank's batch is the stream's image first + i * world + rank.
        keep = [i for i in range(args.batch_size) if first + i * world + rank < num_samples]
        x, cond = x[keep].to(device), {k: v[keep].to(device) for k, v in cond.items()}
        if len(keep):
            out = diffusion.calc_bpd_loop(model, x, clip_denoised=args.clip_denoised, model_kwargs=cond)
            terms = torch.stack(
                [
                    torch.ones_like(out["total_bpd"]),
                    out["total_bpd"],
                    out["prior_bpd"],
                    out["vb"].sum(1),
                    out["vb"][:, -1],
                    out["xstart_mse"].mean(1),
                    out["mse"].mean(1),
                ],
                dim=1,
            )
            sums += terms.double().sum(0)
        running = sums.clone()
        if distributed:
            dist.all_reduce(running)
        if rank == 0:
            print(f"[{int(running[0])}/{num_samples}] bpd {running[1] / running[0]:.4f}", flush=True)
    if distributed:
        dist.all_reduce(sums)
    if rank == 0:
        n = sums[0].item()
        result = {
            "num_samples": int(n),
            "bpd": sums[1].item() / n,
            "prior_bpd": sums[2].item() / n,
            "vb_terms_bpd": sums[3].item() / n,
            "decoder_bpd": sums[4].item() / n,
            "xstart_mse": sums[5].item() / n,
            "eps_mse": sums[6].item() / n,
            "diffusion_steps": diffusion.num_timesteps,
            "weights": path,
        }
        print(json.dumps(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    run_cli(main)
