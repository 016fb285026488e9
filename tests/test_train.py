"""The trainer end to end: outputs of a run, exact resume after SIGKILL under torchrun (FSDP2, gloo),
the resume guards, config/data errors at start, divergence handling, and the exported model being
exactly the EMA model of the training process."""
from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import load_file

import fastsemdiff
import fastsemdiff.train as train_mod
from fastsemdiff import checkpoint as ckpt
from fastsemdiff.config import load_config
from fastsemdiff.data import load_split
from fastsemdiff.errors import TrainingDiverged
from fastsemdiff.models import SemanticDiffusion

from conftest import REPO, child_env, kill_tree, run_cli, run_cmd, torchrun_cmd, train_args

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _main_error(capsys, argv: list[str]) -> str:
    """Run ``main(argv)`` in process; it must exit with code 2 and one ``fastsemdiff.train: error:`` line."""
    with pytest.raises(SystemExit) as e:
        train_mod.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fastsemdiff.train: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _fresh_training_state(cfg):
    """Model, optimizer and EMA dict as ``train()`` builds them in a single process."""
    torch.manual_seed(cfg.train.seed)
    model = SemanticDiffusion(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, optimizer, ema


def _read_dcp(path: Path, cfg) -> dict[str, dict[str, torch.Tensor]]:
    """The model and EMA tensors of a (possibly sharded) DCP checkpoint, gathered into plain tensors."""
    model = SemanticDiffusion(cfg, adaln=ckpt.adaln_layout(path))
    state = {"model": {k: torch.empty_like(v) for k, v in model.state_dict().items()},
             "ema": {n: torch.empty_like(p) for n, p in model.named_parameters() if p.requires_grad}}
    flat = {f"{section}.{k}": v for section, part in state.items() for k, v in part.items()}  # DCP's saved names
    dcp.load(flat, storage_reader=ckpt.SafeReader(str(path)), planner=ckpt.SafePlanner())
    return state


# ------------------------------------------------------------------------------------- a finished run


def test_single_process_run_writes_all_outputs(trained_run):
    run = trained_run.run_dir
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 10 and cfg["model"]["hidden_size"] == 32
    assert json.loads((run / "config.json").read_text()) == cfg

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10]
    for r in records:
        assert r["loss"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
        assert r["img_per_s"] > 0
        assert {"lr", "grad_norm", "mse"} <= set(r)

    found = ckpt.list_checkpoints(run)
    assert [p.name for p in found] == ["step_0000005", "step_0000010"]
    for p in found:
        assert (p / ".metadata").is_file() and list(p.glob("*.distcp"))
        assert ckpt.read_meta(p)["step"] == int(p.name.split("_")[1])
    assert not list((run / "checkpoints").glob(".tmp_*"))

    tensors = load_file(str(run / "model.safetensors"))
    assert set(tensors) == set(trained_run.exported)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


def test_exported_embedding_equals_training_ema_exactly(trained_run):
    """fastsemdiff.load(run).embed == the EMA model of the training process, bit for bit."""
    loaded = fastsemdiff.load(trained_run.run_dir, device="cpu")
    assert not loaded.training
    cfg = load_config(None, trained_run.args)

    # 1) the EMA state the trainer itself handed to the exporter
    in_training = SemanticDiffusion(cfg)
    in_training.load_state_dict(trained_run.exported)
    in_training.eval()

    # 2) the EMA restored from the final DCP checkpoint into a fresh model/optimizer/EMA, as --resume does
    model, optimizer, ema = _fresh_training_state(cfg)
    step = ckpt.load_checkpoint(ckpt.latest_checkpoint(trained_run.run_dir), model, optimizer, ema, cfg)
    assert step == 10
    for name, value in ema.items():
        assert torch.equal(value, trained_run.exported[name]), name
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # the frozen pos_embed has no EMA
                p.copy_(ema[name])
    model.eval()

    images, _ = load_split("fashion-mnist", str(trained_run.data), "test", 28, 1)
    images = images[:48]
    per_image_t = torch.linspace(0, 1, len(images))
    for t in (0.0, 0.3, 1.0, per_image_t):
        z = loaded.embed(images, t)
        assert z.shape == (len(images), 16)
        assert torch.equal(z, in_training.embed(images, t))
        assert torch.equal(z, model.embed(images, t))


# ------------------------------------------------------------------------- torchrun: kill and resume


@pytest.mark.slow
def test_torchrun_sigkill_then_resume_equals_uninterrupted(tmp_path, fake_fmnist):
    steps, every = 24, 4
    cfg = load_config(None, train_args(tmp_path, fake_fmnist))

    def args(run: Path) -> list[str]:
        return train_args(run, fake_fmnist, f"train.steps={steps}", f"train.ckpt_every={every}")

    # the reference: one uninterrupted 2-process run
    full = tmp_path / "full"
    r = run_cmd(torchrun_cmd(2, *args(full)), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fsdp on 2 x cpu" in r.stdout

    # the same run, SIGKILLed (agent and both workers) once its first checkpoint is complete
    part = tmp_path / "part"
    first = part / "checkpoints" / f"step_{every:07d}" / ckpt.META_FILE
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(torchrun_cmd(2, *args(part)), cwd=REPO, env=child_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not first.is_file():
                assert proc.poll() is None, f"run ended before its first checkpoint:\n{(tmp_path / 'killed.log').read_text()}"
                assert time.monotonic() < deadline, "no checkpoint within 180 s"
                time.sleep(0.01)
        finally:
            kill_tree(proc)
    assert proc.returncode != 0
    assert not (part / "model.safetensors").exists(), "the run finished before it could be killed"
    killed_at = ckpt.read_meta(ckpt.latest_checkpoint(part))["step"]
    assert every <= killed_at < steps

    # resume to the end
    r = run_cmd(torchrun_cmd(2, "--resume", *args(part)), timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"steps {killed_at}->{steps}" in r.stdout

    # the exported EMA weights match the uninterrupted run's
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert set(a) == set(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"

    # and so do the final sharded checkpoints (model and EMA), gathered here into plain tensors
    last = f"step_{steps:07d}"
    assert ckpt.latest_checkpoint(full).name == last == ckpt.latest_checkpoint(part).name
    ca, cb = _read_dcp(full / "checkpoints" / last, cfg), _read_dcp(part / "checkpoints" / last, cfg)
    for section in ("model", "ema"):
        for k in ca[section]:
            diff = (ca[section][k] - cb[section][k]).abs().max().item()
            assert diff <= 1e-6, f"{section}.{k} differs by {diff}"
    for k, v in ca["ema"].items():  # the checkpoint's EMA is what was exported
        assert torch.equal(v, a[k]), k


# ----------------------------------------------------------------------------------- resume guards


def test_resume_without_checkpoint_is_an_error(tmp_path, fake_fmnist, capsys):
    msg = _main_error(capsys, ["--resume", *train_args(tmp_path / "new", fake_fmnist, "train.steps=5")])
    assert "--resume" in msg and "no complete checkpoint" in msg


def test_resume_ignores_interrupted_save(tmp_path, fake_fmnist, capsys):
    """Only an interrupted save's temporary folder: nothing to resume from."""
    (tmp_path / "run" / "checkpoints" / ".tmp_step_0000005").mkdir(parents=True)
    msg = _main_error(capsys, ["--resume", *train_args(tmp_path / "run", fake_fmnist, "train.steps=5")])
    assert "no complete checkpoint" in msg


def test_existing_checkpoints_without_resume_is_an_error(trained_run, capsys):
    before = sorted(p.name for p in (trained_run.run_dir / "checkpoints").iterdir())
    msg = _main_error(capsys, train_args(trained_run.run_dir, trained_run.data, "train.steps=20"))
    assert "already holds checkpoints" in msg and "pass --resume" in msg and "step_0000010" in msg
    assert sorted(p.name for p in (trained_run.run_dir / "checkpoints").iterdir()) == before


def test_resume_option_in_config_key(tmp_path, fake_fmnist, capsys):
    """train.resume=true is the same as --resume."""
    msg = _main_error(capsys, train_args(tmp_path / "new", fake_fmnist, "train.resume=true"))
    assert "--resume" in msg and "no complete checkpoint" in msg


# ----------------------------------------------------------------------------- errors at start (CLI)


def test_unknown_key_cli_exit_code_and_valid_keys(tmp_path, fake_fmnist):
    r = run_cli(*train_args(tmp_path / "run", fake_fmnist, "model.hidden=64"))
    assert r.returncode == 2
    assert "fastsemdiff.train: error: unknown config key 'model.hidden'" in r.stderr.splitlines()[-1]
    assert "valid keys" in r.stderr and "model.hidden_size" in r.stderr and "train.ckpt_every" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.steps=abc", ["train.steps='abc'", "wrong type", "int"]),
        ("train.lr=fast", ["train.lr='fast'", "wrong type", "float"]),
        ("model.patch_size=5", ["data.image_size=28", "model.patch_size=5", "not divisible"]),
        ("train.parallel=tpu", ["train.parallel='tpu'", "choose one of"]),
        ("steps", ["not of the form key=value"]),
    ],
)
def test_bad_config_exits_2(override, fragments, tmp_path, fake_fmnist, capsys):
    msg = _main_error(capsys, train_args(tmp_path / "run", fake_fmnist, override))
    for fragment in fragments:
        assert fragment in msg, msg
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path, capsys):
    msg = _main_error(capsys, ["--config", str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in msg and "does not exist" in msg


def test_missing_dataset_folder_exits_2(tmp_path, capsys):
    msg = _main_error(capsys, train_args(tmp_path / "run", tmp_path / "no-such-dir", "train.steps=2"))
    assert "dataset-fashion-mnist" in msg and "data.path" in msg and "no-such-dir" in msg


def test_batch_larger_than_dataset(tmp_path, fake_fmnist, capsys):
    msg = _main_error(capsys, train_args(tmp_path / "run", fake_fmnist, "train.batch_size=1024", "train.steps=2"))
    assert "larger than the dataset" in msg and "train.batch_size" in msg


# ------------------------------------------------------------------------------------------ divergence


_REAL_LOSS = SemanticDiffusion.loss


def _nan_from_call(monkeypatch, bad_call: int) -> None:
    """Make the training loss NaN from its ``bad_call``-th call on (1-based), i.e. from that step."""
    calls = {"n": 0}

    def loss(self, x0, *args):
        out, parts = _REAL_LOSS(self, x0, *args)
        calls["n"] += 1
        return (out * float("nan"), parts) if calls["n"] >= bad_call else (out, parts)

    monkeypatch.setattr(SemanticDiffusion, "loss", loss)


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, fake_fmnist, monkeypatch, capsys):
    run = tmp_path / "run"
    _nan_from_call(monkeypatch, 7)  # steps 1..6 fine: checkpoint at 5; NaN at 7; noticed at the step-10 check
    args = train_args(run, fake_fmnist, "train.steps=20", "train.ckpt_every=5")
    msg = _main_error(capsys, args)
    assert "NaN/inf" in msg and "between steps 5 and 10" in msg
    assert f"last good checkpoint is {run / 'checkpoints' / 'step_0000005'}" in msg

    # the earlier checkpoint is intact and nothing was saved after the NaN
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000005"]
    assert not list((run / "checkpoints").glob(".tmp_*"))
    assert not (run / "model.safetensors").exists()
    cfg = load_config(None, args)
    model, optimizer, ema = _fresh_training_state(cfg)
    assert ckpt.load_checkpoint(run / "checkpoints" / "step_0000005", model, optimizer, ema, cfg) == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for v in ema.values())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5]


def test_nan_before_any_checkpoint(tmp_path, fake_fmnist, monkeypatch):
    _nan_from_call(monkeypatch, 1)
    cfg = load_config(None, train_args(tmp_path / "run", fake_fmnist, "train.steps=20", "train.ckpt_every=5"))
    with pytest.raises(TrainingDiverged, match="NaN/inf") as e:
        train_mod.train(cfg)
    assert "between steps 0 and 5" in str(e.value) and "no checkpoint was written yet" in str(e.value)
    assert ckpt.latest_checkpoint(tmp_path / "run") is None


NAN_ON_RANK0 = """
import os, sys
from fastsemdiff.models.semantic import SemanticDiffusion
real, calls = SemanticDiffusion.loss, [0]
def loss(self, x0, *args):
    out, parts = real(self, x0, *args)
    calls[0] += 1
    if calls[0] == {bad} and os.environ["RANK"] == "0":
        out = out * float("nan")
    return out, parts
SemanticDiffusion.loss = loss
from fastsemdiff.train import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank(tmp_path, fake_fmnist):
    """NaN on rank 0 only, at the last step before a checkpoint: every rank must stop (no hang, no checkpoint)."""
    script = tmp_path / "nan_rank0.py"
    script.write_text(NAN_ON_RANK0.replace("{bad}", "8"))
    run = tmp_path / "run"
    cmd = torchrun_cmd(2, *train_args(run, fake_fmnist, "train.steps=12", "train.ckpt_every=4"))
    at = cmd.index("fastsemdiff.train")
    cmd[at - 1:at + 1] = [str(script)]  # the script instead of `-m fastsemdiff.train`
    r = run_cmd(cmd, timeout=150)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert out.count("fastsemdiff.train: error: loss or gradient norm became NaN/inf between steps 5 and 8") == 2, out
    assert "step_0000004" in out
    assert "save_checkpoint" not in out and "Connection closed" not in out  # no rank left behind in a collective
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000004"]
    assert not (run / "model.safetensors").exists()


def test_parallel_single_under_several_processes(tmp_path, fake_fmnist, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 would set it
    msg = _main_error(capsys, train_args(tmp_path / "run", fake_fmnist, "train.parallel=single"))
    assert "train.parallel=single" in msg and "2 processes" in msg


def test_supervised_baseline_trains_on_labels_and_exports(tmp_path, fake_fmnist):
    """encoder.objective=supervised gets the batch's labels from the trainer, learns (loss falls on the
    fake set's random labels, which it can memorise), and exports a model that embeds like any other."""
    run = tmp_path / "sup"
    train_mod.main(train_args(run, fake_fmnist, "encoder.objective=supervised", "train.steps=30", "train.lr=3e-3",
                              "train.warmup_steps=1", "train.ckpt_every=30", "train.log_every=10"))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "train_acc"} <= set(recs[0]) and recs[-1]["ce"] < recs[0]["ce"]
    model = fastsemdiff.load(str(run), device="cpu")
    images, _ = load_split("fashion-mnist", str(fake_fmnist), "test", 28, 1)
    z = model.embed(images[:4], 0.3)
    assert z.shape == (4, 16) and torch.isfinite(z).all()


