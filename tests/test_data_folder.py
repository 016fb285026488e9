"""Image folders for the streaming loaders (start-up check, PIL DataLoader path, loader choice),
.npz/.npy arrays, and the device-resident dataset's epoch-wise draws.

``write_image_folder`` is shared with tests/test_data_dali.py: two classes told apart by brightness
(dark / bright), JPEG and PNG, grey and colour, mixed sizes, plus three corrupt files.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastsemdiff.config import ConfigError, load_config
from fastsemdiff.data import (
    DatasetError,
    DeviceImageDataset,
    build_train_data,
    check_images,
    choose_loader,
    load_split,
)
from fastsemdiff.data import loader as loader_mod
from fastsemdiff.data.torch_stream import TorchStream
from fastsemdiff.data.verify import CheckedImages

CORRUPT = ("junk.jpg", "cut.jpg", "cut.png")
SIZES = [(20, 12), (9, 30), (16, 16), (40, 25), (13, 13)]


def write_image_folder(root: Path, per_class: int = 8, seed: int = 0, corrupt: bool = True) -> Path:
    """Class 0 ``a_dark`` (pixels 0..90) and class 1 ``b_bright`` (165..255): the label shows in every crop's mean."""
    rng = np.random.default_rng(seed)
    for label, (name, lo, hi) in enumerate((("a_dark", 0, 90), ("b_bright", 165, 256))):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = SIZES[(i + label) % len(SIZES)]
            if i % 2:
                Image.fromarray(rng.integers(lo, hi, (h, w, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.jpg",
                                                                                          quality=95)
            else:
                Image.fromarray(rng.integers(lo, hi, (h, w), dtype=np.uint8), "L").save(folder / f"{i}.png")
    if corrupt:
        good_jpg, good_png = (root / "a_dark" / "1.jpg").read_bytes(), (root / "a_dark" / "0.png").read_bytes()
        (root / "a_dark" / CORRUPT[0]).write_bytes(b"this is not an image " * 20)
        (root / "b_bright" / CORRUPT[1]).write_bytes(good_jpg[: len(good_jpg) // 2])
        (root / "b_bright" / CORRUPT[2]).write_bytes(good_png[: len(good_png) // 2])
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


def data_cfg(path, **over) -> SimpleNamespace:
    """The ``data`` config section, as ``build_train_data`` reads it."""
    d = load_config(None, [f"data.path={path}", "data.image_size=8", "data.channels=3", "model.patch_size=4"]).data
    for k, v in over.items():
        setattr(d, k, v)
    return d


def stream_kwargs(**over) -> dict:
    kw = dict(image_size=8, channels=3, batch_size=4, rank=0, world_size=1, seed=0, hflip=True, crop="center",
              crop_scale=(0.35, 1.0), workers=0, device=torch.device("cpu"))
    kw.update(over)
    return kw


def assert_labels_match_brightness(x: torch.Tensor, y: torch.Tensor) -> None:
    """dark images average below 0 in [-1, 1], bright ones above: labels travel with their images."""
    means = x.mean(dim=(1, 2, 3))
    assert torch.equal((means > 0).long(), y), (means, y)


# ---------------------------------------------------------------- start-up check


def test_check_images_skips_and_counts_corrupt_files(folder):
    checked = check_images(folder)
    assert len(checked) == 16 and checked.class_names == ["a_dark", "b_bright"]
    assert sorted(Path(f).name for f, _ in checked.skipped) == sorted(CORRUPT)
    assert all(reason for _, reason in checked.skipped)
    header_only = check_images(folder, verify="header")  # a truncated PNG still opens
    assert 1 <= len(header_only.skipped) < 3


def test_bad_images_error_names_the_file_and_the_switch(folder):
    with pytest.raises(DatasetError, match="data.bad_images=skip") as e:
        check_images(folder, bad_images="error")
    assert any(name in str(e.value) for name in CORRUPT)


def test_start_errors(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        check_images(tmp_path / "empty")
    (tmp_path / "text" / "a").mkdir(parents=True)
    (tmp_path / "text" / "a" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="holds no images"):
        check_images(tmp_path / "text")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"junk" * 50)
    with pytest.raises(DatasetError, match="could be decoded"):
        check_images(tmp_path / "bad")
    with pytest.raises(DatasetError, match="mixes 8 grey images .* 8 colour images") as e:
        check_images(folder, mixed_channels="error")
    assert "data.mixed_channels=convert" in str(e.value)
    with pytest.raises(DatasetError, match="does not exist"):
        check_images(tmp_path / "missing")


def test_file_list(tmp_path, folder):
    lines = [f"{folder}/a_dark/0.png 0", f"{folder}/b_bright/1.jpg 1", "# a comment", "", f"{folder}/a_dark/2.png 0"]
    (tmp_path / "list.txt").write_text("\n".join(lines))
    checked = check_images(tmp_path / "list.txt")
    assert [Path(f).name for f in checked.files] == ["0.png", "1.jpg", "2.png"] and checked.labels == [0, 1, 0]
    (tmp_path / "gone.txt").write_text("nowhere.jpg 3\n")
    with pytest.raises(DatasetError, match="do not exist"):
        check_images(tmp_path / "gone.txt")


# ---------------------------------------------------------------- PIL DataLoader path


@pytest.mark.parametrize("crop", ["center", "random"])
def test_torch_stream_shape_range_labels(folder, crop):
    stream = TorchStream(check_images(folder), **stream_kwargs(crop=crop))
    assert stream.skipped == 3 and len(stream) == 16
    for step in range(5):  # crosses the epoch boundary (4 steps per epoch)
        x, y = stream.batch(step)
        assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert -1 <= x.min() and x.max() <= 1 and x.std() > 0.05
        assert_labels_match_brightness(x, y)


def test_torch_stream_workers_resume_and_ranks(folder):
    checked = CheckedImages(*_indexed(check_images(folder)))
    whole = TorchStream(checked, **stream_kwargs(workers=2))
    batches = [whole.batch(s) for s in range(6)]
    later = TorchStream(checked, **stream_kwargs(workers=0))  # a resumed run: starts at step 3, no saved state
    for s in range(3, 6):
        x, y = later.batch(s)
        assert torch.equal(x, batches[s][0]) and torch.equal(y, batches[s][1])
    seen = [TorchStream(checked, **stream_kwargs(batch_size=2, rank=r, world_size=2)) for r in range(2)]
    ids = [[i for s in range(4) for i in seen[r].batch(s)[1].tolist()] for r in range(2)]
    assert not set(ids[0]) & set(ids[1]) and sorted(ids[0] + ids[1]) == list(range(16))


def _indexed(checked: CheckedImages):
    """The same files, each labelled with its own index, so a batch tells which files it holds."""
    return checked.files, list(range(len(checked))), checked.class_names, checked.skipped


# ---------------------------------------------------------------- choice and fallback


def test_loader_choice(monkeypatch):
    assert choose_loader("fashion-mnist", "auto") == choose_loader("npz", "auto") == "device"
    with pytest.raises(DatasetError, match="data.source=npz is held on the device"):
        choose_loader("npz", "dali")
    assert choose_loader("folder", "torch") == "torch"
    monkeypatch.setattr(loader_mod, "dali_available", lambda: False)
    assert choose_loader("folder", "auto") == "torch"
    with pytest.raises(DatasetError, match=r"\[dali\]"):
        choose_loader("folder", "dali")


def test_auto_without_dali_falls_back_and_says_so_once(folder, monkeypatch):
    monkeypatch.setattr(loader_mod, "dali_available", lambda: False)
    notes = []
    stream = build_train_data(data_cfg(folder, source="folder", workers=0), batch_size=4, rank=0, world_size=1, seed=0,
                              device=torch.device("cpu"), say=notes.append)
    assert stream.name == "torch" and stream.batch(0)[0].shape == (4, 3, 8, 8)
    assert sum("DALI is not installed" in n for n in notes) == 1
    assert sum("skipping 3 unreadable" in n for n in notes) == 1


def test_config_keys():
    cfg = load_config(None, ["data.source=npz", "data.loader=torch", "data.crop=random", "data.crop_scale=[0.5,1]"])
    assert cfg.data.loader == "torch" and cfg.data.crop_scale == [0.5, 1.0]
    for bad in ("data.loader=nvjpeg", "data.crop_scale=[0,1]", "data.bad_images=ignore", "data.source=cifar"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


# ---------------------------------------------------------------- .npz / .npy arrays


def test_npz_channel_last_and_splits(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)  # CIFAR layout: [N, H, W, C]
    x_test = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", x_train=x_train, y_train=np.arange(10) % 3, x_test=x_test, y_test=np.arange(4))
    images, labels = load_split("npz", str(tmp_path / "c.npz"), "train", 8, 3)
    assert images.shape == (10, 3, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images, torch.from_numpy(x_train).permute(0, 3, 1, 2)) and labels.tolist() == [0, 1, 2, 0,
                                                                                                        1, 2, 0, 1,
                                                                                                        2, 0]
    assert load_split("npz", str(tmp_path / "c.npz"), "test", 8, 3)[0].shape == (4, 3, 8, 8)
    with pytest.raises(DatasetError, match="data.channels=3"):
        load_split("npz", str(tmp_path / "c.npz"), "train", 8, 1)
    with pytest.raises(DatasetError, match="data.image_size=8"):
        load_split("npz", str(tmp_path / "c.npz"), "train", 28, 3)


def test_npy_and_npz_errors(tmp_path):
    grey = np.random.default_rng(1).integers(0, 256, (6, 5, 5), dtype=np.uint8)
    np.save(tmp_path / "g.npy", grey)
    images, labels = load_split("npz", str(tmp_path / "g.npy"), "train", 5, 1)
    assert torch.equal(images[:, 0], torch.from_numpy(grey)) and labels.tolist() == [0] * 6
    with pytest.raises(DatasetError, match="no test split"):
        load_split("npz", str(tmp_path / "g.npy"), "test", 5, 1)
    np.save(tmp_path / "f.npy", grey.astype(np.float32) / 255)
    with pytest.raises(DatasetError, match="uint8"):
        load_split("npz", str(tmp_path / "f.npy"), "train", 5, 1)
    np.savez(tmp_path / "k.npz", pixels=grey)
    with pytest.raises(DatasetError, match="found \\['pixels'\\]"):
        load_split("npz", str(tmp_path / "k.npz"), "train", 5, 1)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="cannot read"):
        load_split("npz", str(tmp_path / "junk.npz"), "train", 5, 1)
    with pytest.raises(DatasetError, match="does not exist"):
        load_split("npz", str(tmp_path / "missing.npz"), "train", 5, 1)


def test_npz_trains_from_the_device(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=x, labels=np.arange(40) % 4)
    stream = build_train_data(data_cfg(tmp_path / "a.npz", source="npz"), batch_size=8, rank=0, world_size=1,
                              seed=0, device=torch.device("cpu"))
    assert stream.name == "device" and len(stream) == 40 and stream.state() is None
    x0, y0 = stream.batch(0)
    assert x0.shape == (8, 3, 8, 8) and -1 <= x0.min() < -0.9 and 0.9 < x0.max() <= 1
    assert torch.equal(stream.batch(0)[0], x0) and not torch.equal(stream.batch(1)[0], x0)


# ---------------------------------------------------------------- device-resident draws


def test_device_dataset_draws_once_per_epoch(monkeypatch):
    images = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = DeviceImageDataset(images, torch.arange(40))
    first = ds.batch(0, 5, seed=1)  # draws the epoch's indices and flips (8 steps per epoch)
    expected = [ds.batch(s, 5, seed=1) for s in range(1, 8)]
    fresh = DeviceImageDataset(images, torch.arange(40))
    fresh.batch(0, 5, seed=1)

    def no_host_draws(*args, **kwargs):
        raise AssertionError("a step drew random numbers on the host")

    monkeypatch.setattr(torch, "randperm", no_host_draws)
    monkeypatch.setattr(torch, "randint", no_host_draws)
    for s in range(1, 8):
        x, y = fresh.batch(s, 5, seed=1)
        assert torch.equal(x, expected[s - 1][0]) and torch.equal(y, expected[s - 1][1])
    with pytest.raises(AssertionError, match="on the host"):
        fresh.batch(8, 5, seed=1)  # a new epoch draws again
    assert first[0].shape == (5, 1, 4, 4)
