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

struct SpreadCtl;   // v07 (below)
struct SpreadSlot;

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
  // v07's spread plan only (spread_blocks > 1; else spread 1 and both null): K2 runs
  // `spread` blocks a row, which share the whole-row passes of the row's fallback.
  int32_t spread;
  SpreadCtl* spread_ctl;    // [batch]: K1 zeroes each row's seq and arrive
  SpreadSlot* spread_slots; // [batch][spread - 1]
};

// ----------------------------------------------------------------------------- v07's spread
//
// Where v07 spreads a row's K2 work over G blocks (spread_blocks), the row's first block
// (the "lead") runs the merge as before and, when the whole-row fallback needs a pass over
// the row, publishes a command in the row's SpreadCtl; the other G - 1 blocks (the
// "helpers") each do their share of the pass and return a SpreadSlot. Commands, one at a
// time (the lead waits for every helper's answer before the next):
//   kSpreadHist: the histogram of one radix level (counts, and masses when with_mass) of
//                the values with key >= dom_lo whose key's top bits equal prefix;
//   kSpreadDraw: the Gumbel-max over the kept values (key >= thr; m, the row's max z',
//                for min_p and the noise bound);
//   kSpreadExit: the row is done (always published last, also when no pass was needed).
constexpr uint32_t kSpreadHist = 1u, kSpreadDraw = 2u, kSpreadExit = 3u;

struct SpreadCtl {
  uint32_t seq;        // commands the lead has published (each adds 1)
  uint32_t arrive;     // answers the helpers have returned (each adds 1)
  uint32_t cmd;        // kSpread*
  uint32_t level, prefix, dom_lo, with_mass, thr;
  float m;
  uint32_t pad[7];     // 64 bytes: one row's control words never share a sector with another's
};

struct SpreadSlot {   // one helper's answer
  unsigned long long mass[256];
  uint32_t cnt[256];
  float best_key;
  int32_t best_idx;
  float best_x;
  uint32_t pad;
};
static_assert(sizeof(SpreadCtl) == 64 && sizeof(SpreadSlot) % 16 == 0, "SpreadCtl / SpreadSlot layout");

// ----------------------------------------------------------------------------- variants
//
// Four builds of the same design live side by side in the extension, for A/B timing on
// one GPU in one process (benchmarks/gpu_check.py). All implement the same contract;
// each is deterministic and batch-invariant on its own. v04 and v05 may differ from each
// other only at floating-point near-ties of the Gumbel keys (the noise's last bits); v06
// and v07 return v05's results bit for bit.
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
//   kV07: v05's arithmetic; K1 skips the noise of the columns whose uniform (known
//         after Philox) rules out a key that could reach the slice's best (exact: the
//         same records); and where spread_blocks says so (small batches) K2 runs
//         several blocks a row that share the whole-row passes of the fallback (the slow
//         path: a flat row under top_p 0.99 at T = 4, huge top_k, tiny min_p): integer
//         histograms and an arg-max, so v05's results bit for bit whatever the number of
//         blocks. Elsewhere v05's K2.
// The launcher picks one per process (PROXYKERN_CUDA_KERNEL, or the benchmark-only
// cuda_kernel_variant op): not part of the API.
enum class KernelVariant : int32_t { kV04 = 0, kV05 = 1, kV06 = 2, kV07 = 3 };

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

// v07's spread, the one rule (the launcher sizes the workspace with it, the kernels
// launch with it, tests and benchmarks read it through cuda_v07_spread): G blocks a row,
//   G = min(kMaxSpread, sm_count / batch, rounds), rounds = the row's whole-row passes in
//   units of kRowPassChunks chunks of 8 columns (what one 512-thread K2 block reads per
//   round), so every block has at least one round of a pass;
// G < 2 (or another variant, or inputs that are not vec_uniform: the spread is built for
// the vector loaders only) means 1: v05's K2. G * batch <= sm_count keeps every block of
// the launch resident at once on an idle GPU (K2 holds one 512-thread block an SM), which
// the lead / helper handshake needs to make progress without waiting for blocks that
// cannot start (cuda_kernels.cuh, "v07").
constexpr int kMaxSpread = 32;
constexpr int64_t kRowPassChunks = 1024;
inline int spread_blocks(KernelVariant v, int64_t batch, int64_t vocab, int64_t sm_count,
                         bool vec_uniform) {
  if (v != KernelVariant::kV07 || !vec_uniform || batch <= 0 || sm_count <= 0) return 1;
  const int64_t rounds = ((vocab + 7) / 8 + kRowPassChunks - 1) / kRowPassChunks;
  int64_t g = sm_count / batch;
  if (g > kMaxSpread) g = kMaxSpread;
  if (g > rounds) g = rounds;
  return g >= 2 ? static_cast<int>(g) : 1;
}

// ----------------------------------------------------------------------------- launches
// Each launches K1 (slice widths of `ept` elements per thread) and K2 on `stream` for
// inputs that all have the unit's dtype (mixed: any dtypes); `vec`: every pointer and
// row stride is 16-byte aligned. v06 with merge_in_slice_kernel: zeroes args.counters
// (cudaMemsetAsync) and launches the fused kernel alone. v07 with args.spread > 1: K1
// (zeroing args.spread_ctl's handshake words) and the spread K2 (batch * spread blocks).
// Returns the launch error (cudaSuccess when fine).
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
