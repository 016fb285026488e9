// adaLN-modulated LayerNorm / RMSNorm, alone and fused with the gated residual, forward and backward.
//
// Semantics are those of the Triton launchers in kernels/modulated_layer_norm.py (and of the plain-PyTorch
// references in fastsemdiff/nn/norm.py):
//   rows:        x viewed as [M, C] (unit column stride, any 16-byte-multiple row stride), M = B * N
//   modulation:  shift/scale/gate are [M / tokens_per_mod_row, C]; row r uses modulation row
//                r / tokens_per_mod_row (tokens_per_mod_row = N: per-sample, 1: per-token)
//   LayerNorm:   mean = mean(x), var = mean((x - mean)^2), rstd = 1 / sqrt(var + eps), xhat = (x - mean) * rstd
//   RMSNorm:     mean = 0 (stored as 0), rstd = 1 / sqrt(mean(x^2) + eps), xhat = x * rstd
//   a = xhat * w + b (where present); y = a * (1 + scale) + shift, stored in x's dtype; all math in fp32.
//   gated:       x_out = x + gate * h (fp32 math, stored in x's dtype); y normalises the stored x_out.
//
// Layout on the GPU. Each row is read and written in 16-byte vectors (8 x bf16/fp16, 4 x fp32) and held in
// registers, 8 elements per thread: a team of ceil(C / 8) threads (rounded up to whole warps) owns one row.
// A one-warp team (C <= 256) reduces with warp shuffles only and a block holds 4 such rows; wider teams are
// a whole block and reduce through shared memory. The backward splits each group of rows that shares a
// modulation row (a sample; all M rows for per-token modulation) into a few row ranges ("workers"). A worker
// walks its rows and keeps its partial sums of dshift/dscale/dgate (per-sample) and dweight/dbias in fp32
// registers, then writes one fp32 [C] row per sum; at::sum over those small [workers, C] buffers finishes
// the reductions. No [M, C] fp32 temporary is made. Per-token dshift/dscale/dgate are elementwise and are
// written directly.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "cuda_ops.h"

namespace fastsemdiff {
namespace {

constexpr int kElemsPerThread = 8;
constexpr int kWarp = 32;

// ------------------------------------------------------------------------------------------- device helpers
// One 16-byte vector of U: the unit of every global load and store below.
template <typename U>
struct alignas(kVectorBytes) Pack {
  static constexpr int kSize = kVectorBytes / static_cast<int>(sizeof(U));
  U v[kSize];
};

// Loads N consecutive elements of U (N * sizeof(U) a multiple of 16 bytes, p 16-byte aligned) as floats.
template <typename U, int N>
__device__ __forceinline__ void load_vec(const U* __restrict__ p, float (&out)[N]) {
  constexpr int kPer = Pack<U>::kSize;
  static_assert(N % kPer == 0, "a vector is a whole number of 16-byte packs");
#pragma unroll
  for (int k = 0; k < N / kPer; ++k) {
    const Pack<U> pk = *reinterpret_cast<const Pack<U>*>(p + k * kPer);
#pragma unroll
    for (int j = 0; j < kPer; ++j) out[k * kPer + j] = static_cast<float>(pk.v[j]);
  }
}

// Stores N floats as N consecutive elements of U (rounded to nearest), p 16-byte aligned.
template <typename U, int N>
__device__ __forceinline__ void store_vec(U* __restrict__ p, const float (&in)[N]) {
  constexpr int kPer = Pack<U>::kSize;
  static_assert(N % kPer == 0, "a vector is a whole number of 16-byte packs");
#pragma unroll
  for (int k = 0; k < N / kPer; ++k) {
    Pack<U> pk;
#pragma unroll
    for (int j = 0; j < kPer; ++j) pk.v[j] = static_cast<U>(in[k * kPer + j]);
    *reinterpret_cast<Pack<U>*>(p + k * kPer) = pk;
  }
}

// Sums each of v[0..N) over the team that owns this row; every thread of the team gets the totals.
// A one-warp team (warps_per_row == 1) uses shuffles only: no block barrier, so its warp may leave the
// kernel early. A wider team is the whole block (one row per block), which reaches every barrier together.
// smem holds kWarp * N floats.
template <int N>
__device__ __forceinline__ void team_sum(float (&v)[N], float* smem, int warps_per_row) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
  if (warps_per_row == 1) return;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) smem[warp * N + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float s = 0.f;
    for (int w = 0; w < warps_per_row; ++w) s += smem[w * N + k];  // same order in every thread
    v[k] = s;
  }
  __syncthreads();  // smem may be reused by the next reduction
}

// ------------------------------------------------------------------------------------------------ forward
struct FwdParams {
  const void* x;
  int64_t x_stride;
  const void* h;  // gated only
  int64_t h_stride;
  const void* gate;  // gated only
  int64_t gate_stride;
  const void* shift;
  int64_t shift_stride;
  const void* scale;
  int64_t scale_stride;
  const float* weight;  // fp32 [C] or nullptr
  const float* bias;    // fp32 [C] or nullptr
  void* y;              // [M, C] contiguous, x's dtype
  void* x_out;          // gated only: [M, C] contiguous, x's dtype
  float* mean;          // [M]
  float* rstd;          // [M]
  int64_t M;
  int C;
  int64_t tokens_per_mod_row;
  float eps;
  bool rms;
  int warps_per_row;
};

