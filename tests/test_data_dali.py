"""The DALI pipeline on CPU: shape, range and labels, two ranks covering an epoch, exact resume from
its checkpoint, corrupt files counted, the PIL fallback's shapes, and training through it (torchrun
with two processes, and a single-process run resumed from a checkpoint ending with the same weights)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastsemdiff.train as train_mod
from fastsemdiff.data import check_images, dali_available
from fastsemdiff.data.dali_stream import DaliStream, decoder_device
from fastsemdiff.data.torch_stream import TorchStream
from fastsemdiff.data.verify import CheckedImages

from conftest import FAST, run_cmd, torchrun_cmd
from test_data_folder import CORRUPT, assert_labels_match_brightness, stream_kwargs, write_image_folder

pytestmark = [
    pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (pip install -e '.[dali]')"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("dali-images"))


@pytest.fixture(scope="module")
def checked(folder) -> CheckedImages:
    return check_images(folder)


def indexed(checked: CheckedImages) -> CheckedImages:
    """The same files, each labelled with its own index, so a batch tells which files it holds."""
    return CheckedImages(checked.files, list(range(len(checked))), checked.class_names, checked.skipped)


def take(stream, steps: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [stream.batch(s) for s in steps]


def test_decoder_choice():
    assert decoder_device(torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("crop", ["center", "random"])
def test_shape_range_labels(checked, crop):
    stream = DaliStream(checked, **stream_kwargs(crop=crop, workers=2))
    for x, y in take(stream, range(6)):  # 4 steps per epoch: crosses into the second
        assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert y.shape == (4,) and y.dtype == torch.int64
        assert -1 <= x.min() and x.max() <= 1 and x.std() > 0.05
        assert_labels_match_brightness(x, y)


def test_grey_output_and_dtype(checked):
    x, y = DaliStream(checked, **stream_kwargs(channels=1, dtype=torch.bfloat16)).batch(0)
    assert x.shape == (4, 1, 8, 8) and x.dtype == torch.bfloat16
    assert_labels_match_brightness(x.float(), y)


def test_two_ranks_cover_each_epoch_without_overlap(checked):
    ids = indexed(checked)  # 16 files: 8 per rank, 2 batches of 4 per epoch
    ranks = [DaliStream(ids, **stream_kwargs(rank=r, world_size=2, seed=5)) for r in range(2)]
    for epoch in range(2):
        seen = [[i for _, y in take(ranks[r], range(2 * epoch, 2 * epoch + 2)) for i in y.tolist()] for r in range(2)]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(16))
    flips = [take(DaliStream(ids, **stream_kwargs(seed=s)), range(1))[0][1].tolist() for s in (1, 2)]
    assert flips[0] != flips[1]  # the seed changes the order


def test_resume_gives_the_same_next_batches(checked):
    stream = DaliStream(checked, **stream_kwargs(crop="random", workers=2))
    take(stream, range(3))
    state = stream.state()
    assert isinstance(state, bytes) and state
    expected = take(stream, range(3, 9))  # through the end of epoch 0 into epoch 2
    resumed = DaliStream(checked, **stream_kwargs(crop="random", workers=2))
    resumed.load_state(state)
    for (x, y), (xe, ye) in zip(take(resumed, range(3, 9)), expected):
        assert torch.equal(x, xe) and torch.equal(y, ye)
    fresh = take(DaliStream(checked, **stream_kwargs(crop="random", workers=2)), range(1))[0]
    assert not torch.equal(fresh[0], expected[0][0])  # the test can tell batches apart


def test_corrupt_files_are_counted(checked):
    stream = DaliStream(checked, **stream_kwargs())
    assert stream.skipped == len(CORRUPT) and len(stream) == 16
    take(stream, range(8))  # two epochs over the readable files, no crash


def test_fallback_yields_the_same_shapes(checked):
    for crop in ("center", "random"):
        kw = stream_kwargs(crop=crop)
        (xd, yd), (xt, yt) = DaliStream(checked, **kw).batch(0), TorchStream(checked, **kw).batch(0)
        assert xd.shape == xt.shape and xd.dtype == xt.dtype and yd.dtype == yt.dtype
        assert_labels_match_brightness(xt, yt)


# ---------------------------------------------------------------- training through DALI

TRAIN = [*FAST, "data.source=folder", "data.loader=dali", "data.image_size=14", "data.channels=3",
         "model.patch_size=7", "train.batch_size=8", "train.log_every=2"]


def test_torchrun_trains_through_dali(folder, tmp_path):
    run = tmp_path / "run"
    res = run_cmd(torchrun_cmd(2, *TRAIN, f"data.path={folder}", f"train.run_dir={run}", "train.steps=4",
                               "train.ckpt_every=2"), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(dali loader)" in res.stdout and "skipping 3 unreadable" in res.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["skipped_images"] == 3 for r in records)
    last = run / "checkpoints" / "step_0000004"
    assert sorted(p.name for p in last.glob("data_rank*")) == ["data_rank0000_of0002.bin", "data_rank0001_of0002.bin"]
    assert (run / "model.safetensors").is_file()


def test_resume_through_dali_ends_with_the_same_weights(folder, tmp_path):
    args = [*TRAIN, f"data.path={folder}", "train.steps=6", "train.ckpt_every=3", "train.keep_last=3",
            "data.crop=random"]
    full = tmp_path / "full"
    train_mod.main([*args, f"train.run_dir={full}"])
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_0000006")
    (part / "model.safetensors").unlink()
    assert (part / "checkpoints" / "step_0000003" / "data_rank0000_of0001.bin").is_file()
    train_mod.main(["--resume", *args, f"train.run_dir={part}"])
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # without the data state the stream restarts: the weights then differ, so the check above can fail
    other = tmp_path / "other"
    shutil.copytree(part, other)
    shutil.rmtree(other / "checkpoints" / "step_0000006")
    (other / "model.safetensors").unlink()
    (other / "checkpoints" / "step_0000003" / "data_rank0000_of0001.bin").unlink()
    train_mod.main(["--resume", *args, f"train.run_dir={other}"])
    c = load_file(other / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)
