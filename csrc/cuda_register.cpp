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

TORCH_LIBRARY_FRAGMENT(proxykern, m) {
  // The architecture of the kernel image `device` runs (e.g. 90), -1 if it has none.
  m.def("cuda_kernel_version(int device) -> int", &cuda_kernel_version);
  // TORCH_CUDA_ARCH_LIST at build time (';' and ' ' written as '_').
  m.def("cuda_build_archs() -> str", &cuda_build_archs);
}

TORCH_LIBRARY_IMPL(proxykern, CUDA, m) { m.impl("fused_sample", &fused_sample_cuda); }

}  // namespace proxykern
