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
  uint32_t* counters;       // [batch], v06's one-launch plan only (else null): K1 blocks of
                            // each row that have finished; zero before the launch
};

// ----------------------------------------------------------------------------- variants
//
// Three builds of the same design live side by side in the extension, for A/B timing on
// one GPU in one process (benchmarks/gpu_check.py). All implement the same contract;
// each is deterministic and batch-invariant on its own. v04 and v05 may differ from each
// other only at floating-point near-ties of the Gumbel keys (the noise's last bits); v06
// returns v05's results bit for bit.
//   kV04: the build's default (csrc/cuda_launcher.cpp): the kernel as measured in
//         benchmarks/NOTES.md v0.4 (libdevice logf noise, IEEE division per column,
//         per-lane 64-bit shared atomics in the fallback).
//   kV05: noise with an accurate inner log near u = 1 and the hardware log elsewhere;
//         z / T as z * RN(1/T) plus two FMA correction steps (the IEEE quotient, bit for
//         bit); the row's parameters loaded before its data; the block's records reduced
//         once (by the thread that writes them) instead of by every thread; the
//         fallback's mass histograms aggregated per warp before the shared-memory atomic.
//   kV06: v05's arithmetic and kernels, and where merge_in_slice_kernel says so (small
//         grids) one launch instead of two: K2's merge runs in the last K1 block of each
//         row to finish (cuda_kernels.cuh, "v06"). Elsewhere it launches v05's K1 and K2.
// The launcher picks one per process (PROXYKERN_CUDA_KERNEL, or the benchmark-only
// cuda_kernel_variant op): not part of the API.
enum class KernelVariant : int32_t { kV04 = 0, kV05 = 1, kV06 = 2 };

// v06's launch plan, the one rule (the launcher sizes the workspace's counters with it,
// cuda_kernels.cuh launches with it): one launch when
//   - the whole K1 grid, batch * num_slices blocks, is at most kFusedMaxBlocks: about one
//     wave of the fused kernel on an H100 / H200 (132 SMs x 2 blocks: the fused kernel
//     holds the merge's registers, 128 a thread, where v05's K1 needs 44-90; see
//     fused_kernel). There the second launch is a fixed cost next to a short K1; past
//     one wave K1 itself dominates and the fused kernel's lower occupancy would slow it,
//     so larger grids keep v05's two launches;
//   - and `vec_uniform`: the three inputs share one dtype and every pointer and row
//     stride is 16-byte aligned (the vector loads, the common case). The unaligned and
//     mixed-dtype loaders would spill at 128 registers, so they keep two launches.
// Either plan gives the same bits, so the choice (a function of batch, vocabulary and
// layout) never breaks batch invariance; it only moves time. The bound is a first guess
// from the occupancy arithmetic, not a measurement (benchmarks/NOTES.md).
constexpr int64_t kFusedMaxBlocks = 256;
inline bool merge_in_slice_kernel(KernelVariant v, int64_t batch, int64_t num_slices,
                                  bool vec_uniform) {
  return v == KernelVariant::kV06 && vec_uniform && batch * num_slices <= kFusedMaxBlocks;
}

// ----------------------------------------------------------------------------- launches
// Each launches K1 (slice widths of `ept` elements per thread) and K2 on `stream` for
// inputs that all have the unit's dtype (mixed: any dtypes); `vec`: every pointer and
// row stride is 16-byte aligned. v06 with merge_in_slice_kernel: zeroes args.counters
// (cudaMemsetAsync) and launches the fused kernel alone. Returns the launch error
// (cudaSuccess when fine).
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