// T: x's (and h's, y's, x_out's) dtype. TM: the modulation's dtype (T, or float when they differ).
template <typename T, typename TM, bool GATED>
__global__ void __launch_bounds__(1024) adaln_fwd_kernel(const FwdParams p) {
  constexpr int VEC = kVectorBytes / sizeof(T);  // elements per 16-byte vector of x
  constexpr int CH = kElemsPerThread / VEC;      // vectors per thread: 1 (16-bit), 2 (fp32)
  __shared__ float smem[kWarp];

  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.M) return;  // only with one-warp teams (several rows per block), which use no barrier
  const int C = p.C;
  const int nvec = C / VEC;
  const int tpr = blockDim.x;
  const int64_t mrow = row / p.tokens_per_mod_row;

  float v[CH][VEC];
  bool active[CH];
  const T* xr = static_cast<const T*>(p.x) + row * p.x_stride;
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    const int c = threadIdx.x + i * tpr;
    active[i] = c < nvec;
    if (active[i]) {
      load_vec<T, VEC>(xr + c * VEC, v[i]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i][j] = 0.f;
    }
  }

  if constexpr (GATED) {
    // x_out = x + gate * h in fp32, rounded to x's dtype; the norm below reads the rounded value.
    const T* hr = static_cast<const T*>(p.h) + row * p.h_stride;
    const TM* gr = static_cast<const TM*>(p.gate) + mrow * p.gate_stride;
    T* xo = static_cast<T*>(p.x_out) + row * C;
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      if (!active[i]) continue;
      const int c = threadIdx.x + i * tpr;
      float hv[VEC], gv[VEC];
      load_vec<T, VEC>(hr + c * VEC, hv);
      load_vec<TM, VEC>(gr + c * VEC, gv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i][j] = static_cast<float>(static_cast<T>(v[i][j] + gv[j] * hv[j]));
      store_vec<T, VEC>(xo + c * VEC, v[i]);
    }
  }

  // Statistics (two passes over the registers: mean, then the centred second moment).
  float mean = 0.f;
  float rstd;
  if (!p.rms) {
    float s[1] = {0.f};
#pragma unroll
    for (int i = 0; i < CH; ++i)
#pragma unroll
      for (int j = 0; j < VEC; ++j) s[0] += v[i][j];
    team_sum<1>(s, smem, p.warps_per_row);
    mean = s[0] / static_cast<float>(C);
  }
  {
    float q[1] = {0.f};
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      if (!active[i]) continue;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[i][j] - mean;
        q[0] += d * d;
      }
    }
    team_sum<1>(q, smem, p.warps_per_row);
    rstd = 1.f / sqrtf(q[0] / static_cast<float>(C) + p.eps);
  }

  const TM* shr = static_cast<const TM*>(p.shift) + mrow * p.shift_stride;
  const TM* scr = static_cast<const TM*>(p.scale) + mrow * p.scale_stride;
  T* yr = static_cast<T*>(p.y) + row * C;
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    if (!active[i]) continue;
    const int c = threadIdx.x + i * tpr;
    float sh[VEC], sc[VEC], out[VEC];
    load_vec<TM, VEC>(shr + c * VEC, sh);
    load_vec<TM, VEC>(scr + c * VEC, sc);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = (v[i][j] - mean) * rstd;
    if (p.weight != nullptr) {
      float w[VEC];
      load_vec<float, VEC>(p.weight + c * VEC, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] *= w[j];
    }
    if (p.bias != nullptr) {
      float b[VEC];
      load_vec<float, VEC>(p.bias + c * VEC, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] += b[j];
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = out[j] * (1.f + sc[j]) + sh[j];
    store_vec<T, VEC>(yr + c * VEC, out);
  }
  if (threadIdx.x == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

// ----------------------------------------------------------------------------------------------- backward
struct BwdParams {
  const void* dy;
  int64_t dy_stride;
  const void* dx_out;  // gated only: gradient of x_out
  int64_t dx_out_stride;
  const void* x;  // the normalised input: x (mln) or x_out (grmln)
  int64_t x_stride;
  const void* h;  // gated only
  int64_t h_stride;
  const void* gate;  // gated only
  int64_t gate_stride;
  const void* scale;
  int64_t scale_stride;
  const float* mean;
  const float* rstd;
  const float* weight;  // fp32 [C] or nullptr
  const float* bias;    // fp32 [C] or nullptr
  void* dx;             // [M, C] contiguous, x's dtype
  void* dh;             // gated only: [M, C] contiguous, x's dtype
  // per-token: [M, C] contiguous in TM; per-sample: fp32 partial sums [num_workers, C]
  void* dshift;
  void* dscale;
  void* dgate;     // gated only
  float* dw_part;  // fp32 [num_workers, C] or nullptr (no weight)
  float* db_part;  // fp32 [num_workers, C] or nullptr (no bias)
  int64_t M;
  int C;
  bool per_token;  // tokens_per_mod_row == 1
  bool rms;
  int warps_per_row;
  int64_t rows_per_group;     // tokens_per_mod_row (per-sample) or M (per-token)
  int64_t workers_per_group;  // row ranges per group
  int64_t rows_per_worker;
  int64_t num_workers;  // groups * workers_per_group
  int64_t rows_per_block;  // rows kernels only: block b owns rows [b * rows_per_block, (b + 1) * rows_per_block)
};

template <typename T, typename TM, bool GATED, int MAX_THREADS>
__global__ void __launch_bounds__(MAX_THREADS) adaln_bwd_kernel(const BwdParams p) {
  constexpr int VEC = kVectorBytes / sizeof(T);
  constexpr int CH = kElemsPerThread / VEC;
  __shared__ float smem[kWarp * 2];

  const int64_t worker = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (worker >= p.num_workers) return;  // only with one-warp teams, which use no barrier
  const int64_t group = worker / p.workers_per_group;
  const int64_t group_begin = group * p.rows_per_group;
  const int64_t row_begin = group_begin + (worker % p.workers_per_group) * p.rows_per_worker;
  const int64_t group_end = group_begin + p.rows_per_group;
  const int64_t row_end = row_begin + p.rows_per_worker < group_end ? row_begin + p.rows_per_worker : group_end;

  const int C = p.C;
  const int nvec = C / VEC;
  const int tpr = blockDim.x;
  const float inv_c = 1.f / static_cast<float>(C);
  const bool has_w = p.weight != nullptr;
  const bool has_b = p.bias != nullptr;

  bool active[CH];
  float w[CH][VEC], b[CH][VEC];
  float ops[CH][VEC];   // 1 + scale (per-sample: the group's; per-token: reloaded per row)
  float gate[CH][VEC];  // gated only
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    const int c = threadIdx.x + i * tpr;
    active[i] = c < nvec;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      w[i][j] = 1.f;
      b[i][j] = 0.f;
      ops[i][j] = 1.f;
      gate[i][j] = 0.f;
    }
    if (!active[i]) continue;
    if (has_w) load_vec<float, VEC>(p.weight + c * VEC, w[i]);
    if (has_b) load_vec<float, VEC>(p.bias + c * VEC, b[i]);
    if (!p.per_token) {  // one modulation row (row `group`) for all of this worker's rows
      load_vec<TM, VEC>(static_cast<const TM*>(p.scale) + group * p.scale_stride + c * VEC, ops[i]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ops[i][j] += 1.f;
      if constexpr (GATED) {
        load_vec<TM, VEC>(static_cast<const TM*>(p.gate) + group * p.gate_stride + c * VEC, gate[i]);
      }
    }
  }

  float acc_shift[CH][VEC], acc_scale[CH][VEC], acc_gate[CH][VEC], acc_w[CH][VEC], acc_b[CH][VEC];
#pragma unroll
  for (int i = 0; i < CH; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_shift[i][j] = 0.f;
      acc_scale[i][j] = 0.f;
      acc_gate[i][j] = 0.f;
      acc_w[i][j] = 0.f;
      acc_b[i][j] = 0.f;
    }

  for (int64_t row = row_begin; row < row_end; ++row) {
    const float mean = p.rms ? 0.f : p.mean[row];  // RMSNorm: xhat = x * rstd
    const float rstd = p.rstd[row];
    const T* xr = static_cast<const T*>(p.x) + row * p.x_stride;
    const T* dyr = static_cast<const T*>(p.dy) + row * p.dy_stride;

    float xhat[CH][VEC], dy[CH][VEC], g[CH][VEC];
    float sums[2] = {0.f, 0.f};  // sum(g), sum(g * xhat)
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int c = threadIdx.x + i * tpr;
      if (active[i]) {
        load_vec<T, VEC>(xr + c * VEC, xhat[i]);
        load_vec<T, VEC>(dyr + c * VEC, dy[i]);
        if (p.per_token) {
          load_vec<TM, VEC>(static_cast<const TM*>(p.scale) + row * p.scale_stride + c * VEC, ops[i]);
#pragma unroll
          for (int j = 0; j < VEC; ++j) ops[i][j] += 1.f;
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          xhat[i][j] = (xhat[i][j] - mean) * rstd;
          g[i][j] = dy[i][j] * ops[i][j] * w[i][j];  // d loss / d xhat
          sums[0] += g[i][j];
          sums[1] += g[i][j] * xhat[i][j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) xhat[i][j] = dy[i][j] = g[i][j] = 0.f;
      }
    }
    team_sum<2>(sums, smem, p.warps_per_row);
    const float mean_g = p.rms ? 0.f : sums[0] * inv_c;
    const float mean_gx = sums[1] * inv_c;

#pragma unroll
    for (int i = 0; i < CH; ++i) {
      if (!active[i]) continue;
      const int c = threadIdx.x + i * tpr;
      const int64_t off = row * C + c * VEC;  // offset in the contiguous [M, C] outputs
      float dx[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) dx[j] = (g[i][j] - mean_g - xhat[i][j] * mean_gx) * rstd;
      if constexpr (GATED) {
        // x_out = x + gate * h feeds both the residual stream (dx_out) and the norm (dx above).
        float dxo[VEC], hv[VEC], dh[VEC], dg[VEC];
        load_vec<T, VEC>(static_cast<const T*>(p.dx_out) + row * p.dx_out_stride + c * VEC, dxo);
        load_vec<T, VEC>(static_cast<const T*>(p.h) + row * p.h_stride + c * VEC, hv);
        if (p.per_token) {
          load_vec<TM, VEC>(static_cast<const TM*>(p.gate) + row * p.gate_stride + c * VEC, gate[i]);
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          dx[j] += dxo[j];
          dh[j] = gate[i][j] * dx[j];
          dg[j] = dx[j] * hv[j];
        }
        store_vec<T, VEC>(static_cast<T*>(p.dh) + off, dh);
        if (p.per_token) {
          store_vec<TM, VEC>(static_cast<TM*>(p.dgate) + off, dg);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc_gate[i][j] += dg[j];
        }
      }
      store_vec<T, VEC>(static_cast<T*>(p.dx) + off, dx);

      float dsc[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) dsc[j] = dy[i][j] * (xhat[i][j] * w[i][j] + b[i][j]);
      if (p.per_token) {
        store_vec<TM, VEC>(static_cast<TM*>(p.dshift) + off, dy[i]);
        store_vec<TM, VEC>(static_cast<TM*>(p.dscale) + off, dsc);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          acc_shift[i][j] += dy[i][j];
          acc_scale[i][j] += dsc[j];
        }
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float dnorm = dy[i][j] * ops[i][j];
        acc_w[i][j] += dnorm * xhat[i][j];
        acc_b[i][j] += dnorm;
      }
    }
  }

  // This worker's partial sums: one fp32 [C] row each.
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    if (!active[i]) continue;
    const int64_t off = worker * C + (threadIdx.x + i * tpr) * VEC;
    if (!p.per_token) {
      store_vec<float, VEC>(static_cast<float*>(p.dshift) + off, acc_shift[i]);
      store_vec<float, VEC>(static_cast<float*>(p.dscale) + off, acc_scale[i]);
      if constexpr (GATED) store_vec<float, VEC>(static_cast<float*>(p.dgate) + off, acc_gate[i]);
    }
    if (has_w) store_vec<float, VEC>(p.dw_part + off, acc_w[i]);
    if (has_b) store_vec<float, VEC>(p.db_part + off, acc_b[i]);
  }
}

// ===================================================================================== the "rows" variants
// Variant 1 of the forward, variants 1 (4-row tiles; 2 for the gated op) and 2 (2-row tiles) of the backward (csrc/adaln.cu's NormConfig picks; the baseline
// kernels above are variant 0). Both walk a persistent grid (SM count x resident blocks) so that every SM
// keeps several rows' 16-byte loads in flight and no block waits on a second wave.
//
// Forward: one row per warp (32 lanes x up to kRowElems elements: C <= 1280), four warps per block, rows
// grid-strided over all warps; the next row's x (and h) are loaded before the current row's two warp-shuffle
// reductions. No block barrier.
//
// Backward: one row across the block (ceil(C / 8) threads rounded to warps, 8 elements per thread as in the
// baseline; C <= 1536), R rows per tile (R / 2 for fp32 x): the tile's x and dy loads are all issued
// before its reductions (dx_out and h, when gated, all right after them), and the tile's 2R row sums share
// one block barrier (double-buffered shared memory).
// Block b owns the contiguous rows [b L, (b + 1) L). Per-sample sums: the block's rows of group g (a
// "segment") are summed in fp32 registers and written once to slot b + g of a [blocks + groups - 1, C] fp32
// buffer (consecutive segments in row order have consecutive b + g, so no two segments share a slot; a slot
// is skipped where a block and a group end on the same row and is never read). dweight/dbias: one [C] row
// per block. adaln_bwd_finish_kernel then writes each group's sum over its blocks b_lo(g)..b_hi(g) (and the
// column sums of the weight/bias partials) in the outputs' dtypes. No atomics. tests/test_csrc_worksplit.py
// re-implements this indexing in Python and checks it against direct sums.
constexpr int kRowElems = 40;                       // elements per lane, one-row-per-warp forward
constexpr int kFwdRowsMaxC = kWarp * kRowElems;     // 1280
constexpr int kFwdRowsWarps = 4;                    // rows (warps) per block
// Threads per row of the rows backward (C <= 1536), and the launch bound's two resident blocks per SM at that
// size: at most 170 registers a thread, which the tiles below fit without spilling.
constexpr int kBwdRowsMaxThreads = 192;
constexpr int kBwdRowsMinBlocks = 2;
constexpr int kBwdRowsMaxWarps = kBwdRowsMaxThreads / kWarp;

