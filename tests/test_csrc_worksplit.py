"""The work split of csrc/adaln.cu's rows kernels, re-implemented in Python and checked on the CPU against
direct sums: the indexing a GPU would otherwise be the first to test.

Backward (``bwd_rows`` and ``adaln_bwd_rows_kernel`` / ``adaln_bwd_finish_kernel``): block b owns rows
[b L, (b + 1) L); it walks each group ("segment") of its rows in tiles of R rows that never cross the segment's
end, keeps the segment's per-sample sums and writes them to slot b + g; the finishing kernel sums slots
b + g over b_lo(g) <= b <= b_hi(g). Forward (``adaln_fwd_rows_kernel``): warps grid-stride over the rows.
The model follows the C++ line by line (same names; R here is the kernel's tile RT); a change there must be made here too.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

SRC = (Path(__file__).resolve().parents[1] / "csrc" / "adaln.cu").read_text()
MIN_ROWS = 8  # kBwdRowsMinRows
FWD_WARPS = 4  # kFwdRowsWarps


def split(M: int, resident: int) -> tuple[int, int]:
    """(blocks, rows_per_block) as bwd_rows chooses them."""
    blocks = max(1, min(resident, (M + MIN_ROWS - 1) // MIN_ROWS))
    rows_per_block = (M + blocks - 1) // blocks
    return (M + rows_per_block - 1) // rows_per_block, rows_per_block


def bwd_rows_model(values: torch.Tensor, rows_per_group: int, resident: int, R: int, per_token: bool = False):
    """Per-group sums and the all-rows sum of ``values`` [M, C] through the kernels' indexing; also checks
    that every row is visited once, tiles stay inside their segment, and no slot is written twice."""
    M, C = values.shape
    blocks, L = split(M, resident)
    groups = 1 if per_token else M // rows_per_group
    slots = torch.full((blocks + groups - 1, C), float("nan"), dtype=torch.float64)
    written = [0] * slots.shape[0]
    part_w = torch.full((blocks, C), float("nan"), dtype=torch.float64)
    visits = [0] * M
    for blk in range(blocks):
        r0 = blk * L
        r1 = r0 + L if r0 + L < M else M
        assert r0 < r1, "an empty block"
        acc_w = torch.zeros(C, dtype=torch.float64)
        if per_token:
            for row in range(r0, r1):
                visits[row] += 1
                acc_w += values[row]
        else:
            seg = r0
            while seg < r1:
                group = seg // rows_per_group
                seg_end = (group + 1) * rows_per_group if (group + 1) * rows_per_group < r1 else r1
                acc = torch.zeros(C, dtype=torch.float64)
                t0 = seg
                while t0 < seg_end:
                    for r in range(R):
                        row = t0 + r
                        if row < seg_end:  # valid[r]
                            assert row // rows_per_group == group
                            visits[row] += 1
                            acc += values[row]
                            acc_w += values[row]
                    t0 += R
                slot = blk + group
                written[slot] += 1
                slots[slot] = acc
                seg = seg_end
        part_w[blk] = acc_w
    assert visits == [1] * M
    assert max(written) <= 1, "two segments share a slot"
    # adaln_bwd_finish_kernel
    per_group = None
    if not per_token:
        per_group = torch.empty(groups, C, dtype=torch.float64)
        for idx in range(groups * C):
            g, c = divmod(idx, C)
            b_lo = g * rows_per_group // L
            b_hi = ((g + 1) * rows_per_group - 1) // L
            t = 0.0
            for b in range(b_lo, b_hi + 1):
                assert written[b + g] == 1, f"slot {b + g} read but never written"
                t += slots[b + g, c].item()
            per_group[g, c] = t
    warps = 8
    total = torch.zeros(C, dtype=torch.float64)
    for c in range(C):
        red = [sum(part_w[b, c].item() for b in range(w, blocks, warps)) for w in range(warps)]
        total[c] = sum(red)
    return per_group, total, blocks, L


CASES = [  # (B, N, resident): blocks aligned with samples, crossing them mid-tile, one block, more blocks than rows
    (3, 256, 132 * 3), (5, 37, 132 * 2), (64, 256, 132), (64, 256, 396), (1, 1, 264), (7, 7, 132), (2, 300, 5),
    (256, 16, 264), (3, 9, 1),
]


@pytest.mark.parametrize("R", [4, 2])
@pytest.mark.parametrize("B,N,resident", CASES)
def test_bwd_rows_split_gives_the_per_sample_and_total_sums(B, N, resident, R):
    C = 3
    values = torch.randn(B * N, C, dtype=torch.float64, generator=torch.Generator().manual_seed(B * N))
    per_group, total, blocks, L = bwd_rows_model(values, N, resident, R)
    torch.testing.assert_close(per_group, values.view(B, N, C).sum(1))
    torch.testing.assert_close(total, values.sum(0))
    assert blocks <= max(resident, 1) and (L >= MIN_ROWS or blocks == 1 or L * blocks >= B * N)


@pytest.mark.parametrize("B,N,resident", CASES[:4])
def test_bwd_rows_per_token_split(B, N, resident):
    values = torch.randn(B * N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, total, _, _ = bwd_rows_model(values, 1, resident, 1, per_token=True)
    torch.testing.assert_close(total, values.sum(0))


@pytest.mark.parametrize("M,grid", [(1, 1), (7, 2), (65536, 528), (2048, 512), (5, 528)])
def test_fwd_rows_grid_stride_covers_every_row_once(M, grid):
    grid = min((M + FWD_WARPS - 1) // FWD_WARPS, grid)  # the host's min(wanted, resident)
    warps_total = grid * FWD_WARPS
    seen = [0] * M
    for blk in range(grid):
        for warp in range(FWD_WARPS):
            row = blk * FWD_WARPS + warp
            while row < M:
                seen[row] += 1
                row += warps_total
    assert seen == [1] * M


def test_model_matches_the_source():
    """The constants and index expressions the model copies are those of csrc/adaln.cu."""
    assert "constexpr int64_t kBwdRowsMinRows = 8;" in SRC
    assert "constexpr int kFwdRowsWarps = 4;" in SRC
    for expr in ["std::max<int64_t>(1, std::min(resident, (M + kBwdRowsMinRows - 1) / kBwdRowsMinRows))",
                 "const int64_t rows_per_block = (M + blocks - 1) / blocks;",
                 "blocks = (M + rows_per_block - 1) / rows_per_block;",
                 "const int64_t slots = blocks + groups - 1;",
                 "const int64_t group = seg / p.rows_per_group;",
                 "(group + 1) * p.rows_per_group < r1 ? (group + 1) * p.rows_per_group : r1;",
                 "for (int64_t t0 = seg; t0 < seg_end; t0 += RT)",
                 "valid[r] = row < end;",
                 "const int64_t off = (blk + group) * C",
                 "const int64_t b_lo = g * f.rows_per_group / f.rows_per_block;",
                 "const int64_t b_hi = ((g + 1) * f.rows_per_group - 1) / f.rows_per_block;",
                 "t += f.sample_src[k][(b + g) * C + c];",
                 "for (int64_t b = warp; b < f.blocks; b += kFinishParamWarps)",
                 "const int64_t next = row + warps_total;"]:
        assert expr in SRC, expr
    assert re.search(r"int64_t row = static_cast<int64_t>\(blockIdx.x\) \* kFwdRowsWarps \+ threadIdx.x / kWarp;",
                     SRC)
