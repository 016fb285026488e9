// fastsemdiff._C: the operator schemas (torch.ops.fastsemdiff_C.*), the validation of every op's inputs
// (validate.h), their Meta kernels (shapes only, so torch.compile / FakeTensor can trace the ops), CPU kernels
// that validate and then refuse with a clear message, and the Python module entry point. The CUDA kernels are
// registered by adaln.cu and timestep_embedding.cu.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "common.h"
#include "cuda_ops.h"
#include "validate.h"

namespace fastsemdiff {

// ------------------------------------------------------------------------------------------ validation
namespace {

bool is_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void check_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; every operand must be on x's device");
}

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t.scalar_type());
}

// A [rows, C] operand: shape, floating dtype, x's device.
void check_rows(const at::Tensor& t, const at::Tensor& x, int64_t rows, int64_t C, const char* op, const char* name,
                const char* what) {
  check_device(t, x, op, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == C, op, ": ", name, " must be [", rows, ", ", C,
              "] (", what, "), got ", t.sizes());
  check_floating(t, op, name);
}

// x (or x_out): a 2-D [M, C] tensor of a kernel dtype with a width the kernels take; returns (M, C).
std::pair<int64_t, int64_t> check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, C] (2-D), got ", x.sizes());
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x.scalar_type(), " (use backend='torch' for other dtypes)");
  const int64_t M = x.size(0);
  const int64_t C = x.size(1);
  TORCH_CHECK(C > 0 && C % kChannelMultiple == 0, op, ": C=", C, " is not a positive multiple of ",
              kChannelMultiple, " (the 16-byte vectorised CUDA kernels need it; use backend='triton')");
  TORCH_CHECK(C <= kMaxChannels, op, ": C=", C, " exceeds the CUDA kernels' row limit of ", kMaxChannels,
              " (use backend='triton')");
  TORCH_CHECK(M <= INT32_MAX, op, ": too many rows (M=", M, "; at most ", INT32_MAX, ")");
  return {M, C};
}

int64_t check_tokens_per_mod_row(int64_t tpm, int64_t M, const char* op) {
  TORCH_CHECK(tpm >= 1 && M % tpm == 0, op, ": tokens_per_mod_row=", tpm, " must be >= 1 and divide M=", M);
  return M / tpm;
}

void check_param(const std::optional<at::Tensor>& p, const at::Tensor& x, int64_t C, const char* op,
                 const char* name) {
  if (!p.has_value() || !p->defined()) return;
  check_device(*p, x, op, name);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == C, op, ": ", name, " must be [", C, "], got ", p->sizes());
  check_floating(*p, op, name);
}

// The dtype the kernels read the modulation in: x's dtype when every modulation tensor has it, else fp32
// (those operands are then converted to fresh tensors).
at::ScalarType mod_dtype(const at::Tensor& x, std::initializer_list<const at::Tensor*> mods) {
  for (const at::Tensor* m : mods)
    if (m->scalar_type() != x.scalar_type()) return at::kFloat;
  return x.scalar_type();
}

// An operand the kernels read in place (in dtype `as`, unit column stride) is read in 16-byte vectors: its
// start address and row stride must be multiples of 16 bytes. Operands that are converted or copied first
// (another dtype, or no unit column stride) and empty ones are fresh, aligned tensors.
void check_aligned(const at::Tensor& t, at::ScalarType as, const char* op, const char* name) {
  if (t.scalar_type() != as || t.numel() == 0 || t.stride(1) != 1) return;
  const auto addr = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  TORCH_CHECK(addr % kVectorBytes == 0, op, ": ", name, " does not start at a 16-byte aligned address (",
              "the vectorised CUDA kernels need it; use backend='triton')");
  TORCH_CHECK(t.size(0) <= 1 || (t.stride(0) * t.element_size()) % kVectorBytes == 0, op, ": the row stride of ",
              name, " (", t.stride(0), " elements) is not a multiple of 16 bytes (the vectorised CUDA kernels ",
              "need it; use backend='triton')");
}

}  // namespace

