// The CUDA implementations of fastsemdiff._C's ops (adaln.cu, timestep_embedding.cu), for ops.cpp to register.
//
// ops.cpp registers them behind the checks of validate.h: an input they do not take is refused by code the host
// compiler alone built, before any frame of nvcc-compiled code is on the stack (the first H200 run ended the
// process in such a refusal raised from adaln.cu; that cause is unproven, so the refusal no longer happens
// there). These functions assume validated inputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastsemdiff {

std::tuple<at::Tensor, at::Tensor, at::Tensor> mln_fwd_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                            const at::Tensor& scale,
                                                            const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& bias, double eps,
                                                            int64_t tokens_per_mod_row, bool rms);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mln_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& scale, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t tokens_per_mod_row, bool rms);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grmln_fwd_cuda(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, int64_t tokens_per_mod_row, bool rms);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grmln_bwd_cuda(
    const at::Tensor& dx_out, const at::Tensor& dy, const at::Tensor& x_out, const at::Tensor& h,
    const at::Tensor& gate, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& scale,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t tokens_per_mod_row,
    bool rms);

at::Tensor timestep_embedding_cuda(const at::Tensor& t, int64_t dim, double max_period);

}  // namespace fastsemdiff
