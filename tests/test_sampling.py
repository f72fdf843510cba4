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
    run("sample.py", *common, "--out", str(one))
    run(
        "sample.py",
        *common,
        "--out",
        str(two),
        launcher=("deepspeed", "--num_gpus", "2", "--master_port", str(free_port())),
    )
    with np.load(one) as f1, np.load(two) as f2:
        # The same images in the same order: each rank drew a disjoint share and rank 0 put them back in
        # order.
        assert np.array_equal(f1["arr_0"], f2["arr_0"]) and f2["arr_1"].tolist() == [1, 2, 1, 2, 1]


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


def train_tiny(steps=150):
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
