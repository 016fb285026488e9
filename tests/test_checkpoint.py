"""Training checkpoints: a corrupt latest checkpoint falls back to the one before, a config that changes the
model or objective is refused by name, the other adaLN layout is converted, metrics.jsonl holds each step
once, the metadata unpickler and the load planner never run pickled code, keep_last pruning, interrupted
saves ignored, checkpoints from before model.pos_layout still load."""
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
from safetensors.torch import load_file
from torch.testing import assert_close

import fastsemdiff.train as train_mod
from fastsemdiff import checkpoint as ckpt
from fastsemdiff.config import load_config
from fastsemdiff.errors import CheckpointError
from fastsemdiff.models import SemanticDiffusion
from fastsemdiff.nn import sincos_pos_embed_2d

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
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # as the trainer: no pos_embed
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    ema = {n: p.detach().clone() for n, p in params.items()}
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


def test_corrupt_latest_resumes_from_previous_cli(trained_run, run_copy):
    """Through the real CLI: the truncated latest checkpoint is set aside, saying so, and the run continues
    from the one before it (10 steps again); metrics.jsonl holds each step once."""
    latest = run_copy / "checkpoints" / "step_0000010"
    shard = latest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    r = run_cli(*_resume_args(trained_run, run_copy))
    assert r.returncode == 0, r.stderr
    assert f"checkpoint {latest} is corrupt" in r.stdout, r.stdout
    assert "resuming from step_0000005 instead" in r.stdout and "steps 5->15" in r.stdout, r.stdout
    assert (run_copy / "checkpoints" / "corrupt_step_0000010" / "__0_0.distcp").stat().st_size == 1000
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["step_0000010", "step_0000015"]
    steps = [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15]


def _damage(path: Path, damage: str) -> None:
    shard, metadata = path / "__0_0.distcp", path / ".metadata"
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
        (path / ckpt.META_FILE).write_text('{"step": "ten"')


DAMAGES = ["garbage shard", "empty shard", "garbage metadata", "truncated metadata", "missing metadata",
           "bad meta.json"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_checkpoint_corrupt_is_one_clear_error(damage, trained_run, run_copy, capfd):
    for path in ckpt.list_checkpoints(run_copy):
        _damage(path, damage)
    msg = _main_error(capfd, _resume_args(trained_run, run_copy))
    assert "no checkpoint of" in msg and "can be read" in msg and "corrupt" in msg, msg
    assert "step_0000010" in msg and "step_0000005" in msg, msg
    if "metadata" in damage:
        assert ".metadata" in msg
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["step_0000005", "step_0000010"]  # not moved


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_latest_falls_back_past_each_damage(damage, trained_run, run_copy):
    cfg = load_config(None, trained_run.args)
    _damage(run_copy / "checkpoints" / "step_0000010", damage)
    said = []
    path, step = ckpt.resume_latest(run_copy, *_state(cfg), cfg, said.append)
    assert (path.name, step) == ("step_0000005", 5)
    assert "step_0000010" in said[0] and "corrupt" in said[0], said
    assert said[0].endswith("resuming from step_0000005 instead") and "corrupt_step_0000010" in said[1], said
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["step_0000005"]


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
    "override, key, old, new",
    [("model.hidden_size=64", "model.hidden_size", "32", "64"), ("model.depth=3", "model.depth", "2", "3"),
     ("encoder.dim=8", "encoder.dim", "16", "8"), ("model.patch_size=4", "model.patch_size", "7", "4"),
     ("diffusion.prediction=x0", "diffusion.prediction", "'eps'", "'x0'"),
     ("diffusion.schedule=flow", "diffusion.schedule", "'vp-cosine'", "'flow'"),
     ("encoder.input=noisy", "encoder.input", "'clean'", "'noisy'"),
     ("encoder.normalize=true", "encoder.normalize", "False", "True"),
     ("encoder.objective=supervised", "encoder.objective", "'self_conditional'", "'supervised'"),
     ("encoder.regularizer=l1", "encoder.regularizer", "'none'", "'l1'"),
     ("model.rms_norm=true", "model.rms_norm", "False", "True"),
     ("model.z_dropout=0.3", "model.z_dropout", "0.1", "0.3"),
     ("model.token_mask=0.25", "model.token_mask", "0.0", "0.25"),
     ("model.pos_layout=rows_first", "model.pos_layout", "'dit'", "'rows_first'")],
)
def test_resume_with_a_key_that_changes_the_model_or_objective(override, key, old, new, trained_run, run_copy,
                                                                capfd):
    msg = _main_error(capfd, _resume_args(trained_run, run_copy, override))
    assert "different model config or objective" in msg and f"{key}: checkpoint {old}, now {new}" in msg, msg
    assert "config.yaml" in msg  # says how to resume properly
    assert f"{key}={old.strip(chr(39)).lower()}" in msg  # and which override keeps the run's value
    assert ckpt.latest_checkpoint(run_copy).name == "step_0000010"


