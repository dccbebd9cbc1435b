// The CUDA kernels for inputs of different dtypes (per-element loads), and the query of
// which kernel image the current device runs (one of the units ninja builds at once).
#include "cuda_kernels.cuh"

namespace proxykern {
namespace cuda {

cudaError_t launch_mixed(const KernelArgs& args, int64_t batch, int ept, KernelVariant v,
                         cudaStream_t stream) {
  return launch_variant<DynLoader>(args, batch, ept, v, stream);
}

int kernel_image_version() {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, merge_kernel<DynLoader, V05>);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it so that later checks start clean
    return -1;
  }
  return attr.binaryVersion;
}

}  // namespace cuda
}  // namespace proxykern
