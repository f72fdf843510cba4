"""Seeds: every global random stream at once, and one seed derived from two numbers."""

import random

import numpy as np
import torch

# A prime far above any index it multiplies, so (seed, index) pairs give distinct seeds.
SEED_STRIDE = 1_000_003


def seed_everything(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def mix_seed(seed: int, index: int) -> int:
    """One seed for the pair (seed, index): image index of a sampling seed, rank at a step, ..."""
    return seed * SEED_STRIDE + index
