"""The data package: Fashion-MNIST and its failure messages, image folders, device batching."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastsemdiff.data import (
    DEFAULT_PATH,
    DatasetError,
    DeviceImageDataset,
    load_fashion_mnist,
    load_image_folder,
    load_split,
    to_model_range,
)

NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
has_fmnist = pytest.mark.skipif(
    not Path(DEFAULT_PATH).is_dir(), reason=f"Fashion-MNIST not installed at {DEFAULT_PATH} (dataset-fashion-mnist)"
)


# ---------------------------------------------------------------- Fashion-MNIST


def _idx_images(n: int, h: int = 28, w: int = 28, magic: int = 2051) -> bytes:
    pixels = (np.arange(n * h * w) % 256).astype(np.uint8)
    return struct.pack(">iiii", magic, n, h, w) + pixels.tobytes()


def _idx_labels(n: int, magic: int = 2049) -> bytes:
    return struct.pack(">ii", magic, n) + (np.arange(n) % 10).astype(np.uint8).tobytes()


def _fake_fmnist(folder: Path, n: int = 6, images: bytes | None = None, labels: bytes | None = None) -> Path:
    """Four gzipped idx files; ``images``/``labels`` replace the train pair's raw (pre-gzip) content."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (image_name, label_name) in NAMES.items():
        image_bytes = images if split == "train" and images is not None else _idx_images(n)
        label_bytes = labels if split == "train" and labels is not None else _idx_labels(n)
        (folder / f"{image_name}.gz").write_bytes(gzip.compress(image_bytes))
        (folder / f"{label_name}.gz").write_bytes(gzip.compress(label_bytes))
    return folder


