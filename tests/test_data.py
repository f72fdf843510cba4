import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from iddpm_ds import builtin_datasets
from iddpm_ds.data_sources import ArraySource
from iddpm_ds.errors import DataError
from iddpm_ds.image_datasets import DataStream, load_data
from iddpm_ds.pixels import center_crop_arr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def index_stream(n, batch_size, rank, world, workers=0, seed=0):
    """A stream whose labels are the dataset indices, so batches say which samples they hold."""
    images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None], 8, 1).repeat(8, 2)
    src = ArraySource("idx", images, np.arange(n), [str(i) for i in range(n)])
    return DataStream(src, 8, batch_size, True, rank, world, seed, True, workers)


def take(stream, steps):
    return [cond["y"].tolist() for _, cond in (next(stream) for _ in range(steps))]


def write_folder(root, n=12, size=(40, 30)):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            os.path.join(root, f"{'cat' if i % 2 else 'dog'}_{i:03d}.png")
        )
    return root


def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers():
    n, B, W = 60, 3, 2
    seen = []
    for rank in range(W):
        stream = index_stream(n, B, rank, W, workers=2)
        seen += sum(take(stream, n // (B * W)), [])
        stream.close()
    assert sorted(seen) == list(range(n))
    # Shuffled, and reproducibly so.
    a, b = take(index_stream(n, B, 0, W), 3), take(index_stream(n, B, 0, W), 3)
    assert a == b and sum(a, []) != sorted(sum(a, []))
    assert take(index_stream(n, B, 0, W, seed=1), 3) != a


def test_epoch_boundary_batches_take_from_next_epoch_without_dropping():
    n, B, W = 10, 4, 1  # 10 is not a multiple of 4
    batches = sum(take(index_stream(n, B, 0, W), 5), [])
    assert sorted(batches[:10]) == list(range(10)) and sorted(batches[10:20]) == list(range(10))


@pytest.mark.parametrize("stop", [7, 10, 13])  # mid-epoch, exactly at the boundary, into the second epoch
def test_exact_resume(stop):
    n, B, W = 60, 3, 2
    straight = [take(index_stream(n, B, r, W, workers=1), 20) for r in range(W)]
    resumed = []
    for r in range(W):
        first = index_stream(n, B, r, W, workers=1)
        head = take(first, stop)
        state = first.state_dict()
        first.close()
        again = index_stream(n, B, r, W, workers=2)
        again.load_state_dict(state)
        resumed.append(head + take(again, 20 - stop))
    assert resumed == straight


def test_resume_on_a_different_world_size_continues_the_global_stream():
    n, B = 60, 3
    two = [index_stream(n, B, r, 2) for r in range(2)]
    consumed = sum((sum(take(s, 4), []) for s in two), [])  # 24 of epoch 0
    one = index_stream(n, B, 0, 1)
    one.load_state_dict(two[0].state_dict())
    rest = sum(take(one, 12), [])  # the other 36
    assert sorted(consumed + rest) == list(range(n))


def test_resume_refuses_different_data():
    state = index_stream(60, 3, 0, 1).state_dict()
    with pytest.raises(DataError, match="same data"):
        index_stream(50, 3, 0, 1).load_state_dict(state)


def test_reference_resize_pixels():
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    # 256 -> 64: BOX halvings while the short side is >= 2x the target (twice), then BICUBIC to 64.
    img = Image.fromarray(big)
    expected = np.array(
        img.resize((128, 128), Image.BOX).resize((64, 64), Image.BOX).resize((64, 64), Image.BICUBIC)
    )
    out = center_crop_arr(img, 64)
    assert np.array_equal(out, expected)
    # The halvings are (close to) 4x4 block means: the pixels are averaged, not subsampled.
    assert np.abs(out.astype(np.float64) - big.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))).max() <= 2
    # Non-square: 300x200 -> BOX to 150x100 -> BICUBIC to 96x64 -> crop 16 px each side.
    img = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    expected = np.array(img.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC))[:, 16:80]
    assert np.array_equal(center_crop_arr(img, 64), expected)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_non_rgb_modes_become_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    img = (
        Image.fromarray((np.arange(400).reshape(20, 20) * 160).astype(np.uint16))
        if mode == "I;16"
        else rgb.convert(mode)
    )
    out = center_crop_arr(img, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert 100 < out.max() <= 255 and out.min() < 10  # rescaled, not clipped to white


def test_small_image_is_upscaled():
    out = center_crop_arr(Image.new("RGB", (5, 7), (10, 20, 30)), 32)
    assert out.shape == (32, 32, 3) and (out == [10, 20, 30]).all()


def test_folder_round_trip_through_shards(tmp_path):
    folder = write_folder(str(tmp_path / "imgs"), n=10)
    out = tmp_path / "shards"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "launch", "make_shards.py"),
        folder,
        str(out),
        "--image_size",
        "16",
        "--shard_size",
        "4",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    index = json.loads((out / "index.json").read_text())
    assert (
        index["count"] == 10
        and index["classes"] == ["cat", "dog"]
        and index["resolution"] == 16
        and len(index["shards"]) == 3
    )
    from_folder = load_data(
        data_dir=folder, batch_size=10, image_size=16, class_cond=True, deterministic=True, num_workers=0
    )
    for pattern in (str(out), str(out / "train-{000000..000002}.tar")):
        from_shards = load_data(
            data_dir=pattern, batch_size=10, image_size=16, class_cond=True, deterministic=True, num_workers=0
        )
        (xa, ca), (xb, cb) = next(from_folder), next(from_shards)
        assert torch.equal(xa, xb) and torch.equal(ca["y"], cb["y"])
        from_folder = load_data(
            data_dir=folder, batch_size=10, image_size=16, class_cond=True, deterministic=True, num_workers=0
        )
    # Resumable: a partial run leaves a .tmp; the rerun completes and keeps finished shards.
    first = (out / "train-000000.tar").stat().st_mtime_ns
    (out / "train-000002.tar").unlink()
    subprocess.run(cmd, check=True, capture_output=True)
    assert (out / "train-000002.tar").exists() and (out / "train-000000.tar").stat().st_mtime_ns == first