void validate_norm_fwd(const char* op, const at::Tensor& x, const at::Tensor* h, const at::Tensor* gate,
                       const at::Tensor& shift, const at::Tensor& scale, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, double eps, int64_t tokens_per_mod_row) {
  const auto [M, C] = check_x(x, op);
  const int64_t R = check_tokens_per_mod_row(tokens_per_mod_row, M, op);
  const char* mod_what = "M / tokens_per_mod_row rows of C";
  check_rows(shift, x, R, C, op, "shift", mod_what);
  check_rows(scale, x, R, C, op, "scale", mod_what);
  if (h != nullptr) {
    check_rows(*h, x, M, C, op, "h", "like x");
    check_rows(*gate, x, R, C, op, "gate", mod_what);
  }
  check_param(weight, x, C, op, "weight");
  check_param(bias, x, C, op, "bias");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  const at::ScalarType md = h != nullptr ? mod_dtype(x, {gate, &shift, &scale}) : mod_dtype(x, {&shift, &scale});
  check_aligned(x, x.scalar_type(), op, "x");
  check_aligned(shift, md, op, "shift");
  check_aligned(scale, md, op, "scale");
  if (h != nullptr) {
    check_aligned(*h, x.scalar_type(), op, "h");
    check_aligned(*gate, md, op, "gate");
  }
}

void validate_norm_bwd(const char* op, const at::Tensor* dx_out, const at::Tensor& dy, const at::Tensor& x,
                       const at::Tensor* h, const at::Tensor* gate, const at::Tensor& mean, const at::Tensor& rstd,
                       const at::Tensor& scale, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, int64_t tokens_per_mod_row) {
  const auto [M, C] = check_x(x, op);
  const int64_t R = check_tokens_per_mod_row(tokens_per_mod_row, M, op);
  const char* mod_what = "M / tokens_per_mod_row rows of C";
  check_rows(dy, x, M, C, op, "dy", "like x");
  check_rows(scale, x, R, C, op, "scale", mod_what);
  if (h != nullptr) {
    check_rows(*dx_out, x, M, C, op, "dx_out", "like x");
    check_rows(*h, x, M, C, op, "h", "like x");
    check_rows(*gate, x, R, C, op, "gate", mod_what);
  }
  check_device(mean, x, op, "mean");
  check_device(rstd, x, op, "rstd");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.dim() == 1 &&
                  rstd.dim() == 1 && mean.size(0) == M && rstd.size(0) == M,
              op, ": mean and rstd must be float32 [", M, "] (as the forward returns them), got ",
              mean.scalar_type(), " ", mean.sizes(), " and ", rstd.scalar_type(), " ", rstd.sizes());
  check_param(weight, x, C, op, "weight");
  check_param(bias, x, C, op, "bias");
  const at::ScalarType md = h != nullptr ? mod_dtype(x, {gate, &scale}) : mod_dtype(x, {&scale});
  const at::ScalarType xt = x.scalar_type();
  check_aligned(x, xt, op, "x");
  check_aligned(dy, xt, op, "dy");
  check_aligned(scale, md, op, "scale");
  if (h != nullptr) {
    check_aligned(*dx_out, xt, op, "dx_out");
    check_aligned(*h, xt, op, "h");
    check_aligned(*gate, md, op, "gate");
  }
}

void validate_timestep_embedding(const char* op, const at::Tensor& t, int64_t dim, double max_period) {
  TORCH_CHECK(t.dim() == 1, op, ": t must be [B] (1-D), got ", t.sizes());
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK(at::isFloatingType(st) || at::isIntegralType(st, /*includeBool=*/false), op,
              ": t must be a real (floating or integer) tensor, got ", st);
  TORCH_CHECK(dim >= 1 && dim <= (int64_t{1} << 30), op, ": dim must be in [1, 2^30], got ", dim);
  TORCH_CHECK(std::isfinite(max_period) && max_period > 0, op, ": max_period must be finite and > 0, got ",
              max_period);
}

