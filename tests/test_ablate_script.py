"""scripts/ablate.py: every variant changes exactly what it names, and a variant equal to the base is skipped."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.stack_independent  # a research script's config edits (see conftest.py)


@pytest.fixture(scope="module")
def ablate():
    spec = importlib.util.spec_from_file_location("ablate", REPO / "scripts" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_change_only_their_switches(ablate):
    base = ablate.resolved("configs/fmnist-tiny.yaml", [])
    for name, (overrides, _) in ablate.VARIANTS.items():
        cfg = ablate.resolved("configs/fmnist-tiny.yaml", overrides)
        changed = {f"{sec}.{k}" for sec in cfg for k in cfg[sec] if cfg[sec][k] != base[sec][k]}
        assert changed <= {o.split("=")[0] for o in overrides}, name


def test_exactly_one_consistency_variant_is_a_no_op(ablate):
    base = ablate.resolved("configs/fmnist-tiny.yaml", [])
    same = [name for name in ("consistency-on", "consistency-off")
            if ablate.resolved("configs/fmnist-tiny.yaml", ablate.VARIANTS[name][0]) == base]
    assert len(same) == 1


def test_run_dir_and_logging_do_not_count_as_changes(ablate):
    a = ablate.resolved("configs/fmnist-tiny.yaml", ["train.run_dir=/tmp/x", "train.progress=false"])
    assert a == ablate.resolved("configs/fmnist-tiny.yaml", [])