def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path, caplog):
    folder = write_folder(str(tmp_path), n=6)
    (tmp_path / "dog_bad.jpg").write_bytes(b"not an image at all")
    good = (tmp_path / "cat_001.png").read_bytes()
    (tmp_path / "cat_trunc.png").write_bytes(good[: len(good) // 2])
    stream = load_data(data_dir=folder, batch_size=8, image_size=16, num_workers=0)
    x, _ = next(stream)
    assert x.shape == (8, 3, 16, 16) and torch.isfinite(x).all()
    assert stream.skipped == 2
    assert sum("dog_bad.jpg" in r.getMessage() for r in caplog.records) == 1


def test_truncated_shard_keeps_the_samples_before_the_damage(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(5):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(buf, format="PNG")
            for name, payload in ((f"{i:04d}.png", buf.getvalue()), (f"{i:04d}.cls", str(i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(shard) as tar:
        cut = tar.getmember("0003.png").offset_data + 10  # inside the 4th image
    shard.write_bytes(shard.read_bytes()[:cut])
    stream = load_data(data_dir=str(shard), batch_size=2, image_size=16, class_cond=True, num_workers=0)
    assert len(stream.source) == 3 and stream.skipped >= 1
    x, cond = next(stream)
    assert x.shape == (2, 3, 16, 16)


def test_configuration_errors_are_one_line(tmp_path):
    cases = [
        dict(data_dir=str(tmp_path / "missing")),
        dict(data_dir=str(tmp_path)),  # empty folder
        dict(data_dir="builtin:nope"),
        dict(data_dir=str(tmp_path / "x-{0..1}.tar")),
    ]
    for kwargs in cases:
        with pytest.raises(DataError) as err:
            load_data(batch_size=2, image_size=8, **kwargs)
        assert "\n" not in str(err.value)
    shard = tmp_path / "nolabels.tar"
    with tarfile.open(shard, "w") as tar:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        info = tarfile.TarInfo("a.png")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(DataError, match="labels"):
        load_data(data_dir=str(shard), batch_size=2, image_size=8, class_cond=True)
    with pytest.raises(DataError, match="num_classes"):
        load_data(data_dir="", batch_size=2, image_size=8, class_cond=True, num_classes=5)


def test_default_dataset_is_mnist_without_network():
    stream = load_data(data_dir="", batch_size=16, image_size=32, class_cond=True, num_workers=0)
    assert len(stream.source) == 5000 and stream.source.classes == [str(d) for d in range(10)]
    x, cond = next(stream)
    assert x.shape == (16, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 1])  # grey digits as RGB
    assert len(set(cond["y"].tolist())) > 1  # shuffled, though the file is sorted by class


@pytest.mark.parametrize(
    "name,attr,package",
    [
        ("builtin:fashion-mnist", "FASHION_DIR", "dataset-fashion-mnist"),
        ("builtin:emoji", "EMOJI_FONT", "fonts-noto-color-emoji"),
    ],
)
def test_optional_builtins_name_their_package_when_missing(monkeypatch, tmp_path, name, attr, package):
    monkeypatch.setattr(builtin_datasets, attr, str(tmp_path / "absent"))
    with pytest.raises(DataError, match=package):
        load_data(data_dir=name, batch_size=2, image_size=8)


def test_fashion_mnist_loads_or_names_its_package():
    # An optional Debian package; setup.sh installs it where it can.
    if not os.path.isdir(builtin_datasets.FASHION_DIR):
        with pytest.raises(DataError, match="dataset-fashion-mnist"):
            load_data(data_dir="builtin:fashion-mnist", batch_size=4, image_size=32)
        return
    stream = load_data(
        data_dir="builtin:fashion-mnist", batch_size=4, image_size=32, class_cond=True, num_workers=0
    )
    assert len(stream.source) == 70000 and len(stream.source.classes) == 10
    assert next(stream)[0].shape == (4, 3, 32, 32)


def test_emoji_loads_or_names_its_package():
    if not os.path.isfile(builtin_datasets.EMOJI_FONT):
        with pytest.raises(DataError, match="fonts-noto-color-emoji"):
            load_data(data_dir="builtin:emoji", batch_size=4, image_size=64)
        return
    stream = load_data(data_dir="builtin:emoji", batch_size=4, image_size=64, num_workers=0)
    assert len(stream.source) > 3000
    x, _ = next(stream)
    assert x.shape == (4, 3, 64, 64) and x.std() > 0.05
