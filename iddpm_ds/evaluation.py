"""Sample quality: FID, Inception Score, KID and precision/recall through torch-fidelity's TF-compatible
InceptionV3 (the network papers report with), and two offline numbers from the project's own digit
classifier (digit_classifier.py): class accuracy and a Fréchet distance in its feature space.

A feature extractor maps uint8 images [N, 3, H, W] to named features [N, D]. A distributed evaluator
(launch/evaluate.py under a launcher) extracts on every rank (rank r takes images r, r + world, ...)
and gathers, so evaluation scales with the launcher; the metrics come from the gathered features. The
reference's Inception features are cached next to the reference, keyed by what they were made from.
"""

import hashlib
import logging
import os
import urllib.request
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError, DataError, first_line

log = logging.getLogger(__name__)

INCEPTION_METRICS = ("fid", "isc", "kid", "prc")
MNIST_METRICS = ("mnist_acc", "mnist_fd")
PIXEL_METRICS = ("colour",)
METRICS = INCEPTION_METRICS + MNIST_METRICS + PIXEL_METRICS
FLOOR_DRAWS = 3  # real-data floors average this many draws of real images
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
WEIGHTS_ENV = "IDDPM_DS_INCEPTION_WEIGHTS"
POOL, LOGITS = "2048", "logits_unbiased"  # torch-fidelity's names for the pool features and the logits

Extractor = Callable[[torch.Tensor], Dict[str, torch.Tensor]]


def parse_metrics(text: str) -> List[str]:
    """'fid,kid' -> ['fid', 'kid'], each checked against METRICS."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ConfigError(
            f"--metrics: unknown {', '.join(unknown) or '(none given)'}; choose from {','.join(METRICS)}"
        )
    return names


def training_metrics(text: str, data_dir: str, class_cond: bool) -> List[str]:
    """--eval_metrics during training; '' = the digit metrics on the built-in MNIST (mnist_acc for a
    class-conditional model only), fid on other data."""
    from .builtin_datasets import DEFAULT_DATASET

    if text:
        names = parse_metrics(text)
    elif (data_dir or DEFAULT_DATASET) == DEFAULT_DATASET:
        names = ["mnist_acc", "mnist_fd"] if class_cond else ["mnist_fd"]
    else:
        names = ["fid"]
    if "mnist_acc" in names and not class_cond:
        raise ConfigError("--eval_metrics mnist_acc needs a class-conditional model (--class_cond True)")
    return names


# --------------------------------------------------------------------------- images
def load_npz(path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(uint8 images [N, H, W, 3], labels [N] or None) from our / improved-diffusion's sample .npz."""
    if not os.path.isfile(path):
        raise DataError(f"no such file: {path}")
    try:
        with np.load(path) as f:
            images = f["arr_0"]
            labels = f["arr_1"] if "arr_1" in f.files else None
    except Exception as e:
        raise DataError(f"{path} is not a samples .npz with arr_0 ({first_line(e)})") from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    return images, labels


