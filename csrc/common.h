// Shared declarations of fastsemdiff._C: the operator namespace, the error text for non-CUDA tensors, and
// the row-layout limits every kernel in csrc/ relies on.
#pragma once

namespace fastsemdiff {

// Every op of the extension lives in this torch.library namespace: torch.ops.fastsemdiff_C.<name>.
#define FASTSEMDIFF_NAMESPACE fastsemdiff_C

// The widest row the kernels keep in registers (8 elements per thread, at most 1024 threads per row).
constexpr int kMaxChannels = 8192;
// Rows are read and written in 16-byte vectors: C must be a multiple of 8 (8 x 16-bit or 2 x 4 x fp32).
constexpr int kChannelMultiple = 8;
constexpr int kVectorBytes = 16;

constexpr const char* kCudaOnlyMessage =
    "fastsemdiff._C ops run on CUDA tensors only; use backend='triton' or backend='torch' for other devices";

}  // namespace fastsemdiff
