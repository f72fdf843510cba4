"""Image data for training as exact, resumable streams (load_data), over the sources of data_sources.py.

Every source is random-access (tar shards are indexed once by member
offset), so the stream is defined by one world-size independent number:

    stream = perm_0 ++ perm_1 ++ ...   (perm_e: a permutation of the N samples,
                                        drawn from (seed, epoch); identity if deterministic)

With W ranks and micro-batch B, the step that starts at global position G
gives rank r the samples stream[G + i*W + r] for i < B, and advances G by W*B.
So within an epoch every sample is seen exactly once across all ranks (a
batch that crosses an epoch boundary simply takes its tail from the next
epoch, nothing is dropped), loader workers split steps round-robin, and a
resumed run, with any number of ranks, continues the same global stream
from G. Only which rank sees which sample changes with W.
"""

import atexit
import logging
import os
import weakref
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from .builtin_datasets import BUILTINS, DEFAULT_DATASET
from .data_sources import FolderSource, Source, TarSource
from .errors import DataError, first_line
from .pixels import center_crop_arr
from .shard_cache import REMOTE_PREFIXES

log = logging.getLogger(__name__)


def open_source(data_dir: str) -> Source:
    """The Source behind a data_dir string ('' = the built-in MNIST)."""
    data_dir = data_dir or DEFAULT_DATASET
    if data_dir in BUILTINS:
        return BUILTINS[data_dir]()
    if data_dir.startswith("builtin:"):
        raise DataError(f"unknown built-in dataset {data_dir!r} (choose from {', '.join(BUILTINS)})")
    if data_dir.startswith(REMOTE_PREFIXES) or "{" in data_dir or data_dir.endswith(".tar"):
        import braceexpand

        return TarSource(list(braceexpand.braceexpand(data_dir)))
    if not os.path.exists(data_dir):
        raise DataError(f"data_dir does not exist: {data_dir}")
    if os.path.isdir(data_dir):
        tars = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.endswith(".tar"))
        if tars:
            return TarSource(tars)
        return FolderSource(data_dir)
    raise DataError(f"data_dir must be a folder, tar shard(s) or a builtin: name, got {data_dir}")


# --------------------------------------------------------------------------- the stream
class StreamBatches(torch.utils.data.IterableDataset):
    """This rank's micro-batches of the global stream (see the module docstring), from position `start`.

    Each item is a dict: 'images' float32 [B, 3, S, S] in [-1, 1], 'y' int64
    [B], 'skipped' (bad samples replaced while building this batch).
    """

    def __init__(
        self,
        source: Source,
        image_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        start: int,
    ):
        self.source, self.image_size, self.batch_size = source, image_size, batch_size
        self.rank, self.world_size, self.seed, self.shuffle, self.start = (
            rank,
            world_size,
            seed,
            shuffle,
            start,
        )
        self._perm_epoch, self._perm = -1, None
        self._logged: set = set()

    def dataset_index(self, g: int) -> int:
        """Dataset index of global stream position g."""
        n = len(self.source)
        epoch, i = divmod(g, n)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def load(self, idx: int) -> Tuple[np.ndarray, int, int]:
        """(uint8 [S, S, 3], label, skips): a bad sample is replaced by the next good dataset index."""
        n = len(self.source)
        for skips in range(n):
            j = (idx + skips) % n
            try:
                arr = center_crop_arr(self.source.image(j), self.image_size)
                return arr, self.source.label(j) or 0, skips
            except Exception as e:  # any decoder failure: count, log once, move on
                key = self.source.key(j)
                if key not in self._logged:
                    self._logged.add(key)
                    log.warning(
                        "skipping unreadable image %s: %s",
                        key,
                        first_line(e),
                    )
        raise DataError("every image in the dataset failed to decode")

    def batch_at(self, step: int) -> Dict[str, torch.Tensor]:
        g0 = self.start + step * self.world_size * self.batch_size
        images, labels, skipped = [], [], 0
        for i in range(self.batch_size):
            arr, label, skips = self.load(self.dataset_index(g0 + i * self.world_size + self.rank))
            images.append(arr)
            labels.append(label)
            skipped += skips
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return {"images": x, "y": torch.tensor(labels, dtype=torch.int64), "skipped": torch.tensor(skipped)}

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        step = worker
        while True:
            yield self.batch_at(step)
            step += num_workers


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to their rank: a scheduler signals every process of a
    job, and a worker that died of it would take its rank down before it could save."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


# Streams with live loader workers. At exit they are stopped before multiprocessing's own exit handler
# runs: that one ends daemonic children with SIGTERM, which ours ignore, and then waits for them forever.
# atexit runs last-registered first, and torch (imported above) registered multiprocessing's already.
_OPEN_STREAMS: "weakref.WeakSet[DataStream]" = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
    for stream in list(_OPEN_STREAMS):
        stream.close()