def load_reference(
    reference: str, image_size: int, limit: int = 0
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Reference images as uint8 [N, image_size, image_size, 3]: an .npz, or any load_data source rendered
    the way training renders it (resize + centre crop); and their labels [N], None where it has none."""
    if reference.endswith(".npz"):
        images, labels = load_npz(reference)
        return (images[:limit], None if labels is None else labels[:limit]) if limit else (images, labels)
    from .image_datasets import open_source
    from .pixels import center_crop_arr, to_rgb

    source = open_source(reference)
    n = min(len(source), limit) if limit else len(source)
    images = np.stack([center_crop_arr(to_rgb(source.image(i)), image_size) for i in range(n)])
    labels = [source.label(i) for i in range(n)]
    return images, None if None in labels else np.array(labels, dtype=np.int64)


def draw_real(
    n_real: int,
    n: int,
    seed: int,
    real_labels: Optional[np.ndarray] = None,
    labels: Optional[np.ndarray] = None,
) -> Optional[np.ndarray]:
    """Indices of n of n_real reference images for a floor, seeded: uniformly at random, or, given the
    samples' labels [n] and the reference's [n_real], as many of each class as the labels hold. None where
    the reference cannot match the labels (it has none, or too few images of a class)."""
    rng = np.random.default_rng(seed)
    if labels is None:
        return rng.choice(n_real, size=min(n, n_real), replace=False)
    if real_labels is None or labels.dtype.kind not in "iu" or len(labels) == 0 or labels.min() < 0:
        return None
    picks = []
    for c, count in enumerate(np.bincount(labels)):
        pool = np.flatnonzero(real_labels == c)
        if len(pool) < count:
            return None
        picks.append(rng.choice(pool, size=count, replace=False))
    return np.concatenate(picks)


# --------------------------------------------------------------------------- features
@torch.no_grad()
def extract(
    extractor: Extractor, images: np.ndarray, batch_size: int = 100, distributed: bool = False
) -> Dict[str, np.ndarray]:
    """Features of uint8 images [N, H, W, 3], in image order; with `distributed`, every rank of the process
    group calls this, extracts a share and receives all (training evaluates on rank 0 alone: not)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = images[rank::world]
    parts: Dict[str, list] = {}
    for i in range(0, len(mine), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(mine[i : i + batch_size])).permute(0, 3, 1, 2)
        for k, v in extractor(batch).items():
            parts.setdefault(k, []).append(v.double().cpu().numpy())
    local = {k: np.concatenate(v) for k, v in parts.items()}
    if world == 1:
        return local
    gathered: List[Optional[Dict[str, np.ndarray]]] = [None] * world
    dist.all_gather_object(gathered, local)
    out = {}
    for k in gathered[0]:
        full = np.empty((len(images),) + gathered[0][k].shape[1:], dtype=np.float64)
        for r, part in enumerate(gathered):
            full[r::world] = part[k]
        out[k] = full
    return out


def _read_cache(path: str, key: str) -> Optional[Dict[str, np.ndarray]]:
    """The features cached at path for this key; None when missing, torn or made from something else."""
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files if k != "key"} if str(f["key"]) == key else None
    except Exception:
        return None


def cached_extract(
    extractor: Extractor,
    images_fn: Callable[[], np.ndarray],
    cache_path: str,
    key: str,
    batch_size: int,
    distributed: bool = False,
) -> Dict[str, np.ndarray]:
    """extract() of a reference, read from cache_path when it was written for the same key; a missing,
    stale or unreadable cache is recomputed and rewritten (atomically, by rank 0)."""
    cached = _read_cache(cache_path, key)
    if cached is not None:
        return cached
    feats = extract(extractor, images_fn(), batch_size, distributed)
    if not distributed or dist.get_rank() == 0:
        tmp = f"{cache_path}.tmp.{os.getpid()}.npz"
        try:
            np.savez(tmp, key=np.array(key), **feats)
            os.replace(tmp, cache_path)
            log.info("reference features cached at %s", cache_path)
        except OSError as e:
            log.warning("could not cache reference features at %s: %s", cache_path, first_line(e))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return feats


def reference_cache_path(reference: str, extractor_name: str, image_size: int) -> str:
    """Next to the reference (R.npz -> R.inception-32px.npz); built-in sets in the user cache."""
    stem = reference.rstrip("/")
    if reference.startswith("builtin:") or "://" in reference:
        from .digit_classifier import cache_dir

        os.makedirs(cache_dir(), exist_ok=True)
        stem = os.path.join(cache_dir(), reference.replace(":", "_").replace("/", "_"))
    elif stem.endswith(".npz"):
        stem = stem[: -len(".npz")]
    return f"{stem}.{extractor_name}-{image_size}px.npz"


