import itertools
import math

import numpy as np
import pytest
import torch
from conftest import tiny_flags

from iddpm_ds import gaussian_diffusion as gd
from iddpm_ds.losses import discretized_gaussian_log_likelihood, normal_kl
from iddpm_ds.respace import SpacedDiffusion, space_timesteps
from iddpm_ds.script_util import create_gaussian_diffusion, create_model_and_diffusion


def make_diffusion(
    T=1000,
    schedule="linear",
    mean=gd.ModelMeanType.EPSILON,
    var=gd.ModelVarType.FIXED_LARGE,
    loss=gd.LossType.MSE,
):
    return gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule(schedule, T),
        model_mean_type=mean,
        model_var_type=var,
        loss_type=loss,
    )


def test_linear_schedule_is_ddpm():
    betas = gd.get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)
    # Fewer steps scale the betas so alpha_bar_T stays near zero.
    short = gd.get_named_beta_schedule("linear", 100)
    assert short[0] == pytest.approx(1e-3) and short[-1] == pytest.approx(0.2)


def test_cosine_schedule_matches_alpha_bar_and_clips():
    T = 1000

    def f(t):
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    d = make_diffusion(T, "cosine")
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    # Before the clip kicks in, alpha_bar_t is exactly f(t)/f(0).
    assert np.allclose(d.alphas_cumprod[:-1], expected[:-1], rtol=1e-10)
    assert d.betas.max() == pytest.approx(0.999)
    assert (d.betas <= 0.999).all()


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        gd.get_named_beta_schedule("sigmoid", 10)


def test_posterior_matches_bayes_rule():
    d = make_diffusion(50)
    rng = torch.Generator().manual_seed(0)
    x0, xt = (
        torch.randn(4, 3, generator=rng, dtype=torch.float64),
        torch.randn(4, 3, generator=rng, dtype=torch.float64),
    )
    t = torch.tensor([1, 7, 25, 49])
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        ab_prev, a, b = d.alphas_cumprod[ti - 1], 1 - d.betas[ti], d.betas[ti]
        # Product of N(x | sqrt(ab_prev) x0, 1 - ab_prev) and N(xt | sqrt(a) x, b) in x.
        prec = 1 / (1 - ab_prev) + a / b
        m = (np.sqrt(ab_prev) * x0[i].numpy() / (1 - ab_prev) + np.sqrt(a) * xt[i].numpy() / b) / prec
        assert np.allclose(mean[i].numpy(), m, rtol=1e-5, atol=1e-6)
        assert np.allclose(var[i].numpy(), 1 / prec, rtol=1e-5)
        assert np.allclose(logvar[i].numpy(), np.log(1 / prec), rtol=1e-5)
    # t = 0: variance 0, log-variance clipped to beta~_1.
    _, var0, logvar0 = d.q_posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    assert float(var0[0, 0]) == 0.0 and float(logvar0[0, 0]) == pytest.approx(
        math.log(d.posterior_variance[1]), rel=1e-6
    )


def test_q_sample_and_predictions_invert():
    d = make_diffusion(100)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 50, 99])
    xt = d.q_sample(x0, t, noise=eps)
    ab = torch.tensor(d.alphas_cumprod[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    assert torch.allclose(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-6)
    assert torch.allclose(d._predict_xstart_from_eps(xt, t, eps), x0, atol=1e-3)
    assert torch.allclose(d._predict_eps_from_xstart(xt, t, x0), eps, atol=1e-3)


def test_normal_kl():
    m, lv = torch.randn(10), torch.randn(10)
    # KL(p || p) = 0 up to float32 rounding of terms of order exp(|lv|) (a few units).
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(10), atol=1e-6)
    m2, lv2 = torch.randn(10), torch.randn(10)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, (0.5 * lv).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    assert torch.allclose(normal_kl(m, lv, m2, lv2), ref, atol=1e-5)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.3, -5.0), (-0.99, -1.0), (1.2, 0.5)])
