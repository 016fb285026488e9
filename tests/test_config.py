"""Typed configuration: defaults, YAML + overrides, and every way a user can get it wrong."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fastsemdiff.config import PRESETS, Config, ConfigError, from_dict, load_config, valid_keys


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_validate():
    cfg = Config()
    assert cfg.validate() is cfg
    assert load_config().to_dict() == Config().to_dict()
    assert load_config(None, []).to_dict() == Config().to_dict()
    assert from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert issubclass(ConfigError, ValueError)
    assert "model.hidden_size" in valid_keys() and "diffusion.lambda_cons" in valid_keys()


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")))
def test_shipped_configs_load_with_every_value_applied(path):
    """Each shipped config validates, and every key it sets reaches the Config with the file's value."""
    cfg = load_config(str(path)).to_dict()
    data = yaml.safe_load(path.read_text())
    assert data, f"{path} is empty"
    for section, values in data.items():
        for key, value in values.items():
            got = cfg[section][key]
            assert got == (float(value) if isinstance(got, float) else value), f"{section}.{key} in {path.name}"


def test_yaml_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "train:\n  steps: 10\n  lr: 0.002\nmodel:\n  patch_size: 4\n  qk_norm: true\n")
    cfg = load_config(path, ["train.steps=20", "encoder.dim=64", "train.steps=30"])
    assert cfg.train.steps == 30  # the last override wins over the file and earlier overrides
    assert cfg.train.lr == 0.002 and cfg.model.patch_size == 4 and cfg.model.qk_norm is True  # from the file
    assert cfg.encoder.dim == 64  # override only
    assert cfg.train.batch_size == Config().train.batch_size  # default untouched
    cfg2 = load_config(path, ["model.patch_size=7"])
    assert cfg2.model.patch_size == 7 and cfg2.train.steps == 10


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")).to_dict() == Config().to_dict()


@pytest.mark.parametrize("override", ["model.hiden_size=3", "modle.depth=2", "depth=2", "model.depth.x=1"])
def test_unknown_key_lists_valid_keys(override):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "unknown config key" in msg
    assert "model.hidden_size" in msg and "train.steps" in msg


def test_unknown_key_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match="model.hidden_size"):
        load_config(write(tmp_path, "model:\n  hiden_size: 64\n"))