def test_several_changed_keys_are_all_named(trained_run, run_copy, capfd):
    msg = _main_error(capfd, _resume_args(trained_run, run_copy, "diffusion.prediction=v", "encoder.input=noisy"))
    assert "diffusion.prediction: checkpoint 'eps', now 'v'" in msg and "encoder.input: checkpoint 'clean'" in msg
    assert "pass encoder.input=clean diffusion.prediction=eps" in msg, msg


def test_every_config_key_is_classified_for_resume():
    """A new config key must be put in FIXED_ON_RESUME or FREE_ON_RESUME (or a free section) on purpose."""
    from fastsemdiff.config import valid_keys

    fixed, free = set(ckpt.FIXED_ON_RESUME), set(ckpt.FREE_ON_RESUME)
    assert not fixed & free
    for key in valid_keys():
        assert key.split(".")[0] in ckpt.FREE_SECTIONS_ON_RESUME or key in fixed | free, key
    assert not (fixed | free) - set(valid_keys())


def test_preset_and_spelled_out_sizes_are_the_same_model(tmp_path):
    """Sizes are compared as resolved: preset S is hidden 384, depth 12, 6 heads."""
    meta = {"step": 1, "config": load_config(None, ["model.preset=S"]).to_dict()}
    same = load_config(None, ["model.hidden_size=384", "model.depth=12", "model.num_heads=6", "encoder.depth=6"])
    ckpt.check_compatible(meta, same, tmp_path)
    with pytest.raises(CheckpointError, match="model.depth: checkpoint 12, now 4"):
        ckpt.check_compatible(meta, load_config(None, ["model.hidden_size=384", "model.num_heads=6"]), tmp_path)


def test_resume_with_free_keys_is_fine(trained_run, run_copy):
    """Keys that change neither parameters nor objective may change on resume; the run continues 10 -> 15."""
    train_mod.main(_resume_args(trained_run, run_copy, "train.lr=0.0005", "train.warmup_steps=3",
                                "train.log_every=1", "train.keep_last=3", "model.backend=torch", "eval.knn_k=5"))
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["step_0000005", "step_0000010", "step_0000015"]
    steps = [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 11, 12, 13, 14, 15]


def test_metrics_hold_each_step_once_after_resume(trained_run, run_copy):
    """Killed after logging step 10 but before its checkpoint was complete (and mid-way through a line):
    the resumed run starts at 5 and logs 10 again, so the old 10 and the cut line are dropped."""
    shutil.rmtree(run_copy / "checkpoints" / "step_0000010")
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')
    train_mod.main(_resume_args(trained_run, run_copy))
    records = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15]


def test_drop_metrics_after(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert ckpt.drop_metrics_after(path, 3) == 0 and not path.exists()
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4, 5)) + "[1]\n{")
    assert ckpt.drop_metrics_after(path, 3) == 4
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert ckpt.drop_metrics_after(path, 3) == 0


# --------------------------------------------------------------------------- the other adaLN layout