def test_discretized_likelihood_bins_sum_to_one(mean, log_scale):
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    logp = discretized_gaussian_log_likelihood(
        bins, means=torch.full_like(bins, mean), log_scales=torch.full_like(bins, log_scale)
    )
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-6)


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert len(space_timesteps(1000, "250")) == 250
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45
    assert sum(k < 100 for k in kept) == 10 and sum(100 <= k < 200 for k in kept) == 15
    assert {0, 99, 100, 199, 200, 299} <= kept
    with pytest.raises(ValueError):
        space_timesteps(100, "ddim33")
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def _reference_space_timesteps(num_timesteps, counts):
    """improved-diffusion's section walk, restated: near-equal sections (the first T mod n one step
    longer), each walked by a running float index (0, s, s + s, ...) rounded per step."""
    n = len(counts)
    sizes = [num_timesteps // n + (i < num_timesteps % n) for i in range(n)]
    kept = set()
    for start, size, count in zip(itertools.accumulate([0] + sizes[:-1]), sizes, counts):
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept |= {start + round(idx) for idx in itertools.accumulate([0.0] + [stride] * (count - 1))}
    return kept


def test_space_timesteps_matches_improved_diffusion_arithmetic():
    # A product frac_stride * j lands on an exact .5 where the running sum does not (or the
    # reverse): 300 steps as "10,15,20" keeps a different step under the two orders.
    assert space_timesteps(300, "10,15,20") == _reference_space_timesteps(300, [10, 15, 20])
    rng = np.random.default_rng(0)
    cases = [(300, [10, 15, 20]), (4000, [1000]), (1000, [1, 1, 1]), (50, [50]), (51, [7, 3])]
    for _ in range(400):
        T = int(rng.integers(50, 4001))
        sections = int(rng.integers(1, 6))
        counts = [int(rng.integers(1, T // sections + 1)) for _ in range(sections)]
        cases.append((T, counts))
    mismatched_by_product = 0
    for T, counts in cases:
        want = _reference_space_timesteps(T, counts)
        assert space_timesteps(T, counts) == want, (T, counts)
        assert space_timesteps(T, ",".join(map(str, counts))) == want, (T, counts)
        size_per, extra = divmod(T, len(counts))
        product, start = set(), 0
        for i, c in enumerate(counts):
            size = size_per + (i < extra)
            stride = 1 if c <= 1 else (size - 1) / (c - 1)
            product |= {start + round(stride * j) for j in range(c)}
            start += size
        mismatched_by_product += product != want
    assert mismatched_by_product > 0  # the grid does reach cases where the order of arithmetic matters


def test_respacing_keeps_alphas_cumprod():
    betas = gd.get_named_beta_schedule("cosine", 1000)
    base = gd.GaussianDiffusion(
        betas=betas,
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_SMALL,
        loss_type=gd.LossType.MSE,
    )
    kept = space_timesteps(1000, "ddim25")
    spaced = SpacedDiffusion(
        kept,
        betas=betas,
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_SMALL,
        loss_type=gd.LossType.MSE,
    )
    assert spaced.num_timesteps == 25
    assert np.allclose(spaced.alphas_cumprod, base.alphas_cumprod[sorted(kept)], rtol=1e-12)

    seen = []

    def model(x, t, **kw):
        return (seen.append(t.clone()), torch.zeros_like(x))[1]

    spaced.p_mean_variance(model, torch.zeros(2, 1, 2, 2), torch.tensor([0, 24]))
    assert seen[0].tolist() == [0, 960]  # original indices, not respaced ones


def test_rescale_timesteps_feeds_the_model_0_to_1000():
    d = create_gaussian_diffusion(steps=100, rescale_timesteps=True, timestep_respacing="10")
    seen = []

    def model(x, t, **kw):
        return (seen.append(t.clone()), torch.zeros_like(x))[1]

    d.training_losses(model, torch.zeros(2, 1, 2, 2), torch.tensor([0, 9]))
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [0.0, 990.0]


COMBOS = list(itertools.product(gd.ModelMeanType, gd.ModelVarType, gd.LossType))


@pytest.mark.parametrize(
    "mean,var,loss", COMBOS, ids=[f"{m.name}-{v.name}-{loss.name}" for m, v, loss in COMBOS]
)
def test_every_objective_gives_finite_losses_and_gradients(mean, var, loss):
    torch.manual_seed(0)
    learned = var in (gd.ModelVarType.LEARNED, gd.ModelVarType.LEARNED_RANGE)
    d = gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule("cosine", 20),
        model_mean_type=mean,
        model_var_type=var,
        loss_type=loss,
    )
    net = torch.nn.Conv2d(3, 6 if learned else 3, 3, padding=1)

    def model(x, t, **kw):
        return net(x) * (0.1 if learned else 1.0)

    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 5, 10, 19])
    terms = d.training_losses(model, x0, t)
    assert terms["loss"].shape == (4,) and torch.isfinite(terms["loss"]).all()
    if not loss.is_vb():
        assert terms["mse"].shape == (4,)
        assert ("vb" in terms) == learned
    terms["loss"].mean().backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_hybrid_loss_stops_vb_gradient_into_the_mean():
    d = create_gaussian_diffusion(steps=50, learn_sigma=True, rescale_learned_sigmas=True)
    assert d.loss_type == gd.LossType.RESCALED_MSE and d.model_var_type == gd.ModelVarType.LEARNED_RANGE
    out = (torch.randn(2, 6, 4, 4) * 0.1).requires_grad_()

    def model(x, t, **kw):
        return out

    terms = d.training_losses(model, torch.rand(2, 3, 4, 4) * 2 - 1, torch.tensor([3, 30]))
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert g_vb[:, :3].abs().max() == 0 and g_vb[:, 3:].abs().max() > 0
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert g_mse[:, 3:].abs().max() == 0 and g_mse[:, :3].abs().max() > 0


def test_rescaled_vb_weight_is_T_over_1000():
    kwargs = dict(steps=50, learn_sigma=True)
    mse = create_gaussian_diffusion(**kwargs, rescale_learned_sigmas=False)
    rescaled = create_gaussian_diffusion(**kwargs, rescale_learned_sigmas=True)
    out = torch.randn(2, 6, 4, 4) * 0.1
    x0, t, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.tensor([3, 30]), torch.randn(2, 3, 4, 4)
    a = mse.training_losses(lambda x, t: out, x0, t, noise=noise)["vb"]
    b = rescaled.training_losses(lambda x, t: out, x0, t, noise=noise)["vb"]
    assert torch.allclose(b, a * 50 / 1000)


def test_calc_bpd_loop_on_tiny_model():
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**tiny_flags(learn_sigma=True, diffusion_steps=8))
    x0 = (torch.randint(0, 256, (2, 3, 8, 8)).float() / 127.5) - 1
    with torch.no_grad():
        out = diffusion.calc_bpd_loop(model, x0, clip_denoised=True)
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (2, 8)
    assert torch.isfinite(out["total_bpd"]).all() and (out["total_bpd"] > 0).all()
    assert torch.allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    # The prior term is the closed-form KL(q(x_T|x_0) || N(0, I)) per dimension, in bits.
    abar = diffusion.alphas_cumprod[-1]
    kl = 0.5 * (-1 - math.log(1 - abar) + (1 - abar) + abar * x0.double() ** 2) / math.log(2)
    assert torch.allclose(out["prior_bpd"].double(), kl.mean(dim=(1, 2, 3)), rtol=1e-4)


