"""Small helpers shared by the test modules."""
import importlib.util

import pytest
import torch

has_export = pytest.mark.skipif(
    importlib.util.find_spec("fastsemdiff.export") is None, reason="fastsemdiff.export (save_model) not there yet"
)


def gen(seed: int) -> torch.Generator:
    """A CPU generator with a fixed seed: every test input is fresh random data, yet repeatable."""
    return torch.Generator().manual_seed(seed)


# A probe-sized model for the evaluation tests: 32 wide, 2 blocks, a 16-d code, patch 7 on 28x28.
EVAL_FAST = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "encoder.dim=16", "model.patch_size=7"]


def give_t_a_say(model):
    """Random encoder adaLN weights, as training leaves them: at initialisation they are zero and z ignores t."""
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if "adaLN" in name and name.endswith("weight"):
                p.normal_(std=0.05)
    return model


def untrained_eval_model(*overrides: str):
    """The evaluation tests' model (seed 0, ``EVAL_FAST`` plus ``overrides``), with t given a say, in eval mode."""
    from fastsemdiff.config import load_config
    from fastsemdiff.models.semantic import SemanticDiffusion

    torch.manual_seed(0)
    return give_t_a_say(SemanticDiffusion(load_config(None, [*EVAL_FAST, *overrides]))).eval()


def exported_run(model, folder):
    """``folder`` as a run directory holding ``model`` exported, as training would leave it."""
    from fastsemdiff.export import save_model

    save_model(model, model.cfg, folder / "model.safetensors")
    return folder