@pytest.mark.parametrize("override,key", [
    ("train.steps=abc", "train.steps"), ("model.qk_norm=3", "model.qk_norm"), ("eval.ts=[a]", "eval.ts"),
    ("train.steps=1.5", "train.steps"), ("train.steps=true", "train.steps"), ("train.lr=fast", "train.lr"),
    ("model.hidden_size=big", "model.hidden_size"), ("train.betas=[0.9, x]", "train.betas"),
    ("data.path=[1, 2]", "data.path"),
])
def test_wrong_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match="wrong type") as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_numbers_coerce_to_floats():
    cfg = load_config(None, ["train.lr=1", "eval.ts=[0, 1]", "diffusion.cons_step=0.1", "train.weight_decay=1e-4",
                             "encoder.reg_weight=-2.5E-3", "model.hidden_size=64"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.eval.ts == [0.0, 1.0] and all(type(t) is float for t in cfg.eval.ts)
    assert cfg.train.weight_decay == 1e-4 and cfg.encoder.reg_weight == -2.5e-3  # 1e-4 is a YAML 1.1 string
    assert cfg.model.hidden_size == 64 and type(cfg.model.hidden_size) is int
    assert load_config(None, ["eval.ts=0.5"]).eval.ts == [0.5]  # a scalar for a list


def test_floats_in_yaml_without_a_dot(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 3e-4\n  betas: [0.9, 1e-1]\n"))
    assert cfg.train.lr == 3e-4 and cfg.train.betas == [0.9, 0.1]


def test_aliases():
    cfg = load_config(None, ["preset=S", "steps=10", "run_dir=runs/x"])
    assert cfg.model.preset == "S" and cfg.train.steps == 10 and cfg.train.run_dir == "runs/x"
    assert cfg.model.resolved() == (384, 12, 6)


def test_alias_in_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "preset: B\nsteps: 7\n"))
    assert cfg.model.preset == "B" and cfg.train.steps == 7


def test_image_size_not_divisible_by_patch():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.patch_size=5"])
    msg = str(e.value)
    assert "data.image_size=28" in msg and "model.patch_size=5" in msg
    load_config(None, ["model.patch_size=4"])  # 28 / 4 is fine


@pytest.mark.parametrize("override,choices", [
    ("diffusion.schedule=foo", ["flow", "ve", "vp-cosine", "vp-linear"]),
    ("diffusion.prediction=score", ["eps", "v", "velocity", "x0"]),
    ("model.cond_merge=mul", ["add", "concat"]),
    ("encoder.regularizer=l2", ["kl", "l1", "none"]),
    ("encoder.input=blurred", ["clean", "noisy"]),
    ("model.backend=cutlass", ["auto", "cuda", "torch", "triton"]),
    ("model.adaln=shared", ["per_block", "stacked"]),
])
def test_invalid_choice_lists_choices(override, choices):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert override.split("=")[0] in msg
    for c in choices:
        assert repr(c) in msg


def test_unknown_preset():
    with pytest.raises(ConfigError, match="XL"):
        load_config(None, ["preset=XXL"])


@pytest.mark.parametrize("override,fragment", [
    ("model.z_dropout=1.0", "model.z_dropout"), ("train.steps=0", "train.steps"),
    ("eval.ts=[0.5, 1.5]", "eval.ts"), ("model.num_heads=3", "num_heads"),
    ("model.patch_size=0", "model.patch_size"), ("model.depth=-1", "model.depth"),
    ("encoder.dim=0", "encoder.dim"), ("data.channels=0", "data.channels"),
    ("model.hidden_size=30", "divisible by 4"),
])
def test_bad_values(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override, "model.num_heads=2"] if "hidden_size" in override else [override])


@pytest.mark.parametrize("reg", ["kl", "l1"])
def test_the_supervised_ceiling_refuses_a_bottleneck(reg):
    """The main job's recipe has a KL bottleneck; its ceiling (command 1b) must say how to turn it off."""
    with pytest.raises(ConfigError, match="encoder.regularizer=none"):
        load_config(None, [f"encoder.regularizer={reg}", "encoder.objective=supervised"])
    main_job = Path(__file__).resolve().parents[1] / "configs" / "fmnist-tiny.yaml"  # wherever pytest starts
    load_config(str(main_job), ["encoder.objective=supervised", "encoder.regularizer=none"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_non_mapping_yaml_and_missing_file(tmp_path):
    for text in ("- a\n- b\n", "just a string\n", "42\n"):
        with pytest.raises(ConfigError, match="mapping"):
            load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


@pytest.mark.parametrize("preset,sizes", [("S", (384, 12, 6)), ("B", (768, 12, 12)), ("L", (1024, 24, 16)),
                                          ("XL", (1152, 28, 16))])
def test_presets_resolve_to_dit_sizes(preset, sizes):
    cfg = load_config(None, [f"model.preset={preset}"])
    assert cfg.model.resolved() == sizes == PRESETS[preset]
    # explicit sizes override the preset field by field
    cfg = load_config(None, [f"model.preset={preset}", "model.depth=3"])
    assert cfg.model.resolved() == (sizes[0], 3, sizes[2])


def test_to_json_round_trip():
    import json

    cfg = load_config(None, ["preset=S", "eval.ts=[0.1]"])
    d = json.loads(cfg.to_json())
    assert d == dataclasses.asdict(cfg)
    assert from_dict(d).to_dict() == cfg.to_dict()


def test_on_off_words_of_string_options():
    """YAML reads `on`/`off` as booleans; a string option such as train.compile takes them as the words."""
    from fastsemdiff.config import load_config as load

    assert load(None, ["train.compile=on"]).train.compile == "on"
    assert load(None, ["train.compile=off"]).train.compile == "off"