namespace {

using OptTensor = std::optional<at::Tensor>;

// Absent affine parameters get an empty fp32 [0] gradient (as the CUDA kernels return).
at::Tensor param_grad_meta(const OptTensor& p, const at::Tensor& x) {
  if (p.has_value() && p->defined()) return at::empty_like(*p, at::MemoryFormat::Contiguous);
  return at::empty({0}, x.options().dtype(at::kFloat));
}

at::Tensor rows_meta(const at::Tensor& x) { return at::empty({x.size(0), x.size(1)}, x.options()); }
at::Tensor stat_meta(const at::Tensor& x) { return at::empty({x.size(0)}, x.options().dtype(at::kFloat)); }
at::Tensor like_meta(const at::Tensor& t) { return at::empty(t.sizes(), t.options()); }

void check_rows_meta(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, C], got ", x.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mln_fwd_meta(const at::Tensor& x, const at::Tensor& shift,
                                                            const at::Tensor& scale, const OptTensor& weight,
                                                            const OptTensor& bias, double eps,
                                                            int64_t tokens_per_mod_row, bool rms) {
  check_rows_meta(x, "fastsemdiff_C::mln_fwd");
  return {rows_meta(x), stat_meta(x), stat_meta(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mln_bwd_meta(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& scale, const OptTensor& weight, const OptTensor& bias, int64_t tokens_per_mod_row,
    bool rms) {
  check_rows_meta(x, "fastsemdiff_C::mln_bwd");
  return {rows_meta(x), like_meta(scale), like_meta(scale), param_grad_meta(weight, x), param_grad_meta(bias, x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grmln_fwd_meta(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, const OptTensor& weight, const OptTensor& bias, double eps,
    int64_t tokens_per_mod_row, bool rms) {
  check_rows_meta(x, "fastsemdiff_C::grmln_fwd");
  return {rows_meta(x), rows_meta(x), stat_meta(x), stat_meta(x)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grmln_bwd_meta(
    const at::Tensor& dx_out, const at::Tensor& dy, const at::Tensor& x_out, const at::Tensor& h,
    const at::Tensor& gate, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& scale,
    const OptTensor& weight, const OptTensor& bias, int64_t tokens_per_mod_row, bool rms) {
  check_rows_meta(x_out, "fastsemdiff_C::grmln_bwd");
  return {rows_meta(x_out), rows_meta(h),     like_meta(gate),           like_meta(scale),
          like_meta(scale), param_grad_meta(weight, x_out), param_grad_meta(bias, x_out)};
}

at::Tensor timestep_embedding_meta(const at::Tensor& t, int64_t dim, double max_period) {
  TORCH_CHECK(t.dim() == 1, "fastsemdiff_C::timestep_embedding: t must be [B], got ", t.sizes());
  return at::empty({t.size(0), dim}, t.options().dtype(at::kFloat));
}

// Every op on CPU tensors: the inputs are validated as on CUDA (so a CPU proves each message), then a clear
// error instead of torch's generic "no kernel" message.
[[noreturn]] void cuda_only(const char* op) { TORCH_CHECK(false, op, ": got CPU tensors; ", kCudaOnlyMessage); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> mln_fwd_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                           const at::Tensor& scale, const OptTensor& weight,
                                                           const OptTensor& bias, double eps,
                                                           int64_t tokens_per_mod_row, bool /*rms*/) {
  constexpr const char* op = "fastsemdiff_C::mln_fwd";
  validate_norm_fwd(op, x, nullptr, nullptr, shift, scale, weight, bias, eps, tokens_per_mod_row);
  cuda_only(op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mln_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& scale, const OptTensor& weight, const OptTensor& bias, int64_t tokens_per_mod_row,
    bool /*rms*/) {
  constexpr const char* op = "fastsemdiff_C::mln_bwd";
  validate_norm_bwd(op, nullptr, dy, x, nullptr, nullptr, mean, rstd, scale, weight, bias, tokens_per_mod_row);
  cuda_only(op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grmln_fwd_cpu(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, const OptTensor& weight, const OptTensor& bias, double eps,
    int64_t tokens_per_mod_row, bool /*rms*/) {
  constexpr const char* op = "fastsemdiff_C::grmln_fwd";
  validate_norm_fwd(op, x, &h, &gate, shift, scale, weight, bias, eps, tokens_per_mod_row);
  cuda_only(op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grmln_bwd_cpu(
    const at::Tensor& dx_out, const at::Tensor& dy, const at::Tensor& x_out, const at::Tensor& h,
    const at::Tensor& gate, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& scale,
    const OptTensor& weight, const OptTensor& bias, int64_t tokens_per_mod_row, bool /*rms*/) {
  constexpr const char* op = "fastsemdiff_C::grmln_bwd";
  validate_norm_bwd(op, &dx_out, dy, x_out, &h, &gate, mean, rstd, scale, weight, bias, tokens_per_mod_row);
  cuda_only(op);
}

at::Tensor timestep_embedding_cpu(const at::Tensor& t, int64_t dim, double max_period) {
  constexpr const char* op = "fastsemdiff_C::timestep_embedding";
  validate_timestep_embedding(op, t, dim, max_period);
  cuda_only(op);
}

// Every op on CUDA tensors: the same checks, here in code the host compiler built, then the implementation of
// adaln.cu / timestep_embedding.cu (cuda_ops.h): a refused input never has an nvcc-compiled frame on the stack.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mln_fwd_checked(const at::Tensor& x, const at::Tensor& shift,
                                                               const at::Tensor& scale, const OptTensor& weight,
                                                               const OptTensor& bias, double eps,
                                                               int64_t tokens_per_mod_row, bool rms) {
  validate_norm_fwd("fastsemdiff_C::mln_fwd", x, nullptr, nullptr, shift, scale, weight, bias, eps,
                    tokens_per_mod_row);
  return mln_fwd_cuda(x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mln_bwd_checked(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& scale, const OptTensor& weight, const OptTensor& bias, int64_t tokens_per_mod_row, bool rms) {
  validate_norm_bwd("fastsemdiff_C::mln_bwd", nullptr, dy, x, nullptr, nullptr, mean, rstd, scale, weight, bias,
                    tokens_per_mod_row);
  return mln_bwd_cuda(dy, x, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grmln_fwd_checked(
    const at::Tensor& x, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, const OptTensor& weight, const OptTensor& bias, double eps, int64_t tokens_per_mod_row,
    bool rms) {
  validate_norm_fwd("fastsemdiff_C::grmln_fwd", x, &h, &gate, shift, scale, weight, bias, eps, tokens_per_mod_row);
  return grmln_fwd_cuda(x, h, gate, shift, scale, weight, bias, eps, tokens_per_mod_row, rms);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grmln_bwd_checked(
    const at::Tensor& dx_out, const at::Tensor& dy, const at::Tensor& x_out, const at::Tensor& h,
    const at::Tensor& gate, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& scale,
    const OptTensor& weight, const OptTensor& bias, int64_t tokens_per_mod_row, bool rms) {
  validate_norm_bwd("fastsemdiff_C::grmln_bwd", &dx_out, dy, x_out, &h, &gate, mean, rstd, scale, weight, bias,
                    tokens_per_mod_row);
  return grmln_bwd_cuda(dx_out, dy, x_out, h, gate, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms);
}

at::Tensor timestep_embedding_checked(const at::Tensor& t, int64_t dim, double max_period) {
  validate_timestep_embedding("fastsemdiff_C::timestep_embedding", t, dim, max_period);
  return timestep_embedding_cuda(t, dim, max_period);
}

}  // namespace

TORCH_LIBRARY(fastsemdiff_C, m) {
  m.def(
      "mln_fwd(Tensor x, Tensor shift, Tensor scale, Tensor? weight, Tensor? bias, float eps, "
      "int tokens_per_mod_row, bool rms) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "mln_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor scale, Tensor? weight, Tensor? bias, "
      "int tokens_per_mod_row, bool rms) -> (Tensor dx, Tensor dshift, Tensor dscale, Tensor dweight, "
      "Tensor dbias)");
  m.def(
      "grmln_fwd(Tensor x, Tensor h, Tensor gate, Tensor shift, Tensor scale, Tensor? weight, Tensor? bias, "
      "float eps, int tokens_per_mod_row, bool rms) -> (Tensor x_out, Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "grmln_bwd(Tensor dx_out, Tensor dy, Tensor x_out, Tensor h, Tensor gate, Tensor mean, Tensor rstd, "
      "Tensor scale, Tensor? weight, Tensor? bias, int tokens_per_mod_row, bool rms) -> (Tensor dx, Tensor dh, "
      "Tensor dgate, Tensor dshift, Tensor dscale, Tensor dweight, Tensor dbias)");
  m.def("timestep_embedding(Tensor t, int dim, float max_period) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastsemdiff_C, Meta, m) {
  m.impl("mln_fwd", &mln_fwd_meta);
  m.impl("mln_bwd", &mln_bwd_meta);
  m.impl("grmln_fwd", &grmln_fwd_meta);
  m.impl("grmln_bwd", &grmln_bwd_meta);
  m.impl("timestep_embedding", &timestep_embedding_meta);
}

TORCH_LIBRARY_IMPL(fastsemdiff_C, CPU, m) {
  m.impl("mln_fwd", &mln_fwd_cpu);
  m.impl("mln_bwd", &mln_bwd_cpu);
  m.impl("grmln_fwd", &grmln_fwd_cpu);
  m.impl("grmln_bwd", &grmln_bwd_cpu);
  m.impl("timestep_embedding", &timestep_embedding_cpu);
}

TORCH_LIBRARY_IMPL(fastsemdiff_C, CUDA, m) {
  m.impl("mln_fwd", &mln_fwd_checked);
  m.impl("mln_bwd", &mln_bwd_checked);
  m.impl("grmln_fwd", &grmln_fwd_checked);
  m.impl("grmln_bwd", &grmln_bwd_checked);
  m.impl("timestep_embedding", &timestep_embedding_checked);
}

}  // namespace fastsemdiff

// `import fastsemdiff._C` loads this library, whose static initialisers register the ops above; the module
// itself is empty (the ops are reached through torch.ops.fastsemdiff_C).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                      "fastsemdiff's CUDA kernels: see torch.ops.fastsemdiff_C", -1, nullptr};
  return PyModule_Create(&module);
}