// 16-byte streaming accesses (read or written once: evict first, keep the modulation rows in L2).
template <typename U>
__device__ __forceinline__ Pack<U> load_stream(const U* __restrict__ p) {
  const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
  Pack<U> pk;
  static_assert(sizeof(Pack<U>) == sizeof(uint4), "a pack is 16 bytes");
  memcpy(&pk, &raw, sizeof(raw));
  return pk;
}

template <typename U, int N>
__device__ __forceinline__ void unpack(const Pack<U>& pk, float (&out)[N]) {
  static_assert(N == Pack<U>::kSize, "one pack");
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = static_cast<float>(pk.v[j]);
}

template <typename U, int N>
__device__ __forceinline__ void store_stream(U* __restrict__ p, const float (&in)[N]) {
  static_assert(N == Pack<U>::kSize, "one pack");
  Pack<U> pk;
#pragma unroll
  for (int j = 0; j < N; ++j) pk.v[j] = static_cast<U>(in[j]);
  uint4 raw;
  memcpy(&raw, &pk, sizeof(raw));
  __stcs(reinterpret_cast<uint4*>(p), raw);
}

// Makes a pack's registers opaque to the compiler: a conversion after this point cannot reuse one made
// before it, so a tile kept in packs across a reduction is not kept as floats (twice the registers) instead.
template <typename U>
__device__ __forceinline__ void opaque(Pack<U>& pk) {
  uint4 raw;
  memcpy(&raw, &pk, sizeof(raw));
  asm volatile("" : "+r"(raw.x), "+r"(raw.y), "+r"(raw.z), "+r"(raw.w));
  memcpy(&pk, &raw, sizeof(raw));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T, typename TM, bool GATED>
__global__ void __launch_bounds__(kFwdRowsWarps * kWarp) adaln_fwd_rows_kernel(const FwdParams p) {
  constexpr int VEC = kVectorBytes / sizeof(T);
  constexpr int NV = kRowElems / VEC;  // vectors per lane: 5 (16-bit), 10 (fp32)
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kFwdRowsWarps;
  int64_t row = static_cast<int64_t>(blockIdx.x) * kFwdRowsWarps + threadIdx.x / kWarp;
  if (row >= p.M) return;  // the whole warp (no block barrier in this kernel)
  const int C = p.C;
  const int nvec = C / VEC;
  const float inv_c = 1.f / static_cast<float>(C);
  bool active[NV];
#pragma unroll
  for (int k = 0; k < NV; ++k) active[k] = lane + k * kWarp < nvec;

  Pack<T> xa[NV], ha[NV];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    if (!active[k]) continue;
    const int64_t e = static_cast<int64_t>(lane + k * kWarp) * VEC;
    xa[k] = load_stream(static_cast<const T*>(p.x) + row * p.x_stride + e);
    if constexpr (GATED) ha[k] = load_stream(static_cast<const T*>(p.h) + row * p.h_stride + e);
  }
  while (true) {
    // The next row's loads go out before this row's reductions.
    const int64_t next = row + warps_total;
    const bool has_next = next < p.M;
    Pack<T> xb[NV], hb[NV];
    if (has_next) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        if (!active[k]) continue;
        const int64_t e = static_cast<int64_t>(lane + k * kWarp) * VEC;
        xb[k] = load_stream(static_cast<const T*>(p.x) + next * p.x_stride + e);
        if constexpr (GATED) hb[k] = load_stream(static_cast<const T*>(p.h) + next * p.h_stride + e);
      }
    }

    // The row stays in its 16-byte packs (half the registers of floats for 16-bit x) and is converted at
    // each of its three uses.
    const int64_t mrow = row / p.tokens_per_mod_row;
    if constexpr (GATED) {
      // x_out = x + gate * h in fp32, rounded to x's dtype; the norm reads the rounded value (kept in xa).
      const TM* gr = static_cast<const TM*>(p.gate) + mrow * p.gate_stride;
      T* xo = static_cast<T*>(p.x_out) + row * C;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        if (!active[k]) continue;
        const int c = (lane + k * kWarp) * VEC;
        float xv[VEC], hv[VEC], gv[VEC];
        unpack(xa[k], xv);
        unpack(ha[k], hv);
        load_vec<TM, VEC>(gr + c, gv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) xa[k].v[j] = static_cast<T>(xv[j] + gv[j] * hv[j]);
        uint4 raw;
        memcpy(&raw, &xa[k], sizeof(raw));
        __stcs(reinterpret_cast<uint4*>(xo + c), raw);
      }
    }
    float mean = 0.f;
    if (!p.rms) {
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        if (!active[k]) continue;
        float xv[VEC];
        unpack(xa[k], xv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += xv[j];
      }
      mean = warp_sum(s) * inv_c;
    }
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (!active[k]) continue;
      float xv[VEC];
      unpack(xa[k], xv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = xv[j] - mean;
        q += d * d;
      }
    }
    const float rstd = 1.f / sqrtf(warp_sum(q) * inv_c + p.eps);

    const TM* shr = static_cast<const TM*>(p.shift) + mrow * p.shift_stride;
    const TM* scr = static_cast<const TM*>(p.scale) + mrow * p.scale_stride;
    T* yr = static_cast<T*>(p.y) + row * C;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (!active[k]) continue;
      const int c = (lane + k * kWarp) * VEC;
      float sh[VEC], sc[VEC], out[VEC];
      unpack(xa[k], out);
      load_vec<TM, VEC>(shr + c, sh);
      load_vec<TM, VEC>(scr + c, sc);
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = (out[j] - mean) * rstd;
      if (p.weight != nullptr) {
        float w[VEC];
        load_vec<float, VEC>(p.weight + c, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] *= w[j];
      }
      if (p.bias != nullptr) {
        float b[VEC];
        load_vec<float, VEC>(p.bias + c, b);
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] += b[j];
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = out[j] * (1.f + sc[j]) + sh[j];
      store_stream<T, VEC>(yr + c, out);
    }
    if (lane == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
    if (!has_next) break;
    row = next;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if (!active[k]) continue;
      xa[k] = xb[k];
      if constexpr (GATED) ha[k] = hb[k];
    }
  }
}

// A thread's share of the rows backward: its 8 columns (CH vectors of VEC) of the parameters, of the current
// group's modulation, and of the running sums.
template <int CH, int VEC>
struct BwdRowsState {
  bool active[CH];
  float w[CH][VEC], b[CH][VEC];
  float ops[CH][VEC];   // 1 + scale: the current group's (per-sample) or the current row's (per-token)
  float gate[CH][VEC];  // gated only, as ops
  float acc_shift[CH][VEC], acc_scale[CH][VEC], acc_gate[CH][VEC];  // per-sample: the current segment's
  float acc_w[CH][VEC], acc_b[CH][VEC];                             // the block's
};

// One tile of RT rows [t0, t0 + RT) clipped to `end`: all loads, one block reduction of the 2 RT row sums,
// then dx (dh), the per-row outputs (per-token) and the running sums.
template <typename T, typename TM, bool GATED, int RT, bool PER_TOKEN, int CH, int VEC>
__device__ __forceinline__ void bwd_rows_tile(const BwdParams& p, int64_t t0, int64_t end,
                                              BwdRowsState<CH, VEC>& s, float* smem, int& buf) {
  const int C = p.C;
  const int tpr = blockDim.x;
  const int nwarps = tpr / kWarp;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const float inv_c = 1.f / static_cast<float>(C);

  bool valid[RT];
  float mean[RT], rstd[RT];
  Pack<T> xr[RT][CH], dyr[RT][CH], dxor[RT][CH], hr[RT][CH];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int64_t row = t0 + r;
    valid[r] = row < end;  // the same in every thread of the block
    mean[r] = 0.f;
    rstd[r] = 0.f;
    if (!valid[r]) continue;
    if (!p.rms) mean[r] = p.mean[row];
    rstd[r] = p.rstd[row];
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      if (!s.active[i]) continue;
      const int64_t e = static_cast<int64_t>(threadIdx.x + i * tpr) * VEC;
      xr[r][i] = load_stream(static_cast<const T*>(p.x) + row * p.x_stride + e);
      dyr[r][i] = load_stream(static_cast<const T*>(p.dy) + row * p.dy_stride + e);
    }
  }
  if constexpr (PER_TOKEN) {
    static_assert(!PER_TOKEN || RT == 1, "per-token tiles are one row (its own modulation row)");
    if (valid[0]) {
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        if (!s.active[i]) continue;
        const int64_t e = static_cast<int64_t>(threadIdx.x + i * tpr) * VEC;
        load_vec<TM, VEC>(static_cast<const TM*>(p.scale) + t0 * p.scale_stride + e, s.ops[i]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) s.ops[i][j] += 1.f;
        if constexpr (GATED) load_vec<TM, VEC>(static_cast<const TM*>(p.gate) + t0 * p.gate_stride + e, s.gate[i]);
      }
    }
  }

  // The tile stays in its 16-byte packs (x, dy: 8 registers a row for 16-bit x) and is converted in each phase.
  float sums[2 * RT];  // per row: sum(g), sum(g * xhat), g = dy (1 + scale) w = d loss / d xhat
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    sums[2 * r] = 0.f;
    sums[2 * r + 1] = 0.f;
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      if (!(valid[r] && s.active[i])) continue;
      float xv[VEC], dv[VEC];
      unpack(xr[r][i], xv);
      unpack(dyr[r][i], dv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = (xv[j] - mean[r]) * rstd[r];
        const float g = dv[j] * s.ops[i][j] * s.w[i][j];
        sums[2 * r] += g;
        sums[2 * r + 1] += g * xhat;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < 2 * RT; ++k) sums[k] = warp_sum(sums[k]);
  if (nwarps > 1) {  // the same in every thread
    // smem: [2 buffers][kBwdRowsMaxWarps][2 RT]; alternating buffers make one barrier per tile enough (a
    // buffer is rewritten two tiles later, after every thread has passed the barrier in between).
    float* sb = smem + buf * (kBwdRowsMaxWarps * 2 * RT);
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < 2 * RT; ++k) sb[warp * 2 * RT + k] = sums[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 2 * RT; ++k) {
      float t = 0.f;
      for (int w = 0; w < nwarps; ++w) t += sb[w * 2 * RT + k];  // same order in every thread
      sums[k] = t;
    }
    buf ^= 1;
  }
