// What every op of fastsemdiff._C requires of its inputs, checked before anything is allocated or launched.
//
// The checks are the same on every device: the CPU registration (ops.cpp) runs them ahead of its "CUDA only"
// refusal, so tests on a CPU prove each message, and the CUDA registration (also ops.cpp) runs them before it
// calls into adaln.cu / timestep_embedding.cu, so no input the kernels do not take reaches a kernel. They read shapes, strides, dtypes, devices and
// start addresses only (never tensor data). Defined in ops.cpp (compiled by the host compiler alone).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastsemdiff {

// The forward of the modulated norm (h and gate null) or of the gated residual + norm (both given).
void validate_norm_fwd(const char* op, const at::Tensor& x, const at::Tensor* h, const at::Tensor* gate,
                       const at::Tensor& shift, const at::Tensor& scale, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, double eps, int64_t tokens_per_mod_row);

// The backward of either (dx_out, h and gate null for the plain norm); x is the normalised input.
void validate_norm_bwd(const char* op, const at::Tensor* dx_out, const at::Tensor& dy, const at::Tensor& x,
                       const at::Tensor* h, const at::Tensor* gate, const at::Tensor& mean, const at::Tensor& rstd,
                       const at::Tensor& scale, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, int64_t tokens_per_mod_row);

void validate_timestep_embedding(const char* op, const at::Tensor& t, int64_t dim, double max_period);

}  // namespace fastsemdiff
