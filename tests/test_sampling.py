"""Sampling, likelihood and super-resolution entry points, on tiny models."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_SR_CLI, tiny_flags

from iddpm_ds.checkpointing import CheckpointError, load_official_state_dict
from iddpm_ds.dist_util import free_port
from iddpm_ds.script_util import create_model_and_diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, check=True, launcher=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [*launcher, *(() if launcher else (sys.executable,)), os.path.join(ROOT, "launch", script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as train.py leaves it: config.json and consolidated EMA weights of a tiny
    class-conditional model."""
    d = tmp_path_factory.mktemp("run")
    flags = tiny_flags(class_cond=True, learn_sigma=True, diffusion_steps=50)
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**flags)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.save(model.state_dict(), d / "ema_0.9999_000010.pt")
    torch.save(model.state_dict(), d / "model000010.pt")
    (d / "config.json").write_text(json.dumps({"model_flags": flags, "data_classes": 10}))
    return d


def test_sampling_is_deterministic_and_writes_improved_diffusion_npz(run_dir, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    six = ["--run_dir", str(run_dir), "--num_samples", "6", "--timestep_respacing", "5"]
    for out, batch in ((a, "4"), (b, "3")):  # batch size must not change the images
        run("sample.py", *six, "--batch_size", batch, "--out", str(out))
    with np.load(a) as fa, np.load(b) as fb:
        assert fa["arr_0"].dtype == np.uint8 and fa["arr_0"].shape == (6, 8, 8, 3)
        assert fa["arr_1"].shape == (6,) and fa["arr_1"].max() < 10  # labels drawn from the data's 10 classes
        assert np.array_equal(fa["arr_0"], fb["arr_0"]) and np.array_equal(fa["arr_1"], fb["arr_1"])
    assert (tmp_path / "a.png").exists()
    c = tmp_path / "c.npz"
    run("sample.py", *six, "--seed", "1", "--out", str(c))
    with np.load(a) as fa, np.load(c) as fc:
        assert not np.array_equal(fa["arr_0"], fc["arr_0"])


@pytest.mark.slow
def test_distributed_sampling_partitions_the_work(run_dir, tmp_path):
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    common = [
        "--run_dir",
        str(run_dir),
        "--num_samples",
        "5",
        "--timestep_respacing",
        "ddim5",
        "--use_ddim",
        "True",
        "--class_labels",
        "1,2",
    ]
    two_ranks = ("deepspeed", "--num_gpus", "2", "--master_port", str(free_port()))
    run("sample.py", *common, "--out", str(one))
    run("sample.py", *common, "--out", str(two), launcher=two_ranks)
    with np.load(one) as f1, np.load(two) as f2:
        # The same images in the same order: each rank drew a disjoint share and rank 0 put them back in
        # order.
        assert np.array_equal(f1["arr_0"], f2["arr_0"]) and f2["arr_1"].tolist() == [1, 2, 1, 2, 1]
    # DPM-Solver++ too (its only noise is x_T, drawn per image).
    dpm = [*common[:4], "--timestep_respacing", "5", "--sampler", "dpmpp_2m"]
    run("sample.py", *dpm, "--out", str(one))
    run("sample.py", *dpm, "--out", str(two), launcher=two_ranks)
    with np.load(one) as f1, np.load(two) as f2:
        assert np.array_equal(f1["arr_0"], f2["arr_0"])


def test_flags_that_contradict_the_run_are_one_line_errors(run_dir, tmp_path):
    proc = run(
        "sample.py", "--run_dir", str(run_dir), "--num_channels", "64", "--num_samples", "1", check=False
    )
    assert proc.returncode == 2 and "num_channels" in proc.stderr and "Traceback" not in proc.stderr
    # A bare .pt with the wrong flags: the mismatch is named, not dumped as keys.
    proc = run(
        "sample.py",
        "--model_path",
        str(run_dir / "model000010.pt"),
        "--image_size",
        "8",
        "--num_channels",
        "32",
        "--channel_mult",
        "1,2",
        "--attention_resolutions",
        "4",
        "--num_res_blocks",
        "1",
        "--num_samples",
        "1",
        check=False,
    )
    assert (
        proc.returncode == 2
        and "learn_sigma" in proc.stderr
        and "class_cond" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    model, _ = create_model_and_diffusion(**tiny_flags(class_cond=True))
    with pytest.raises(CheckpointError, match="learn_sigma"):
        load_official_state_dict(model, torch.load(run_dir / "model000010.pt"))


def train_tiny(steps=80):
    """A tiny eps-model fitted to 16 MNIST digits at 8 px (seconds on CPU)."""
    from iddpm_ds.image_datasets import load_data

    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**tiny_flags(diffusion_steps=50))
    x0, _ = next(load_data(data_dir="builtin:mnist", batch_size=16, image_size=8, num_workers=0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(steps):
        t = torch.randint(0, diffusion.num_timesteps, (16,))
        loss = diffusion.training_losses(model, x0, t)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x0


def test_ddim_eta0_is_deterministic_and_reverse_inverts_it():
    model, x0 = train_tiny()
    _, d = create_model_and_diffusion(**tiny_flags(diffusion_steps=50, timestep_respacing="ddim25"))
    x = x0[:4]
    # Up to mid-process: near t = T the cosine schedule's alpha_bar -> 0 makes any x_0 estimate
    # ill-conditioned.
    K = 12
    with torch.no_grad():
        z = x
        for i in range(K):  # encode x_0 -> x_K along the deterministic ODE
            z = d.ddim_reverse_sample(model, z, torch.full((4,), i), clip_denoised=False)["sample"]
        decoded = []
        for _ in range(2):
            a = z
            for i in reversed(range(K)):
                a = d.ddim_sample(model, a, torch.full((4,), i), clip_denoised=False, eta=0.0)["sample"]
            decoded.append(a)
    assert torch.equal(decoded[0], decoded[1])
    moved = float((z - x).pow(2).mean().sqrt())
    err = float((decoded[0] - x).pow(2).mean().sqrt())
    assert moved > 0.3 and err < 0.1 * moved, (err, moved)


def test_nll_script_matches_a_direct_computation(tmp_path):
    model, _ = train_tiny(steps=30)
    flags = tiny_flags(diffusion_steps=8)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(model.state_dict(), run_dir / "ema_0.9999_000001.pt")
    (run_dir / "config.json").write_text(json.dumps({"model_flags": flags}))
    out = tmp_path / "nll.json"
    run(
        "nll.py",
        "--run_dir",
        str(run_dir),
        "--data_dir",
        "builtin:mnist",
        "--num_samples",
        "6",
        "--batch_size",
        "4",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    assert result["num_samples"] == 6 and np.isfinite(result["bpd"]) and result["bpd"] > 0
    assert result["bpd"] == pytest.approx(result["prior_bpd"] + result["vb_terms_bpd"], rel=1e-6)

    # Direct: the same images (the unshuffled stream's first 6), the same noise (seed 0), calc_bpd_loop by
    # hand.
    from iddpm_ds.image_datasets import load_data

    _, diffusion = create_model_and_diffusion(**flags)
    stream = load_data(
        data_dir="builtin:mnist", batch_size=4, image_size=8, deterministic=True, num_workers=0
    )
    totals = []
    torch.manual_seed(0)
    for n in (4, 2):
        x, _ = next(stream)
        with torch.no_grad():
            totals.append(diffusion.calc_bpd_loop(model, x[:n])["total_bpd"])
    assert result["bpd"] == pytest.approx(float(torch.cat(totals).mean()), rel=1e-5)


@pytest.mark.slow
def test_super_resolution_train_and_sample_round_trip(tmp_path):
    sr = [*TINY_SR_CLI, "--class_cond", "True"]
    run_dir = tmp_path / "sr"
    run("super_res_train.py", "--log_dir", str(run_dir), *sr, "--max_steps", "2", "--batch_size", "4")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["super_res"] and config["model_flags"]["large_size"] == 16
    base = tmp_path / "base.npz"
    np.savez(
        base, np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), np.array([1, 2, 3])
    )
    out = tmp_path / "up.npz"
    run(
        "super_res_sample.py",
        "--run_dir",
        str(run_dir),
        "--base_samples",
        str(base),
        "--timestep_respacing",
        "4",
        "--out",
        str(out),
    )
    with np.load(out) as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and f["arr_1"].tolist() == [1, 2, 3]


def test_class_dropout_adds_only_a_null_class_row():
    plain, _ = create_model_and_diffusion(**tiny_flags(class_cond=True))
    guided, _ = create_model_and_diffusion(**tiny_flags(class_cond=True, class_dropout_prob=0.1))
    assert plain.label_emb.weight.shape[0] == 1000  # improved-diffusion's layout, unchanged at 0
    assert guided.label_emb.weight.shape[0] == 1001  # one learned "no class" row, label NULL_CLASS
    own, other = plain.state_dict(), guided.state_dict()
    assert own.keys() == other.keys()
    assert all(own[k].shape == other[k].shape for k in own if k != "label_emb.weight")


def test_drop_labels_replaces_labels_with_the_null_class_at_the_given_rate():
    from iddpm_ds.train_util import drop_labels

    y = torch.arange(10).repeat(1000)
    assert torch.equal(drop_labels(y, 0.0, 1000), y)
    torch.manual_seed(0)
    dropped = drop_labels(y, 0.3, 1000)
    null = dropped == 1000
    assert abs(null.float().mean().item() - 0.3) < 0.02
    assert torch.equal(dropped[~null], y[~null])


def test_guidance_combines_the_conditional_and_null_halves():
    from iddpm_ds.sampling import classifier_free_guidance

    def model(x, t, y):  # eps channels = y, variance channels = 100 + y: distinguishable halves
        yy = y.float().view(-1, 1, 1, 1).expand(-1, 3, *x.shape[2:])
        return torch.cat([yy, 100 + yy], dim=1)

    x, t, y = torch.zeros(2, 3, 4, 4), torch.tensor([5, 5]), torch.tensor([2, 7])
    for w in (0.0, 1.0, 3.0):
        out = classifier_free_guidance(model, w, null_label=1000)(x, t, y=y)
        eps_c, eps_u = y.float().view(-1, 1, 1, 1), 1000.0
        assert torch.allclose(out[:, :3], (eps_u + w * (eps_c - eps_u)).expand(-1, 3, 4, 4))
        assert torch.equal(out[:, 3:], 100 + y.float().view(-1, 1, 1, 1).expand(-1, 3, 4, 4))  # conditional


def test_guided_sampling_needs_a_null_class_and_then_works(run_dir, tmp_path):
    proc = run(
        "sample.py", "--run_dir", str(run_dir), "--num_samples", "2", "--guidance_scale", "3", check=False
    )
    assert proc.returncode == 2 and "class_dropout_prob" in proc.stderr and "Traceback" not in proc.stderr
    guided_dir = tmp_path / "guided"
    guided_dir.mkdir()
    flags = {**json.loads((run_dir / "config.json").read_text())["model_flags"], "class_dropout_prob": 0.1}
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**flags)
    torch.save(model.state_dict(), guided_dir / "ema_0.9999_000010.pt")
    (guided_dir / "config.json").write_text(json.dumps({"model_flags": flags, "data_classes": 10}))
    out = tmp_path / "g.npz"
    for w in ("1", "3"):
        run(
            "sample.py",
            "--run_dir",
            str(guided_dir),
            "--num_samples",
            "3",
            "--timestep_respacing",
            "4",
            "--guidance_scale",
            w,
            "--out",
            str(out.with_name(f"g{w}.npz")),
        )
    with np.load(out.with_name("g1.npz")) as a, np.load(out.with_name("g3.npz")) as b:
        assert a["arr_0"].shape == b["arr_0"].shape == (3, 8, 8, 3)
        assert np.array_equal(a["arr_1"], b["arr_1"]) and a["arr_1"].max() < 10  # real labels, never the null


# ------------------------------------------------------------------------------------------- DPM-Solver++
class GaussianDataDenoiser(torch.nn.Module):
    """The exact model of data x_0 ~ N(mu, s^2) per dimension: E[x_0 | x_t] is linear in x_t, so the
    probability-flow ODE maps x_T to x_0 = mu + s z with z = (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 +
    sigma_T^2) (the standardised coordinate is constant along it). Returns eps, or x_0 (predict_xstart), as
    the diffusion's flags ask, with a variance half for learn_sigma, at timesteps rescaled or not."""

    def __init__(self, abar, mu, s, predict_xstart=False, learn_sigma=False, rescale=False):
        super().__init__()
        self.abar, self.mu, self.s = torch.tensor(abar, dtype=torch.float64), mu, s
        self.predict_xstart, self.learn_sigma, self.rescale = predict_xstart, learn_sigma, rescale
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # for the loops' device

    def exact(self, x_T):
        a = float(self.abar[-1])
        return self.mu + self.s * (x_T.double() - a**0.5 * self.mu) / (a * self.s**2 + 1 - a) ** 0.5

    def forward(self, x, t, **kwargs):
        steps = (t.double() * len(self.abar) / 1000).round().long() if self.rescale else t.long()
        a = self.abar[steps].view(-1, *[1] * (x.dim() - 1))
        x = x.double()
        x0 = self.mu + a.sqrt() * self.s**2 / (a * self.s**2 + 1 - a) * (x - a.sqrt() * self.mu)
        out = x0 if self.predict_xstart else (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([out, torch.zeros_like(out)], 1).float() if self.learn_sigma else out.float()


def ode_errors(flags, counts, sampler):
    from iddpm_ds.sampling import diffusion_for_sampler
    from iddpm_ds.script_util import create_gaussian_diffusion

    base = create_gaussian_diffusion(**flags)
    model = GaussianDataDenoiser(
        base.alphas_cumprod, 0.3, 0.5, flags.get("predict_xstart", False), flags.get("learn_sigma", False),
        flags.get("rescale_timesteps", False),
    )  # fmt: skip
    x_T = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    errors = []
    for n in counts:
        diffusion = create_gaussian_diffusion(**flags, timestep_respacing=str(n))
        if sampler == "dpmpp_2m":
            diffusion = diffusion_for_sampler(diffusion, sampler)
            loop = diffusion.dpm_solver_sample_loop
        else:
            loop = diffusion.ddim_sample_loop
        out = loop(model, x_T.shape, noise=x_T.clone(), clip_denoised=False)
        errors.append(float((out.double() - model.exact(x_T)).abs().mean()))
    return errors


ODE_CASES = [
    dict(steps=1000, noise_schedule="linear"),
    dict(steps=1000, noise_schedule="cosine", learn_sigma=True),
    dict(steps=4000, noise_schedule="cosine", predict_xstart=True, rescale_timesteps=True),
]


@pytest.mark.parametrize("flags", ODE_CASES, ids=["linear-eps", "cosine-learned-sigma", "x0-rescaled-T4000"])
def test_dpm_solver_converges_to_the_exact_ode_solution_at_second_order(flags):
    """On Gaussian data the probability-flow ODE's solution is known exactly. DPM-Solver++(2M) reaches it
    within 2% of the data's scale (s = 0.5) at 20 model evaluations, 4x closer than DDIM, and its error falls
    about 4x per doubling of the steps (second order) where DDIM's falls 2x (first order)."""
    counts = (20, 40, 80)
    dpm, ddim = ode_errors(flags, counts, "dpmpp_2m"), ode_errors(flags, counts, "ddim")
    assert dpm[0] < 0.01 and dpm[0] < ddim[0] / 4
    dpm_order = np.log2(np.array(dpm[:-1]) / np.array(dpm[1:]))
    ddim_order = np.log2(np.array(ddim[:-1]) / np.array(ddim[1:]))
    assert np.all((dpm_order > 1.6) & (dpm_order < 2.6)), dpm_order
    assert np.all((ddim_order > 0.8) & (ddim_order < 1.2)), ddim_order


def test_log_snr_timesteps_are_n_distinct_steps_from_the_noisiest_to_zero():
    from iddpm_ds.respace import log_snr_timesteps
    from iddpm_ds.script_util import create_gaussian_diffusion

    for schedule in ("linear", "cosine"):
        abar = create_gaussian_diffusion(steps=1000, noise_schedule=schedule).alphas_cumprod
        for n in (2, 3, 10, 25, 1000):
            steps = log_snr_timesteps(abar, n)
            assert (
                len(steps) == n
                and steps[0] == 999
                and steps[-1] == 0
                and steps == sorted(steps, reverse=True)
            )
            assert len(set(steps)) == n


def test_guidance_outside_its_interval_is_the_conditional_prediction_in_one_forward():
    from iddpm_ds.sampling import classifier_free_guidance, noise_level
    from iddpm_ds.script_util import create_gaussian_diffusion

    calls = []

    def model(x, t, y):
        calls.append(len(x))
        yy = y.float().view(-1, 1, 1, 1).expand(-1, 3, *x.shape[2:])
        return torch.cat([yy + x[:, :3], 100 + yy], dim=1)

    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear", rescale_timesteps=True)
    sigma = noise_level(diffusion)
    abar = diffusion.alphas_cumprod
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([2, 7])
    guided = classifier_free_guidance(model, 3.0, null_label=1000, interval=(0.5, 2.0), sigma=sigma)
    everywhere = classifier_free_guidance(model, 3.0, null_label=1000)
    for step in (10, 300, 999):  # sigma 0.07, 0.88 and 157
        t = torch.full((2,), step * 1000 / 1000.0)  # as the model sees it: rescaled to [0, 1000)
        level = ((1 - abar[step]) / abar[step]) ** 0.5
        assert float(sigma(t)[0]) == pytest.approx(level)
        calls.clear()
        out = guided(x, t, y=y)
        if 0.5 < level <= 2.0:
            assert torch.equal(out, everywhere(x, t, y=y)) and calls[0] == 4
        else:
            assert torch.equal(out, model(x, t, y=y)) and calls[0] == 2  # exactly: one forward, no guidance
    # A batch whose timesteps straddle the interval: each image is guided or not by its own noise level.
    t = torch.tensor([300.0, 999.0])
    out = guided(x, t, y=y)
    assert torch.equal(out[0], everywhere(x, t, y=y)[0]) and torch.equal(out[1], model(x, t, y=y)[1])


@pytest.fixture(scope="module")
def guided_run_dir(run_dir, tmp_path_factory):
    """run_dir's model with a null class (class_dropout_prob 0.1), for guided sampling."""
    d = tmp_path_factory.mktemp("guided")
    flags = {**json.loads((run_dir / "config.json").read_text())["model_flags"], "class_dropout_prob": 0.1}
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**flags)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.save(model.state_dict(), d / "ema_0.9999_000010.pt")
    (d / "config.json").write_text(json.dumps({"model_flags": flags, "data_classes": 10}))
    return d


def test_dpm_solver_with_a_guidance_interval_gives_the_same_images_at_any_batch_size(
    guided_run_dir, tmp_path
):
    common = ["--run_dir", str(guided_run_dir), "--num_samples", "5", "--sampler", "dpmpp_2m"]
    common += ["--timestep_respacing", "6", "--guidance_scale", "3", "--guidance_interval", "0.3,5"]
    outs = [tmp_path / "b5.npz", tmp_path / "b2.npz"]
    for out, batch in zip(outs, ("5", "2")):
        proc = run("sample.py", *common, "--batch_size", batch, "--out", str(out))
    assert "DPM-Solver++(2M), 6 model evaluations" in proc.stdout and "where 0.3 < sigma <= 5" in proc.stdout
    with np.load(outs[0]) as a, np.load(outs[1]) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and a["arr_0"].std() > 0
    # Without the interval (guidance everywhere) the images differ: the interval is in force.
    run("sample.py", *common[:-2], "--out", str(tmp_path / "all.npz"))
    with np.load(outs[0]) as a, np.load(tmp_path / "all.npz") as c:
        assert not np.array_equal(a["arr_0"], c["arr_0"])


def test_the_log_says_what_an_ancestral_ddim_respacing_does(run_dir, tmp_path):
    proc = run("sample.py", "--run_dir", str(run_dir), "--num_samples", "1", "--timestep_respacing", "ddim5",
               "--out", str(tmp_path / "x.npz"))  # fmt: skip
    assert "ancestral, 5 of the 50 diffusion steps (respacing 'ddim5' only picks which" in proc.stdout


def test_sde_dpm_solver_samples_the_data_distribution_and_each_image_keeps_its_seed():
    """SDE-DPM-Solver++(2M) on Gaussian data (N(0.3, 0.5^2)): the samples' mean and spread converge to the
    data's as model evaluations grow (a 20-step chain is off by under 4% in spread, 160 steps by under 1%);
    and, as with every sampler, image i depends on (seed, i) alone, not its batch."""
    from iddpm_ds.sampling import diffusion_for_sampler, sample_images
    from iddpm_ds.script_util import create_gaussian_diffusion

    x_T = torch.randn(512, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps, spread_tol in ((20, 0.04), (160, 0.01)):
        diffusion = create_gaussian_diffusion(
            steps=1000, noise_schedule="linear", timestep_respacing=str(steps)
        )
        model = GaussianDataDenoiser(diffusion.base_alphas_cumprod(), 0.3, 0.5)
        gen = torch.Generator().manual_seed(1)
        out = diffusion_for_sampler(diffusion, "dpmpp_2m_sde").dpm_solver_sample_loop(
            model, x_T.shape, noise=x_T, clip_denoised=False, sde=True,
            step_noise=lambda: torch.randn(x_T.shape, generator=gen),
        )  # fmt: skip
        assert float(out.mean()) == pytest.approx(0.3, abs=0.01), steps
        assert float(out.std()) == pytest.approx(0.5, rel=spread_tol), steps
    kwargs = dict(
        image_size=8, seed=0, sampler="dpmpp_2m_sde", clip_denoised=False, device=torch.device("cpu")
    )
    whole = sample_images(model, diffusion, list(range(5)), **kwargs)
    parts = [sample_images(model, diffusion, idx, **kwargs) for idx in ([0, 1], [2, 3, 4])]
    assert np.array_equal(whole, np.concatenate(parts))
