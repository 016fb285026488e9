"""``pip install --no-index --no-build-isolation --no-deps -e .`` (no network; the CUDA extension is build-cuda's),
then the package must import with its kernels. A dry run asks pip with ``--dry-run`` and changes nothing."""
from __future__ import annotations

from ..runner import PY, Check, Stage

NAME = "install"
ORDER = 10


def run(check: Check) -> Stage:
    s = Stage(NAME)
    cmd = [PY, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "--disable-pip-version-check",
           *(["--dry-run"] if check.dry_run else []), "-e", "."]
    rc, _ = check.run(s, cmd, check.box(150, 400), check.child_env(FASTSEMDIFF_BUILD_CUDA="0"))
    if rc == 0:
        probe = [PY, "-c", "import fastsemdiff, fastsemdiff.ops, importlib.util as u; "
                           "assert u.find_spec('fastsemdiff.kernels'), 'fastsemdiff.kernels is not importable'; "
                           "print('fastsemdiff', fastsemdiff.__version__, 'from', fastsemdiff.__file__)"]
        rc, _ = check.run(s, probe, check.box(60, 200))
    if rc == 0:
        s.status = "passed"
        s.reason = ("pip --dry-run (nothing changed); the package imports" if check.dry_run
                    else "installed editable with no network; the package imports")
    return s
