// The CUDA kernels instantiated for f16 inputs (one of the units ninja builds at once).
#include "cuda_kernels.cuh"

namespace proxykern {
namespace cuda {

cudaError_t launch_f16(const KernelArgs& args, int64_t batch, bool vec, int ept, KernelVariant v,
                       cudaStream_t stream) {
  return vec ? launch_variant<UniformLoader<F16, true>>(args, batch, ept, v, stream)
             : launch_variant<UniformLoader<F16, false>>(args, batch, ept, v, stream);
}

}  // namespace cuda
}  // namespace proxykern
