// Sinusoidal timestep embedding, t [B] -> fp32 [B, dim], as fastsemdiff/nn/embedding.py's timestep_embedding:
//   half = dim / 2, freqs[j] = exp(-ln(max_period) * j / half), args = t * freqs,
//   out = [cos(args), sin(args)] and a zero last column when dim is odd.
// The fp32 operations are the ones torch runs for the reference on a CUDA tensor, in the same order
// (torch divides a CUDA tensor by a Python scalar as a multiplication by the scalar's fp32 reciprocal), and
// this file is built without fast math, so expf/cosf/sinf are the same accurate device functions.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"
#include "cuda_ops.h"

namespace fastsemdiff {
namespace {

__global__ void timestep_embedding_kernel(const float* __restrict__ t, float* __restrict__ out, int64_t total,
                                          int dim, int half, float neg_log_period, float inv_half) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / dim;
    const int col = static_cast<int>(i - b * dim);
    float value = 0.f;  // the odd dim's last column
    if (col < 2 * half) {
      const int j = col < half ? col : col - half;
      const float freq = expf((neg_log_period * static_cast<float>(j)) * inv_half);
      const float arg = t[b] * freq;
      value = col < half ? cosf(arg) : sinf(arg);
    }
    out[i] = value;
  }
}

}  // namespace

// Registered for CUDA by ops.cpp, behind validate.h's checks (cuda_ops.h says why there).
at::Tensor timestep_embedding_cuda(const at::Tensor& t_in, int64_t dim, double max_period) {
  constexpr const char* op = "fastsemdiff_C::timestep_embedding";
  TORCH_CHECK(t_in.is_cuda(), op, ": t is on ", t_in.device(), "; ", kCudaOnlyMessage);
  TORCH_CHECK(t_in.dim() == 1, op, ": t must be [B], got ", t_in.sizes());
  TORCH_CHECK(at::isFloatingType(t_in.scalar_type()) || at::isIntegralType(t_in.scalar_type(), false), op,
              ": t must be a real tensor, got ", t_in.scalar_type());
  TORCH_CHECK(dim >= 1 && dim <= (int64_t{1} << 30), op, ": dim must be positive, got ", dim);
  TORCH_CHECK(max_period > 0, op, ": max_period must be positive, got ", max_period);
  c10::cuda::CUDAGuard guard(t_in.device());

  const at::Tensor t = t_in.to(at::kFloat).contiguous();
  const int64_t B = t.size(0);
  at::Tensor out = at::empty({B, dim}, t.options());
  const int64_t total = B * dim;
  if (total == 0) return out;
  const int half = static_cast<int>(dim / 2);
  // As the reference: (-ln(max_period) as fp32) * j, times 1 / half (computed in double, rounded to fp32,
  // as torch's CUDA division by a scalar does). half == 0 (dim 1) uses no frequency.
  const float neg_log_period = static_cast<float>(-std::log(max_period));
  const float inv_half = half > 0 ? static_cast<float>(1.0 / half) : 0.f;

  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t{1} << 16);
  timestep_embedding_kernel<<<static_cast<unsigned>(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      t.data_ptr<float>(), out.data_ptr<float>(), total, static_cast<int>(dim), half, neg_log_period, inv_half);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace fastsemdiff