def test_samplers_produce_images_and_ddim_eta0_is_deterministic(tiny):
    model, _ = tiny
    _, d = create_model_and_diffusion(**tiny_flags(timestep_respacing="ddim5"))
    shape = (2, 3, 8, 8)
    noise = torch.randn(shape)
    a = d.ddim_sample_loop(model, shape, noise=noise, eta=0.0)
    b = d.ddim_sample_loop(model, shape, noise=noise, eta=0.0)
    assert torch.equal(a, b) and a.shape == shape and a.abs().max() <= 1.0 + 1e-5
    torch.manual_seed(1)
    c = d.p_sample_loop(model, shape, noise=noise)
    torch.manual_seed(1)
    e = d.p_sample_loop(model, shape, noise=noise)
    assert torch.equal(c, e) and torch.isfinite(c).all()
    steps = list(d.p_sample_loop_progressive(model, shape, noise=noise))
    assert len(steps) == 5
    with pytest.raises(ValueError):
        d.ddim_reverse_sample(model, noise, torch.zeros(2, dtype=torch.long), eta=0.5)


def test_normal_kl_float_arguments_round_through_float32_as_improved_diffusion():
    # improved-diffusion turns a float log-variance into a float32 tensor, then into the other
    # argument's dtype; a float64 caller thus sees 0.1 rounded to float32, not 0.1 exactly.
    mean = torch.tensor([0.3], dtype=torch.float64)
    got = normal_kl(mean, 0.1, 0.0, torch.tensor([0.2], dtype=torch.float64))
    logvar1 = torch.tensor(0.1, dtype=torch.float32).double()
    want = 0.5 * (
        -1.0
        + 0.2
        - logvar1
        + torch.exp(logvar1 - 0.2)
        + mean**2 * torch.exp(torch.tensor(-0.2, dtype=torch.float64))
    )
    assert torch.equal(got, want)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("predict_xstart", [False, True], ids=["eps", "x0"])
