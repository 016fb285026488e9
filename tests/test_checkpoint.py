"""Training checkpoints: corrupt or foreign checkpoints fail with one clear CheckpointError, the metadata
unpickler and the load planner never run pickled code, keep_last pruning, interrupted saves ignored."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import fastsemdiff.train as train_mod
from fastsemdiff import checkpoint as ckpt
from fastsemdiff.config import load_config
from fastsemdiff.errors import CheckpointError
from fastsemdiff.models import SemanticDiffusion

from conftest import FAST, run_cli, train_args

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

MODEL_KEYS = [a for a in FAST if a.startswith(("model.", "encoder."))]


class Payload:
    """Pickles to a call of os.system that creates ``marker``: proof of whether unpickling ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state(cfg):
    torch.manual_seed(0)
    model = SemanticDiffusion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, optimizer, ema


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the shared trained run (checkpoints step_0000005 and step_0000010)."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, dst)
    return dst


def _resume_args(trained_run, run: Path, *extra: str) -> list[str]:
    return ["--resume", *train_args(run, trained_run.data, "train.steps=15", "train.ckpt_every=5", *extra)]


def _main_error(capfd, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        train_mod.main(argv)
    assert e.value.code == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fastsemdiff.train: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------ corrupt checkpoints


def test_truncated_distcp_cli(trained_run, run_copy):
    """Through the real CLI: exit code 2, one line naming the checkpoint, no traceback."""
    latest = run_copy / "checkpoints" / "step_0000010"
    shard = latest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    r = run_cli(*_resume_args(trained_run, run_copy))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert f"fastsemdiff.train: error: checkpoint {latest} is corrupt" in r.stderr
    assert "delete that folder to resume from the previous checkpoint" in r.stderr
    assert not (run_copy / "model.safetensors.tmp").exists()
    assert ckpt.latest_checkpoint(run_copy) == latest  # nothing new written


@pytest.mark.parametrize(
    "damage",
    ["garbage shard", "empty shard", "garbage metadata", "truncated metadata", "missing metadata", "bad meta.json"],
)
def test_corrupt_checkpoint_on_resume(damage, trained_run, run_copy, capfd):
    latest = run_copy / "checkpoints" / "step_0000010"
    shard, metadata = latest / "__0_0.distcp", latest / ".metadata"
    if damage == "garbage shard":
        shard.write_bytes(os.urandom(shard.stat().st_size))
    elif damage == "empty shard":
        shard.write_bytes(b"")
    elif damage == "garbage metadata":
        metadata.write_bytes(b"this is not a pickle at all")
    elif damage == "truncated metadata":
        metadata.write_bytes(metadata.read_bytes()[:200])
    elif damage == "missing metadata":
        metadata.unlink()
    else:
        (latest / ckpt.META_FILE).write_text('{"step": "ten"')
    msg = _main_error(capfd, _resume_args(trained_run, run_copy))
    assert str(latest) in msg and "corrupt" in msg, msg
    if "metadata" in damage:
        assert ".metadata" in msg


def test_corrupt_checkpoint_load_checkpoint_raises(run_copy, trained_run):
    latest = run_copy / "checkpoints" / "step_0000010"
    (latest / "__0_0.distcp").write_bytes(b"\0" * 64)
    cfg = load_config(None, trained_run.args)
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(latest, *_state(cfg), cfg)
    # the previous checkpoint still loads
    assert ckpt.load_checkpoint(run_copy / "checkpoints" / "step_0000005", *_state(cfg), cfg) == 5


@pytest.mark.parametrize("meta", ["[]", '{"step": 5}', '{"config": {}}', "\xff\xfe"])
def test_read_meta_rejects_malformed(meta, tmp_path):
    (tmp_path / ckpt.META_FILE).write_text(meta, encoding="latin-1")
    with pytest.raises(CheckpointError, match="meta.json"):
        ckpt.read_meta(tmp_path)


# --------------------------------------------------------------------------- a different model config


@pytest.mark.parametrize(
    "override, key",
    [("model.hidden_size=64", "model.hidden_size"), ("model.depth=3", "model.depth"),
     ("encoder.dim=8", "encoder.dim"), ("model.patch_size=4", "model.patch_size")],
)
def test_resume_with_different_model_config(override, key, trained_run, run_copy, capfd):
    msg = _main_error(capfd, _resume_args(trained_run, run_copy, override))
    assert "different model config" in msg and key in msg, msg
    assert "config.yaml" in msg  # says how to resume properly
    assert ckpt.latest_checkpoint(run_copy).name == "step_0000010"


def test_resume_with_other_training_settings_is_fine(trained_run, run_copy):
    """Non-architecture keys (lr, steps) may change on resume; the run continues 10 -> 15."""
    train_mod.main(_resume_args(trained_run, run_copy, "train.lr=0.0005"))
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["step_0000010", "step_0000015"]
    steps = [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15]


# -------------------------------------------------------------------------------- no code execution


def test_metadata_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Payload(marker))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        ckpt._MetadataUnpickler(io.BytesIO(evil)).load()
    assert not marker.exists()
    pickle.loads(evil)  # the same bytes with a plain unpickler do run the payload: the test is real
    assert marker.exists()


def _proto4_global(module: str, name: str, arg: str) -> bytes:
    """``module`` / ``name`` looked up with STACK_GLOBAL, called with ``arg``."""
    def s(text: str) -> bytes:
        return pickle.SHORT_BINUNICODE + struct.pack("<B", len(text)) + text.encode()
    return b"\x80\x04" + s(module) + s(name) + pickle.STACK_GLOBAL + s(arg) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP


