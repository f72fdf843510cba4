import numpy as np
import pytest
import torch

from iddpm_ds.resample import (
    HighNoiseSampler,
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)


class FakeDiffusion:
    def __init__(self, T):
        self.num_timesteps = T


def push_one_at_a_time(history, counts, ts, losses, H):
    """The paper's FIFO semantics, written the slow obvious way."""
    for t, loss in zip(ts, losses):
        if counts[t] == H:
            history[t, :-1] = history[t, 1:]
            history[t, -1] = loss
        else:
            history[t, counts[t]] = loss
            counts[t] += 1


def test_named_samplers():
    d = FakeDiffusion(10)
    assert isinstance(create_named_schedule_sampler("uniform", d), UniformSampler)
    s = create_named_schedule_sampler("loss-second-moment", d)
    assert isinstance(s, LossSecondMomentResampler) and s.history_per_term == 10 and s.uniform_prob == 0.001
    assert isinstance(create_named_schedule_sampler("high-noise", d), HighNoiseSampler)
    with pytest.raises(ValueError, match="unknown schedule sampler"):
        create_named_schedule_sampler("nope", d)


def test_vectorised_update_equals_sequential_fifo():
    rng = np.random.default_rng(0)
    s = LossSecondMomentResampler(FakeDiffusion(7), history_per_term=4)
    h, c = np.zeros((7, 4)), np.zeros(7, dtype=np.int64)
    for _ in range(60):
        n = int(rng.integers(1, 25))
        ts, ls = rng.integers(0, 7, n), rng.normal(size=n)
        s.update_with_all_losses(ts, ls)
        push_one_at_a_time(h, c, ts, ls, 4)
        assert np.array_equal(s._loss_history, h) and np.array_equal(s._loss_counts, c)


def test_non_finite_losses_never_enter_history():
    s = LossSecondMomentResampler(FakeDiffusion(3), history_per_term=2)
    s.update_with_all_losses([0, 1, 2, 0], [1.0, np.nan, np.inf, 2.0])
    assert s._loss_counts.tolist() == [2, 0, 0]
    assert np.isfinite(s._loss_history).all()


def test_weights_stay_uniform_until_warm_then_follow_second_moment():
    T, H = 5, 3
    s = LossSecondMomentResampler(FakeDiffusion(T), history_per_term=H)
    s.update_with_all_losses(np.repeat(np.arange(T - 1), H), np.ones((T - 1) * H))
    assert np.array_equal(s.weights(), np.ones(T))  # timestep 4 has no history yet
    losses = np.arange(1, T + 1, dtype=np.float64)
    s.update_with_all_losses(np.repeat(np.arange(T), H), np.repeat(losses, H))
    expected = losses / losses.sum() * (1 - 0.001) + 0.001 / T
    assert np.allclose(s.weights(), expected)


def test_importance_weights_have_mean_one_under_the_sampling_distribution():
    T = 50
    s = LossSecondMomentResampler(FakeDiffusion(T))
    rng = np.random.default_rng(1)
    s.update_with_all_losses(
        np.repeat(np.arange(T), 10), rng.gamma(2.0, size=10 * T) * np.repeat(np.linspace(0.1, 5, T), 10)
    )
    p = s.weights() / s.weights().sum()
    # Exact: sum_t p_t * 1 / (T p_t) = 1.
    np.random.seed(0)
    t, w = s.sample(200000, "cpu")
    assert t.dtype == torch.long and w.dtype == torch.float32
    assert np.allclose(w.numpy(), 1.0 / (T * p[t.numpy()]), rtol=1e-6)
    assert float(w.double().mean()) == pytest.approx(1.0, rel=0.02)
    # Frequent timesteps are the high-loss ones.
    counts = np.bincount(t.numpy(), minlength=T) / len(t)
    assert np.allclose(counts, p, atol=0.01)


def test_uniform_sampler_weights_are_one():
    np.random.seed(0)
    t, w = UniformSampler(FakeDiffusion(10)).sample(64, "cpu")
    assert (w == 1).all() and t.min() >= 0 and t.max() < 10


@pytest.mark.parametrize("T", [10, 1000])
def test_high_noise_sampler_draws_the_linear_density_and_does_not_weight_it_back(T):
    # p_t is the continuous density 1/2 + u integrated over t's bin [t/T, (t+1)/T], in float64.
    lo = np.arange(T, dtype=np.float64) / T
    hi = lo + 1.0 / T
    p = 0.5 * (hi - lo) + (hi**2 - lo**2) / 2  # the density integrates to 1 over [0, 1]
    s = HighNoiseSampler(FakeDiffusion(T))
    assert np.allclose(s.weights() / s.weights().sum(), p, rtol=1e-12, atol=0)
    np.random.seed(0)
    t, w = s.sample(400000, "cpu")
    assert t.dtype == torch.long and w.dtype == torch.float32 and (w == 1).all()
    if T == 10:
        assert np.allclose(np.bincount(t.numpy(), minlength=T) / len(t), p, atol=0.003)
    else:  # the noisiest tenth of the timesteps drawn 1.45 / 0.55 = 2.6x as often as the cleanest tenth
        tenth = np.bincount(t.numpy() * 10 // T, minlength=10) / len(t)
        assert tenth[-1] / tenth[0] == pytest.approx(1.45 / 0.55, rel=0.02)


def test_state_dict_round_trip_and_shape_check():
    a = LossSecondMomentResampler(FakeDiffusion(4), history_per_term=2)
    a.update_with_all_losses([0, 1, 1, 3], [1.0, 2.0, 3.0, 4.0])
    b = LossSecondMomentResampler(FakeDiffusion(4), history_per_term=2)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a._loss_history, b._loss_history) and np.array_equal(a._loss_counts, b._loss_counts)
    with pytest.raises(ValueError, match="diffusion_steps"):
        LossSecondMomentResampler(FakeDiffusion(5), history_per_term=2).load_state_dict(a.state_dict())


def test_update_with_local_losses_without_distributed():
    s = LossSecondMomentResampler(FakeDiffusion(4), history_per_term=2)
    s.update_with_local_losses(torch.tensor([0, 2, 2]), torch.tensor([1.0, 2.0, 3.0]))
    assert s._loss_counts.tolist() == [1, 0, 2, 0] and s._loss_history[2].tolist() == [2.0, 3.0]