@pytest.mark.parametrize("learn_sigma", [False, True], ids=["fixed-sigma", "learned-sigma"])
def test_min_snr_weights_the_mse_term_by_the_float64_formula(schedule, predict_xstart, learn_sigma):
    """--snr_gamma 5: the mse term of each sample times min(SNR_t, 5) / SNR_t (eps) or min(SNR_t, 5) (x_0),
    SNR_t = abar_t / (1 - abar_t) computed here in float64 from the betas; the vb term and everything at the
    default (0) unchanged."""
    from iddpm_ds.gaussian_diffusion import get_named_beta_schedule
    from iddpm_ds.script_util import create_gaussian_diffusion

    kwargs = dict(steps=200, noise_schedule=schedule, predict_xstart=predict_xstart, learn_sigma=learn_sigma)
    plain, weighted = create_gaussian_diffusion(**kwargs), create_gaussian_diffusion(**kwargs, snr_gamma=5.0)
    assert (
        plain.mse_weights is None and create_gaussian_diffusion(**kwargs, snr_gamma=0.0).mse_weights is None
    )
    channels = 6 if learn_sigma else 3

    def model(x, t, **_):  # a fixed function of its inputs: the same outputs for both diffusions
        return torch.cat([x * 0.5, x.flip(1)], 1)[:, :channels] + t.float().view(-1, 1, 1, 1) / 100

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 20, 80, 150, 199])
    a = plain.training_losses(model, x0, t, noise=noise)
    b = weighted.training_losses(model, x0, t, noise=noise)
    abar = np.cumprod(1.0 - get_named_beta_schedule(schedule, 200))
    snr = abar / (1.0 - abar)
    weight = np.minimum(snr, 5.0) if predict_xstart else np.minimum(snr, 5.0) / snr
    expected = a["mse"].double() * torch.from_numpy(weight[t.numpy()])
    assert torch.allclose(b["mse"].double(), expected, rtol=1e-6)
    assert 0 < weight[t.numpy()].min() < 1 or predict_xstart  # some steps are damped for eps
    if learn_sigma:
        assert torch.equal(a["vb"], b["vb"]) and torch.equal(b["loss"], b["mse"] + b["vb"])
    else:
        assert torch.equal(b["loss"], b["mse"])


def test_post_hoc_ema_rebuilds_a_tracked_profile_to_float_precision():
    """A synthetic parameter trajectory (smooth drift plus noise) averaged step by step by power-function
    EMAs of widths 0.05, 0.07 and 0.10 (phema.beta) as training does, with snapshots of 0.05 and 0.10 every
    100 steps: at the last step, a width that was snapshotted comes back to float32 precision, and 0.07, which
    was tracked but never snapshotted, to within 1e-4 of the trajectory's scale."""
    from iddpm_ds import phema

    rng = np.random.default_rng(0)
    tracked = {w: torch.zeros(3, dtype=torch.float64) for w in (0.05, 0.07, 0.10)}
    saved = {}
    for step in range(1, 2001):
        theta = torch.tensor([np.sin(step / 300), np.cos(step / 170) + step / 1000, 0.5])
        theta = theta + 0.05 * torch.from_numpy(rng.standard_normal(3))
        for w, avg in tracked.items():
            avg.lerp_(theta, 1 - phema.beta(w, step))
        if step % 100 == 0:
            saved.update({(step, w): {"p": tracked[w].float().clone()} for w in (0.05, 0.10)})
    snaps = sorted(saved)
    for width, tol in ((0.05, 1e-6), (0.10, 1e-6), (0.07, 1e-4)):
        rebuilt = phema.reconstruct(snaps, lambda s, w: saved[(s, w)], 2000, width)["p"]
        assert torch.allclose(rebuilt.double(), tracked[width], atol=tol), (width, rebuilt, tracked[width])
    # The widths' exponents invert the profile's relative std.
    for width in (0.05, 0.07, 0.10):
        g = phema.exponent(width)
        assert np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(width)