#pragma unroll
  for (int r = 0; r < RT; ++r) {
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      if (!(valid[r] && s.active[i])) continue;
      opaque(xr[r][i]);
      opaque(dyr[r][i]);
    }
  }
  if constexpr (GATED) {
    // dx_out and h feed only the outputs: loaded (the whole tile's, back to back) after the reduction, so
    // that they do not hold registers across it (they made the gated kernels spill at 2 blocks per SM).
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      if (!valid[r]) continue;
      const int64_t row = t0 + r;
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        if (!s.active[i]) continue;
        const int64_t e = static_cast<int64_t>(threadIdx.x + i * tpr) * VEC;
        dxor[r][i] = load_stream(static_cast<const T*>(p.dx_out) + row * p.dx_out_stride + e);
        hr[r][i] = load_stream(static_cast<const T*>(p.h) + row * p.h_stride + e);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RT; ++r) {
    if (!valid[r]) continue;
    const int64_t row = t0 + r;
    const float mean_g = p.rms ? 0.f : sums[2 * r] * inv_c;
    const float mean_gx = sums[2 * r + 1] * inv_c;
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      if (!s.active[i]) continue;
      const int64_t off = row * C + static_cast<int64_t>(threadIdx.x + i * tpr) * VEC;  // contiguous outputs
      float xh[VEC], dy[VEC], dx[VEC];
      unpack(xr[r][i], xh);
      unpack(dyr[r][i], dy);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xh[j] = (xh[j] - mean[r]) * rstd[r];
        const float g = dy[j] * s.ops[i][j] * s.w[i][j];
        dx[j] = (g - mean_g - xh[j] * mean_gx) * rstd[r];
      }
      if constexpr (GATED) {
        // x_out = x + gate * h feeds both the residual stream (dx_out) and the norm (dx above).
        float dxo[VEC], hv[VEC], dh[VEC], dg[VEC];
        unpack(dxor[r][i], dxo);
        unpack(hr[r][i], hv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          dx[j] += dxo[j];
          dh[j] = s.gate[i][j] * dx[j];
          dg[j] = dx[j] * hv[j];
        }
        store_stream<T, VEC>(static_cast<T*>(p.dh) + off, dh);
        if constexpr (PER_TOKEN) {
          store_vec<TM, VEC>(static_cast<TM*>(p.dgate) + off, dg);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) s.acc_gate[i][j] += dg[j];
        }
      }
      store_stream<T, VEC>(static_cast<T*>(p.dx) + off, dx);
      float dsc[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) dsc[j] = dy[j] * (xh[j] * s.w[i][j] + s.b[i][j]);
      if constexpr (PER_TOKEN) {
        store_vec<TM, VEC>(static_cast<TM*>(p.dshift) + off, dy);
        store_vec<TM, VEC>(static_cast<TM*>(p.dscale) + off, dsc);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          s.acc_shift[i][j] += dy[j];
          s.acc_scale[i][j] += dsc[j];
        }
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float dnorm = dy[j] * s.ops[i][j];
        s.acc_w[i][j] += dnorm * xh[j];
        s.acc_b[i][j] += dnorm;
      }
    }
  }
}

template <typename T, typename TM, bool GATED, int R>
__global__ void __launch_bounds__(kBwdRowsMaxThreads, kBwdRowsMinBlocks) adaln_bwd_rows_kernel(const BwdParams p) {
  constexpr int VEC = kVectorBytes / sizeof(T);
  constexpr int CH = kElemsPerThread / VEC;
  // R rows of 16-bit x a tile; R / 2 rows of fp32 x (the same bytes, and the same registers).
  constexpr int RT = sizeof(T) == 4 && R > 1 ? R / 2 : R;
  __shared__ float smem[2 * kBwdRowsMaxWarps * 2 * RT];
  const int C = p.C;
  const int nvec = C / VEC;
  const int tpr = blockDim.x;
  const int64_t blk = blockIdx.x;
  const int64_t r0 = blk * p.rows_per_block;
  const int64_t r1 = r0 + p.rows_per_block < p.M ? r0 + p.rows_per_block : p.M;

  BwdRowsState<CH, VEC> s;
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    const int c = threadIdx.x + i * tpr;
    s.active[i] = c < nvec;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s.w[i][j] = 1.f;
      s.b[i][j] = 0.f;
      s.ops[i][j] = 1.f;
      s.gate[i][j] = 0.f;
      s.acc_shift[i][j] = s.acc_scale[i][j] = s.acc_gate[i][j] = 0.f;
      s.acc_w[i][j] = s.acc_b[i][j] = 0.f;
    }
    if (!s.active[i]) continue;
    if (p.weight != nullptr) load_vec<float, VEC>(p.weight + c * VEC, s.w[i]);
    if (p.bias != nullptr) load_vec<float, VEC>(p.bias + c * VEC, s.b[i]);
  }

  int buf = 0;
  if (p.per_token) {
    for (int64_t row = r0; row < r1; ++row) bwd_rows_tile<T, TM, GATED, 1, true>(p, row, r1, s, smem, buf);
  } else {
    for (int64_t seg = r0; seg < r1;) {
      const int64_t group = seg / p.rows_per_group;
      const int64_t seg_end = (group + 1) * p.rows_per_group < r1 ? (group + 1) * p.rows_per_group : r1;
#pragma unroll
      for (int i = 0; i < CH; ++i) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) s.acc_shift[i][j] = s.acc_scale[i][j] = s.acc_gate[i][j] = 0.f;
        if (!s.active[i]) continue;
        const int64_t e = static_cast<int64_t>(threadIdx.x + i * tpr) * VEC;
        load_vec<TM, VEC>(static_cast<const TM*>(p.scale) + group * p.scale_stride + e, s.ops[i]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) s.ops[i][j] += 1.f;
        if constexpr (GATED) load_vec<TM, VEC>(static_cast<const TM*>(p.gate) + group * p.gate_stride + e, s.gate[i]);
      }
      for (int64_t t0 = seg; t0 < seg_end; t0 += RT) bwd_rows_tile<T, TM, GATED, RT, false>(p, t0, seg_end, s, smem, buf);
      // This segment's sums: slot blk + group (see the comment above kRowElems).
#pragma unroll
      for (int i = 0; i < CH; ++i) {
        if (!s.active[i]) continue;
        const int64_t off = (blk + group) * C + static_cast<int64_t>(threadIdx.x + i * tpr) * VEC;
        store_vec<float, VEC>(static_cast<float*>(p.dshift) + off, s.acc_shift[i]);
        store_vec<float, VEC>(static_cast<float*>(p.dscale) + off, s.acc_scale[i]);
        if constexpr (GATED) store_vec<float, VEC>(static_cast<float*>(p.dgate) + off, s.acc_gate[i]);
      }
      seg = seg_end;
    }
  }
#pragma unroll
  for (int i = 0; i < CH; ++i) {
    if (!s.active[i]) continue;
    const int64_t off = blk * C + static_cast<int64_t>(threadIdx.x + i * tpr) * VEC;
    if (p.dw_part != nullptr) store_vec<float, VEC>(p.dw_part + off, s.acc_w[i]);
    if (p.db_part != nullptr) store_vec<float, VEC>(p.db_part + off, s.acc_b[i]);
  }
}

// Output dtypes the finishing kernel writes (anything else is written as fp32 and converted by the host).
enum OutDtype : int { kOutF32 = 0, kOutF16 = 1, kOutBF16 = 2, kOutF64 = 3 };

__device__ __forceinline__ void store_as(void* dst, int64_t i, int dtype, float v) {
  switch (dtype) {
    case kOutF16: static_cast<at::Half*>(dst)[i] = static_cast<at::Half>(v); break;
    case kOutBF16: static_cast<at::BFloat16*>(dst)[i] = static_cast<at::BFloat16>(v); break;
    case kOutF64: static_cast<double*>(dst)[i] = static_cast<double>(v); break;
    default: static_cast<float*>(dst)[i] = v;
  }
}

struct FinishParams {
  // per-sample sums (dshift, dscale, dgate): dst[g, c] = sum over b in [b_lo(g), b_hi(g)] of src[b + g, c]
  const float* sample_src[3];
  void* sample_dst[3];
  int sample_dtype[3];
  int n_sample;
  // weight/bias: dst[c] = sum over b < blocks of src[b, c]
  const float* param_src[2];
  void* param_dst[2];
  int param_dtype[2];
  int n_param;
  int64_t groups;
  int64_t rows_per_group;
  int64_t rows_per_block;
  int64_t blocks;
  int64_t sample_blocks;  // the grid's first sample_blocks blocks do the per-sample sums, the rest weight/bias
  int C;
};

constexpr int kFinishThreads = 256;
constexpr int kFinishParamWarps = kFinishThreads / kWarp;

