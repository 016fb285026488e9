"""The exported model: model.safetensors with its config in the metadata, loaded without pickle."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastsemdiff
from fastsemdiff.config import load_config
from fastsemdiff.errors import CheckpointError
from fastsemdiff.export import FORMAT, MODEL_FILE, load_model, read_exported, save_model, save_weights
from fastsemdiff.models import SemanticDiffusion

from conftest import FAST

MODEL_KEYS = [a for a in FAST if a.startswith(("model.", "encoder."))]


def _model(*extra: str, seed: int = 0) -> SemanticDiffusion:
    torch.manual_seed(seed)
    cfg = load_config(None, [*MODEL_KEYS, *extra])
    return SemanticDiffusion(cfg).train()  # train mode on purpose: loading must switch to eval


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (24, 1, 28, 28), dtype=torch.uint8, generator=g)


@pytest.fixture
def exported(tmp_path):
    model = _model("encoder.regularizer=kl", "model.qk_norm=true")  # non-default keys must survive the trip
    path = save_model(model, model.cfg, tmp_path / MODEL_FILE)
    return model, path


def test_round_trip_state_and_embeddings(exported, images):
    model, path = exported
    loaded = load_model(path, device="cpu")
    assert isinstance(loaded, SemanticDiffusion)
    assert not loaded.training and all(not m.training for m in loaded.modules())
    assert loaded.cfg.to_dict() == model.cfg.to_dict()
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    model.eval()
    for t in (0.0, 0.25, torch.rand(len(images))):
        assert torch.equal(loaded.embed(images, t), model.embed(images, t))


def test_load_from_run_dir_file_and_package(exported, images):
    _, path = exported
    a = load_model(path.parent, device="cpu")  # the run directory
    b = load_model(str(path), device="cpu")  # the file, as a string
    c = fastsemdiff.load(path.parent, device="cpu")
    for m in (b, c):
        assert not m.training
        assert torch.equal(m.embed(images, 0.5), a.embed(images, 0.5))
    assert fastsemdiff.load(path).device == fastsemdiff.export.best_device()


def test_files_written(exported):
    model, path = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json", MODEL_FILE]  # no temp files left
    assert json.loads((path.parent / "config.json").read_text()) == model.cfg.to_dict()
    cfg, tensors = read_exported(path)
    assert cfg.to_dict() == model.cfg.to_dict()
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_save_weights_converts_to_float32_cpu(tmp_path):
    model = _model()
    half = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_weights(half, model.cfg, tmp_path / MODEL_FILE)
    tensors = load_file(str(tmp_path / MODEL_FILE))
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors.keys() == half.keys()
    assert all(torch.equal(tensors[k], half[k].float()) for k in half)


def test_missing_file_says_train_first(tmp_path):
    for where in (tmp_path, tmp_path / MODEL_FILE, tmp_path / "nope"):
        with pytest.raises(CheckpointError, match="train first") as e:
            load_model(where)
        assert "python -m fastsemdiff.train" in str(e.value) and MODEL_FILE in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bad header length"])
def test_corrupt_file(damage, exported):
    _, path = exported
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x13\x37" * 5000)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes((2**40).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_safetensors_without_our_metadata(tmp_path):
    model = _model()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    for name in ("plain.safetensors", "other.safetensors"):
        with pytest.raises(CheckpointError, match="not a fastsemdiff model"):
            load_model(tmp_path / name)


@pytest.mark.parametrize(
    "config, fragment",
    [('{"model": {"hidden_sise": 32}}', "unknown config key"),
     ('{"model": {"patch_size": 5}}', "not divisible"),
     ("{not json", "cannot read")],
)
def test_unreadable_config_in_metadata(config, fragment, tmp_path):
    model = _model()
    save_file(dict(model.state_dict()), str(tmp_path / MODEL_FILE), metadata={"format": FORMAT, "config": config})
    with pytest.raises(CheckpointError, match="cannot read") as e:
        load_model(tmp_path)
    assert fragment in str(e.value)


@pytest.mark.parametrize("other", ["model.hidden_size=64", "model.depth=3", "encoder.dim=8", "model.patch_size=4"])
def test_weights_of_another_config(other, tmp_path):
    """Weights of one config with the metadata (config) of another."""
    small, big = _model(), _model(other)
    save_weights(small.state_dict(), big.cfg, tmp_path / MODEL_FILE)
    with pytest.raises(CheckpointError, match="different model config") as e:
        load_model(tmp_path)
    assert any(w in str(e.value) for w in ("shape differs", "missing", "unexpected"))


def test_never_unpickles(exported, images, monkeypatch):
    model, path = exported

    def refuse(*args, **kwargs):
        raise AssertionError("loading an exported model must not unpickle")

    class Refuse:
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_model(path, device="cpu")
    model.eval()
    assert torch.equal(loaded.embed(images, 0.1), model.embed(images, 0.1))


# ------------------------------------------------------------- models exported before pos_layout existed
LEGACY = Path(__file__).resolve().parent / "data" / "legacy-v1"  # written by tests/data/make_legacy_v1.py


def test_export_from_before_pos_layout_embeds_exactly_as_before():
    """A file of commit 29a0d73 (no model.pos_layout, no pos_embed tensors): it loads with its rows-first
    positions and gives the embeddings and denoiser outputs that version computed, to float rounding (the
    recording CPU's kernels, AVX2 or AVX-512, round differently; a wrong layout moves them by ~1e-1)."""
    meta_config = json.loads((LEGACY / "config.json").read_text())
    assert "pos_layout" not in meta_config["model"]
    assert not any(k.endswith("pos_embed") for k in load_file(str(LEGACY / MODEL_FILE)))
    model = load_model(LEGACY, device="cpu")
    assert model.cfg.model.pos_layout == "rows_first"
    expected = load_file(str(LEGACY / "expected.safetensors"))
    with torch.no_grad():
        z = model.embed(expected["images"], expected["t"])
        denoised = model.denoiser(expected["x_t"], expected["t"], z)
    assert expected["z"].abs().max() > 0.1
    torch.testing.assert_close(z, expected["z"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(denoised, expected["denoised"], rtol=1e-5, atol=1e-5)
    # the same weights under today's default layout embed differently: the recorded layout matters
    cfg, tensors = read_exported(LEGACY)
    cfg.model.pos_layout = "dit"
    today = SemanticDiffusion(cfg)
    today.load_state_dict({**today.state_dict(), **tensors})
    with torch.no_grad():
        assert not torch.allclose(today.eval().embed(expected["images"], expected["t"]), expected["z"], atol=1e-3)


def test_new_exports_record_layout_and_positions(tmp_path, images):
    model = _model("model.pos_layout=rows_first")
    path = save_model(model, model.cfg, tmp_path / MODEL_FILE)
    tensors = load_file(str(path))
    assert {"encoder.pos_embed", "denoiser.pos_embed"} <= set(tensors)
    loaded = load_model(path, device="cpu")
    assert loaded.cfg.model.pos_layout == "rows_first"
    assert _model().cfg.model.pos_layout == "dit"
    model.eval()
    assert torch.equal(loaded.embed(images, 0.3), model.embed(images, 0.3))