def file_fingerprint(path: str) -> str:
    """The first 16 hex digits of a file's sha256: part of the reference cache's key, so features extracted
    with other Inception weights are never reused."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def resolve_inception_weights(path: str = "") -> str:
    """The InceptionV3 weights file: `path`, else $IDDPM_DS_INCEPTION_WEIGHTS, else torch hub's cache,
    downloaded there on first use. One-line ConfigError when none is there and the download fails."""
    path = path or os.environ.get(WEIGHTS_ENV, "")
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"Inception weights not found: {path}")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if os.path.isfile(cached):
        return cached
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    tmp = f"{cached}.tmp.{os.getpid()}"
    try:
        urllib.request.urlretrieve(INCEPTION_URL, tmp)
        os.replace(tmp, cached)
    except Exception as e:
        raise ConfigError(
            f"the Inception weights could not be downloaded ({first_line(e)}): fetch {INCEPTION_URL} on a "
            f"machine with a network and pass it with --inception_weights PATH or ${WEIGHTS_ENV}"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return cached


def _torch_fidelity():
    try:
        import torch_fidelity
    except Exception as e:  # also a torchvision that cannot load beside this torch
        raise ConfigError(
            f"the fid/isc/kid/prc metrics need torch-fidelity and a torchvision that matches torch "
            f"({first_line(e)}): pip install -e .[eval]; mnist_acc,mnist_fd need neither"
        ) from e
    return torch_fidelity


def inception_extractor(weights_path: str, device: str = "cpu") -> Extractor:
    """torch-fidelity's TF-compatible InceptionV3: pool features and unbiased logits of uint8 images."""
    tf = _torch_fidelity()
    model = tf.FeatureExtractorInceptionV3(
        "inception-v3-compat", [POOL, LOGITS], feature_extractor_weights_path=weights_path
    ).to(device)

    def run(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return dict(zip((POOL, LOGITS), model(x.to(device))))

    return run


# --------------------------------------------------------------------------- metrics
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] and [M, D]:
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b (real and
    non-negative for covariance matrices, up to round-off).
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s_a @ s_b).astype(np.complex128)).real.sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def inception_metrics(
    metrics: Sequence[str], samples: Dict[str, np.ndarray], reference: Dict[str, np.ndarray]
) -> Dict[str, float]:
    """fid / isc / kid / prc from Inception features (dicts with POOL and LOGITS)."""
    out: Dict[str, float] = {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(samples[POOL], reference[POOL])
    needs_library = [m for m in metrics if m in ("isc", "kid", "prc")]
    if not needs_library:
        return out
    _torch_fidelity()
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    gen, ref = torch.from_numpy(samples[POOL]).float(), torch.from_numpy(reference[POOL]).float()
    if "isc" in metrics:
        isc = isc_features_to_metric(torch.from_numpy(samples[LOGITS]).float())
        out["isc"], out["isc_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    if "kid" in metrics:
        kid = kid_features_to_metric(gen, ref, kid_subset_size=min(1000, len(gen), len(ref)), verbose=False)
        out["kid"], out["kid_std"] = (
            kid["kernel_inception_distance_mean"],
            kid["kernel_inception_distance_std"],
        )
    if "prc" in metrics:
        prc = prc_features_to_metric(gen, ref, verbose=False)
        out["precision"], out["recall"] = prc["precision"], prc["recall"]
    return out


class Evaluator:
    """Computes the configured metrics of sample sets against one reference; the reference's features are
    made (or read from their cache) once, on first use.

    :param metrics: names from METRICS.
    :param reference: an .npz or a load_data source (for mnist_fd, the digits the model was trained on).
    :param image_size: the samples' resolution (a reference source is rendered at it).
    :param inception_weights: '' = resolve_inception_weights's search.
    :param max_reference: use at most this many reference images (0 = all).
    :param extractors: name -> Extractor, replacing the built ones ('inception', 'digits'); for tests.
    :param distributed: every rank of the process group calls the evaluator and extracts a share.
    """

    def __init__(
        self,
        metrics: Sequence[str],
        reference: str,
        image_size: int,
        inception_weights: str = "",
        max_reference: int = 0,
        batch_size: int = 100,
        device: str = "cpu",
        extractors: Optional[Dict[str, Extractor]] = None,
        distributed: bool = False,
    ):
        self.distributed = distributed
        self.metrics, self.reference, self.image_size = list(metrics), reference, image_size
        self.max_reference, self.batch_size = max_reference, batch_size
        self.extractors = dict(extractors or {})
        self._reference_feats: Dict[str, Dict[str, np.ndarray]] = {}
        self._floors: Dict[Tuple, Optional[float]] = {}
        self._real: Optional[Tuple[np.ndarray, Optional[np.ndarray]]] = None  # the digit metrics' reference
        self._weights_id = ""  # which Inception weights made the reference features ('' = injected)
        if any(m in INCEPTION_METRICS for m in self.metrics) and "inception" not in self.extractors:
            weights = resolve_inception_weights(inception_weights)
            self.extractors["inception"] = inception_extractor(weights, device)
            self._weights_id = file_fingerprint(weights)
        self.classifier_accuracy = None
        if any(m in MNIST_METRICS for m in self.metrics) and "digits" not in self.extractors:
            self.extractors["digits"], self.classifier_accuracy = digit_extractor()

    def _reference(self, name: str) -> Dict[str, np.ndarray]:
        if name not in self._reference_feats:

            def images():
                return load_reference(self.reference, self.image_size, self.max_reference)[0]

            if name == "inception":
                # A rewritten reference (a folder whose files changed), or other weights, is a new key.
                stat = os.stat(self.reference) if os.path.exists(self.reference) else None
                changed = f"{stat.st_mtime_ns}|{stat.st_size}" if stat else ""
                key = f"{os.path.abspath(self.reference)}|{changed}|{self.image_size}|{self.max_reference}"
                key += f"|{self._weights_id}"
                path = reference_cache_path(self.reference, name, self.image_size)
                self._reference_feats[name] = cached_extract(
                    self.extractors[name], images, path, key, self.batch_size, self.distributed
                )
            else:  # the digit classifier is cheap to run and may be retrained: never cached
                self._reference_feats[name] = extract(
                    self.extractors[name], self._real_digits()[0], self.batch_size, self.distributed
                )
        return self._reference_feats[name]

    def _real_digits(self) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The reference's images and labels for the digit metrics, loaded once: their features and every
        floor's draws come from them (a digit reference is small; an Inception one is only read to extract
        its features, and not kept)."""
        if self._real is None:
            self._real = load_reference(self.reference, self.image_size, self.max_reference)
        return self._real

    def mnist_fd_floor(self, n: int, labels: Optional[np.ndarray] = None) -> Optional[float]:
        """mnist_fd of n real images of the reference scored as samples (the mean of FLOOR_DRAWS seeded
        draws): what samples as good as the data score at this sample count, for the FD is biased upwards
        by few samples. Drawn at random; or, given the samples' labels [n], with their class counts, the
        floor for class-conditional samples: at a few dozen images which classes were drawn moves the
        distance as much as the images do. None where the reference cannot match the labels (draw_real)."""
        key = (n, None if labels is None else tuple(np.sort(labels).tolist()))  # the draws use only counts
        if key not in self._floors:
            real, real_labels = self._real_digits()
            picks = [draw_real(len(real), n, seed, real_labels, labels) for seed in range(FLOOR_DRAWS)]
            self._floors[key] = None
            if picks[0] is not None:
                reference, scores = self._reference("digits")["features"], []
                for pick in picks:
                    feats = extract(self.extractors["digits"], real[pick], self.batch_size, self.distributed)
                    scores.append(frechet_distance(feats["features"], reference))
                self._floors[key] = float(np.mean(scores))
        return self._floors[key]

    def __call__(self, images: np.ndarray, labels: Optional[np.ndarray] = None) -> Dict[str, float]:
        """Metrics of uint8 samples [N, H, W, 3] (labels [N] for mnist_acc); with mnist_fd, also
        mnist_fd_floor (mnist_fd_floor(): real images drawn at random) and, given labels the reference can
        match, mnist_fd_floor_classes (real images of the labels' classes). Collective under a process
        group."""
        out: Dict[str, float] = {}
        if any(m in INCEPTION_METRICS for m in self.metrics):
            feats = extract(self.extractors["inception"], images, self.batch_size, self.distributed)
            out.update(inception_metrics(self.metrics, feats, self._reference("inception")))
        if any(m in MNIST_METRICS for m in self.metrics):
            feats = extract(self.extractors["digits"], images, self.batch_size, self.distributed)
            if "mnist_acc" in self.metrics:
                if labels is None:
                    raise DataError(
                        "mnist_acc needs the labels the samples were drawn for (arr_1 of a class-conditional "
                        "model's .npz)"
                    )
                out["mnist_acc"] = float((feats["label"].astype(np.int64) == np.asarray(labels)).mean())
            if "mnist_fd" in self.metrics:
                out["mnist_fd"] = frechet_distance(feats["features"], self._reference("digits")["features"])
                out["mnist_fd_floor"] = self.mnist_fd_floor(len(images))
                matched = None if labels is None else self.mnist_fd_floor(len(images), np.asarray(labels))
                if matched is not None:
                    out["mnist_fd_floor_classes"] = matched
        if "colour" in self.metrics:
            out["colour"] = colour(images)
        return out


def colour(images: np.ndarray) -> float:
    """The mean over pixels of (max - min) across R, G and B, / 255, of uint8 images [N, H, W, 3]: 0 for
    grey images (MNIST's digits), up to 1."""
    channels = images.astype(np.int16)
    return float((channels.max(-1) - channels.min(-1)).mean() / 255.0)


def digit_extractor() -> Tuple[Extractor, float]:
    """The cached digit classifier as an extractor ('label', 'features') and its held-out accuracy."""
    from .digit_classifier import load_classifier, predict

    model, accuracy = load_classifier()

    def run(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        labels, feats = predict(model, x.permute(0, 2, 3, 1).numpy())
        return {"label": torch.from_numpy(labels), "features": torch.from_numpy(feats)}

    return run, accuracy
