"""Loader throughput: images/s for decode + resize + batch at several resolutions.

    python benchmarks/bench_data.py [--data_dir DIR] [--sizes 32,64,256] [--batch_size 16] [--num_workers 1]

Without --data_dir it writes a folder of 512x512 JPEGs (the expensive case:
every image is decoded and downsampled) to a temporary folder. Prints a table
and a JSON line.
"""

import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from iddpm_ds.flags import ConfigError, make_parser, run_cli
from iddpm_ds.image_datasets import load_data


def make_folder(root: str, n: int = 256, size: int = 512) -> str:
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BILINEAR).save(
            os.path.join(root, f"c{i % 10}_{i:05d}.jpg"), quality=90
        )
    return root


def main() -> None:
    p = make_parser(__doc__)
    p.add_argument("--data_dir", default="", help="data to read ('' = a synthetic folder of 512 px JPEGs)")
    p.add_argument("--sizes", default="32,64,256", help="comma-separated image sizes to time")
    p.add_argument("--batch_size", type=int, default=16, help="images per batch")
    p.add_argument("--num_workers", type=int, default=1, help="loader worker processes")
    p.add_argument("--batches", type=int, default=20, help="batches timed per size")
    args = p.parse_args()
    for flag in ("batch_size", "batches"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.num_workers < 0:
        raise ConfigError(f"--num_workers must not be negative, got {args.num_workers}")
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--sizes {args.sizes!r} must be comma-separated integers") from None

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or make_folder(tmp)
        rows = []
        for size in sizes:
            stream = load_data(
                data_dir=data_dir, batch_size=args.batch_size, image_size=size, num_workers=args.num_workers
            )
            next(stream)  # worker start-up is not throughput
            t0 = time.perf_counter()
            for _ in range(args.batches):
                next(stream)
            dt = time.perf_counter() - t0
            stream.close()
            rows.append(
                {
                    "image_size": size,
                    "images_per_s": args.batches * args.batch_size / dt,
                    "num_workers": args.num_workers,
                    "batch_size": args.batch_size,
                    "data": args.data_dir or "synthetic 512px jpeg folder",
                }
            )
    print(f"{'size':>6} {'workers':>8} {'images/s':>10}")
    for r in rows:
        print(f"{r['image_size']:>6} {r['num_workers']:>8} {r['images_per_s']:>10.1f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    run_cli(main)