@has_fmnist
@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(split, count):
    images, labels = load_fashion_mnist(DEFAULT_PATH, split)
    assert images.shape == (count, 1, 28, 28) and images.dtype == torch.uint8 and images.is_contiguous()
    assert labels.shape == (count,) and labels.dtype == torch.int64
    assert labels.min() == 0 and labels.max() == 9
    assert torch.bincount(labels).tolist() == [count // 10] * 10  # Fashion-MNIST is balanced
    assert images.float().std() > 50  # real content, not zeros


def test_fake_files_load(tmp_path):
    images, labels = load_fashion_mnist(str(_fake_fmnist(tmp_path / "f", n=6)), "train")
    assert images.shape == (6, 1, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4, 5]
    expected = (np.arange(6 * 28 * 28) % 256).astype(np.uint8).reshape(6, 1, 28, 28)
    assert torch.equal(images, torch.from_numpy(expected))


def test_uncompressed_files_load(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    for image_name, label_name in NAMES.values():
        (folder / image_name).write_bytes(_idx_images(3))
        (folder / label_name).write_bytes(_idx_labels(3))
    images, labels = load_fashion_mnist(str(folder), "test")
    assert images.shape == (3, 1, 28, 28) and labels.shape == (3,)


def test_missing_folder_says_how_to_install(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_fashion_mnist(str(tmp_path / "nowhere"), "train")
    assert "dataset-fashion-mnist" in str(e.value) and "data.path" in str(e.value)


def test_missing_file_is_named(tmp_path):
    folder = _fake_fmnist(tmp_path / "f")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    load_fashion_mnist(str(folder), "train")  # the other split is still fine
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte") as e:
        load_fashion_mnist(str(folder), "test")
    assert "train-images-idx3-ubyte.gz" in str(e.value)  # lists the expected names


def test_unknown_split(tmp_path):
    with pytest.raises(DatasetError, match="train"):
        load_fashion_mnist(str(_fake_fmnist(tmp_path / "f")), "validation")


@pytest.mark.parametrize(
    "which,fragment",
    [("images", "not an idx image file"), ("labels", "not an idx label file")],
)
def test_wrong_magic(tmp_path, which, fragment):
    swapped = {"images": _idx_labels(6), "labels": _idx_images(6)}  # the pair mixed up
    folder = _fake_fmnist(tmp_path / "f", **{which: swapped[which]})
    with pytest.raises(DatasetError, match=fragment):
        load_fashion_mnist(str(folder), "train")


def test_truncated_file_reports_byte_counts(tmp_path):
    folder = _fake_fmnist(tmp_path / "f", n=6, images=_idx_images(6)[:-100])
    with pytest.raises(DatasetError, match="truncated or corrupt") as e:
        load_fashion_mnist(str(folder), "train")
    assert str(6 * 28 * 28) in str(e.value) and str(6 * 28 * 28 - 100) in str(e.value)


def test_corrupt_gzip(tmp_path):
    folder = _fake_fmnist(tmp_path / "f")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DatasetError, match="gzip data is corrupt"):
        load_fashion_mnist(str(folder), "train")
    cut = gzip.compress(_idx_images(6))[:40]  # a download cut short
    (folder / "train-images-idx3-ubyte.gz").write_bytes(cut)
    with pytest.raises(DatasetError, match="gzip data is corrupt"):
        load_fashion_mnist(str(folder), "train")


def test_count_mismatch(tmp_path):
    folder = _fake_fmnist(tmp_path / "f", images=_idx_images(6), labels=_idx_labels(5))
    with pytest.raises(DatasetError, match="6 images but 5 labels"):
        load_fashion_mnist(str(folder), "train")


def test_wrong_image_size(tmp_path):
    folder = _fake_fmnist(tmp_path / "f", images=_idx_images(6, 32, 32))
    with pytest.raises(DatasetError, match="32x32"):
        load_fashion_mnist(str(folder), "train")


# ---------------------------------------------------------------- load_split


def test_load_split_checks_fashion_mnist_shape(tmp_path):
    folder = str(_fake_fmnist(tmp_path / "f"))
    images, labels = load_split("fashion-mnist", folder, "test", 28, 1)
    assert images.shape == (6, 1, 28, 28)
    with pytest.raises(DatasetError, match="data.image_size=28 data.channels=1"):
        load_split("fashion-mnist", folder, "train", 32, 1)
    with pytest.raises(DatasetError, match="data.image_size=28 data.channels=1"):
        load_split("fashion-mnist", folder, "train", 28, 3)


def test_load_split_unknown_source(tmp_path):
    with pytest.raises(DatasetError, match="fashion-mnist") as e:
        load_split("cifar", str(tmp_path), "train", 28, 1)
    assert "folder" in str(e.value)


def test_load_split_folder_splits(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("a", "b"):
            _write_images(tmp_path / "root" / split / cls, n)
    images, labels = load_split("folder", str(tmp_path / "root"), "train", 8, 1)
    assert images.shape == (6, 1, 8, 8) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    images, labels = load_split("folder", str(tmp_path / "root"), "test", 8, 1)
    assert images.shape == (4, 1, 8, 8) and labels.tolist() == [0, 0, 1, 1]

    _write_images(tmp_path / "root" / "test" / "c", 1)
    with pytest.raises(DatasetError, match="same class subfolders"):
        load_split("folder", str(tmp_path / "root"), "test", 8, 1)


def test_load_split_folder_without_test(tmp_path):
    _write_images(tmp_path / "flat", 3)
    images, labels = load_split("folder", str(tmp_path / "flat"), "train", 8, 3)
    assert images.shape == (3, 3, 8, 8)
    with pytest.raises(DatasetError, match="no test split"):
        load_split("folder", str(tmp_path / "flat"), "test", 8, 3)


# ---------------------------------------------------------------- image folders


def _write_images(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` random-content images of mixed sizes, modes and formats (PNG and JPEG)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [(20, 12), (9, 30), (16, 16), (40, 25)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        if i % 2:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
            img.save(folder / f"img{i}.JPG")  # upper-case extension on purpose
        else:
            img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
            img.save(folder / f"img{i}.png")


def test_image_folder_classes_and_corrupt_file(tmp_path):
    _write_images(tmp_path / "cats", 3, seed=1)
    _write_images(tmp_path / "dogs", 4, seed=2)
    (tmp_path / "dogs" / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path, image_size=12, channels=1)
    assert data.images.shape == (7, 1, 12, 12) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [0] * 3 + [1] * 4
    assert data.class_names == ["cats", "dogs"]
    assert len(data.skipped) == 1 and data.skipped[0].endswith("broken.jpg")
    assert data.images.float().std() > 20  # random content survived the resize


def test_image_folder_rgb_and_flat(tmp_path):
    _write_images(tmp_path, 4)
    data = load_image_folder(str(tmp_path), image_size=10, channels=3)
    assert data.images.shape == (4, 3, 10, 10) and data.class_names == ["all"]
    assert data.labels.tolist() == [0, 0, 0, 0] and data.skipped == []


def test_image_folder_resize_then_centre_crop(tmp_path):
    # Black sides around a white middle: short side 10 -> 5 makes it 5x30, and the crop keeps the middle.
    pixels = np.zeros((10, 60), dtype=np.uint8)
    pixels[:, 20:40] = 255
    Image.fromarray(pixels, "L").save(tmp_path / "wide.png")
    data = load_image_folder(tmp_path, image_size=5, channels=1)
    assert data.images.shape == (1, 1, 5, 5)
    assert data.images.min() >= 250


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 8, 1)
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no images"):
        load_image_folder(tmp_path / "empty", 8, 1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="could be decoded"):
        load_image_folder(tmp_path / "bad", 8, 1)
    with pytest.raises(DatasetError, match="use 1 .grey. or 3"):
        load_image_folder(tmp_path / "bad", 8, 4)


# ---------------------------------------------------------------- DeviceImageDataset


def _indexed_dataset(n: int = 40) -> DeviceImageDataset:
    """Image i is filled with the value i, so a batch reveals which indices it drew."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return DeviceImageDataset(images, torch.arange(n), device="cpu")


def _indices(x: torch.Tensor) -> list[int]:
    return ((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


def test_to_model_range():
    x = to_model_range(torch.tensor([0, 127, 255], dtype=torch.uint8))
    assert x.dtype == torch.float32 and x[0] == -1.0 and x[2] == 1.0
    with pytest.raises(TypeError):
        to_model_range(torch.zeros(3))


def test_batch_range_dtype_and_determinism():
    gen = torch.Generator().manual_seed(0)
    ds = DeviceImageDataset(torch.randint(0, 256, (50, 3, 6, 6), dtype=torch.uint8, generator=gen), torch.arange(50) % 5)
    assert len(ds) == 50 and ds.num_channels == 3 and ds.image_size == 6
    assert ds.all_images().dtype == torch.uint8
    x, y = ds.batch(step=3, batch_size=8, seed=7)
    assert x.shape == (8, 3, 6, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    x2, y2 = DeviceImageDataset(ds.all_images(), ds.labels).batch(step=3, batch_size=8, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # a fresh dataset: no hidden state
    x3, _ = ds.batch(step=3, batch_size=8, seed=8)
    assert not torch.equal(x, x3)


def test_labels_follow_images():
    ds = _indexed_dataset()
    x, y = ds.batch(step=5, batch_size=6, hflip=False)
    assert _indices(x) == y.tolist()


def test_ranks_partition_each_epoch():
    ds = _indexed_dataset(40)
    batch_size, world = 6, 2  # G = 12, 3 steps per epoch, 4 images left over
    spe = ds.steps_per_epoch(batch_size, world)
    assert spe == 3
    for epoch in range(2):
        seen = {r: [] for r in range(world)}
        for step in range(epoch * spe, (epoch + 1) * spe):
            for r in range(world):
                seen[r] += _indices(ds.batch(step, batch_size, rank=r, world_size=world, hflip=False)[0])
        assert not set(seen[0]) & set(seen[1])
        union = seen[0] + seen[1]
        assert len(set(union)) == len(union) == batch_size * world * spe


def test_world_size_one_equals_concatenated_ranks():
    ds = _indexed_dataset(40)
    whole = _indices(ds.batch(1, 10, hflip=False)[0])
    parts = [_indices(ds.batch(1, 5, rank=r, world_size=2, hflip=False)[0]) for r in range(2)]
    assert whole == parts[0] + parts[1]


def test_steps_and_epochs_differ():
    ds = _indexed_dataset(40)
    a, b = (_indices(ds.batch(s, 10, hflip=False)[0]) for s in (0, 1))
    assert a != b
    epoch0 = [i for s in range(4) for i in _indices(ds.batch(s, 10, hflip=False)[0])]
    epoch1 = [i for s in range(4, 8) for i in _indices(ds.batch(s, 10, hflip=False)[0])]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))
    assert epoch0 != epoch1  # reshuffled
    assert _indices(ds.batch(0, 10, hflip=False)[0]) == a  # going back to epoch 0 gives it back


def test_hflip_flips_some_not_all():
    n = 64
    ramp = torch.arange(4, dtype=torch.uint8) * 50  # left dark, right bright
    ds = DeviceImageDataset(ramp.expand(n, 1, 4, 4).contiguous(), torch.zeros(n, dtype=torch.long))
    x, _ = ds.batch(step=0, batch_size=32, hflip=True)
    flipped = x[:, 0, 0, 0] > x[:, 0, 0, -1]
    assert 0 < int(flipped.sum()) < 32
    ref = to_model_range(ramp.expand(1, 4, 4))
    assert all(torch.equal(x[i], ref.flip(-1) if f else ref) for i, f in enumerate(flipped.tolist()))
    assert torch.equal(x, ds.batch(step=0, batch_size=32, hflip=True)[0])
    other_rank = ds.batch(step=0, batch_size=32, rank=1, world_size=2, hflip=True)[0]
    assert not torch.equal(flipped, other_rank[:, 0, 0, 0] > other_rank[:, 0, 0, -1])


def test_batch_errors():
    ds = _indexed_dataset(10)
    with pytest.raises(DatasetError, match="larger than the dataset"):
        ds.batch(0, 6, world_size=2)
    with pytest.raises(DatasetError, match="rank=2"):
        ds.batch(0, 2, rank=2, world_size=2)
    with pytest.raises(DatasetError, match="uint8"):
        DeviceImageDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(DatasetError, match="one label per image"):
        DeviceImageDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu():
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (30, 1, 5, 5), dtype=torch.uint8, generator=gen)
    cpu, gpu = DeviceImageDataset(images, torch.arange(30)), DeviceImageDataset(images, torch.arange(30), "cuda")
    for step in (0, 4, 9):
        x_cpu, y_cpu = cpu.batch(step, 4, rank=1, world_size=2, seed=3)
        x_gpu, y_gpu = gpu.batch(step, 4, rank=1, world_size=2, seed=3)
        assert x_gpu.is_cuda and torch.equal(x_gpu.cpu(), x_cpu) and torch.equal(y_gpu.cpu(), y_cpu)
