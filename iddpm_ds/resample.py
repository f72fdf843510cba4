"""Timestep samplers: uniform, the paper's loss-aware importance sampling of L_vlb (Sec. 3.3), and a
high-noise tilt that changes the objective.

A sampler draws t with probability p_t. The uniform and loss-aware samplers return the importance weight
1 / (T p_t) for each draw, so E_p[w_t L_t] = mean_t L_t: the objective's expectation is unchanged while its
variance falls. The high-noise sampler returns weight 1: its p_t is the training distribution over noise
levels (as EDM's p_train(sigma) and SD3's timestep densities are), so it moves the objective itself.
"""

from abc import ABC, abstractmethod
from typing import Tuple

import numpy as np
import torch
import torch.distributed as dist

from .gaussian_diffusion import GaussianDiffusion

SAMPLER_NAMES = ("uniform", "loss-second-moment", "high-noise")


def create_named_schedule_sampler(name: str, diffusion: GaussianDiffusion) -> "ScheduleSampler":
    """Build a sampler by name: one of SAMPLER_NAMES."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    if name == "high-noise":
        return HighNoiseSampler(diffusion)
    raise ValueError(f"unknown schedule sampler: {name!r} (expected one of {', '.join(SAMPLER_NAMES)})")


def all_gather_columns(local: torch.Tensor) -> torch.Tensor:
    """Every rank's [K, N] tensor side by side, [K, world * N] in rank order (N equal on all ranks).

    One collective: every rank must call it.
    """
    world = dist.get_world_size()
    gathered = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single; older torches have only
    # the old name.
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(gathered, local.flatten().contiguous())
    return gathered.view(world, *local.shape).permute(1, 0, 2).reshape(local.shape[0], -1)


class ScheduleSampler(ABC):
    """A distribution over the diffusion's timesteps: one that reduces the objective's variance, or (the
    high-noise sampler) one that is part of the objective."""

    # True: each draw carries 1 / (T p_t), so the objective is uniform over t whatever p is; False: weight 1.
    importance_weighted = True

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive float64 weights [T], one per timestep."""

    def sample(self, batch_size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw batch_size timesteps (long [B]) and their weights (float32 [B]): 1 / (T p_t) where the
        sampler is importance_weighted, else 1.

        Draws from numpy's global RNG, so seeding or restoring np.random
        reproduces them.
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        weights_np = 1.0 / (len(p) * p[indices_np]) if self.importance_weighted else np.ones(batch_size)
        return (
            torch.from_numpy(indices_np).long().to(device),
            torch.from_numpy(weights_np).float().to(device),
        )


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion: GaussianDiffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps], dtype=np.float64)

    def weights(self) -> np.ndarray:
        return self._weights


