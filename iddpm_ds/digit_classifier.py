"""A LeNet-size digit classifier trained by the project itself on the built-in MNIST, for measuring
samples without a network: the class accuracy of class-conditional samples and a Fréchet distance in
its feature space (the MNIST practice where an ImageNet Inception says little).

It is trained once (seeded, 4,000 of the 5,000 built-in digits; the other 1,000 are held out and give
its printed test accuracy) and cached; a missing or unreadable cache file is retrained.
"""

import fcntl
import logging
import os
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpointing import atomic_torch_save
from .errors import first_line
from .pixels import center_crop_arr, to_rgb

log = logging.getLogger(__name__)

INPUT_SIZE = 32  # the digits as the demo trains on them: 28 px upsampled to 32 by load_data's resize
HELD_OUT = 1000
SEED = 0
EPOCHS = 8
CACHE_NAME = "mnist_lenet_v1.pt"


class LeNet(nn.Module):
    """Two 5x5 conv + max-pool stages and two linear layers; `features` is the 128-d penultimate layer."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * (INPUT_SIZE // 4) ** 2, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 1, 32, 32] in [-1, 1] -> [N, 128]."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 images [N, H, W] or [N, H, W, C] -> float [N, 1, 32, 32] in [-1, 1].

    Colour is averaged away: the demo's samples are RGB, and a model that has not yet learnt that
    digits are grey must still be judged on their shape.
    """
    x = torch.from_numpy(np.asarray(images)).float()
    if x.dim() == 4:
        x = x.mean(dim=-1)
    x = x.unsqueeze(1) / 127.5 - 1
    if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
        x = F.interpolate(
            x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False
        )
    return x


def builtin_digits() -> Tuple[np.ndarray, np.ndarray]:
    """The built-in MNIST rendered as training sees it at 32 px: (uint8 [5000, 32, 32, 3], labels)."""
    from .builtin_datasets import BUILTINS

    source = BUILTINS["builtin:mnist"]()
    images = np.stack([center_crop_arr(to_rgb(source.image(i)), INPUT_SIZE) for i in range(len(source))])
    return images, source.labels


def _shifted(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translations of up to 2 px, so samples slightly off-centre are still read."""
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()
    return padded[..., dy : dy + INPUT_SIZE, dx : dx + INPUT_SIZE]


@torch.no_grad()
def predict(model: LeNet, images: np.ndarray, batch_size: int = 500) -> Tuple[np.ndarray, np.ndarray]:
    """(predicted labels [N], features [N, 128]) of uint8 images."""
    model.eval()
    labels, feats = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(to_input(images[i : i + batch_size]))
        labels.append(model.fc2(f).argmax(1).numpy())
        feats.append(f.numpy())
    return np.concatenate(labels), np.concatenate(feats).astype(np.float64)


def train_classifier() -> Tuple[LeNet, float]:
    """Train from scratch, seeded; returns (model, accuracy on the held-out digits)."""
    images, labels = builtin_digits()
    order = np.random.default_rng(SEED).permutation(len(images))
    train, test = order[:-HELD_OUT], order[-HELD_OUT:]
    gen = torch.Generator().manual_seed(SEED)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    model = LeNet()
    torch.random.set_rng_state(torch_state)  # the caller's random stream stays as it was
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_train, y_train = to_input(images[train]), torch.from_numpy(labels[train])
    for _ in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(_shifted(x_train[idx], gen)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    predicted, _ = predict(model, images[test])
    return model, float((predicted == labels[test]).mean())


def cache_dir() -> str:
    """$IDDPM_DS_CACHE, else $XDG_CACHE_HOME/iddpm_ds, else ~/.cache/iddpm_ds."""
    if os.environ.get("IDDPM_DS_CACHE"):
        return os.environ["IDDPM_DS_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "iddpm_ds")


def load_classifier() -> Tuple[LeNet, float]:
    """The cached classifier and its held-out accuracy; trained (about half a minute on 2 cores) and cached
    when the file is missing or unreadable. Processes that need it at once (ranks evaluating, tests beside a
    run) wait for the one that trains it rather than each training their own."""
    path = os.path.join(cache_dir(), CACHE_NAME)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        model = LeNet()
        if os.path.isfile(path):
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(saved["state_dict"])
                return model.eval(), float(saved["test_accuracy"])
            except Exception as e:  # a torn or foreign file is rebuilt, not trusted
                log.warning("retraining the digit classifier: %s is unreadable (%s)", path, first_line(e))
        model, accuracy = train_classifier()
        atomic_torch_save({"state_dict": model.state_dict(), "test_accuracy": accuracy}, path)
    log.info(
        "trained the digit classifier: %.1f%% on %d held-out digits; cached at %s",
        100 * accuracy,
        HELD_OUT,
        path,
    )
    return model.eval(), accuracy
