"""embed() with no t returns the readout the probe found best, recorded beside the model (readout.json)."""
from __future__ import annotations

import pytest
import torch

import fastsemdiff
from fastsemdiff.config import load_config
from fastsemdiff.errors import CheckpointError
from fastsemdiff.eval import best_readout
from fastsemdiff.export import save_model, write_readout
from fastsemdiff.models import SemanticDiffusion

from helpers import gen

FAST = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "encoder.dim=8"]


@pytest.fixture()
def run(tmp_path):
    torch.manual_seed(0)
    model = SemanticDiffusion(load_config(None, FAST))
    with torch.no_grad():  # t-dependent z: wake the encoder's zero-initialised adaLN weights
        for name, p in model.encoder.named_parameters():
            if "adaLN" in name:
                p.normal_(0, 0.2, generator=gen(len(name)))
    save_model(model, model.cfg, tmp_path / "model.safetensors")
    return tmp_path


def test_embed_without_t_follows_the_recorded_readout(run):
    images = (torch.rand(5, 1, 28, 28, generator=gen(1)) * 255).to(torch.uint8)
    model = fastsemdiff.load(run, device="cpu")
    assert model.readout is None and torch.equal(model.embed(images), model.embed(images, 0.0))
    write_readout(run, {"t": 0.7, "linear": 80.0})
    model = fastsemdiff.load(run, device="cpu")
    assert torch.equal(model.embed(images), model.embed(images, 0.7))
    assert not torch.equal(model.embed(images), model.embed(images, 0.0))
    write_readout(run, {"ts": [0.2, 0.9], "linear": 81.0})
    model = fastsemdiff.load(str(run / "model.safetensors"), device="cpu")
    assert torch.equal(model.embed(images), model.embed_multi(images, [0.2, 0.9]))
    assert model.embed(images).shape == (5, 16)


@pytest.mark.parametrize("text", ["{not json", '{"linear": 3}', "[1, 2]"])
def test_a_broken_readout_file_is_a_clear_error(run, text):
    (run / "readout.json").write_text(text)
    with pytest.raises(CheckpointError, match="readout.json"):
        fastsemdiff.load(run, device="cpu")


def test_best_readout_picks_the_higher_linear_probe():
    result = {"best_t": {"t": 0.9, "linear": 84.0}, "embedding_dim": 8,
              "multi_t": {"ts": [0.0, 0.9], "linear": 85.0, "dim": 16}}
    assert best_readout(result) == {"ts": [0.0, 0.9], "linear": 85.0, "dim": 16}
    result["multi_t"]["linear"] = 83.0
    assert best_readout(result) == {"t": 0.9, "linear": 84.0, "dim": 8}
    result["multi_t"].update(linear=90.0, t_blind=True)  # a t-blind model's "multi-t" is its one embedding
    assert best_readout(result)["t"] == 0.9


def test_training_speed_is_the_median_of_the_logged_rates(tmp_path):
    from fastsemdiff.eval import training_speed

    assert training_speed(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "img_per_s": 300.0}\n{"step": 2, "loss": 1}\n'
                                            '{"step": 3, "img_per_s": 700.0}\n{"step": 4, "img_per_s": 500.0}\n')
    assert training_speed(tmp_path) == 500.0
