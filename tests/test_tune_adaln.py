"""bench/tune_adaln.py's dry run (CPU, interpreter, tiny shapes): the plumbing from candidates to the launch
table. Its timings mean nothing; what is checked is that every op, direction and width got a timed best config
in the table's format, that kernels/adaln_config.py reads it back as a "table" config, and that the default
was among the candidates timed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from conftest import PYTHON, child_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# bench/tune_adaln.py runs on the GPU machines: tested on their stack, .venv-gpu-image (see conftest.py).
pytestmark = pytest.mark.device_tool


def test_dry_run_writes_a_table_the_launchers_read(tmp_path):
    from fastsemdiff.kernels import adaln_config as AC

    out = tmp_path / "adaln_configs.json"
    env = child_env(OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for --dry-run
    proc = subprocess.run([PYTHON, str(ROOT / "bench" / "tune_adaln.py"), "--dry-run", "--out", str(out),
                           "--time-box", "40"], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["measured"]["dry_run"] and data["measured"]["device_class"] == "cpu"
    table = data["devices"]
    for op in AC.OPS:
        for direction in AC.DIRECTIONS:
            entry = table["cpu"][op][direction]["64"]
            assert entry["us"] > 0 and entry["default_us"] > 0
            assert entry["us"] <= entry["default_us"]  # the best of a set that holds the default
            cfg, source = AC.launch_config(op, direction, 64, "cpu", table=table)
            assert source == "table" and all(cfg[k] == entry[k] for k in AC.KEYS)
    timed = [t for t in data["timings"] if "us" in t]
    assert len(timed) >= 2 * len(AC.OPS) * len(AC.DIRECTIONS)
    assert not [t for t in data["timings"] if "error" in t]
