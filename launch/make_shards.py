"""Pack an image folder into size-balanced WebDataset shards, resized once up front.

    python launch/make_shards.py SRC OUT --image_size 64 --shard_size 1000

Each sample is `KEY.png` (already resized/cropped as training does) and
`KEY.cls` (the class index of its filename prefix). OUT/index.json records
count, classes, resolution and the shards. An interrupted run resumes: shards
already complete are kept, the rest are rewritten (each is written to a
temporary name and renamed when complete).
"""

import io
import json
import os
import tarfile

from PIL import Image
from tqdm import tqdm

from iddpm_ds.checkpointing import atomic_write_text
from iddpm_ds.console import progress_bar
from iddpm_ds.data_sources import FolderSource
from iddpm_ds.flags import ConfigError, make_parser, run_cli
from iddpm_ds.pixels import center_crop_arr


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def count_images(path: str) -> int:
    with tarfile.open(path, "r:") as tar:
        return sum(m.name.endswith(".png") for m in tar)


def main() -> None:
    p = make_parser(__doc__)
    p.add_argument("src", help="image folder (labels from the filename prefix before '_')")
    p.add_argument("out", help="output folder for shards and index.json")
    p.add_argument(
        "--image_size", type=int, required=True, help="side in pixels the images are centre-cropped to"
    )
    p.add_argument(
        "--shard_size",
        type=int,
        default=1000,
        help="samples per shard (equal-size images make shards equal in bytes)",
    )
    args = p.parse_args()
    for flag in ("image_size", "shard_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}")

    source = FolderSource(args.src)
    os.makedirs(args.out, exist_ok=True)
    n = len(source)
    num_shards = (n + args.shard_size - 1) // args.shard_size
    shards, written = [], 0
    with progress_bar(total=n, unit="img", desc="sharding") as bar:
        for s in range(num_shards):
            lo, hi = s * args.shard_size, min(n, (s + 1) * args.shard_size)
            name = f"train-{s:06d}.tar"
            path = os.path.join(args.out, name)
            shards.append(name)
            if os.path.exists(path):  # renamed into place only once complete
                written += count_images(path)
                bar.update(hi - lo)
                continue
            tmp = path + ".tmp"
            with tarfile.open(tmp, "w") as tar:
                for i in range(lo, hi):
                    try:
                        arr = center_crop_arr(source.image(i), args.image_size)
                    except Exception as e:
                        tqdm.write(f"skipping unreadable image {source.key(i)}: {e}")
                        bar.update(1)
                        continue
                    buf = io.BytesIO()
                    Image.fromarray(arr).save(buf, format="PNG")
                    key = f"{i:08d}"
                    add_bytes(tar, f"{key}.png", buf.getvalue())
                    add_bytes(tar, f"{key}.cls", str(source.label(i)).encode())
                    written += 1
                    bar.update(1)
            os.replace(tmp, path)
    index = {
        "count": written,
        "skipped": n - written,
        "classes": source.classes,
        "resolution": args.image_size,
        "shards": shards,
        "shard_size": args.shard_size,
    }
    atomic_write_text(os.path.join(args.out, "index.json"), json.dumps(index, indent=1))
    print(
        f"wrote {index['count']} samples in {num_shards} shards to {args.out} ({n - written} unreadable "
        "images skipped)"
    )


if __name__ == "__main__":
    run_cli(main)