__global__ void __launch_bounds__(kFinishThreads) adaln_bwd_finish_kernel(const FinishParams f) {
  const int C = f.C;
  if (blockIdx.x < f.sample_blocks) {  // one thread per (group, column)
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kFinishThreads + threadIdx.x;
    if (idx >= f.groups * C) return;
    const int64_t g = idx / C;
    const int64_t c = idx % C;
    const int64_t b_lo = g * f.rows_per_group / f.rows_per_block;
    const int64_t b_hi = ((g + 1) * f.rows_per_group - 1) / f.rows_per_block;
    for (int k = 0; k < f.n_sample; ++k) {
      float t = 0.f;
      for (int64_t b = b_lo; b <= b_hi; ++b) t += f.sample_src[k][(b + g) * C + c];
      store_as(f.sample_dst[k], idx, f.sample_dtype[k], t);
    }
    return;
  }
  // 32 columns per block, the blocks' partial rows split over 8 warps, then summed across the warps.
  __shared__ float red[2][kFinishParamWarps][kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) - f.sample_blocks) * kWarp + lane;
  for (int k = 0; k < f.n_param; ++k) {
    float t = 0.f;
    if (c < C) {
#pragma unroll 4
      for (int64_t b = warp; b < f.blocks; b += kFinishParamWarps) t += f.param_src[k][b * C + c];
    }
    red[k][warp][lane] = t;
  }
  __syncthreads();
  if (warp == 0 && c < C) {
    for (int k = 0; k < f.n_param; ++k) {
      float t = 0.f;
      for (int w = 0; w < kFinishParamWarps; ++w) t += red[k][w][lane];
      store_as(f.param_dst[k], c, f.param_dtype[k], t);
    }
  }
}

// ------------------------------------------------------------------------------------------- host helpers
// x's dtype: the kernels are instantiated for fp32, fp16 and bf16 only (no fp64).
#define FASTSEMDIFF_DISPATCH_X(DTYPE, OP, ...)                                                     \
  switch (DTYPE) {                                                                               \
    case at::kFloat: {                                                                           \
      using scalar_t = float;                                                                    \
      __VA_ARGS__();                                                                             \
      break;                                                                                     \
    }                                                                                            \
    case at::kHalf: {                                                                            \
      using scalar_t = at::Half;                                                                 \
      __VA_ARGS__();                                                                             \
      break;                                                                                     \
    }                                                                                            \
    case at::kBFloat16: {                                                                        \
      using scalar_t = at::BFloat16;                                                             \
      __VA_ARGS__();                                                                             \
      break;                                                                                     \
    }                                                                                            \
    default:                                                                                     \
      TORCH_CHECK(false, OP, ": x must be float32, float16 or bfloat16, got ", DTYPE);           \
  }

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

struct RowLaunch {
  int threads_per_row;  // a multiple of 32, at most 1024
  int rows_per_block;   // 4 for one-warp teams, else 1
  int warps_per_row;
};

RowLaunch row_launch(int64_t C) {
  const int threads = static_cast<int>((C / kElemsPerThread + kWarp - 1) / kWarp * kWarp);
  return {threads, threads == kWarp ? 4 : 1, threads / kWarp};
}

void check_cuda(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " is on ", t.device(), "; ", kCudaOnlyMessage);
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

void check_channels(int64_t C, const char* op) {
  TORCH_CHECK(C > 0 && C % kChannelMultiple == 0, op, ": C=", C, " is not a positive multiple of ",
              kChannelMultiple, " (the 16-byte vectorised CUDA kernels need it; use backend='triton')");
  TORCH_CHECK(C <= kMaxChannels, op, ": C=", C, " exceeds the CUDA kernels' row limit of ", kMaxChannels,
              " (use backend='triton')");
}

// A 2-D [rows, C] operand with unit column stride (copied only when it has none).
at::Tensor rows_of(const at::Tensor& t, int64_t rows, int64_t C, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == C, op, ": ", name, " must be [", rows, ", ", C,
              "], got ", t.sizes());
  return t.stride(1) == 1 ? t : t.contiguous();
}

// 16-byte vector access needs a 16-byte aligned start and a row stride that keeps every row aligned.
void check_aligned(const at::Tensor& t, const char* op, const char* name) {
  const auto addr = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  TORCH_CHECK(addr % kVectorBytes == 0, op, ": ", name, " does not start at a 16-byte aligned address (",
              "the vectorised CUDA kernels need it; use backend='triton')");
  TORCH_CHECK(t.size(0) <= 1 || (t.stride(0) * t.element_size()) % kVectorBytes == 0, op, ": the row stride of ",
              name, " (", t.stride(0), " elements) is not a multiple of 16 bytes (the vectorised CUDA kernels ",
              "need it; use backend='triton')");
}