class DataStream:
    """Infinite iterator of (images [B, 3, S, S], {'y': labels [B]}) with a resumable position.

    state_dict() holds the global stream position; it is the same number on
    every rank, and load_state_dict() (before iterating) continues from it.
    """

    def __init__(
        self,
        source: Source,
        image_size: int,
        batch_size: int,
        class_cond: bool,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        num_workers: int,
    ):
        self.source, self.image_size, self.batch_size, self.class_cond = (
            source,
            image_size,
            batch_size,
            class_cond,
        )
        self.rank, self.world_size, self.seed, self.shuffle, self.num_workers = (
            rank,
            world_size,
            seed,
            shuffle,
            num_workers,
        )
        self.position = 0
        self.skipped = source.skipped
        self._it = None

    @property
    def epoch(self) -> float:
        return self.position / len(self.source)

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "num_samples": len(self.source),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != len(self.source):
            raise DataError(
                f"the checkpoint's data had {state['num_samples']} samples, this data_dir has "
                f"{len(self.source)}: resume with the same data (or start a new run)"
            )
        self.position, self.seed, self.shuffle = (
            int(state["position"]),
            int(state["seed"]),
            bool(state["shuffle"]),
        )
        self.skipped = int(state.get("skipped", 0))
        self._it = None

    def close(self) -> None:
        """Stop the loader workers now (they restart on the next batch)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # absent with num_workers=0
        if shutdown is not None:
            shutdown()

    def __del__(self):
        self.close()

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if self._it is None:
            ds = StreamBatches(
                self.source,
                self.image_size,
                self.batch_size,
                self.rank,
                self.world_size,
                self.seed,
                self.shuffle,
                self.position,
            )
            # Its own generator: creating the loader must not draw from the global RNG, or a resumed
            # run (which creates it at another point) would see different noise.
            loader = torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                num_workers=self.num_workers,
                generator=torch.Generator(),
                persistent_workers=False,
                prefetch_factor=4 if self.num_workers else None,
                worker_init_fn=_ignore_stop_signals,
            )
            self._it = iter(loader)
            _OPEN_STREAMS.add(self)
        batch = next(self._it)
        self.position += self.world_size * self.batch_size
        self.skipped += int(batch["skipped"])
        cond = {"y": batch["y"]} if self.class_cond else {}
        return batch["images"], cond


def _dist_rank_world() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def load_data(
    *,
    data_dir: str,
    batch_size: int,
    image_size: int,
    class_cond: bool = False,
    deterministic: bool = False,
    seed: int = 0,
    num_workers: int = 1,
    num_classes: Optional[int] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> DataStream:
    """An endless stream of (images, kwargs) batches for training, improved-diffusion's call shape.

    :param data_dir: an image folder, tar shard(s) (brace pattern, folder of
        .tar, or URL), 'builtin:NAME', or '' for the built-in MNIST.
    :param batch_size: this rank's micro-batch size.
    :param class_cond: yield {'y': labels}; the data must then carry labels.
    :param deterministic: no shuffling (epochs repeat the dataset order).
    :param num_classes: if given, every label must be below it.
    :param rank, world_size: default to torch.distributed's.
    :return: a DataStream (an iterator with state_dict/load_state_dict).
    """
    if batch_size <= 0 or image_size <= 0:
        raise DataError(f"batch_size and image_size must be positive (got {batch_size}, {image_size})")
    source = open_source(data_dir)
    if class_cond:
        if isinstance(source, TarSource) and not source.has_labels:
            raise DataError(f"class_cond needs labels, but some samples in {data_dir} have no .cls member")
        if num_classes is not None:
            labels = np.array([source.label(i) for i in range(len(source))])
            if labels.max() >= num_classes or labels.min() < 0:
                raise DataError(
                    f"label {int(labels.max())} in {data_dir or DEFAULT_DATASET} is outside "
                    f"num_classes={num_classes}"
                )
    d_rank, d_world = _dist_rank_world()
    rank = d_rank if rank is None else rank
    world_size = d_world if world_size is None else world_size
    return DataStream(
        source, image_size, batch_size, class_cond, rank, world_size, seed, not deterministic, num_workers
    )


class SuperResStream:
    """Wraps a DataStream of high-resolution batches: adds model_kwargs['low_res'], the batch
    downsampled to small_size by area averaging, as improved-diffusion's super-resolution training does."""

    def __init__(self, stream: DataStream, small_size: int):
        self.stream, self.small_size = stream, small_size

    def __iter__(self):
        return self

    def __next__(self):
        x, cond = next(self.stream)
        return x, {**cond, "low_res": torch.nn.functional.interpolate(x, self.small_size, mode="area")}

    def __getattr__(self, name):  # position, skipped, epoch, source, state_dict, load_state_dict, close
        return getattr(self.stream, name)
