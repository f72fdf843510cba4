"""Random-access sources of (image, label) samples: image folders, indexed tar shards (WebDataset layout)
and in-memory arrays."""

import logging
import os
import tarfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from .errors import DataError
from .pixels import IMAGE_EXTS, decode_image
from .shard_cache import local_shard

log = logging.getLogger(__name__)


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

    def __len__(self) -> int:
        return len(self.files)

    def key(self, i: int) -> str:
        return self.files[i]

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def image(self, i: int) -> Image.Image:
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
        self.shards = [local_shard(s) for s in shards]
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

    def __len__(self) -> int:
        return len(self.members)

    def key(self, i: int) -> str:
        return self.members[i].key

    def label(self, i: int) -> int:
        return self.members[i].label

    def image(self, i: int) -> Image.Image:
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


class ArraySource(Source):
    """In-memory uint8 images [N, H, W] (grey) or [N, H, W, 3] with int labels."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, classes: List[str]):
        self.name, self.images, self.labels, self.classes = name, images, labels.astype(np.int64), classes

    def __len__(self) -> int:
        return len(self.images)

    def key(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])