@pytest.mark.parametrize(
    "module, name",
    [
        ("torch.distributed.checkpoint.filesystem", "os.system"),  # a dotted name through an allowed module
        ("torch.distributed.checkpoint.filesystem", "os"),
        ("torch.distributed.checkpoint.state_dict_saver", "save"),  # a function, not a data class
        ("builtins", "eval"),
        ("torch", "load"),
        ("posix", "system"),
    ],
)
def test_metadata_unpickler_refuses_smuggled_globals(module, name, tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        ckpt._MetadataUnpickler(io.BytesIO(_proto4_global(module, name, f"touch {marker}"))).load()
    assert not marker.exists()


def test_malicious_metadata_file_on_resume(trained_run, run_copy, capfd, tmp_path):
    marker = tmp_path / "pwned"
    latest = run_copy / "checkpoints" / "step_0000010"
    (latest / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(pickle.UnpicklingError):
        ckpt.SafeReader(str(latest)).read_metadata()
    msg = _main_error(capfd, _resume_args(trained_run, run_copy))
    assert "corrupt" in msg and ".metadata" in msg and "not allowed" in msg
    assert not marker.exists()


def test_real_metadata_still_loads(trained_run):
    metadata = ckpt.SafeReader(str(ckpt.latest_checkpoint(trained_run.run_dir))).read_metadata()
    assert any(k.startswith("ema.") for k in metadata.state_dict_metadata)
    assert any(k.startswith("model.") for k in metadata.state_dict_metadata)


def test_safe_planner_refuses_pickled_objects(tmp_path):
    """A non-tensor item (DCP stores it as torch.save bytes) is loaded with weights_only=True."""
    marker = tmp_path / "pwned"
    path = tmp_path / "ck"
    dcp.save({"w": torch.arange(3.0), "plain": 7, "evil": Payload(marker)},
             checkpoint_id=str(path))
    assert not marker.exists()

    ok = {"w": torch.zeros(3), "plain": None}
    dcp.load(ok, storage_reader=ckpt.SafeReader(str(path)), planner=ckpt.SafePlanner())
    assert torch.equal(ok["w"], torch.arange(3.0)) and ok["plain"] == 7

    with pytest.raises(BaseException) as e:  # DCP wraps it in its CheckpointException (a BaseException)
        dcp.load({"evil": None}, storage_reader=ckpt.SafeReader(str(path)), planner=ckpt.SafePlanner())
    assert "Weights only load failed" in str(e.value) or "UnpicklingError" in str(e.value)
    assert not marker.exists()

    # DCP's stock planner unpickles with weights_only=False and would run the payload
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    dcp.load({"evil": None}, storage_reader=ckpt.SafeReader(str(path)), planner=DefaultLoadPlanner())
    assert marker.exists()


# ------------------------------------------------------------------------ pruning and partial saves


@pytest.fixture(scope="module")
def small():
    cfg = load_config(None, MODEL_KEYS)
    return cfg, *_state(cfg)


def test_keep_last_prunes_old_checkpoints(tmp_path, small):
    cfg, model, optimizer, ema = small
    for step in (2, 4, 6, 8):
        final = ckpt.save_checkpoint(tmp_path, step, model, optimizer, ema, cfg, keep_last=2)
        assert final == tmp_path / "checkpoints" / f"step_{step:07d}"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000006", "step_0000008"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000006", "step_0000008"]
    assert ckpt.read_meta(ckpt.latest_checkpoint(tmp_path)) == {"step": 8, "config": cfg.to_dict()}


def test_keep_last_zero_keeps_all(tmp_path, small):
    cfg, model, optimizer, ema = small
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, ema, cfg, keep_last=0)
    assert len(ckpt.list_checkpoints(tmp_path)) == 3


def test_checkpoints_sorted_by_number_not_name(tmp_path, small):
    cfg, model, optimizer, ema = small
    for step in (10_000_000, 9):  # an 8-digit step sorts before a 7-digit one by name
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, ema, cfg, keep_last=0)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_10000000"


def test_interrupted_save_is_ignored(tmp_path, small):
    cfg, model, optimizer, ema = small
    ckpt.save_checkpoint(tmp_path, 4, model, optimizer, ema, cfg, keep_last=2)
    root = tmp_path / "checkpoints"
    (root / ".tmp_step_0000008").mkdir()  # killed mid-save: DCP files but no meta.json, not renamed
    shutil.copy(root / "step_0000004" / "__0_0.distcp", root / ".tmp_step_0000008")
    (root / "step_0000012").mkdir()  # a folder without meta.json is not a checkpoint either
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_0000004"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000004"]

    # saving that step again replaces the stale temporary folder
    (root / ".tmp_step_0000008" / "stale").write_text("x")
    ckpt.save_checkpoint(tmp_path, 8, model, optimizer, ema, cfg, keep_last=5)
    assert not (root / ".tmp_step_0000008").exists()
    assert not (root / "step_0000008" / "stale").exists()
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_0000008"


def test_no_checkpoints(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "nothing") is None
    assert ckpt.list_checkpoints(tmp_path) == []


def test_save_load_round_trip(tmp_path, small):
    cfg, model, optimizer, ema = small
    model(torch.zeros(4, 1, 28, 28))[0].backward()
    optimizer.step()
    optimizer.zero_grad()
    ema = {k: v + 1 for k, v in ema.items()}
    path = ckpt.save_checkpoint(tmp_path, 3, model, optimizer, ema, cfg, keep_last=1)

    model2, optimizer2, ema2 = _state(cfg)
    assert ckpt.load_checkpoint(path, model2, optimizer2, ema2, cfg) == 3
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    for k in ema:
        assert torch.equal(ema[k], ema2[k]), k
    s1, s2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(s1[i][name]), torch.as_tensor(s2[i][name])), (i, name)
