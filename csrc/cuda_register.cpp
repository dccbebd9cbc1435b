// Registration of the CUDA backend: proxykern::fused_sample on CUDA tensors, and two
// queries that let Python check, before choosing "cuda", that this build holds a kernel
// image the device can run (CUDA builds only).
#include <torch/library.h>

#include <string>

#include "fused_sample_op.h"

namespace proxykern {

SampleTensors fused_sample_cuda(const at::Tensor& base, const at::Tensor& expert,
                                const at::Tensor& anti, const at::Tensor& alpha,
                                const at::Tensor& temperature, const at::Tensor& top_k,
                                const at::Tensor& top_p, const at::Tensor& min_p,
                                const at::Tensor& seed, const at::Tensor& step,
                                int64_t vocab_size);
int64_t cuda_kernel_version(int64_t device);
std::string cuda_build_archs();
std::string cuda_kernel_variant(const std::string& name);
bool cuda_v06_one_launch(int64_t batch, int64_t vocab_size);
int64_t cuda_v07_spread(int64_t batch, int64_t vocab_size, int64_t sm_count);

TORCH_LIBRARY_FRAGMENT(proxykern, m) {
  // The architecture of the kernel image `device` runs (e.g. 90), -1 if it has none.
  m.def("cuda_kernel_version(int device) -> int", &cuda_kernel_version);
  // TORCH_CUDA_ARCH_LIST at build time (';' and ' ' written as '_').
  m.def("cuda_build_archs() -> str", &cuda_build_archs);
  // Benchmarks only (A/B in one process): the CUDA kernel variant in use, "v04", "v05",
  // "v06" or "v07" (cuda_sample.h); a non-empty name selects that variant for the calls that follow
  // and the previous one is returned. Default: PROXYKERN_CUDA_KERNEL, else "v04".
  m.def("cuda_kernel_variant(str name=\"\") -> str", &cuda_kernel_variant);
  // Benchmarks and tests only: whether v06 fuses K2 into K1 (one launch) for `batch` rows
  // of `vocab_size` columns (one dtype, 16-byte aligned rows); cuda_sample.h's rule.
  m.def("cuda_v06_one_launch(int batch, int vocab_size) -> bool", &cuda_v06_one_launch);
  // Benchmarks and tests only: the blocks a row v07's K2 runs (its spread; 1: v05's K2) for
  // `batch` rows of `vocab_size` columns (one dtype, 16-byte aligned rows) on a device with
  // `sm_count` SMs; cuda_sample.h's rule.
  m.def("cuda_v07_spread(int batch, int vocab_size, int sm_count) -> int", &cuda_v07_spread);
}

TORCH_LIBRARY_IMPL(proxykern, CUDA, m) { m.impl("fused_sample", &fused_sample_cuda); }

}  // namespace proxykern
