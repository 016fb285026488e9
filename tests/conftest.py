"""Shared fixtures for the training, checkpoint and export tests.

* ``fake_fmnist``: a tiny Fashion-MNIST (512 train / 128 test random images) in the real idx.gz
  format, so training tests need neither the installed dataset nor its load time.
* ``trained_run``: one short single-process training run (``main([...])`` in this process), shared by
  the tests that only read its outputs; it also keeps the EMA weights the trainer handed to the
  exporter, i.e. the model exactly as it was in the training process.
* helpers to run the CLI in a subprocess (``run_cli``) and to kill a process tree (``kill_tree``).
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

# Triton kernels run on a CPU-only machine only under the interpreter, which is chosen when a kernel is
# defined (first import of fastsemdiff.kernels): set it before any test module can import them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# Where the fastsemdiff under test lives: the checkout (editable install), or site-packages (.venv-gpu-image's
# regular install, run with PYTHONSAFEPATH=1 so the checkout does not shadow it, here and in every child).
PACKAGE_ROOT = Path(importlib.util.find_spec("fastsemdiff").origin).resolve().parents[1]
PYTHON = sys.executable
# torch's launcher run by this interpreter (the venv's `torchrun` script may name another interpreter)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# A model small enough for 2 shared CPU cores: 32 wide, 2 blocks, 16 tokens (patch 7 on 28x28).
FAST = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "encoder.dim=16",
        "train.batch_size=32", "train.log_every=5", "train.progress=false", "train.threads=1"]

N_TRAIN, N_TEST = 512, 128


def _idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">iiii", 2051, n, h, w) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def write_fake_fmnist(folder: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0) -> Path:
    """The four gzipped idx files of Fashion-MNIST, filled with random pixels and labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_images(images), 1))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_labels(labels), 1))
    return folder


# The README's test command runs the suite on two stacks and splits it by two marks, so that no test runs twice
# for nothing: ``stack_independent`` tests (docs, research scripts: nothing that depends on the torch or Triton
# version) run on .venv only (`-m "not stack_independent"` on .venv-gpu-image), and ``device_tool`` tests (tools
# that run on the GPU machines) run on .venv-gpu-image, the GPU machines' stack, only (`-m "not device_tool"` on
# .venv). Everything else runs on both. A plain `pytest tests` runs everything.
STACK_MARKS = ("stack_independent", "device_tool")


def pytest_collection_modifyitems(config, items):
    """A test with both stack marks would run under neither of the README's commands: refuse to collect it."""
    for item in items:
        if all(item.get_closest_marker(mark) for mark in STACK_MARKS):
            raise pytest.UsageError(f"{item.nodeid} is marked both {' and '.join(STACK_MARKS)}: the README's test "
                                    "command would run it on neither stack; keep one mark")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small ops on 2 shared cores: one intra-op thread avoids oversubscription stalls (~100x on tiny models)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def poison_kernel_outputs():
    """Every buffer the Triton launchers allocate starts as NaN, so an element a kernel fails to write
    cannot pass a comparison."""
    from fastsemdiff.kernels import modulated_layer_norm as kernels

    before = kernels.POISON_OUTPUTS
    kernels.POISON_OUTPUTS = True
    yield
    kernels.POISON_OUTPUTS = before


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory) -> Path:
    return write_fake_fmnist(tmp_path_factory.mktemp("fake-fmnist"))


def train_args(run_dir: Path, data: Path, *extra: str) -> list[str]:
    """CLI overrides for a fast run in ``run_dir`` on the dataset at ``data``."""
    return [*FAST, f"train.run_dir={run_dir}", f"data.path={data}", *extra]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: the fastsemdiff this process imports importable (the checkout, or
    the installed copy of .venv-gpu-image), one thread, no stray torchrun vars."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_RUN_ID", "GROUP_RANK")}
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    """``torchrun --nproc_per_node N -m fastsemdiff.train ARGS`` on a rendezvous port the OS picks (never collides)."""
    return [*TORCHRUN, "--nproc_per_node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
            "--max-restarts", "0", "-m", "fastsemdiff.train", *args]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc). torchrun starts each worker in its own session,
    so killing torchrun's process group alone would leave the workers running."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session=True``: its process group and every descendant."""
    victims = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_cmd(cmd: list[str], timeout: float = 180, cwd: Optional[Path] = None) -> Result:
    """Run a command in its own session; on timeout kill its whole tree and fail the test."""
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    return Result(proc.returncode, out, err)


def run_cli(*args: str, timeout: float = 120) -> Result:
    """``python -m fastsemdiff.train ARGS`` in a subprocess."""
    return run_cmd([PYTHON, "-m", "fastsemdiff.train", *args], timeout=timeout)


@dataclass
class TrainedRun:
    run_dir: Path
    data: Path
    args: list[str]
    exported: dict[str, torch.Tensor]  # the EMA state the training process handed to save_weights


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, fake_fmnist) -> TrainedRun:
    """10 steps in this process, checkpoints every 5 (keep_last=2); read-only for the tests that use it."""
    import fastsemdiff.train as train_mod

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    args = train_args(run_dir, fake_fmnist, "train.steps=10", "train.ckpt_every=5")
    captured: dict[str, torch.Tensor] = {}
    real = train_mod.save_weights

    def spy(state_dict, cfg, path):
        captured.update({k: v.detach().clone() for k, v in state_dict.items()})
        return real(state_dict, cfg, path)

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "save_weights", spy)
        train_mod.main(args)
    torch.set_num_threads(threads)
    return TrainedRun(run_dir, fake_fmnist, args, captured)