class HighNoiseSampler(ScheduleSampler):
    """p_t proportional to 1/2 + (t + 1/2) / T, not weighted back: the noisiest timestep is drawn 3x as
    often as the cleanest, and the loss at t counts in proportion.

    Why: with x_0 prediction the high-noise steps are where a class-conditional model learns which digit
    (which layout) it draws, and a short run on a small model gets its class accuracy there
    (`benchmarks/demo_recipe.md`, fifth session); Min-SNR-gamma, which all but switches those steps off,
    costs class accuracy. The density is linear in t, so each p_t is the mean of the continuous density
    1/2 + u over its 1/T-wide bin of u = t / T.
    """

    importance_weighted = False  # the tilt is the objective, not a variance reduction to undo

    def __init__(self, diffusion: GaussianDiffusion):
        self.diffusion = diffusion
        T = diffusion.num_timesteps
        self._weights = 0.5 + (np.arange(T, dtype=np.float64) + 0.5) / T

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the training losses seen so far."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Gather every rank's (t, loss) pairs and apply them on all ranks in the same order.

        Collective when torch.distributed is initialised: every rank must call
        it. Ranks may hold different batch sizes; one fixed-size all_gather of
        padded [3, max_B] (valid, t, loss) rows carries them.
        """
        local = torch.stack(
            [
                torch.ones_like(local_losses, dtype=torch.float64),
                local_ts.to(torch.float64),
                local_losses.detach().to(torch.float64),
            ]
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            size = torch.tensor([local.shape[1]], device=local.device)
            sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
            dist.all_gather(sizes, size)
            padded = torch.zeros(3, int(torch.stack(sizes).max()), dtype=torch.float64, device=local.device)
            padded[:, : local.shape[1]] = local
            local = all_gather_columns(padded)
        local = local[:, local[0] > 0].cpu().numpy()
        self.update_with_all_losses(local[1].astype(np.int64), local[2])

    @abstractmethod
    def update_with_all_losses(self, ts: np.ndarray, losses: np.ndarray) -> None:
        """Apply identical (t, loss) sequences on every rank, without communication.

        :param ts: int timesteps [N]; losses: float losses [N], in arrival order.
        """


class LossSecondMomentResampler(LossAwareSampler):
    """p_t proportional to sqrt(E[L_t^2]) over the last history_per_term losses of each t.

    Until every timestep has a full history the sampler stays uniform; after
    that it mixes in uniform_prob of the uniform distribution so no timestep
    is starved. Non-finite losses are dropped before they enter the history.
    """

    def __init__(self, diffusion: GaussianDiffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        # Row t holds its losses oldest first in columns [0, count_t).
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts: np.ndarray, losses: np.ndarray) -> None:
        """Push each (t, loss) onto t's FIFO history, in order, dropping the oldest when full.

        Vectorised: the result equals pushing the pairs one at a time.
        """
        ts = np.asarray(ts, dtype=np.int64).reshape(-1)
        losses = np.asarray(losses, dtype=np.float64).reshape(-1)
        finite = np.isfinite(losses)
        ts, losses = ts[finite], losses[finite]
        if ts.size == 0:
            return
        H = self.history_per_term
        order = np.argsort(ts, kind="stable")  # groups by t, arrival order kept within each t
        ts, losses = ts[order], losses[order]
        uniq, first, counts = np.unique(ts, return_index=True, return_counts=True)
        group = np.repeat(np.arange(len(uniq)), counts)
        pos = np.arange(len(ts)) - first[group]
        # Only the last H pushes of a timestep can survive.
        new_k = np.minimum(counts, H)
        keep = pos >= counts[group] - H
        pos = pos[keep] - (counts[group][keep] - new_k[group][keep])

        # Lay out [old history right-aligned in H slots | new values left-aligned in H slots],
        # so each row's surviving sequence is contiguous and ends at column H + new_k.
        old_k = self._loss_counts[uniq]
        buf = np.zeros([len(uniq), 2 * H], dtype=np.float64)
        cols = np.arange(H)[None, :]
        old_mask = cols < old_k[:, None]
        rows = np.broadcast_to(np.arange(len(uniq))[:, None], old_mask.shape)
        buf[rows[old_mask], (H - old_k[:, None] + cols)[old_mask]] = self._loss_history[uniq][old_mask]
        buf[group[keep], H + pos] = losses[keep]

        total = np.minimum(old_k + new_k, H)
        start = H + new_k - total
        gathered = np.take_along_axis(buf, np.minimum(start[:, None] + cols, 2 * H - 1), axis=1)
        self._loss_history[uniq] = np.where(cols < total[:, None], gathered, 0.0)
        self._loss_counts[uniq] = total

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self) -> dict:
        return {"loss_history": self._loss_history.copy(), "loss_counts": self._loss_counts.copy()}

    def load_state_dict(self, state: dict) -> None:
        history, counts = (
            np.asarray(state["loss_history"], dtype=np.float64),
            np.asarray(state["loss_counts"], dtype=np.int64),
        )
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"resampler state has history {history.shape}, this diffusion needs "
                f"{self._loss_history.shape}: diffusion_steps differ between the checkpoint and this run"
            )
        self._loss_history, self._loss_counts = history.copy(), counts.copy()