// The optional affine parameter as a contiguous, aligned fp32 [C] tensor (undefined when absent).
at::Tensor param_f32(const std::optional<at::Tensor>& p, const at::Tensor& x, int64_t C, const char* op,
                     const char* name) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  check_cuda(*p, x, op, name);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == C, op, ": ", name, " must be [", C, "], got ", p->sizes());
  TORCH_CHECK(at::isFloatingType(p->scalar_type()), op, ": ", name, " must be a floating tensor");
  at::Tensor out = p->to(at::kFloat).contiguous();
  if (reinterpret_cast<std::uintptr_t>(out.data_ptr()) % kVectorBytes != 0) out = out.clone();
  return out;
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
float* mutable_ptr_or_null(at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// The dtype the kernels read the modulation in: x's dtype when every modulation tensor has it, else fp32.
at::ScalarType mod_dtype(const at::Tensor& x, std::initializer_list<const at::Tensor*> mods, const char* op) {
  bool same = true;
  for (const at::Tensor* m : mods) {
    TORCH_CHECK(at::isFloatingType(m->scalar_type()), op, ": the modulation must be floating, got ",
                m->scalar_type());
    same = same && m->scalar_type() == x.scalar_type();
  }
  return same ? x.scalar_type() : at::kFloat;
}

int64_t check_tokens_per_mod_row(int64_t tpm, int64_t M, const char* op) {
  TORCH_CHECK(tpm >= 1 && M % tpm == 0, op, ": tokens_per_mod_row=", tpm, " must be >= 1 and divide M=", M);
  return M / tpm;
}

at::Tensor empty_param_grad(const at::Tensor& x) { return at::empty({0}, x.options().dtype(at::kFloat)); }

at::Tensor param_grad_or_empty(const at::Tensor& part, const std::optional<at::Tensor>& p, const at::Tensor& x) {
  if (!part.defined()) return empty_param_grad(x);
  return part.sum(0).to(p->scalar_type());
}

// x of a norm op: a CUDA [M, C] tensor of a kernel dtype with a width the kernels take; returns (M, C).
std::pair<int64_t, int64_t> check_rows_input(const at::Tensor& x_in, const char* op) {
  check_cuda(x_in, x_in, op, "x");
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be [M, C], got ", x_in.sizes());
  TORCH_CHECK(is_kernel_dtype(x_in.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x_in.scalar_type());
  check_channels(x_in.size(1), op);
  return {x_in.size(0), x_in.size(1)};
}

// ------------------------------------------------------------------------------------ variant selection
// Which kernels run: the forward variant (0: adaln_fwd_kernel, 1: adaln_fwd_rows_kernel), the backward
// variant (0: adaln_bwd_kernel, 1: adaln_bwd_rows_kernel with 4-row tiles (the gated op: 2), 2: 2-row tiles) and the
// resident blocks per SM the rows kernels size their persistent grid for (0: the occupancy calculator's
// figure). A variant < 0 means "the table's choice" (choose_*_variant below). Set by the op
// fastsemdiff_C::norm_config (tests, the tuner), or by FASTSEMDIFF_CUDA_NORM_CONFIG="fwd,bwd[,bps]", read at the
// first norm call.
// A rows variant that does not take a width (forward: C > 1280; backward: C > 1536) runs variant 0.
constexpr int kFwdVariants = 2;
constexpr int kBwdVariants = 3;

struct NormConfigState {
  std::atomic<int> fwd{-1};
  std::atomic<int> bwd{-1};
  std::atomic<int> blocks_per_sm{0};
  NormConfigState() {
    const char* env = std::getenv("FASTSEMDIFF_CUDA_NORM_CONFIG");
    if (env == nullptr || *env == '\0') return;
    int f = -1, b = -1, bps = 0;
    const int n = std::sscanf(env, "%d,%d,%d", &f, &b, &bps);
    // Read on the first norm call (norm_config_state is built then), so a bad value is that call's error.
    TORCH_CHECK(n >= 2 && f >= -1 && f < kFwdVariants && b >= -1 && b < kBwdVariants && bps >= 0 && bps <= 32,
                "FASTSEMDIFF_CUDA_NORM_CONFIG=", env, " is not \"fwd,bwd[,blocks_per_sm]\" with fwd in -1..",
                kFwdVariants - 1, ", bwd in -1..", kBwdVariants - 1, " and blocks_per_sm in 0..32 (unset it, or see "
                "csrc/adaln.cu)");
    fwd = f;
    bwd = b;
    blocks_per_sm = n == 3 ? bps : 0;
  }
};

NormConfigState& norm_config_state() {
  static NormConfigState state;
  return state;
}

// The table: measured choices per width and rows go here (scripts/gpu_check.py's tuning stage). Until a GPU
// run has shown a rows variant correct and faster, every width runs the baseline kernels.
int choose_fwd_variant(int64_t /*C*/, int64_t /*M*/) { return 0; }
int choose_bwd_variant(int64_t /*C*/, int64_t /*M*/) { return 0; }

int fwd_variant(int64_t C, int64_t M) {
  const int v = norm_config_state().fwd.load();
  const int chosen = v >= 0 ? v : choose_fwd_variant(C, M);
  return chosen == 1 && C > kFwdRowsMaxC ? 0 : chosen;
}

int bwd_variant(int64_t C, int64_t M) {
  const int v = norm_config_state().bwd.load();
  const int chosen = v >= 0 ? v : choose_bwd_variant(C, M);
  const int64_t threads = (C / kElemsPerThread + kWarp - 1) / kWarp * kWarp;
  return chosen != 0 && threads > kBwdRowsMaxThreads ? 0 : chosen;
}

// Resident blocks per SM of a kernel at a block size (the override, or the occupancy calculator's figure,
// asked once per kernel, block size and device).
int resident_blocks(const void* kernel, int threads) {
  const int forced = norm_config_state().blocks_per_sm.load();
  if (forced > 0) return forced;
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int>, int> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(kernel, threads, device);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
  blocks = std::max(blocks, 1);
  cache.emplace(key, blocks);
  return blocks;
}

std::vector<int64_t> norm_config(int64_t fwd, int64_t bwd, int64_t blocks_per_sm) {
  TORCH_CHECK(fwd >= -1 && fwd < kFwdVariants, "fastsemdiff_C::norm_config: fwd_variant=", fwd,
              " is not -1 (the table's choice) or a variant 0..", kFwdVariants - 1);
  TORCH_CHECK(bwd >= -1 && bwd < kBwdVariants, "fastsemdiff_C::norm_config: bwd_variant=", bwd,
              " is not -1 (the table's choice) or a variant 0..", kBwdVariants - 1);
  TORCH_CHECK(blocks_per_sm >= 0 && blocks_per_sm <= 32, "fastsemdiff_C::norm_config: blocks_per_sm=",
              blocks_per_sm, " is not 0 (the occupancy calculator's) or 1..32");
  NormConfigState& s = norm_config_state();
  std::vector<int64_t> previous{s.fwd.exchange(static_cast<int>(fwd)), s.bwd.exchange(static_cast<int>(bwd)),
                                s.blocks_per_sm.exchange(static_cast<int>(blocks_per_sm))};
  return previous;
}

// ------------------------------------------------------------------------------------------ forward host
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaln_fwd_impl(
    const char* op, const at::Tensor& x_in, const at::Tensor* h_in, const at::Tensor* gate_in,
    const at::Tensor& shift_in, const at::Tensor& scale_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t tokens_per_mod_row, bool rms) {
  const bool gated = h_in != nullptr;
  const std::pair<int64_t, int64_t> rows = check_rows_input(x_in, op);
  const int64_t M = rows.first;
  const int64_t C = rows.second;
  check_cuda(shift_in, x_in, op, "shift");
  check_cuda(scale_in, x_in, op, "scale");
  if (gated) {
    check_cuda(*h_in, x_in, op, "h");
    check_cuda(*gate_in, x_in, op, "gate");
    TORCH_CHECK(at::isFloatingType(h_in->scalar_type()), op, ": h must be a floating tensor");
  }
  c10::cuda::CUDAGuard guard(x_in.device());

  const auto opts = x_in.options();
  at::Tensor y = at::empty({M, C}, opts);
  at::Tensor x_out = gated ? at::empty({M, C}, opts) : at::Tensor();
  at::Tensor mean = at::empty({M}, opts.dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, opts.dtype(at::kFloat));
  const int64_t mod_rows = M == 0 ? shift_in.size(0) : check_tokens_per_mod_row(tokens_per_mod_row, M, op);
  if (M == 0) return {x_out, y, mean, rstd};
  TORCH_CHECK(M <= (int64_t{1} << 31) - 1, op, ": too many rows (", M, ")");

  const at::ScalarType md = gated ? mod_dtype(x_in, {gate_in, &shift_in, &scale_in}, op)
                                  : mod_dtype(x_in, {&shift_in, &scale_in}, op);
  const at::Tensor x = rows_of(x_in, M, C, op, "x");
  const at::Tensor shift = rows_of(shift_in, mod_rows, C, op, "shift").to(md);
  const at::Tensor scale = rows_of(scale_in, mod_rows, C, op, "scale").to(md);
  // h of another dtype (e.g. a bf16 branch output on an fp32 residual stream) is read in x's dtype.
  const at::Tensor h = gated ? rows_of(*h_in, M, C, op, "h").to(x.scalar_type()) : at::Tensor();
  const at::Tensor gate = gated ? rows_of(*gate_in, mod_rows, C, op, "gate").to(md) : at::Tensor();
  const at::Tensor w = param_f32(weight, x_in, C, op, "weight");
  const at::Tensor b = param_f32(bias, x_in, C, op, "bias");
  check_aligned(x, op, "x");
  check_aligned(shift, op, "shift");
  check_aligned(scale, op, "scale");
  if (gated) {
    check_aligned(h, op, "h");
    check_aligned(gate, op, "gate");
  }

  FwdParams p{};
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.h = gated ? h.data_ptr() : nullptr;
  p.h_stride = gated ? h.stride(0) : 0;
  p.gate = gated ? gate.data_ptr() : nullptr;
  p.gate_stride = gated ? gate.stride(0) : 0;
  p.shift = shift.data_ptr();
  p.shift_stride = shift.stride(0);
  p.scale = scale.data_ptr();
  p.scale_stride = scale.stride(0);
  p.weight = ptr_or_null(w);
  p.bias = ptr_or_null(b);
  p.y = y.data_ptr();
  p.x_out = gated ? x_out.data_ptr() : nullptr;
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.M = M;
  p.C = static_cast<int>(C);
  p.tokens_per_mod_row = tokens_per_mod_row;
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  const RowLaunch cfg = row_launch(C);
  p.warps_per_row = cfg.warps_per_row;

  const dim3 block(cfg.threads_per_row, cfg.rows_per_block);
  const dim3 grid(static_cast<unsigned>((M + cfg.rows_per_block - 1) / cfg.rows_per_block));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool mod_f32 = md != x.scalar_type();
  if (fwd_variant(C, M) == 1) {
    // One row per warp, a persistent grid: as many blocks as are resident at once, or one row per warp.
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const auto launch = [&](void (*kernel)(const FwdParams)) {
      const int threads = kFwdRowsWarps * kWarp;
      const int64_t wanted = (M + kFwdRowsWarps - 1) / kFwdRowsWarps;
      const int64_t resident = static_cast<int64_t>(sms) * resident_blocks(reinterpret_cast<const void*>(kernel),
                                                                           threads);
      kernel<<<static_cast<unsigned>(std::min(wanted, resident)), threads, 0, stream>>>(p);
    };
    FASTSEMDIFF_DISPATCH_X(x.scalar_type(), op, [&] {
      if (mod_f32 && !std::is_same<scalar_t, float>::value) {
        launch(gated ? &adaln_fwd_rows_kernel<scalar_t, float, true> : &adaln_fwd_rows_kernel<scalar_t, float, false>);
      } else {
        launch(gated ? &adaln_fwd_rows_kernel<scalar_t, scalar_t, true>
                     : &adaln_fwd_rows_kernel<scalar_t, scalar_t, false>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {x_out, y, mean, rstd};
  }
  FASTSEMDIFF_DISPATCH_X(x.scalar_type(), op, [&] {
    if (mod_f32 && !std::is_same<scalar_t, float>::value) {
      if (gated) adaln_fwd_kernel<scalar_t, float, true><<<grid, block, 0, stream>>>(p);
      else adaln_fwd_kernel<scalar_t, float, false><<<grid, block, 0, stream>>>(p);
    } else {
      if (gated) adaln_fwd_kernel<scalar_t, scalar_t, true><<<grid, block, 0, stream>>>(p);
      else adaln_fwd_kernel<scalar_t, scalar_t, false><<<grid, block, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_out, y, mean, rstd};
}

// ----------------------------------------------------------------------------------------- backward host
struct BwdOut {
  at::Tensor dx, dh, dgate, dshift, dscale, dweight, dbias;
};

// The rows backward's operands, prepared as adaln_bwd_impl prepares them for the baseline.
struct BwdRowsInputs {
  at::Tensor dy, x, dx_out, h, gate, scale, mean, rstd, w, b;
};

int out_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kOutF32;
    case at::kHalf: return kOutF16;
    case at::kBFloat16: return kOutBF16;
    case at::kDouble: return kOutF64;
    default: return -1;  // written as fp32, converted afterwards
  }
}

// The rows backward (variants 1, 2): the persistent-grid kernel, then one finishing launch for the per-sample
// and weight/bias sums (the work split is described above kRowElems).
void bwd_rows(const char* op, const BwdRowsInputs& in, BwdOut& out, const at::Tensor& scale_in,
              const at::Tensor* gate_in, const at::Tensor* h_in, const std::optional<at::Tensor>& weight,
              const std::optional<at::Tensor>& bias, int64_t M, int64_t C, int64_t mod_rows,
              int64_t tokens_per_mod_row, bool rms, at::ScalarType md, int variant) {
  const bool gated = h_in != nullptr;
  const bool per_token = tokens_per_mod_row == 1;
  const RowLaunch cfg = row_launch(C);
  const int threads = cfg.threads_per_row;  // <= kBwdRowsMaxThreads (bwd_variant checked)
  const bool mod_f32 = md != in.x.scalar_type();
  // Tiles of 4 rows (variant 1) or 2 (variant 2); the gated op takes 2-row tiles in both: with 4 rows of x, dy,
  // dx_out and h its kernel spills at the two-blocks-per-SM register bound.
  const int tile = variant == 1 && !gated ? 4 : 2;
  void (*kernel)(const BwdParams) = nullptr;
#define FASTSEMDIFF_BWD_ROWS_PICK(TM)                                                                 \
  if (gated) kernel = &adaln_bwd_rows_kernel<scalar_t, TM, true, 2>;                                  \
  else if (tile == 4) kernel = &adaln_bwd_rows_kernel<scalar_t, TM, false, 4>;                        \
  else kernel = &adaln_bwd_rows_kernel<scalar_t, TM, false, 2>;
  FASTSEMDIFF_DISPATCH_X(in.x.scalar_type(), op, [&] {
    if (mod_f32 && !std::is_same<scalar_t, float>::value) {
      FASTSEMDIFF_BWD_ROWS_PICK(float)
    } else {
      FASTSEMDIFF_BWD_ROWS_PICK(scalar_t)
    }
  });
#undef FASTSEMDIFF_BWD_ROWS_PICK

  // The split: one block per resident slot on the device (one wave), at least kBwdRowsMinRows rows a block
  // (fewer rows would write more partial sums than they read rows), none left empty.
  constexpr int64_t kBwdRowsMinRows = 8;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t resident = static_cast<int64_t>(sms) * resident_blocks(reinterpret_cast<const void*>(kernel), threads);
  int64_t blocks = std::max<int64_t>(1, std::min(resident, (M + kBwdRowsMinRows - 1) / kBwdRowsMinRows));
  const int64_t rows_per_block = (M + blocks - 1) / blocks;
  blocks = (M + rows_per_block - 1) / rows_per_block;
  const int64_t groups = per_token ? 1 : mod_rows;
  const int64_t slots = blocks + groups - 1;

  const auto opts = in.x.options();
  const auto f32 = opts.dtype(at::kFloat);
  at::Tensor dshift_buf, dscale_buf, dgate_buf;
  if (per_token) {
    dshift_buf = at::empty({M, C}, opts.dtype(md));
    dscale_buf = at::empty({M, C}, opts.dtype(md));
    if (gated) dgate_buf = at::empty({M, C}, opts.dtype(md));
  } else {
    dshift_buf = at::empty({slots, C}, f32);
    dscale_buf = at::empty({slots, C}, f32);
    if (gated) dgate_buf = at::empty({slots, C}, f32);
  }
  at::Tensor dw_part = in.w.defined() ? at::empty({blocks, C}, f32) : at::Tensor();
  at::Tensor db_part = in.b.defined() ? at::empty({blocks, C}, f32) : at::Tensor();

  BwdParams p{};
  p.dy = in.dy.data_ptr();
  p.dy_stride = in.dy.stride(0);
  p.dx_out = gated ? in.dx_out.data_ptr() : nullptr;
  p.dx_out_stride = gated ? in.dx_out.stride(0) : 0;
  p.x = in.x.data_ptr();
  p.x_stride = in.x.stride(0);
  p.h = gated ? in.h.data_ptr() : nullptr;
  p.h_stride = gated ? in.h.stride(0) : 0;
  p.gate = gated ? in.gate.data_ptr() : nullptr;
  p.gate_stride = gated ? in.gate.stride(0) : 0;
  p.scale = in.scale.data_ptr();
  p.scale_stride = in.scale.stride(0);
  p.mean = in.mean.data_ptr<float>();
  p.rstd = in.rstd.data_ptr<float>();
  p.weight = ptr_or_null(in.w);
  p.bias = ptr_or_null(in.b);
  p.dx = out.dx.data_ptr();
  p.dh = gated ? out.dh.data_ptr() : nullptr;
  p.dshift = dshift_buf.data_ptr();
  p.dscale = dscale_buf.data_ptr();
  p.dgate = gated ? dgate_buf.data_ptr() : nullptr;
  p.dw_part = mutable_ptr_or_null(dw_part);
  p.db_part = mutable_ptr_or_null(db_part);
  p.M = M;
  p.C = static_cast<int>(C);
  p.per_token = per_token;
  p.rms = rms;
  p.warps_per_row = cfg.warps_per_row;
  p.rows_per_group = per_token ? M : tokens_per_mod_row;
  p.rows_per_block = rows_per_block;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Finish: per-sample sums over each group's blocks, weight/bias sums over all blocks, in the outputs' dtypes.
  FinishParams f{};
  f.groups = groups;
  f.rows_per_group = p.rows_per_group;
  f.rows_per_block = rows_per_block;
  f.blocks = blocks;
  f.C = static_cast<int>(C);
  std::vector<std::pair<at::Tensor*, at::ScalarType>> convert;  // outputs written as fp32, cast afterwards
  const auto output = [&](at::Tensor& dst, at::IntArrayRef shape, at::ScalarType dtype, int& code) {
    code = out_dtype_code(dtype);
    dst = at::empty(shape, opts.dtype(code < 0 ? at::kFloat : dtype));
    if (code < 0) {
      code = kOutF32;
      convert.emplace_back(&dst, dtype);
    }
  };
  if (per_token) {
    out.dshift = dshift_buf.to(scale_in.scalar_type());
    out.dscale = dscale_buf.to(scale_in.scalar_type());
    if (gated) out.dgate = dgate_buf.to(gate_in->scalar_type());
  } else {
    f.n_sample = gated ? 3 : 2;
    f.sample_src[0] = dshift_buf.data_ptr<float>();
    f.sample_src[1] = dscale_buf.data_ptr<float>();
    output(out.dshift, {groups, C}, scale_in.scalar_type(), f.sample_dtype[0]);
    output(out.dscale, {groups, C}, scale_in.scalar_type(), f.sample_dtype[1]);
    if (gated) {
      f.sample_src[2] = dgate_buf.data_ptr<float>();
      output(out.dgate, {groups, C}, gate_in->scalar_type(), f.sample_dtype[2]);
    }
    f.sample_dst[0] = out.dshift.data_ptr();
    f.sample_dst[1] = out.dscale.data_ptr();
    if (gated) f.sample_dst[2] = out.dgate.data_ptr();
    f.sample_blocks = (groups * C + kFinishThreads - 1) / kFinishThreads;
  }
  out.dweight = empty_param_grad(in.x);
  out.dbias = empty_param_grad(in.x);
  if (dw_part.defined()) {
    f.param_src[f.n_param] = dw_part.data_ptr<float>();
    output(out.dweight, {C}, weight->scalar_type(), f.param_dtype[f.n_param]);
    f.param_dst[f.n_param++] = out.dweight.data_ptr();
  }
  if (db_part.defined()) {
    f.param_src[f.n_param] = db_part.data_ptr<float>();
    output(out.dbias, {C}, bias->scalar_type(), f.param_dtype[f.n_param]);
    f.param_dst[f.n_param++] = out.dbias.data_ptr();
  }
  const int64_t param_blocks = f.n_param > 0 ? (C + kWarp - 1) / kWarp : 0;
  if (f.sample_blocks + param_blocks > 0) {
    adaln_bwd_finish_kernel<<<static_cast<unsigned>(f.sample_blocks + param_blocks), kFinishThreads, 0, stream>>>(f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (auto& [dst, dtype] : convert) *dst = dst->to(dtype);
  if (gated && h_in->scalar_type() != in.x.scalar_type()) out.dh = out.dh.to(h_in->scalar_type());
}

BwdOut adaln_bwd_impl(const char* op, const at::Tensor* dx_out_in, const at::Tensor& dy_in,
                      const at::Tensor& x_in, const at::Tensor* h_in, const at::Tensor* gate_in,
                      const at::Tensor& mean_in, const at::Tensor& rstd_in, const at::Tensor& scale_in,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                      int64_t tokens_per_mod_row, bool rms) {
  const bool gated = h_in != nullptr;
  const std::pair<int64_t, int64_t> rows = check_rows_input(x_in, op);
  const int64_t M = rows.first;
  const int64_t C = rows.second;
  check_cuda(dy_in, x_in, op, "dy");
  check_cuda(mean_in, x_in, op, "mean");
  check_cuda(rstd_in, x_in, op, "rstd");
  check_cuda(scale_in, x_in, op, "scale");
  if (gated) {
    check_cuda(*dx_out_in, x_in, op, "dx_out");
    check_cuda(*h_in, x_in, op, "h");
    check_cuda(*gate_in, x_in, op, "gate");
  }
  TORCH_CHECK(mean_in.scalar_type() == at::kFloat && rstd_in.scalar_type() == at::kFloat &&
                  mean_in.numel() == M && rstd_in.numel() == M,
              op, ": mean and rstd must be float32 [", M, "] (as the forward returns them)");
  c10::cuda::CUDAGuard guard(x_in.device());

  BwdOut out;
  const auto opts = x_in.options();
  out.dx = at::empty({M, C}, opts);
  if (gated) out.dh = at::empty({M, C}, opts);
  if (M == 0) {
    TORCH_CHECK(scale_in.dim() == 2 && scale_in.size(1) == C, op, ": scale must be [rows, ", C, "]");
    out.dscale = at::zeros_like(scale_in, at::MemoryFormat::Contiguous);
    out.dshift = at::zeros_like(scale_in, at::MemoryFormat::Contiguous);
    if (gated) out.dgate = at::zeros_like(*gate_in, at::MemoryFormat::Contiguous);
    if (gated) out.dh = at::empty({M, C}, opts.dtype(h_in->scalar_type()));
    out.dweight = (weight.has_value() && weight->defined()) ? at::zeros_like(*weight) : empty_param_grad(x_in);
    out.dbias = (bias.has_value() && bias->defined()) ? at::zeros_like(*bias) : empty_param_grad(x_in);
    return out;
  }
  TORCH_CHECK(M <= (int64_t{1} << 31) - 1, op, ": too many rows (", M, ")");
  const int64_t mod_rows = check_tokens_per_mod_row(tokens_per_mod_row, M, op);
  const bool per_token = tokens_per_mod_row == 1;

  const at::ScalarType md = gated ? mod_dtype(x_in, {gate_in, &scale_in}, op) : mod_dtype(x_in, {&scale_in}, op);
  const at::Tensor x = rows_of(x_in, M, C, op, "x");
  // dy, dx_out and h of another dtype are read in x's dtype (dh is returned in h's dtype).
  const at::ScalarType xt = x.scalar_type();
  const at::Tensor dy = rows_of(dy_in, M, C, op, "dy").to(xt);
  const at::Tensor scale = rows_of(scale_in, mod_rows, C, op, "scale").to(md);
  const at::Tensor dx_out = gated ? rows_of(*dx_out_in, M, C, op, "dx_out").to(xt) : at::Tensor();
  const at::Tensor h = gated ? rows_of(*h_in, M, C, op, "h").to(xt) : at::Tensor();
  const at::Tensor gate = gated ? rows_of(*gate_in, mod_rows, C, op, "gate").to(md) : at::Tensor();
  const at::Tensor mean = mean_in.reshape({M}).contiguous();
  const at::Tensor rstd = rstd_in.reshape({M}).contiguous();
  const at::Tensor w = param_f32(weight, x_in, C, op, "weight");
  const at::Tensor b = param_f32(bias, x_in, C, op, "bias");
  check_aligned(x, op, "x");
  check_aligned(dy, op, "dy");
  check_aligned(scale, op, "scale");
  if (gated) {
    check_aligned(dx_out, op, "dx_out");
    check_aligned(h, op, "h");
    check_aligned(gate, op, "gate");
  }

  if (const int variant = bwd_variant(C, M); variant != 0) {
    BwdRowsInputs in{dy, x, dx_out, h, gate, scale, mean, rstd, w, b};
    bwd_rows(op, in, out, scale_in, gate_in, h_in, weight, bias, M, C, mod_rows, tokens_per_mod_row, rms, md,
             variant);
    return out;
  }

  // Row ranges: each group (a sample, or all rows when per-token) is split into workers_per_group ranges,
  // enough workers in all to fill the device a few teams per SM deep.
  const RowLaunch cfg = row_launch(C);
  const int64_t groups = per_token ? 1 : mod_rows;
  const int64_t rows_per_group = per_token ? M : tokens_per_mod_row;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t teams_per_sm = std::max(2, 1024 / cfg.threads_per_row);
  const int64_t target = static_cast<int64_t>(sms) * teams_per_sm;
  int64_t workers_per_group = std::min(rows_per_group, std::max<int64_t>(1, (target + groups - 1) / groups));
  const int64_t rows_per_worker = (rows_per_group + workers_per_group - 1) / workers_per_group;
  workers_per_group = (rows_per_group + rows_per_worker - 1) / rows_per_worker;  // none left empty
  const int64_t num_workers = groups * workers_per_group;

  const auto f32 = opts.dtype(at::kFloat);
  at::Tensor dshift_buf, dscale_buf, dgate_buf;
  if (per_token) {
    dshift_buf = at::empty({M, C}, opts.dtype(md));
    dscale_buf = at::empty({M, C}, opts.dtype(md));
    if (gated) dgate_buf = at::empty({M, C}, opts.dtype(md));
  } else {
    dshift_buf = at::empty({num_workers, C}, f32);
    dscale_buf = at::empty({num_workers, C}, f32);
    if (gated) dgate_buf = at::empty({num_workers, C}, f32);
  }
  at::Tensor dw_part = w.defined() ? at::empty({num_workers, C}, f32) : at::Tensor();
  at::Tensor db_part = b.defined() ? at::empty({num_workers, C}, f32) : at::Tensor();

  BwdParams p{};
  p.dy = dy.data_ptr();
  p.dy_stride = dy.stride(0);
  p.dx_out = gated ? dx_out.data_ptr() : nullptr;
  p.dx_out_stride = gated ? dx_out.stride(0) : 0;
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.h = gated ? h.data_ptr() : nullptr;
  p.h_stride = gated ? h.stride(0) : 0;
  p.gate = gated ? gate.data_ptr() : nullptr;
  p.gate_stride = gated ? gate.stride(0) : 0;
  p.scale = scale.data_ptr();
  p.scale_stride = scale.stride(0);
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.weight = ptr_or_null(w);
  p.bias = ptr_or_null(b);
  p.dx = out.dx.data_ptr();
  p.dh = gated ? out.dh.data_ptr() : nullptr;
  p.dshift = dshift_buf.data_ptr();
  p.dscale = dscale_buf.data_ptr();
  p.dgate = gated ? dgate_buf.data_ptr() : nullptr;
  p.dw_part = mutable_ptr_or_null(dw_part);
  p.db_part = mutable_ptr_or_null(db_part);
  p.M = M;
  p.C = static_cast<int>(C);
  p.per_token = per_token;
  p.rms = rms;
  p.warps_per_row = cfg.warps_per_row;
  p.rows_per_group = rows_per_group;
  p.workers_per_group = workers_per_group;
  p.rows_per_worker = rows_per_worker;
  p.num_workers = num_workers;

  const dim3 block(cfg.threads_per_row, cfg.rows_per_block);
  const dim3 grid(static_cast<unsigned>((num_workers + cfg.rows_per_block - 1) / cfg.rows_per_block));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool mod_f32 = md != x.scalar_type();
  // The launch bound caps the registers per thread (65536 / bound): 256 lets a team keep its ~120 live
  // values in registers (C <= 2048), 512 as well (C <= 4096); 1024-thread teams (C <= 8192) spill some.
  const int bound = cfg.threads_per_row <= 256 ? 256 : cfg.threads_per_row <= 512 ? 512 : 1024;
#define FASTSEMDIFF_BWD_LAUNCH_BOUND(TM, BOUND)                                                     \
  if (gated) adaln_bwd_kernel<scalar_t, TM, true, BOUND><<<grid, block, 0, stream>>>(p);            \
  else adaln_bwd_kernel<scalar_t, TM, false, BOUND><<<grid, block, 0, stream>>>(p);
#define FASTSEMDIFF_BWD_LAUNCH(TM)                                                                  \
  if (bound == 256) {                                                                               \
    FASTSEMDIFF_BWD_LAUNCH_BOUND(TM, 256)                                                           \
  } else if (bound == 512) {                                                                        \
    FASTSEMDIFF_BWD_LAUNCH_BOUND(TM, 512)                                                           \
  } else {                                                                                          \
    FASTSEMDIFF_BWD_LAUNCH_BOUND(TM, 1024)                                                          \
  }
  FASTSEMDIFF_DISPATCH_X(x.scalar_type(), op, [&] {
    if (mod_f32 && !std::is_same<scalar_t, float>::value) {
      FASTSEMDIFF_BWD_LAUNCH(float)
    } else {
      FASTSEMDIFF_BWD_LAUNCH(scalar_t)
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
#undef FASTSEMDIFF_BWD_LAUNCH
#undef FASTSEMDIFF_BWD_LAUNCH_BOUND

  // Finish the reductions over each group's workers (small [workers, C] buffers) and cast to the
  // parameters' dtypes.
  if (per_token) {
    out.dshift = dshift_buf.to(scale_in.scalar_type());
    out.dscale = dscale_buf.to(scale_in.scalar_type());
    if (gated) out.dgate = dgate_buf.to(gate_in->scalar_type());
  } else {
    out.dshift = dshift_buf.view({groups, workers_per_group, C}).sum(1).to(scale_in.scalar_type());
    out.dscale = dscale_buf.view({groups, workers_per_group, C}).sum(1).to(scale_in.scalar_type());
    if (gated) out.dgate = dgate_buf.view({groups, workers_per_group, C}).sum(1).to(gate_in->scalar_type());
  }
  if (gated && h_in->scalar_type() != x.scalar_type()) out.dh = out.dh.to(h_in->scalar_type());
  out.dweight = param_grad_or_empty(dw_part, weight, x_in);
  out.dbias = param_grad_or_empty(db_part, bias, x_in);
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------- the ops
// Registered for CUDA by ops.cpp, behind validate.h's checks (cuda_ops.h says why there).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mln_fwd_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                            const at::Tensor& scale,
                                                            const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& bias, double eps,
                                                            int64_t tokens_per_mod_row, bool rms) {
  auto r = adaln_fwd_impl("fastsemdiff_C::mln_fwd", x, nullptr, nullptr, shift, scale, weight, bias, eps,
                          tokens_per_mod_row, rms);
  return {std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mln_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& scale, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t tokens_per_mod_row, bool rms) {
  BwdOut o = adaln_bwd_impl("fastsemdiff_C::mln_bwd", nullptr, dy, x, nullptr, nullptr, mean, rstd, scale,
                            weight, bias, tokens_per_mod_row, rms);
  return {o.dx, o.dshift, o.dscale, o.dweight, o.dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grmln_fwd_cuda(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, int64_t tokens_per_mod_row, bool rms) {
  return adaln_fwd_impl("fastsemdiff_C::grmln_fwd", x, &h, &gate, shift, scale, weight, bias, eps,
                        tokens_per_mod_row, rms);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grmln_bwd_cuda(
    const at::Tensor& dx_out, const at::Tensor& dy, const at::Tensor& x_out, const at::Tensor& h,
    const at::Tensor& gate, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& scale,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t tokens_per_mod_row,
    bool rms) {
  BwdOut o = adaln_bwd_impl("fastsemdiff_C::grmln_bwd", &dx_out, dy, x_out, &h, &gate, mean, rstd, scale, weight,
                            bias, tokens_per_mod_row, rms);
  return {o.dx, o.dh, o.dgate, o.dshift, o.dscale, o.dweight, o.dbias};
}

// The variant switch (see "variant selection"): an op of its own, so that ops.cpp's schemas stay as they are.
TORCH_LIBRARY_FRAGMENT(fastsemdiff_C, m) {
  m.def("norm_config(int fwd_variant, int bwd_variant, int blocks_per_sm) -> int[]", &norm_config);
}

}  // namespace fastsemdiff
