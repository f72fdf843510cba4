"""Sample-quality metrics: the Fréchet distance against its closed form, the metric plumbing with stand-in
feature extractors (order across ranks, the reference cache), the digit classifier and its two
metrics on real digits, evaluate.py end to end, and the Inception weights' one-line errors."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from iddpm_ds import digit_classifier, evaluation
from iddpm_ds.errors import ConfigError, DataError
from iddpm_ds.evaluation import Evaluator, extract, frechet_distance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_fidelity_importable() -> bool:
    try:
        import torch_fidelity  # noqa: F401
    except Exception:  # absent, or a torchvision that cannot load beside this torch
        return False
    return True


needs_torch_fidelity = pytest.mark.skipif(
    not torch_fidelity_importable(), reason="torch-fidelity (and a torchvision matching torch) not importable"
)


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 6)) @ rng.normal(size=(6, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = rng.normal(size=6)
    # Same covariance: only the means differ.
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # b = 2a: mu_b = 2 mu_a and S_b = 4 S_a, so |mu_a|^2 + Tr(S_a + 4 S_a - 2 * 2 S_a) = |mu_a|^2 + Tr(S_a).
    mu = a.mean(0)
    expected = float(mu @ mu) + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-6)
    # Two independent draws of the same Gaussian are close, a different one is not.
    b = rng.normal(size=(4000, 6)) @ np.eye(6)
    c = rng.normal(size=(4000, 6)) @ np.eye(6)
    assert frechet_distance(b, c) < 0.05 < 1.0 < frechet_distance(b, c * 2)


class MeanColour:
    """A stand-in extractor: per-image channel means and stds as 'features', a fake label; counts calls."""

    def __init__(self):
        self.images_seen = 0

    def __call__(self, x: torch.Tensor):
        self.images_seen += len(x)
        f = x.float()
        feats = torch.cat([f.mean((2, 3)), f.std((2, 3))], 1)
        return {
            evaluation.POOL: feats,
            evaluation.LOGITS: feats,
            "features": feats,
            "label": (f.mean((1, 2, 3)) > 127).long(),
        }


def random_images(n: int, seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_identical_sets_score_zero_and_a_brightened_set_scores_its_shift(tmp_path):
    ref = random_images(300, 0)
    path = tmp_path / "ref.npz"
    np.savez(path, ref)
    stub = MeanColour()
    ev = Evaluator(["fid", "mnist_fd"], str(path), 8, extractors={"inception": stub, "digits": stub})
    same = ev(ref)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["mnist_fd"] == pytest.approx(0.0, abs=1e-6)
    # Adding 20 to every pixel (of images kept below 236) shifts each channel mean by 20 and leaves the
    # stds: the distance is 3 * 20^2.
    dark = np.minimum(ref, 235)
    np.savez(path, dark)
    ev = Evaluator(["fid"], str(path), 8, extractors={"inception": MeanColour()})
    assert ev(dark + 20)["fid"] == pytest.approx(3 * 20.0**2, rel=1e-6)


def test_mnist_acc_is_the_fraction_classified_as_drawn():
    images = random_images(50, 1)
    labels = (images.reshape(50, -1).astype(np.float64).mean(1) > 127).astype(np.int64)
    stub = MeanColour()
    ev = Evaluator(["mnist_acc"], "unused", 8, extractors={"digits": stub})
    assert ev(images, labels)["mnist_acc"] == 1.0
    flipped = labels.copy()
    flipped[:10] = 1 - flipped[:10]
    assert ev(images, flipped)["mnist_acc"] == pytest.approx(0.8)
    with pytest.raises(DataError, match="labels"):
        ev(images)


@needs_torch_fidelity
def test_precision_recall_and_kid_through_torch_fidelity(tmp_path):
    ref = random_images(200, 2)
    path = tmp_path / "ref.npz"
    np.savez(path, ref)
    ev = Evaluator(["prc", "kid", "isc"], str(path), 8, extractors={"inception": MeanColour()})
    out = ev(ref)
    assert out["precision"] == pytest.approx(1.0) and out["recall"] == pytest.approx(1.0)
    assert abs(out["kid"]) < 1e-3


def test_reference_features_are_cached_next_to_the_reference(tmp_path):
    ref = random_images(120, 3)
    path = tmp_path / "ref.npz"
    np.savez(path, ref)
    first = MeanColour()
    a = Evaluator(["fid"], str(path), 8, extractors={"inception": first})(ref[:40])
    cache = tmp_path / "ref.inception-8px.npz"
    assert cache.is_file() and first.images_seen == 120 + 40
    second = MeanColour()
    b = Evaluator(["fid"], str(path), 8, extractors={"inception": second})(ref[:40])
    assert second.images_seen == 40 and b == a  # the reference came from the cache
    # A different reference subset is a different key; a torn cache is recomputed, not trusted.
    third = MeanColour()
    Evaluator(["fid"], str(path), 8, max_reference=60, extractors={"inception": third})(ref[:40])
    assert third.images_seen == 60 + 40
    cache.write_bytes(b"torn")
    fourth = MeanColour()
    assert Evaluator(["fid"], str(path), 8, extractors={"inception": fourth})(ref[:40]) == a
    assert fourth.images_seen == 120 + 40


def test_reference_features_made_with_other_inception_weights_are_not_reused(tmp_path, monkeypatch):
    """The cache's key names the weights file by its contents: features extracted with one set of weights
    are never served to an evaluation with another (its FID would compare different feature spaces)."""
    from iddpm_ds import evaluation

    ref = random_images(50, 4)
    path = tmp_path / "ref.npz"
    np.savez(path, ref)
    extractors = []

    def build(weights_path, device):
        extractors.append(MeanColour())
        return extractors[-1]

    monkeypatch.setattr(evaluation, "inception_extractor", build)
    for name, content in (("a.pth", b"weights a"), ("a_copy.pth", b"weights a"), ("b.pth", b"weights b")):
        (tmp_path / name).write_bytes(content)
        Evaluator(["fid"], str(path), 8, inception_weights=str(tmp_path / name))(ref[:10])
    # The same bytes under another name reuse the cache; other weights extract the reference again.
    assert [e.images_seen for e in extractors] == [50 + 10, 10, 50 + 10]


def _extract_on_two_ranks(rank: int, port: int, images: np.ndarray, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    feats = extract(MeanColour(), images, batch_size=7, distributed=True)
    if rank == 0:
        np.save(out, feats["features"])
    dist.destroy_process_group()


@pytest.mark.slow
def test_features_extracted_on_two_ranks_come_back_in_image_order(tmp_path):
    from iddpm_ds.dist_util import free_port

    images = random_images(33, 4)
    out = str(tmp_path / "feats.npy")
    torch.multiprocessing.spawn(_extract_on_two_ranks, args=(free_port(), images, out), nprocs=2)
    np.testing.assert_allclose(np.load(out), extract(MeanColour(), images)["features"])


# The tests below use the user's classifier cache, as evaluate.py and training's evaluation do: on a fresh
# machine the first test or run that needs the classifier trains it (tens of seconds), the rest read it.
def test_digit_classifier_reads_held_out_digits_and_is_cached(monkeypatch):
    model, accuracy = digit_classifier.load_classifier()
    assert accuracy >= 0.95
    assert os.path.isfile(os.path.join(digit_classifier.cache_dir(), digit_classifier.CACHE_NAME))
    # The second load reads the cache: training is not called again.
    monkeypatch.setattr(digit_classifier, "train_classifier", lambda: pytest.fail("retrained"))
    again, same = digit_classifier.load_classifier()
    assert same == accuracy
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_a_torn_classifier_cache_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("IDDPM_DS_CACHE", str(tmp_path))
    (tmp_path / digit_classifier.CACHE_NAME).write_bytes(b"not a checkpoint")
    calls = []

    def train():
        calls.append(1)
        return digit_classifier.LeNet(), 0.5

    monkeypatch.setattr(digit_classifier, "train_classifier", train)
    _, accuracy = digit_classifier.load_classifier()
    assert calls == [1] and accuracy == 0.5
    _, accuracy = digit_classifier.load_classifier()  # now a readable cache
    assert calls == [1] and accuracy == 0.5


def test_processes_needing_the_classifier_at_once_train_it_once(tmp_path, monkeypatch):
    """Ranks evaluating together, or tests beside a run: one trains, the others wait and read its file."""
    monkeypatch.setenv("IDDPM_DS_CACHE", str(tmp_path))
    calls = []

    def slow_train():
        calls.append(1)
        time.sleep(0.5)  # the others arrive while it trains
        return digit_classifier.LeNet(), 0.5

    monkeypatch.setattr(digit_classifier, "train_classifier", slow_train)
    threads = [threading.Thread(target=digit_classifier.load_classifier) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]


def test_floor_draws_match_the_samples_class_counts():
    real_labels = np.repeat(np.arange(3), [5, 8, 2])
    labels = np.array([1, 0, 1, 2, 1, 1])
    pick = evaluation.draw_real(len(real_labels), len(labels), 0, real_labels, labels)
    assert len(set(pick.tolist())) == len(labels)
    assert np.bincount(real_labels[pick], minlength=3).tolist() == np.bincount(labels).tolist()
    assert not np.array_equal(
        pick, evaluation.draw_real(len(real_labels), len(labels), 1, real_labels, labels)
    )
    assert np.array_equal(pick, evaluation.draw_real(len(real_labels), len(labels), 0, real_labels, labels))
    # Unlabelled, the draw is the random one; a reference that cannot match the labels gives none.
    assert len(set(evaluation.draw_real(15, 6, 0).tolist())) == 6
    assert evaluation.draw_real(15, 6, 0, None, labels) is None
    assert evaluation.draw_real(15, 6, 0, real_labels, labels.astype(np.float32)) is None
    assert evaluation.draw_real(15, 4, 0, real_labels, np.array([2, 2, 2, 0])) is None  # two 2s only


def test_the_class_matched_floor_scores_real_images_of_the_samples_classes(tmp_path):
    # Class 0 dark, class 1 bright: samples of class 0 only are far from the whole reference, and so are
    # real images of class 0 alone, but not a random draw of both classes.
    rng = np.random.default_rng(0)
    dark, bright = rng.integers(0, 60, (100, 8, 8, 3)), rng.integers(196, 256, (100, 8, 8, 3))
    path = tmp_path / "ref.npz"
    np.savez(path, np.concatenate([dark, bright]).astype(np.uint8), np.repeat([0, 1], 100))
    ev = Evaluator(["mnist_fd"], str(path), 8, extractors={"digits": MeanColour()})
    samples = rng.integers(0, 60, (20, 8, 8, 3)).astype(np.uint8)
    out = ev(samples, np.zeros(20, dtype=np.int64))
    assert out["mnist_fd_floor_classes"] == pytest.approx(out["mnist_fd"], rel=0.2)
    assert out["mnist_fd_floor"] < out["mnist_fd"] / 10
    assert "mnist_fd_floor_classes" not in ev(samples)
    np.savez(path, np.concatenate([dark, bright]).astype(np.uint8))  # no labels: no class-matched floor
    assert "mnist_fd_floor_classes" not in Evaluator(
        ["mnist_fd"], str(path), 8, extractors={"digits": MeanColour()}
    )(samples, np.zeros(20, dtype=np.int64))


def test_real_digits_score_as_digits_and_noise_does_not():
    digits, labels = digit_classifier.builtin_digits()
    pick = np.random.default_rng(0).permutation(len(digits))[:500]
    ev = Evaluator(["mnist_acc", "mnist_fd"], "builtin:mnist", 32)
    real = ev(digits[pick], labels[pick])
    assert real["mnist_acc"] >= 0.95
    noise = ev(random_images(500, 5, size=32), labels[pick])
    assert noise["mnist_acc"] < 0.3
    assert real["mnist_fd"] * 20 < noise["mnist_fd"]
    # Colour is averaged away and the 28 px originals are resized: both still read as digits.
    tinted = (digits[pick] * np.array([1.0, 0.6, 0.3])).astype(np.uint8)
    assert ev(tinted, labels[pick])["mnist_acc"] >= 0.9


def run_evaluate(*argv, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_evaluate_cli_reports_digit_metrics_of_an_npz(tmp_path):
    digits, labels = digit_classifier.builtin_digits()
    path = tmp_path / "samples_200x32x32x3.npz"
    np.savez(path, digits[:200], labels[:200])
    out = tmp_path / "metrics.json"
    proc = run_evaluate("--samples", str(path), "--metrics", "mnist_acc,mnist_fd", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "mnist_acc" in proc.stdout and "held-out" in proc.stdout
    import json

    result = json.loads(out.read_text())
    assert result["mnist_acc"] >= 0.95 and result["mnist_fd"] >= 0
    # Real digits score about their own floors: the random draw's and that of real digits of their classes.
    assert result["mnist_fd"] < 2 * result["mnist_fd_floor_classes"]
    assert "of the samples' classes" in proc.stdout


def test_evaluate_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, np.zeros((4, 8, 8), dtype=np.float32))
    cases = [
        ([], "--samples"),
        (["--samples", str(tmp_path / "missing.npz")], "no such file"),
        (["--samples", str(bad)], "arr_0 must be uint8"),
        (["--samples", str(bad), "--metrics", "fid,sharpness"], "unknown sharpness"),
    ]
    for argv, message in cases:
        proc = run_evaluate(*argv)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[-1].startswith("evaluate.py: error: ") and message in lines[-1], proc.stderr


def test_missing_inception_weights_are_one_line_and_nothing_is_downloaded(tmp_path, monkeypatch):
    digits = random_images(4, 6)
    path = tmp_path / "s.npz"
    np.savez(path, digits)
    proc = run_evaluate(
        "--samples", str(path), "--metrics", "fid", env={evaluation.WEIGHTS_ENV: str(tmp_path / "none.pth")}
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "Inception weights not found" in proc.stderr.splitlines()[-1]
    # With no file anywhere, the download is tried once into torch hub's cache; its failure says how to
    # get the file. (An unroutable address stands in for an offline machine.)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv(evaluation.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(evaluation, "INCEPTION_URL", "http://127.0.0.1:9/weights.pth")
    with pytest.raises(ConfigError, match="--inception_weights PATH") as e:
        evaluation.resolve_inception_weights()
    assert evaluation.WEIGHTS_ENV in str(e.value)
    assert not any(f.endswith(".pth") for _, _, fs in os.walk(tmp_path / "hub") for f in fs)
    (tmp_path / "w.pth").write_bytes(b"x")
    assert evaluation.resolve_inception_weights(str(tmp_path / "w.pth")) == str(tmp_path / "w.pth")
