"""Activation memory of one training forward+backward, per image, with and without activation checkpointing.

    python benchmarks/activations.py            (prints a table and one JSON line)

Each case runs in a fresh process: peak resident memory (ru_maxrss) during one
fp32 forward+backward at batch 1 and 2, minus the peak before it. The
per-image slope (batch 2 minus batch 1) removes the fixed cost (gradients,
allocator slack). CPU fp32 numbers: an fp16/bf16 GPU run holds about half.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = """
import resource, sys, torch
from iddpm_ds.script_util import create_model_and_diffusion, model_and_diffusion_defaults
torch.set_num_threads(2)
f = model_and_diffusion_defaults()
f.update(image_size={size}, use_checkpoint={ckpt}, use_fused_kernels=False)
model, diffusion = create_model_and_diffusion(**f)
x = torch.rand({batch}, 3, {size}, {size}) * 2 - 1
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
diffusion.training_losses(model, x, torch.randint(0, 1000, ({batch},)))["loss"].mean().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, sum(p.numel() for p in model.parameters()))
"""


def peak(size: int, ckpt: bool, batch: int):
    # Freed blocks go back to the OS, so RSS tracks live memory.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, "-c", CASE.format(root=ROOT, size=size, ckpt=ckpt, batch=batch)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def main() -> None:
    rows = []
    for size in (64, 256):
        for ckpt in (False, True):
            (b1, params), (b2, _) = peak(size, ckpt, 1), peak(size, ckpt, 2)
            rows.append(
                {
                    "image_size": size,
                    "use_checkpoint": ckpt,
                    "params": params,
                    "peak_delta_batch1": b1,
                    "peak_delta_batch2": b2,
                    "activation_bytes_per_image": b2 - b1,
                }
            )
    print(
        f"{'size':>5} {'checkpointing':>14} {'params M':>9} {'batch-1 MB':>11} {'batch-2 MB':>11} "
        f"{'MB per image':>13}"
    )
    for r in rows:
        print(
            f"{r['image_size']:>5} {str(r['use_checkpoint']):>14} {r['params'] / 1e6:>9.1f} "
            f"{r['peak_delta_batch1'] / 2**20:>11.0f} "
            f"{r['peak_delta_batch2'] / 2**20:>11.0f} {r['activation_bytes_per_image'] / 2**20:>13.0f}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
