"""Launch settings of the adaLN norm kernels: from the tuned table where it has an entry, defaults elsewhere.

The table (``adaln_configs.json`` beside this file) is written by ``bench/tune_adaln.py`` on a GPU (the
``tune-adaln`` stage of ``scripts/gpu_check.py``) and committed. It is keyed by device class (``"sm_90"``), op
(``"modulated_norm"`` | ``"gated_residual_norm"``), direction (``"fwd"`` | ``"bwd"``) and width (``"1152"``)::

    {"devices": {"sm_90": {"modulated_norm": {"bwd": {"1152": {"rows": 2, "warps": 8, "stages": 2,
                                                              "programs_per_sm": 4}}}}}}

A config is a dict with:

* ``rows``: rows per tile (the 2-D ``[rows, BLOCK_C]`` block each loop iteration loads);
* ``warps``: ``num_warps`` of the launch; ``stages``: ``num_stages`` (the backward's row loop);
* ``programs_per_sm`` (backward): how many programs to aim for per SM. The work split follows from it per
  call: each group of rows sharing a modulation row (a sample) gets S programs, S the largest power of two with
  ``groups * S <= programs_per_sm * SMs`` (at least 1), capped so each program keeps at least ``min_rows``
  rows; on 132 SMs at 256 tokens that is S = 32 at batch 8, 8 at batch 64, 2 at batch 256 and 1 at batch 512:
  the grid fills the GPU at both ends, and at large batch one program per sample finishes its sums in-kernel;
* ``min_rows``: that floor (backward).

:func:`launch_config` says where a config came from (``"table"`` or ``"default"``), so a benchmark can report
whether it measured a tuned launch.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import torch

TABLE_PATH = Path(__file__).with_name("adaln_configs.json")
OPS = ("modulated_norm", "gated_residual_norm")
DIRECTIONS = ("fwd", "bwd")
KEYS = ("rows", "warps", "stages", "programs_per_sm", "min_rows")

# Elements of one tile a default launch gives each thread per loaded tensor: 16 fp32 values keeps the
# backward's working set (x, dy, xhat, g, dx of the tile, fp32) near 100 registers, i.e. two 256-thread
# blocks per SM, while a tile of 4,096 elements (two C = 1,152 rows, padded to 2,048 lanes) is in flight.
TILE_ELEMENTS = 4096


def device_class(device: torch.device) -> str:
    """``"sm_90"`` for a compute-capability-9.0 GPU; ``"cpu"`` (the interpreter) otherwise."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    return device.type


@functools.lru_cache(maxsize=None)
def load_table(path: Optional[str] = None) -> dict:
    """The committed table's ``devices`` mapping (empty when the file has none)."""
    p = Path(path) if path else TABLE_PATH
    if not p.is_file():
        return {}
    return json.loads(p.read_text()).get("devices", {})


def default_config(op: str, direction: str, C: int) -> dict:
    """Settings derived from the width alone: tiles of ``TILE_ELEMENTS`` padded lanes (one row when a row is
    wider), 16 lanes per thread (two 16-byte bf16 vectors), 4 programs per SM in the backward with at least
    8 rows each and a 2-stage pipelined row loop; the gated backward, with two more row tensors live, halves
    the rows per tile."""
    block = 1 << max(0, (int(C) - 1).bit_length())
    rows = max(1, min(16, TILE_ELEMENTS // block))
    warps = max(1, min(32, rows * block // (16 * 32)))
    if op == "gated_residual_norm" and direction == "bwd":
        rows = max(1, rows // 2)
    # the backward's row loop with 2 stages: triton software-pipelines its loads (cp.async into shared memory on
    # sm_80+), so the next tile's loads are in flight while the current tile reduces
    stages = 2 if direction == "bwd" else 1
    return {"rows": rows, "warps": warps, "stages": stages, "programs_per_sm": 4, "min_rows": 8}


def launch_config(op: str, direction: str, C: int, device: torch.device | str,
                  table: Optional[dict] = None) -> tuple[dict, str]:
    """``(config, source)`` for one launch: the table's entry for this device class, op, direction and width
    (``source == "table"``) completed by the defaults, or the defaults (``"default"``). ``device`` is a
    torch device or a device-class string such as ``"sm_90"``."""
    if op not in OPS or direction not in DIRECTIONS:
        raise ValueError(f"launch_config: op must be one of {OPS} and direction one of {DIRECTIONS}, "
                         f"got {op!r}, {direction!r}")
    cls = device if isinstance(device, str) else device_class(device)
    entries = load_table() if table is None else table
    entry = entries.get(cls, {}).get(op, {}).get(direction, {}).get(str(int(C)))
    config = default_config(op, direction, C)
    if entry:
        config.update({k: int(v) for k, v in entry.items() if k in KEYS})
        return config, "table"
    return config, "default"


def tile_rows(config: dict, affine_backward: bool = False) -> int:
    """Rows per tile of a launch: the config's, halved for a backward with weight or bias (two more fp32
    accumulators and w, b live per thread: at C = 1,152 two rows took 157-173 registers, one block per SM). The
    table is tuned on DiT's norms, which have no affine."""
    return max(1, config["rows"] // 2) if affine_backward else config["rows"]


def programs_per_group(groups: int, rows_per_group: int, rows: int, sms: int, config: dict) -> tuple[int, int]:
    """``(S, rows_per_program)``: S programs per group of ``rows_per_group`` rows (a power of two, see the module
    docstring), each over a whole number of ``rows``-row tiles (the last program of a group may be ragged)."""
    target = config["programs_per_sm"] * sms
    S = 1
    while groups * S * 2 <= target and rows_per_group >= 2 * S * config["min_rows"]:
        S *= 2
    per_program = -(-rows_per_group // S)
    per_program = -(-per_program // rows) * rows  # whole tiles
    return -(-rows_per_group // per_program), per_program
