// The CUDA backend's interface between its torch-free kernel units (cuda_kernels_*.cu,
// compiled in parallel) and the torch-facing launcher (cuda_launcher.cpp). Plain C++: no
// torch and no device code, so both nvcc and the host compiler read it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "proxy_sample.h"

namespace proxykern {
namespace cuda {

// ----------------------------------------------------------------------------- slices
//
// K1 cuts each row into slices of kSliceThreads * ept columns (ept elements per thread:
// 4, 8 or 16). The width depends on the vocabulary alone -- never on the batch -- so a
// row's result is bitwise the same alone or in any batch. It is the widest that still
// gives a row at least kTargetSlices slices (about one block per SM of an H100/H200, so
// a batch of 1 spreads over the GPU), else the narrowest:
//   32000 -> 1024 (32 slices), 128256 -> 1024 (126), 151936 -> 1024 (149), 1M -> 4096.
constexpr int kSliceThreads = 256;
constexpr int64_t kTargetSlices = 128;

inline int slice_elems_per_thread(int64_t vocab) {
  for (int ept : {16, 8}) {
    const int64_t width = int64_t{kSliceThreads} * ept;
    if ((vocab + width - 1) / width >= kTargetSlices) return ept;
  }
  return 4;
}
inline int64_t slice_width(int ept) { return int64_t{kSliceThreads} * ept; }
// Candidates kept per slice for filtered rows: 16 / 32 / 64, about vocab / 64 a row
// whatever the width, so K2's candidate passes cost the same for every width.
inline int cands_per_slice(int ept) { return 4 * ept; }

// ----------------------------------------------------------------------------- records

struct SlicePartial {
  float max;          // max z' of the slice (NaN ignored), -inf if none
  float sum;          // sum of exp(z' - max) over the slice's z' > -inf
  float best_x;       // greedy: max z', lowest column
  int32_t best_idx;
  float gkey;         // sampling: max z' + g over the slice, lowest column
  int32_t gidx;
  float gx;           // z' of that column
  uint32_t flags;     // kFlag*
  uint32_t tkey;      // filtered rows: candidates hold every key > tkey (0: every finite z')
  int32_t ncand;
};

struct alignas(8) Cand {
  float x;            // z'
  int32_t idx;        // column
};

struct KernelArgs {
  LogitsView base, expert, anti;
  RowParams params;
  SampleResult result;
  int64_t vocab;
  int32_t num_slices;
  int32_t cand_per_slice;  // cands_per_slice(ept)
  float mass_scale;   // 2^F: masses exp(z' - max) in [0, 1] are stored as round(e * 2^F)
  SlicePartial* partials;   // [batch][num_slices]
  Cand* cands;              // [batch][num_slices][cand_per_slice]
};

// ----------------------------------------------------------------------------- variants
//
// Two builds of the same design live side by side in the extension, for A/B timing on
// one GPU in one process (benchmarks/gpu_check.py). Both implement the same contract;
// each is deterministic and batch-invariant on its own, and they may differ from each
// other only at floating-point near-ties of the Gumbel keys (the noise's last bits).
//   kV04: the kernel as measured in benchmarks/NOTES.md v0.4 (libdevice logf noise,
//         IEEE division per column, per-lane 64-bit shared atomics in the fallback).
//   kV05: the default. Noise with an accurate inner log near u = 1 and the hardware log
//         elsewhere; z / T as z * RN(1/T) plus two FMA correction steps (the IEEE
//         quotient, bit for bit); the row's parameters loaded before its data; the
//         block's records reduced once (by the thread that writes them) instead of by
//         every thread; the fallback's mass histograms aggregated per warp before the
//         shared-memory atomic.
// The launcher picks one per process (PROXYKERN_CUDA_KERNEL, or the benchmark-only
// cuda_kernel_variant op): not part of the API.
enum class KernelVariant : int32_t { kV04 = 0, kV05 = 1 };

// ----------------------------------------------------------------------------- launches
// Each launches K1 (slice widths of `ept` elements per thread) and K2 on `stream` for
// inputs that all have the unit's dtype (mixed: any dtypes); `vec`: every pointer and
// row stride is 16-byte aligned. Returns the launch error (cudaSuccess when fine).
cudaError_t launch_f32(const KernelArgs& args, int64_t batch, bool vec, int ept, KernelVariant v,
                       cudaStream_t stream);
cudaError_t launch_bf16(const KernelArgs& args, int64_t batch, bool vec, int ept, KernelVariant v,
                        cudaStream_t stream);
cudaError_t launch_f16(const KernelArgs& args, int64_t batch, bool vec, int ept, KernelVariant v,
                       cudaStream_t stream);
cudaError_t launch_mixed(const KernelArgs& args, int64_t batch, int ept, KernelVariant v,
                         cudaStream_t stream);

// The architecture of the kernel image the current device would run (e.g. 90), or -1
// when the build holds none it can load (built for another architecture, no PTX).
int kernel_image_version();

}  // namespace cuda
}  // namespace proxykern