def test_the_embedding_levers_train_through_the_trainer(tmp_path, fake_fmnist):
    """Issue 22's switches together (min-SNR weights, t shifted toward noise and drawn logit-normal, SODA-style
    views, the L1 bottleneck) go through the trainer's step and export: a finite loss with the L1 term logged, a model that embeds,
    and the saved config keeps every switch."""
    run = tmp_path / "levers"
    levers = ["diffusion.loss_weight=min_snr", "diffusion.t_sampling=logit_normal", "diffusion.t_mean=1",
              "diffusion.t_shift=2", "encoder.view_crop_scale=[0.35,1.0]", "encoder.view_flip=true",
              "encoder.view_erase=0.5", "encoder.regularizer=l1"]
    train_mod.main(train_args(run, fake_fmnist, *levers, "train.steps=6", "train.ckpt_every=6", "train.log_every=2"))
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    # the weighted loss's value is tested in test_timesteps (the log averages it over a window, the parts not)
    assert recs and all("reg" in r and math.isfinite(r["loss"]) and r["loss"] > 0 for r in recs), recs
    model = fastsemdiff.load(str(run), device="cpu")
    assert model.cfg.encoder.view_crop_scale == [0.35, 1.0] and model.cfg.diffusion.loss_weight == "min_snr"
    images, _ = load_split("fashion-mnist", str(fake_fmnist), "test", 28, 1)
    assert torch.isfinite(model.embed(images[:4], 0.5)).all()
