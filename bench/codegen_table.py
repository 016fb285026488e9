"""Print the codegen table of bench/RESULTS.md: every Triton kernel variant and every fastsemdiff._C kernel the
dispatcher selects at the DiT widths, compiled for sm_80 and sm_90 on this (CPU) machine and read with cuobjdump.

    python bench/codegen_table.py [--what triton|cuda|all] [-o table.md]

The rows come from bench/codegen.py, the helper tests/test_codegen.py checks them with; a header names the
date, versions and commit. Nothing is timed.
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/codegen.py, also under PYTHONSAFEPATH=1
import codegen  # noqa: E402


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", choices=["triton", "cuda", "all"], default="all")
    parser.add_argument("-o", "--out", help="write the markdown here (default: print it)")
    args = parser.parse_args()
    rows = []
    if args.what in ("triton", "all"):
        rows += codegen.run_in_subprocess("triton")
    if args.what in ("cuda", "all") and codegen.built_extension() is not None:
        rows += codegen.run_in_subprocess("cuda")
    so = codegen.built_extension()
    header = (f"{datetime.date.today().isoformat()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"commit `{_commit()}`, fastsemdiff._C: {so.name if so else 'not built'}; "
              f"command `python bench/codegen_table.py --what {args.what}`; {len(rows)} kernels, "
              f"{sum(bool(r['problems']) for r in rows)} failing the rules.")
    text = header + "\n\n" + codegen.markdown(rows) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
