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


def test_setup_checks_space_before_each_environment():
    """Both environments ask for room before they are made (the GPU-image one is the second ~6.5 GB)."""
    text = (REPO / "scripts" / "setup.sh").read_text()
    for env in (".venv", '"$gpu"'):
        check, make = text.index(f"need_space {env}"), text.index(f"[ -x {env}/bin/python ] ||" if env == ".venv"
                                                                   else '[ -x "$gpu/bin/python" ] ||')
        assert check < make
