// fastsemdiff._C: the operator schemas (torch.ops.fastsemdiff_C.*), their Meta kernels (shapes only, so
// torch.compile / FakeTensor can trace the ops), a CPU kernel that refuses with a clear message, and the
// Python module entry point. The CUDA kernels are registered by adaln.cu and timestep_embedding.cu.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"

namespace fastsemdiff {
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

// Every op on a non-CUDA (here: CPU) tensor: a clear error instead of torch's generic "no kernel" message.
void cuda_only(const c10::OperatorHandle& op, torch::jit::Stack* /*stack*/) {
  TORCH_CHECK(false, op.schema().name(), ": got CPU tensors; ", kCudaOnlyMessage);
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
  for (const char* name : {"mln_fwd", "mln_bwd", "grmln_fwd", "grmln_bwd", "timestep_embedding"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cuda_only>());
  }
}

}  // namespace fastsemdiff

// `import fastsemdiff._C` loads this library, whose static initialisers register the ops above; the module
// itself is empty (the ops are reached through torch.ops.fastsemdiff_C).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                      "fastsemdiff's CUDA kernels: see torch.ops.fastsemdiff_C", -1, nullptr};
  return PyModule_Create(&module);
}
