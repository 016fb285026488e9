"""scripts/setup.sh on a disk without room for an environment: a clear refusal before pip runs, nothing made."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_setup_refuses_a_full_disk_before_making_an_environment(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    # more free space than any disk has: the check must refuse here, whatever this machine's disk holds
    env = {"PATH": "/usr/bin:/bin", "FASTSEMDIFF_SETUP_MIN_GB": "100000000"}
    out = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1, out
    assert "GB free on" in out.stderr and ".venv" in out.stderr and "FASTSEMDIFF_SETUP_MIN_GB" in out.stderr, out.stderr
    assert not (tmp_path / ".venv").exists()  # refused before the environment was started


def test_every_environment_is_made_by_the_space_checking_helper():
    """Both environments (the GPU-image one is the second ~6.5 GB) are made by new_env, the one place that runs
    ``python -m venv``, so neither can start without the check."""
    text = (REPO / "scripts" / "setup.sh").read_text()
    assert text.count("-m venv") == 1 and '"$python" -m venv "$1"' in text
    assert "\nnew_env .venv\n" in text and '\n    new_env "$gpu" "$room"\n' in text