def _trained_state(cfg, seed: int = 0):
    """Model, optimizer and EMA after two optimizer steps, every tensor distinct."""
    model, optimizer, ema = _state(cfg)
    for i in range(2):
        model(torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(seed + i)) * 2 - 1,
              torch.Generator().manual_seed(seed))[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    ema = {k: v * 0.5 + 0.01 for k, v in ema.items()}
    return model, optimizer, ema


def _per_param(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: s for p, s in optimizer.state.items()}


@pytest.mark.parametrize("src, dst", [("stacked", "per_block"), ("per_block", "stacked")])
def test_changed_adaln_layout_is_converted_on_load(src, dst, tmp_path):
    from fastsemdiff.nn import convert_adaln_state_dict

    def to(layout, sd, depth):
        for prefix, n in (("encoder.", 1), ("denoiser.", depth)):
            convert_adaln_state_dict(sd, prefix, n, layout)
        return sd

    cfg_src = load_config(None, [*MODEL_KEYS, f"model.adaln={src}"])
    cfg_dst = load_config(None, [*MODEL_KEYS, f"model.adaln={dst}"])
    model, optimizer, ema = _trained_state(cfg_src)
    path = ckpt.save_checkpoint(tmp_path, 2, model, optimizer, ema, cfg_src, keep_last=1)
    model2, optimizer2, ema2 = _state(cfg_dst)
    assert ckpt.load_checkpoint(path, model2, optimizer2, ema2, cfg_dst) == 2

    want = to(dst, dict(model.state_dict()), 2)
    got = model2.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    want_ema = to(dst, dict(ema), 2)
    assert want_ema.keys() == ema2.keys()
    for k in want_ema:
        assert torch.equal(ema2[k], want_ema[k]), k
    s1, s2 = _per_param(model, optimizer), _per_param(model2, optimizer2)
    for kind in ("exp_avg", "exp_avg_sq"):
        want_state = to(dst, {n: s[kind] for n, s in s1.items()}, 2)
        assert want_state.keys() == s2.keys()
        for n in want_state:
            assert torch.equal(s2[n][kind], want_state[n]), (n, kind)
    assert all(float(s["step"]) == 2 for s in s2.values())
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_resume_with_the_other_adaln_layout_continues_the_same_run(trained_run, tmp_path):
    """Resumed 10 -> 15 with model.adaln=per_block, the run ends where the stacked one does."""
    runs = {}
    for layout in ("stacked", "per_block"):
        run = tmp_path / layout
        shutil.copytree(trained_run.run_dir, run)
        train_mod.main(_resume_args(trained_run, run, f"model.adaln={layout}"))
        runs[layout] = load_file(str(run / "model.safetensors"))
    from fastsemdiff.nn import convert_adaln_state_dict

    per_block = runs["per_block"]
    for prefix, n in (("encoder.", 1), ("denoiser.", 2)):
        convert_adaln_state_dict(per_block, prefix, n, "stacked")
    assert per_block.keys() == runs["stacked"].keys()
    for k, v in runs["stacked"].items():
        assert_close(per_block[k], v, rtol=1e-4, atol=1e-6, msg=k)


FSDP_LOAD = """
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from fastsemdiff import checkpoint as ckpt, distributed
from fastsemdiff.config import load_config
from fastsemdiff.models import SemanticDiffusion

path, out, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
cfg = load_config(None, args)
rt = distributed.setup("fsdp", "fp32", 1)
torch.manual_seed(0)
core = SemanticDiffusion(cfg)
model = distributed.wrap(core, rt).module
params = [p for p in model.parameters() if p.requires_grad]
names = [n for n, p in core.named_parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-3)
ema = {n: p.detach().clone() for n, p in zip(names, params)}
step = ckpt.load_checkpoint(path, model, optimizer, ema, cfg)
msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
full_ema = {k: v.full_tensor() for k, v in ema.items()}
if rt.rank == 0:
    torch.save({"step": step, "model": msd, "optim": osd["state"], "ema": full_ema}, out)
distributed.cleanup()
distributed.exit_if_gloo_outlives_the_group()  # the FSDP model above still holds the group
"""


@pytest.mark.slow
def test_fsdp_shards_load_the_other_adaln_layout(trained_run, tmp_path):
    """Two FSDP2 processes load the single-process (stacked) checkpoint into per-block shards: gathered,
    model, EMA and optimizer state equal what one process loads."""
    from conftest import TORCHRUN, run_cmd

    script, out = tmp_path / "load.py", tmp_path / "loaded.pt"
    script.write_text(FSDP_LOAD)
    args = [*trained_run.args, "model.adaln=per_block"]
    path = ckpt.latest_checkpoint(trained_run.run_dir)
    r = run_cmd([*TORCHRUN, "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
                 "--max-restarts", "0", str(script), str(path), str(out), *args], timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    got = torch.load(out, weights_only=True)

    cfg = load_config(None, args)
    model, optimizer, ema = _state(cfg)
    assert ckpt.load_checkpoint(path, model, optimizer, ema, cfg) == got["step"] == 10
    for k, v in model.state_dict().items():
        assert torch.equal(got["model"][k], v), k
    for k, v in ema.items():
        assert torch.equal(got["ema"][k], v), k
    for n, state in _per_param(model, optimizer).items():
        for kind in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(got["optim"][n][kind]), torch.as_tensor(state[kind])), (n, kind)
    assert any("adaLN_modulation" in k for k in got["model"]) and not any("adaLN_stack" in k for k in got["model"])


# ------------------------------------------------------------------ checkpoints from before pos_layout
LEGACY = Path(__file__).resolve().parent / "data" / "legacy-v1"  # written by tests/data/make_legacy_v1.py
LEGACY_ARGS = ["model.hidden_size=16", "model.depth=1", "model.num_heads=2", "encoder.dim=8"]


def test_checkpoint_from_before_pos_layout():
    """A checkpoint of commit 29a0d73 has no pos_embed entries and no model.pos_layout: resuming it with
    today's default is refused naming the key; with its own layout every tensor is restored."""
    path = ckpt.latest_checkpoint(LEGACY)
    with pytest.raises(CheckpointError, match="model.pos_layout: checkpoint 'rows_first', now 'dit'.*"
                                              "pass model.pos_layout=rows_first"):
        ckpt.load_checkpoint(path, *_state(load_config(None, LEGACY_ARGS)), load_config(None, LEGACY_ARGS))
    cfg = load_config(None, [*LEGACY_ARGS, "model.pos_layout=rows_first"])
    model, optimizer, ema = _state(cfg)
    assert ckpt.load_checkpoint(path, model, optimizer, ema, cfg) == 3
    exported = load_file(str(LEGACY / "model.safetensors"))  # the same weights, as that version exported them
    for k, v in model.state_dict().items():
        if k.endswith("pos_embed"):
            assert torch.equal(v[0], sincos_pos_embed_2d(16, 4, "rows_first")), k
        else:
            assert torch.equal(v, exported[k]), k
    assert all(float(s["step"]) == 3 for s in optimizer.state.values())
    assert torch.equal(ema["denoiser.x_embedder.proj.weight"], exported["denoiser.x_embedder.proj.weight"] * 0.5)


def test_reader_uses_no_private_dcp_names():
    """The reader and planner stand on DCP's public classes only (they must work on torch 2.11 and later)."""
    source = Path(ckpt.__file__).read_text()
    for private in ("_get_metadata_path", "_nested_dict", "set_element", "mappings", "original_state_dict"):
        assert private not in source, private


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
    for path in ckpt.list_checkpoints(run_copy):
        (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(pickle.UnpicklingError):
        ckpt.SafeReader(str(path)).read_metadata()
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


# ------------------------------------------------------------------------------ checkpoint period


def test_ckpt_every_zero_writes_only_the_last_step(trained_run, tmp_path):
    """train.ckpt_every=0 turns the periodic checkpoints off (it once divided by zero at the first log step);
    the last step is still saved."""
    run = tmp_path / "run"
    train_mod.main(train_args(run, trained_run.data, "train.steps=4", "train.ckpt_every=0", "train.log_every=1"))
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert steps == ["step_0000004"], steps


@pytest.mark.parametrize("override, words", [("train.ckpt_every=-1", "train.ckpt_every=-1 is negative"),
                                             ("train.probe_every=-5", "train.probe_every=-5 is negative"),
                                             ("train.log_every=0", "train.log_every=0")])
def test_bad_periods_are_refused_before_training(trained_run, tmp_path, capfd, override, words):
    line = _main_error(capfd, train_args(tmp_path / "run", trained_run.data, "train.steps=2", override))
    assert words in line, line
