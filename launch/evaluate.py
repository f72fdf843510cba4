"""Measure samples: FID, Inception Score, KID and precision/recall (torch-fidelity's InceptionV3), and on
digits the class accuracy and feature distance of the project's own classifier (no network).

    python launch/evaluate.py --samples runs/demo/samples_64x32x32x3.npz --metrics mnist_acc,mnist_fd
    python launch/evaluate.py --samples S.npz --reference R.npz                     (fid,isc,kid,prc)
    deepspeed --num_gpus 8 launch/evaluate.py --samples S.npz --reference /data/lsun_bedroom

--samples is our or improved-diffusion's .npz (arr_0 uint8 NHWC, class labels in arr_1). --reference is
an .npz or anything --data_dir takes (a folder, shards, builtin:mnist), rendered at the samples'
resolution; its Inception features are cached next to it. The Inception weights are downloaded into
torch hub's cache on first use; offline, pass a local copy with --inception_weights or
$IDDPM_DS_INCEPTION_WEIGHTS. Under a launcher every rank extracts a share of the features.
"""

import json
import logging

from iddpm_ds import dist_util
from iddpm_ds.errors import ConfigError
from iddpm_ds.evaluation import Evaluator, load_npz, parse_metrics
from iddpm_ds.flags import make_parser, run_cli


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--samples", default="", help="the samples' .npz (required)")
    parser.add_argument("--reference", default="builtin:mnist", help="an .npz or a data source")
    parser.add_argument(
        "--metrics",
        default="fid,isc,kid,prc",
        help="comma-separated: fid,isc,kid,prc,mnist_acc,mnist_fd (beside its real-data floors: real digits "
        "drawn at random and, for labelled samples, of the samples' classes),colour",
    )
    parser.add_argument("--inception_weights", default="", help="a local InceptionV3 weights file")
    parser.add_argument(
        "--max_reference", type=int, default=0, help="use at most this many reference images (0 = all)"
    )
    parser.add_argument("--batch_size", type=int, default=100, help="images per feature-extraction batch")
    parser.add_argument("--out", default="", help="also write the metrics to this JSON file")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--master_port", type=int, default=0, help="rendezvous port for mpirun")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # e.g. the classifier's first training
    if not args.samples:
        raise ConfigError("--samples: give the .npz of samples to measure")
    if args.batch_size < 1 or args.max_reference < 0:
        raise ConfigError("--batch_size must be at least 1 and --max_reference at least 0")
    metrics = parse_metrics(args.metrics)
    images, labels = load_npz(args.samples)

    rank, _, distributed = dist_util.setup_if_launched(args.master_port or None)
    device = str(dist_util.dev())
    evaluator = Evaluator(
        metrics,
        args.reference,
        images.shape[1],
        args.inception_weights,
        args.max_reference,
        args.batch_size,
        device,
        distributed=distributed,
    )
    result = evaluator(images, labels)
    dist_util.shutdown()
    if rank != 0:
        return
    if evaluator.classifier_accuracy is not None:
        print(f"digit classifier: {100 * evaluator.classifier_accuracy:.1f}% on its held-out digits")
    print(f"{len(images)} samples from {args.samples} against {args.reference}:")
    for k, v in result.items():
        if k.startswith("mnist_fd_floor"):
            continue
        floor = ""
        if k == "mnist_fd":
            floor = f" (real digits at {len(images)} samples: {result['mnist_fd_floor']:.1f} drawn at random"
            if "mnist_fd_floor_classes" in result:
                floor += f", {result['mnist_fd_floor_classes']:.1f} of the samples' classes"
            floor += ")"
        print(f"  {k} {v:.4f}{floor}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"samples": args.samples, "reference": args.reference, **result}, f, indent=1)


if __name__ == "__main__":
    run_cli(main)
