// The CUDA backend's kernels (K1 slice_kernel, K2 merge_kernel) and their launch, on raw
// pointers with no torch headers. Semantics: proxykern/reference.py (the spec).
//
// Build units: cuda_kernels_{f32,bf16,f16,mixed}.cu each include this header and
// instantiate the kernels for their dtype (ninja compiles them at once);
// cuda_launcher.cpp checks the tensors, sizes the workspace and calls them;
// cuda_register.cpp registers the op. cuda_sample.h is the interface between them.
//
// Design
// ------
// Two launches on the current stream (one in v06's small-grid plan, below), no host
// sync, no allocation besides one at::empty workspace (so the op is safe inside
// CUDA-graph capture):
//
// K1 slice_kernel, grid = batch * num_slices blocks of 256 threads, row-major.
//    Each row's vocabulary is cut into fixed slices of 256 * EPT columns, EPT = 4, 8 or 16
//    elements per thread chosen from the vocabulary alone (cuda_sample.h: 1024 columns
//    up to 260096 columns, so even one row spreads over the SMs; the slicing never
//    depends on the batch, so a row's result is bitwise the same alone or in any batch).
//    A block reads its slice once: three inputs with 16-byte (EPT >= 8) or 8-byte
//    (EPT = 4, 16-bit data) vector loads when every pointer and row stride allows (scalar
//    loads otherwise, and for the masked tail), combines z = base + alpha * (expert - anti) and
//    z' = z / T in fp32 with separately rounded operations, and writes one SlicePartial:
//      max z', sum exp(z' - max), argmax z' (greedy), NaN / +inf / "any z > -inf" flags,
//      and for sampling rows the slice's Gumbel-max winner (key z' + g, index, z').
//    Rows with an active filter (top_k, top_p or min_p) also select the slice's top
//    candidates: an exact block radix select (8-bit digits, warp-aggregated shared
//    histograms; run down to the (cand_per_slice + 1)-th value's own key or a bin holding
//    it alone, never stopping at a wider bin) finds a key bound t_s with at most
//    cand_per_slice values above it
//    (4 * EPT: 16, 32 or 64, about vocab / 64 candidates a row for every width), and
//    the block stores every value with key > t_s (z', column). t_s = 0 means "every
//    finite value of the slice is stored". Candidates are written in any order: every
//    later use is order independent (integer histograms, lexicographic arg-max).
//
// K2 merge_kernel, grid = batch blocks of 512 threads (one per row).
//    Warp 0 merges the row's partials in a fixed order (lane-strided, then a fixed
//    xor-shuffle tree): max, lse = max + log(sum_s sum_s * exp(max_s - max)), greedy
//    token, unfiltered Gumbel winner, status, t* = max_s t_s. Bad rows (status != 0),
//    greedy rows and unfiltered sampling rows are finished here. The overflow rule: a
//    good sampled row whose max z' = z / T is +-inf is sampled as greedy (one pass over z).
//    Filtered rows: the candidate set C is complete above t* (every value with key > t*
//    of the whole row is in C). Thresholds are searched in C when that is provably
//    exact, else in the whole row (the fallback, re-reading the inputs):
//      top_k: radix select of the k-th largest key (exact if k <= |C above t*|);
//      top_p: radix search over (count, mass) histograms, masses exp(z' - max) in
//             64-bit fixed point (deterministic in any order), total mass = the top_k
//             set's (or, for C without top_k, the fp32 sum of K1); first value in
//             descending order whose cumulative mass reaches top_p * total;
//      min_p: exp(z' - max) >= min_p, tested per value as the reference does.
//    If the unfiltered winner passes the final kept test it is the answer (the arg-max
//    over a subset holding the global arg-max). Otherwise one Gumbel-max pass over the
//    kept values: over C when the kept set is provably inside C, else over the row.
//
// v06 (PROXYKERN_CUDA_KERNEL=v06; v05's arithmetic) launches one kernel instead of two
// where cuda_sample.h's merge_in_slice_kernel says so (K1's grid of at most
// kFusedMaxBlocks = 256 blocks, e.g. batch <= 2 at 128256 columns, and 16-byte aligned
// inputs of one dtype); elsewhere it launches v05's K1 and K2 unchanged.
//    A memset zeroes one uint32 counter a row (in the workspace), then fused_kernel runs
//    K1's grid: each block does K1's work (slice_block, the same code as slice_kernel),
//    fences, and thread 0 adds 1 to its row's counter; the block that draws the last
//    ticket (num_slices - 1) resets the counter and runs K2's work for the row
//    (merge_row, the same code as merge_kernel) with its 256 threads, reading the other
//    blocks' partials and candidates through L2 (ld.global.cg). The merge order is
//    fixed and the one reduction that depends on the block width (the overflow rule's
//    sum) is done in the 512-thread order, so the results are v05's bit for bit, and
//    batch-invariant whichever plan a batch gets. Shared memory: K1's and K2's in one
//    union (19892 bytes a block with the "last" flag); registers: 128 (2 blocks an
//    SM). Details at fused_kernel.
//
// v07 (PROXYKERN_CUDA_KERNEL=v07; v05's arithmetic) changes two things, each exact:
//  - K1 computes a column's noise only where its uniform u, known after Philox, allows a
//    key that reaches the slice's floor key (noise_prune_ratio; about 1% of the columns
//    on LM-like rows, where v05 computes it for 30-96%), skipped by whole warps;
//  - K2 runs with G blocks a row where cuda_sample.h's spread_blocks says so (batch * G
//    <= the SM count, G <= 32, at least one 1024-chunk round of a row each; e.g. 16 at
//    128256 columns for batch <= 8, 1 from batch 67 on an H100 / H200), the inputs of
//    one dtype with aligned rows:
//    block 0 of a row (the lead) runs K2's merge; blocks 1..G-1 (helpers) take their share
//    of each whole-row pass the lead's fallback makes (a radix level's histograms, the
//    draw) and return it through global memory. Integer histograms and arg-max records:
//    v05's bits for any G. The common paths never call on the helpers, which exit when
//    the lead says so. Details at "v07: spread K2".
//
// Passes over the inputs per row: greedy / temperature: 1. Filters: 1 in the common
// case (thresholds and draw from the candidates); fallback (the kept set or the
// threshold does not fit the candidates, e.g. huge top_k, tiny min_p or a flat
// distribution with top_p): one more read per radix level (at most 4 for top_k, 4 for
// top_p) plus at most one draw pass, by the row's K2 block alone (v07: its G blocks).
//
// Exactness notes. Keys are the monotone uint32 image of the float (with -0 mapped to
// +0, so ties compare as floats do). The Gumbel draw skips a value x when
// fl(x + 17) < fl(m - 3), m the max of the values in the same arg-max (always one of
// them): g is in [-2.82, 16.64], so such an x can never reach the max's key (rounding
// is monotone). Ties in every reduction go to the lowest column.

#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_sample.h"
#include "philox.h"
#include "proxy_sample.h"

namespace proxykern {
namespace cuda {
namespace {  // internal linkage: each kernel unit holds its own instantiations


// ----------------------------------------------------------------------------- constants

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kChunk = 8;                 // columns per K2 chunk: one 16-byte load of 16-bit data
constexpr int kSliceWarps = kSliceThreads / 32;   // K1 block: kSliceThreads (cuda_sample.h)
constexpr int kMergeThreads = 512;        // K2 block
constexpr int kMergeWarps = kMergeThreads / 32;
constexpr int kCandStage = 2048;          // candidates staged in K2 shared memory
constexpr int kRowUnroll = 2;             // chunks in flight per thread in a K2 row pass
constexpr int kNoIndex = INT_MAX;         // "no element" in arg-max records
constexpr float kGumbelHi = 17.0f;        // strict bounds of g = -log(-log(u)), u in [2^-24, 1 - 2^-24]
constexpr float kGumbelLo = -3.0f;

constexpr uint32_t kFlagNan = 1u;         // some z is NaN
constexpr uint32_t kFlagPosInf = 2u;      // some z is +inf
constexpr uint32_t kFlagLive = 4u;        // some z > -inf

static_assert(kSliceThreads >= 256 && kMergeThreads >= 256, "the radix scan uses 256 threads");
static_assert(kSliceWarps == 8, "K1's max butterfly reads 8 warp records");
static_assert(int64_t{kMergeThreads} * kRowUnroll == kRowPassChunks,
              "spread_blocks (cuda_sample.h) counts a row's passes in K2's rounds of chunks");

// ----------------------------------------------------------------------------- variants
// What differs between the two arithmetic builds, V04 and V05 (cuda_sample.h,
// KernelVariant), and v07's K1 (V07). Every kernel and helper whose arithmetic differs
// takes the policy, so K1 and K2 of one variant compute the same z' and the same noise,
// bit for bit. v06 is not a policy: it runs V05 with another launch plan (launch_variant).
// Merge: the policy of the K2 a variant launches after its K1 (v07's K1 differs from
// v05's only in work skipped, so it pairs with v05's K2 instead of a copy of it).
struct V04 {
  static constexpr bool kFastNoise = false;  // accurate libdevice logf, twice a column
  static constexpr bool kRecipT = false;     // __fdiv_rn per column, also at T == 1
  static constexpr bool kWarpMass = false;   // one 64-bit shared atomicAdd per value
  static constexpr bool kLeanK1 = false;     // every thread re-reduces the warp records
  static constexpr bool kPruneNoise = false;
  using Merge = V04;
};
struct V05 {
  static constexpr bool kFastNoise = true;   // gumbel_fast: ~19 instructions, |dg| bounded
  static constexpr bool kRecipT = true;      // z * RN(1/T) + one correction: the IEEE quotient
  static constexpr bool kWarpMass = true;    // per-warp sums per bin, one atomic per bin
  static constexpr bool kLeanK1 = true;      // params first; records reduced by one thread
  static constexpr bool kPruneNoise = false;
  using Merge = V05;
};
// v07's K1: v05's arithmetic; the noise only where the column's uniform says its key can
// reach the slice's (noise_prune_ratio). The same records as v05's K1, bit for bit.
struct V07 : V05 {
  static constexpr bool kPruneNoise = true;
  using Merge = V05;
};
static_assert(kSliceThreads % 32 == 0 && kMergeThreads % 32 == 0, "whole warps only");

// ----------------------------------------------------------------------------- records

struct Best {
  float key;
  int32_t idx;
  float x;
};

__device__ __forceinline__ Best no_best() { return Best{-INFINITY, kNoIndex, -INFINITY}; }

// a beats b: larger key, or the same key at a lower column. NaN keys never win.
__device__ __forceinline__ bool better(const Best& a, const Best& b) {
  return a.key > b.key || (a.key == b.key && a.idx < b.idx);
}

// ----------------------------------------------------------------------------- loads

__device__ __forceinline__ float bf16_bits(uint32_t b) { return __uint_as_float(b << 16); }
__device__ __forceinline__ float f16_bits(uint32_t b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
}

struct F32 {
  using raw = unsigned int;
  __device__ static float cvt(unsigned int b) { return __uint_as_float(b); }
};
struct BF16 {
  using raw = unsigned short;
  __device__ static float cvt(unsigned int b) { return bf16_bits(b); }
};
struct F16 {
  using raw = unsigned short;
  __device__ static float cvt(unsigned int b) { return f16_bits(b); }
};

// The three inputs of one row, all of dtype D. kVec: every base pointer and row stride is
// 16-byte aligned, so a full chunk (8 columns starting at a multiple of 8) is 1 (16-bit)
// or 2 (fp32) uint4 loads per input.
template <class D, bool kVec>
struct UniformLoader {
  using raw = typename D::raw;
  const raw* p[3];

  __device__ UniformLoader(const KernelArgs& a, int64_t row) {
    p[0] = static_cast<const raw*>(a.base.data) + row * a.base.row_stride;
    p[1] = static_cast<const raw*>(a.expert.data) + row * a.expert.row_stride;
    p[2] = static_cast<const raw*>(a.anti.data) + row * a.anti.row_stride;
  }

  // v[input][j] for columns col0 + j, j < n (n <= N; entries j >= n are left at 0). N = 8:
  // 16-byte loads of 16-bit data; N = 4: 8-byte loads (col0 is a multiple of N).
  template <int N>
  __device__ __forceinline__ void load(int64_t col0, int n, float (&v)[3][N]) const {
    static_assert(N == 4 || N == 8, "chunks of 4 or 8 columns");
    if (kVec && n == N) {
#pragma unroll
      for (int i = 0; i < 3; ++i) {
        if constexpr (sizeof(raw) == 2 && N == 8) {
          const uint4 q = __ldg(reinterpret_cast<const uint4*>(p[i] + col0));
          const unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            v[i][2 * t] = D::cvt(w[t] & 0xFFFFu);
            v[i][2 * t + 1] = D::cvt(w[t] >> 16);
          }
        } else if constexpr (sizeof(raw) == 2) {
          const uint2 q = __ldg(reinterpret_cast<const uint2*>(p[i] + col0));
          v[i][0] = D::cvt(q.x & 0xFFFFu); v[i][1] = D::cvt(q.x >> 16);
          v[i][2] = D::cvt(q.y & 0xFFFFu); v[i][3] = D::cvt(q.y >> 16);
        } else {
#pragma unroll
          for (int h = 0; h < N / 4; ++h) {
            const uint4 q = __ldg(reinterpret_cast<const uint4*>(p[i] + col0 + 4 * h));
            v[i][4 * h + 0] = D::cvt(q.x); v[i][4 * h + 1] = D::cvt(q.y);
            v[i][4 * h + 2] = D::cvt(q.z); v[i][4 * h + 3] = D::cvt(q.w);
          }
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) {
#pragma unroll
        for (int i = 0; i < 3; ++i) v[i][j] = j < n ? D::cvt(__ldg(p[i] + col0 + j)) : 0.0f;
      }
    }
  }
  __device__ __forceinline__ void load8(int64_t col0, int n, float (&v)[3][kChunk]) const {
    load<kChunk>(col0, n, v);
  }
};

// Any mix of dtypes: per-element loads with a (grid-uniform) dtype switch. Slower; only
// used when the three inputs do not share one dtype.
struct DynLoader {
  const char* p[3];
  int dt[3];

  __device__ void init(int i, const LogitsView& view, int64_t row) {
    dt[i] = static_cast<int>(view.dtype);
    const int64_t bytes = view.dtype == LogitsDtype::kFloat32 ? 4 : 2;
    p[i] = static_cast<const char*>(view.data) + row * view.row_stride * bytes;
  }
  __device__ DynLoader(const KernelArgs& a, int64_t row) {
    init(0, a.base, row);
    init(1, a.expert, row);
    init(2, a.anti, row);
  }
  __device__ __forceinline__ float load1(int i, int64_t col) const {
    switch (dt[i]) {
      case static_cast<int>(LogitsDtype::kFloat32):
        return __uint_as_float(__ldg(reinterpret_cast<const unsigned int*>(p[i]) + col));
      case static_cast<int>(LogitsDtype::kBFloat16):
        return bf16_bits(__ldg(reinterpret_cast<const unsigned short*>(p[i]) + col));
      default:
        return f16_bits(__ldg(reinterpret_cast<const unsigned short*>(p[i]) + col));
    }
  }
  template <int N>
  __device__ __forceinline__ void load(int64_t col0, int n, float (&v)[3][N]) const {
#pragma unroll
    for (int j = 0; j < N; ++j) {
#pragma unroll
      for (int i = 0; i < 3; ++i) v[i][j] = j < n ? load1(i, col0 + j) : 0.0f;
    }
  }
  __device__ __forceinline__ void load8(int64_t col0, int n, float (&v)[3][kChunk]) const {
    load<kChunk>(col0, n, v);
  }
};

// ----------------------------------------------------------------------------- math

// z = base + alpha * (expert - anti), each operation rounded separately (no FMA), as the
// CPU and torch backends do; -inf in any input excludes the token.
__device__ __forceinline__ float combine_logit(float b, float e, float a, float alpha) {
  if (b == -INFINITY || e == -INFINITY || a == -INFINITY) return -INFINITY;
  return __fadd_rn(b, __fmul_rn(alpha, __fsub_rn(e, a)));
}

// Greedy rows: T == 0 and, by the overflow rule (proxykern/reference.py), subnormal T.
// A NaN temperature samples (the Python layer flags it).
__device__ __forceinline__ bool is_sampling(float temperature) {
  return !(fabsf(temperature) < 1.17549435e-38f);  // FLT_MIN
}

// z' = z / T. The row's scale: T, RN(1/T) and whether a division happens at all.
struct TScale {
  float t;        // the temperature
  float r;        // RN(1/T) (kRecipT), else unused
  bool sampling;  // is_sampling(t): else z' = z
  bool unit;      // T == 1: z / T == z exactly
};

__device__ __forceinline__ TScale make_tscale(float temperature) {
  TScale s;
  s.t = temperature;
  s.sampling = is_sampling(temperature);
  s.unit = temperature == 1.0f;
  s.r = s.sampling ? __frcp_rn(temperature) : 1.0f;
  return s;
}

// RN(z / t) from r = RN(1/t) without a division. q0 = RN(z * r) can be 1.5 ulp off z / t
// (e.g. t = 2 - 2^-23), so one correction q1 = RN(q0 + RN(z - q0 t) * r) makes it
// faithful, and a second, whose residual z - q1 t is then exact in one FMA, rounds it
// correctly (Markstein's theorem, given r = RN(1/t)). The theorem needs every value
// normal and far from overflow, so operands outside [2^-100, 2^100] take the IEEE
// division (never for an LM's logits; bitwise the same result either way). 5
// instructions instead of __fdiv_rn's ~13; tests/test_noise_model.py checks the sequence
// against IEEE division on CPU (and that one correction, though it also matched in
// every case tried, lacks the theorem's precondition).
__device__ __forceinline__ float div_by_recip(float z, float t, float r) {
  float q = __fmul_rn(z, r);
  const float az = fabsf(z), aq = fabsf(q);
  if (az >= 0x1p-100f && az <= 0x1p100f && aq >= 0x1p-100f && aq <= 0x1p100f) {
    q = __fmaf_rn(__fmaf_rn(-q, t, z), r, q);
    return __fmaf_rn(__fmaf_rn(-q, t, z), r, q);
  }
  return __fdiv_rn(z, t);
}

template <class P>
__device__ __forceinline__ float scale_logit(float z, const TScale& s) {
  if constexpr (P::kRecipT) {
    return (!s.sampling || s.unit) ? z : div_by_recip(z, s.t, s.r);
  } else {
    return s.sampling ? __fdiv_rn(z, s.t) : z;
  }
}

// g = -log(-log(u)), v0.4: accurate libdevice logf twice (~54 instructions), as the
// other backends compute it.
__device__ __forceinline__ float gumbel_accurate(uint32_t bits) {
  return -logf(-logf(uniform_from_bits(bits)));
}

// g = -log(-log(u)), v0.5 (~24 instructions, all but two MUFU full rate). The hardware
// log (MUFU.LG2; __log2f: absolute error <= 2^-22 on [0.5, 2], else <= 2 ulp) has a
// small absolute error in log2, which is a large relative error of L = -log(u) as u -> 1,
// where the Gumbel-max winners live. So the inner log is
//   u >= 3/4: L = 2 atanh(s), s = d / (2 - d), d = 1 - u (exact), s <= 1/7, a series to
//             s^9 (truncation < 2e-9 relative);
//   u <  3/4: L = -log2(u) * ln 2 from the hardware log (L > 0.287 there).
// The outer log splits L's exponent off, L = 2^e * m, m in [1, 2): g = -(e + log2 m) ln 2
// with the hardware log on m alone, where its bound is absolute (log2 L itself rounded
// to fp32 near -24 would lose 1e-6). Every operation is spelled out (no contraction
// choices left to the compiler), so tests/test_noise_model.py emulates this sequence over
// all 2^23 values of u against float64, with the documented bounds as perturbations:
// |dg| <= 9.7e-7 (half an ulp of g near its top, 16.6; correctly rounded fp32 logs:
// 5.2e-7), and g stays inside (kGumbelLo, kGumbelHi).
constexpr float kNoiseSplit = 0.75f;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kAtanh9 = 2.0f / 9.0f, kAtanh7 = 2.0f / 7.0f, kAtanh5 = 2.0f / 5.0f,
                kAtanh3 = 2.0f / 3.0f;

__device__ __forceinline__ float gumbel_fast(uint32_t bits) {
  const float u = uniform_from_bits(bits);
  const float d = __fsub_rn(1.0f, u);                      // exact for u >= 1/2
  const float s = __fdividef(d, __fsub_rn(2.0f, d));       // MUFU.RCP + FMUL
  const float s2 = __fmul_rn(s, s);
  float p = __fmaf_rn(kAtanh9, s2, kAtanh7);
  p = __fmaf_rn(p, s2, kAtanh5);
  p = __fmaf_rn(p, s2, kAtanh3);
  const float near1 = __fmaf_rn(__fmul_rn(s, s2), p, __fmul_rn(2.0f, s));  // 2 atanh(s)
  const float far = __fmul_rn(__log2f(u), -kLn2);
  const float L = u >= kNoiseSplit ? near1 : far;         // -log(u), normal, > 0
  const uint32_t b = __float_as_uint(L);
  // e as a float without I2F: 2^23 + (b >> 23) exactly, minus 2^23 + 127.
  const float e = __fsub_rn(__uint_as_float((b >> 23) | 0x4B000000u), 8388735.0f);
  const float m = __uint_as_float((b & 0x007FFFFFu) | 0x3F800000u);
  return __fmaf_rn(e, -kLn2, __fmul_rn(__log2f(m), -kLn2));
}

template <class P>
__device__ __forceinline__ float gumbel_from_bits(uint32_t bits) {
  if constexpr (P::kFastNoise) {
    return gumbel_fast(bits);
  } else {
    return gumbel_accurate(bits);
  }
}

// v07's noise pruning. K1 skips the noise of a column whose z' x lies 20 below the slice
// max m (x + 17 < fl(m - 3), every variant). v07 also skips it, after Philox, when
//   fl(1 - u) > ex2(fl(fl(x - F) * log2 e)),  F = fl(m - 3),  |m| < 2^16 (kPruneMaxAbs),
// i.e. (with every rounding and ex2.approx's 2^-22 relative error bounded, and
// -log(u) >= 1 - u) when g(u) < F - x + 4e-6: the column's computed key fl(x + g) is
// then below F + 0.005, while the slice's best key is at least a max column's,
// fl(m + g) >= fl(m - 2.82) > F + 0.17 (g >= -2.81; ulps of at most 2^-7 below 2^16).
// So a skipped column could neither win nor tie, and the slice's record is v05's bit for
// bit. 1 - u is exact (u = (2k + 1) 2^-24). tests/test_noise_model.py checks the
// inequality over every u against the model of gumbel_fast. On LM-like and randn * 3 rows
// about 1% of the columns keep their noise (a CPU model, benchmarks/NOTES.md v0.7), where
// the x test alone keeps 30-96%.
constexpr float kPruneMaxAbs = 65536.0f;
constexpr float kLog2e = 1.44269504088896340736f;

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// exp(x - F) as the pruning test computes it (F: fl(m - 3), the floor key).
__device__ __forceinline__ float noise_prune_ratio(float x, float floor_key) {
  return ex2_approx(__fmul_rn(__fsub_rn(x, floor_key), kLog2e));
}

__device__ __forceinline__ uint32_t philox_word(const Philox4& r, int j) {
  return j == 0 ? r.w[0] : j == 1 ? r.w[1] : j == 2 ? r.w[2] : r.w[3];
}

// Monotone uint32 image of a float (larger float, larger key; -0 and +0 share a key).
__device__ __forceinline__ uint32_t float_key(float x) {
  uint32_t b = __float_as_uint(x);
  if (x == 0.0f) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

__device__ __forceinline__ uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }

// ----------------------------------------------------------------------------- row params

struct RowFilter {
  bool top_k_on, top_p_on, min_p_on;
  uint32_t k;   // valid when top_k_on (0 < k < vocab)
  float top_p, min_p;
  __device__ bool any() const { return top_k_on || top_p_on || min_p_on; }
};

// top_k <= 0 or >= vocab: all; top_p >= 1 (or NaN): all; min_p <= 0 (or NaN): all. The
// Python layer flags NaN and out-of-range values (their rows get token -1).
__device__ __forceinline__ RowFilter read_filter(const RowParams& rp, int64_t row, int64_t vocab) {
  RowFilter f;
  const int64_t k = rp.top_k[row];
  f.top_k_on = k > 0 && k < vocab;
  f.k = f.top_k_on ? static_cast<uint32_t>(k) : 0u;
  f.top_p = rp.top_p[row];
  f.top_p_on = f.top_p < 1.0f;
  f.min_p = rp.min_p[row];
  f.min_p_on = f.min_p > 0.0f;
  return f;
}

// Every per-row parameter K1 uses, loaded at once at the top of the kernel (v0.5): one
// round of independent loads in flight beside the data's, instead of temperature, then
// the filter (its loads sunk below the `sampling` test), then seed/step after a barrier.
struct RowScalars {
  float alpha, temperature, top_p, min_p;
  int64_t top_k, seed, step;
};

__device__ __forceinline__ RowScalars load_row_scalars(const RowParams& rp, int64_t row) {
  RowScalars r;
  r.alpha = __ldg(rp.alpha + row);
  r.temperature = __ldg(rp.temperature + row);
  r.top_p = __ldg(rp.top_p + row);
  r.min_p = __ldg(rp.min_p + row);
  r.top_k = __ldg(rp.top_k + row);
  r.seed = __ldg(rp.seed + row);
  r.step = __ldg(rp.step + row);
  return r;
}

// read_filter's rule on preloaded values.
__device__ __forceinline__ RowFilter filter_of(const RowScalars& r, int64_t vocab) {
  RowFilter f;
  f.top_k_on = r.top_k > 0 && r.top_k < vocab;
  f.k = f.top_k_on ? static_cast<uint32_t>(r.top_k) : 0u;
  f.top_p = r.top_p;
  f.top_p_on = f.top_p < 1.0f;
  f.min_p = r.min_p;
  f.min_p_on = f.min_p > 0.0f;
  return f;
}

// ----------------------------------------------------------------------------- warp/block

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
// Xor butterfly: every lane ends with the same, order-fixed sum (addition commutes).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
__device__ __forceinline__ uint32_t warp_or(uint32_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ uint32_t warp_umax(uint32_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = umax(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
__device__ __forceinline__ Best warp_best(Best b) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const Best other{__shfl_xor_sync(kFullMask, b.key, o), __shfl_xor_sync(kFullMask, b.idx, o),
                     __shfl_xor_sync(kFullMask, b.x, o)};
    if (better(other, b)) b = other;
  }
  return b;
}

// Block-wide arg-max; every thread gets the result. red holds NT / 32 entries.
template <int NT>
__device__ __forceinline__ Best block_best(Best b, Best* red) {
  b = warp_best(b);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = b;
  __syncthreads();
  Best r = no_best();
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) {
    const Best o = red[w];
    if (better(o, r)) r = o;
  }
  __syncthreads();  // red may be reused
  return r;
}

// Block-wide sum in a fixed order; every thread gets the result. red holds NT / 32 entries.
template <int NT>
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = 0.0f;
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) r = __fadd_rn(r, red[w]);
  __syncthreads();  // red may be reused
  return r;
}

// ----------------------------------------------------------------------------- radix search

struct RadixSmem {
  uint32_t cnt[256];
  unsigned long long mass[256];
  uint32_t wcnt[8];
  unsigned long long wmass[8];
  uint32_t first;
  uint32_t sel_cnt, sel_above_cnt;
  unsigned long long sel_mass, sel_above_mass;
};

enum class SearchMode { kRank, kMass };

struct SearchSpec {
  SearchMode mode;
  uint32_t need;        // kRank: the rank (1 = largest) of the value searched
  uint32_t dom_lo;      // only finite values with key >= dom_lo take part
  bool with_mass;       // build mass histograms (required by kMass)
  float p;              // kMass: fraction of the total mass
  bool use_t_ext;       // kMass: total = t_ext, else the domain's own total mass
  double t_ext;
  // kRank: stop as soon as the bins from the top hold exactly `need` values (exact for a
  // threshold at key_lo, as top_k wants). K1's candidate bound wants key_hi tight instead:
  // there a level-0 bin spans a factor of 4 in z', and 17 values in one bin of a short
  // last slice would put t_s near 32 -- above the row's max, leaving no candidates and
  // sending the row to K2's whole-row fallback.
  bool count_exit = true;
};

struct SearchOut {
  bool found;
  uint32_t key_lo, key_hi;   // key range of the bin holding the value searched
  uint32_t cnt_ge;           // values in the domain with key >= key_lo
  unsigned long long mass_ge;
};

struct MassCtx {
  float m;       // the row's max z'
  float scale;   // 2^F
  // round(exp(x - m) * 2^F): exact scaling, one rounding; NaN or out-of-range -> clamp.
  __device__ __forceinline__ unsigned long long q(float x) const {
    float e = expf(__fsub_rn(x, m));
    e = e >= 0.0f ? (e <= 1.0f ? e : 1.0f) : 0.0f;
    return __float2ull_rn(__fmul_rn(e, scale));
  }
};

// All 32 lanes must call this together (the sources call back in warp-uniform loops).
__device__ __forceinline__ unsigned warp_hist_add(uint32_t* cnt, bool active, uint32_t d) {
  const unsigned peers = __match_any_sync(kFullMask, active ? d : 0xFFFFFFFFu);
  if (active && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) {
    atomicAdd(&cnt[d], static_cast<uint32_t>(__popc(peers)));
  }
  return peers;
}

// v0.5: the fixed-point masses of the lanes sharing a bin (peers, from warp_hist_add)
// summed in the warp, then one shared-memory atomic per bin and warp. sm_90 has no
// native 64-bit shared add (atomicAdd compiles to a CAS loop), and a flat row at T = 4
// sends ~128k values into ~8 bins: per-value atomics serialize there (1.4 ms a row in
// NOTES v0.4). A mass is < 2^61 (2^F, F <= 60), so three 27-bit pieces each sum over
// 32 lanes without overflow in the native 32-bit warp reduction (REDUX). Integer sums:
// the histogram does not depend on the order, as before. All lanes call this together.
__device__ __forceinline__ void warp_mass_add(unsigned long long* mass, bool active, uint32_t d,
                                              unsigned long long q, unsigned peers) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned long long v = active ? q : 0ull;
  constexpr unsigned long long kPiece = (1ull << 27) - 1ull;
  // Each group of peers reduces with its own mask (the labeled-partition pattern).
  const unsigned lo = __reduce_add_sync(peers, static_cast<unsigned>(v & kPiece));
  const unsigned mid = __reduce_add_sync(peers, static_cast<unsigned>((v >> 27) & kPiece));
  const unsigned hi = __reduce_add_sync(peers, static_cast<unsigned>(v >> 54));
  if (active && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) {
    atomicAdd(&mass[d], static_cast<unsigned long long>(lo) +
                            (static_cast<unsigned long long>(mid) << 27) +
                            (static_cast<unsigned long long>(hi) << 54));
  }
#else
  (void)peers;  // no warp reduction before sm_80: one atomic per value
  if (active) atomicAdd(&mass[d], q);
#endif
}

// One radix level's histograms of a source into cnt / mass (zeroed by the caller): the
// finite values with key >= dom_lo whose key's bits above this level's digit equal
// prefix, binned by the digit; masses (when with_mass) in mc's fixed point. Integer
// sums: the same histograms in any order and from any split of the source (v07's spread
// helpers build their shares with it). All threads of the block call it.
template <bool kWarpMass, class Src>
__device__ __forceinline__ void level_histogram(const Src& src, uint32_t* cnt,
                                                unsigned long long* mass, uint32_t dom_lo,
                                                bool with_mass, const MassCtx& mc, int level,
                                                uint32_t prefix) {
  const int shift = 24 - 8 * level;
  src([&](bool active, float x, int32_t) {
    uint32_t k = 0u;
    if (active && isfinite(x)) {
      k = float_key(x);
      active = k >= dom_lo && (level == 0 || (k >> (shift + 8)) == prefix);
    } else {
      active = false;
    }
    const uint32_t d = (k >> shift) & 255u;
    const unsigned peers = warp_hist_add(cnt, active, d);
    if constexpr (kWarpMass) {
      if (with_mass) warp_mass_add(mass, active, d, active ? mc.q(x) : 0ull, peers);
    } else {
      if (with_mass && active) atomicAdd(&mass[d], mc.q(x));
    }
  });
}

// What radix_search and block_draw do besides their own block's share: nothing, except
// in v07's spread lead (SpreadLead), which hands every whole-row pass to the row's helper
// blocks too and adds their answers in.
struct NoGather {
  NoGather() = default;
  __device__ NoGather(const KernelArgs&, int64_t) {}
  __device__ __forceinline__ void publish_hist(int, uint32_t, const SearchSpec&, const MassCtx&) {}
  __device__ __forceinline__ void collect_hist(RadixSmem&) {}
  __device__ __forceinline__ void publish_draw(uint32_t, float) {}
  __device__ __forceinline__ Best collect_best(Best b) { return b; }
};

// Radix search over the keys of a source, 8 bits per level from the top, early exit as
// soon as the searched value's bin is settled. A source is a callable taking f and
// calling f(bool active, float x, int32_t column) for its values, in loops whose trip
// count is the same for every thread of the block.
//   kRank: the need-th largest key (with multiplicity). Exact: the domain values with
//          key >= key_lo are exactly those >= that value; at most need - 1 are > key_hi.
//   kMass: the first value v in descending order at which the cumulative mass reaches
//          p * total, i.e. !(cum < p * total) (the reference's n_below rule). The domain
//          values with key >= key_lo are exactly those >= v.
// found = false: fewer than need values (kRank) or the mass never reaches the target.
// Block-uniform result. Integer histograms: the result does not depend on the order in
// which the source lists its values, nor on how it is split: with v07's SpreadLead as
// gather, the source is the lead's share and each level adds the helpers' shares in.
template <int NT, bool kWarpMass, class Src, class Gather = NoGather>
__device__ __forceinline__ SearchOut radix_search(const Src& src, RadixSmem& sm,
                                                  const SearchSpec& spec, const MassCtx& mc,
                                                  Gather&& gather = Gather{}) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  SearchOut out{false, 0u, 0u, 0u, 0ull};
  uint32_t prefix = 0, above_cnt = 0;
  unsigned long long above_mass = 0;
  double target = 0.0;
  for (int level = 0; level < 4; ++level) {
    const int shift = 24 - 8 * level;
    for (int i = tid; i < 256; i += NT) {
      sm.cnt[i] = 0u;
      sm.mass[i] = 0ull;
    }
    __syncthreads();
    gather.publish_hist(level, prefix, spec, mc);
    level_histogram<kWarpMass>(src, sm.cnt, sm.mass, spec.dom_lo, spec.with_mass, mc, level,
                               prefix);
    __syncthreads();
    gather.collect_hist(sm);
    // Thread t < 256 owns bin 255 - t: inclusive scans run from the top bin down.
    uint32_t c = 0u;
    unsigned long long ms = 0ull;
    if (tid < 256) {
      c = sm.cnt[255 - tid];
      ms = sm.mass[255 - tid];
    }
    uint32_t ci = c;
    unsigned long long mi = ms;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t tc = __shfl_up_sync(kFullMask, ci, o);
      const unsigned long long tm = __shfl_up_sync(kFullMask, mi, o);
      if (lane >= o) {
        ci += tc;
        mi += tm;
      }
    }
    if (tid < 256 && lane == 31) {
      sm.wcnt[warp] = ci;
      sm.wmass[warp] = mi;
    }
    if (tid == 0) sm.first = 0xFFFFFFFFu;
    __syncthreads();
    uint32_t pre_c = 0u;
    unsigned long long pre_m = 0ull, tot_m = 0ull;
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      const uint32_t wc = sm.wcnt[w];
      const unsigned long long wm = sm.wmass[w];
      if (w < warp) {
        pre_c += wc;
        pre_m += wm;
      }
      tot_m += wm;
    }
    if (level == 0 && spec.mode == SearchMode::kMass) {
      target = static_cast<double>(spec.p) *
               (spec.use_t_ext ? spec.t_ext : static_cast<double>(tot_m));
    }
    const uint32_t inc_c = above_cnt + pre_c + ci;
    const unsigned long long inc_m = above_mass + pre_m + mi;
    bool qualifies = false;
    if (tid < 256 && c > 0u) {
      qualifies = spec.mode == SearchMode::kRank ? inc_c >= spec.need
                                                 : !(static_cast<double>(inc_m) < target);
    }
    if (qualifies) atomicMin(&sm.first, static_cast<uint32_t>(tid));
    __syncthreads();
    const uint32_t first = sm.first;
    if (first == 0xFFFFFFFFu) return out;  // block-uniform
    if (static_cast<uint32_t>(tid) == first) {
      sm.sel_cnt = c;
      sm.sel_mass = ms;
      sm.sel_above_cnt = inc_c - c;
      sm.sel_above_mass = inc_m - ms;
    }
    __syncthreads();
    const uint32_t sel_cnt = sm.sel_cnt;
    above_cnt = sm.sel_above_cnt;
    above_mass = sm.sel_above_mass;
    prefix = (prefix << 8) | (255u - first);
    const bool done = level == 3 || sel_cnt == 1u ||
                      (spec.mode == SearchMode::kRank && spec.count_exit &&
                       above_cnt + sel_cnt == spec.need);
    if (done) {
      out.found = true;
      out.key_lo = prefix << shift;
      out.key_hi = out.key_lo | ((1u << shift) - 1u);
      out.cnt_ge = above_cnt + sel_cnt;
      out.mass_ge = above_mass + sm.sel_mass;
      return out;
    }
    // The next level's first writes to sm (cnt, mass) follow reads that all threads
    // finished before the last barrier; sel_* and first are rewritten only after two
    // more barriers.
  }
  return out;
}

// ----------------------------------------------------------------------------- K1

// K1's shared memory: where slice_block finds it. slice_kernel declares the arrays one
// by one (as before v06: the same code as v0.5's K1, register for register); v06's
// fused_kernel points into SliceSmem, overlaid with K2's (FusedSmem).
struct SliceShared {
  RadixSmem& rs;
  float* r1_max;
  uint32_t* r1_flags;
  Best* r1_best;
  float* r2_sum;
  Best* r2_g;
  uint32_t& ncand;
};
struct SliceSmem {
  RadixSmem rs;
  float r1_max[kSliceWarps];
  uint32_t r1_flags[kSliceWarps];
  Best r1_best[kSliceWarps];
  float r2_sum[kSliceWarps];
  Best r2_g[kSliceWarps];
  uint32_t ncand;
  __device__ SliceShared refs() { return SliceShared{rs, r1_max, r1_flags, r1_best, r2_sum, r2_g, ncand}; }
};

// K1's work, one block of kSliceThreads threads: slice blockIdx.x % num_slices of row
// blockIdx.x / num_slices. Writes the slice's SlicePartial (thread 0) and, for filtered
// rows, its candidates (every thread) with plain stores. slice_kernel is this alone;
// v06's fused_kernel runs it, then the merge in the row's last block.
template <class Loader, int EPT, class P>
__device__ __forceinline__ void slice_block(const KernelArgs& a, const SliceShared& sm) {
  constexpr int CH = EPT >= kChunk ? kChunk : EPT;  // columns per load
  constexpr int CPT = EPT / CH;                      // chunks per thread
  constexpr int kSlice = kSliceThreads * EPT;        // columns per slice
  static_assert(CH % 4 == 0 && CPT * CH == EPT, "whole Philox groups per chunk");
  RadixSmem& rs = sm.rs;
  float* const r1_max = sm.r1_max;
  uint32_t* const r1_flags = sm.r1_flags;
  Best* const r1_best = sm.r1_best;
  float* const r2_sum = sm.r2_sum;
  Best* const r2_g = sm.r2_g;
  uint32_t& s_ncand = sm.ncand;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) / a.num_slices;
  const int slice = static_cast<int>(static_cast<int64_t>(blockIdx.x) - row * a.num_slices);
  const int64_t vocab = a.vocab;
  float alpha, temperature;
  RowFilter rf;
  int64_t seed = 0, step = 0;
  if constexpr (P::kLeanK1) {
    const RowScalars rp = load_row_scalars(a.params, row);
    alpha = rp.alpha;
    temperature = rp.temperature;
    rf = filter_of(rp, vocab);
    seed = rp.seed;
    step = rp.step;
  } else {
    alpha = a.params.alpha[row];
    temperature = a.params.temperature[row];
    rf = read_filter(a.params, row, vocab);
  }
  const TScale ts = make_tscale(temperature);
  const bool sampling = ts.sampling;
  const bool filtered = sampling && rf.any();
  const Loader ld(a, row);
  const int64_t slice0 = static_cast<int64_t>(slice) * kSlice;

  // Thread tid owns chunks tid, tid + 256, ... of the slice (coalesced 16-byte loads).
  int64_t col0[CPT];
  int nvalid[CPT];
  float x[EPT];
  uint32_t flags = 0u;
  float mx = -INFINITY;
  Best best = no_best();
  {
    float v[CPT][3][CH];
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      col0[c] = slice0 + static_cast<int64_t>(c * kSliceThreads + tid) * CH;
      const int64_t left = vocab - col0[c];
      nvalid[c] = left <= 0 ? 0 : (left >= CH ? CH : static_cast<int>(left));
      ld.template load<CH>(col0[c], nvalid[c], v[c]);
    }
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const int e = c * CH + j;
        if (j < nvalid[c]) {
          const float z = combine_logit(v[c][0][j], v[c][1][j], v[c][2][j], alpha);
          flags |= (z != z) ? kFlagNan : 0u;
          flags |= (z == INFINITY) ? kFlagPosInf : 0u;
          flags |= (z > -INFINITY) ? kFlagLive : 0u;
          const float xp = scale_logit<P>(z, ts);
          x[e] = xp;
          mx = fmaxf(mx, xp);
          const Best cand{xp, static_cast<int32_t>(col0[c] + j), xp};
          if (better(cand, best)) best = cand;
        } else {
          x[e] = -INFINITY;
        }
      }
    }
  }

  // Round 1: max, flags, greedy arg-max.
  mx = warp_max(mx);
  flags = warp_or(flags);
  best = warp_best(best);
  if (lane == 0) {
    r1_max[warp] = mx;
    r1_flags[warp] = flags;
    r1_best[warp] = best;
  }
  if (tid == 0) s_ncand = 0u;
  __syncthreads();
  float m = -INFINITY;
  uint32_t slice_flags = 0u;
  Best slice_best = no_best();
  if constexpr (P::kLeanK1) {
    // Every thread needs m: lane l reads warp l % 8's max, a 3-step butterfly (the same
    // steps in every warp, so every thread gets the same bits). The flags and the
    // arg-max only matter to thread 0, which reduces them when it writes the record.
    m = r1_max[lane & (kSliceWarps - 1)];
#pragma unroll
    for (int o = kSliceWarps / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(kFullMask, m, o));
  } else {
#pragma unroll
    for (int w = 0; w < kSliceWarps; ++w) {
      m = fmaxf(m, r1_max[w]);
      slice_flags |= r1_flags[w];
      if (better(r1_best[w], slice_best)) slice_best = r1_best[w];
    }
  }

  // Round 2: sum of exp(z' - m), Gumbel winner.
  float sum = 0.0f;
  if (m > -INFINITY) {
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      if (x[e] > -INFINITY) sum = __fadd_rn(sum, expf(__fsub_rn(x[e], m)));
    }
  }
  Best g = no_best();
  if (sampling) {
    if constexpr (!P::kLeanK1) {
      seed = a.params.seed[row];
      step = a.params.step[row];
    }
    const float floor_key = __fadd_rn(m, kGumbelLo);
    // v07: the pruning test's bound holds for |m| < 2^16 (also false for m = +-inf, NaN).
    const bool prune = P::kPruneNoise && fabsf(m) < kPruneMaxAbs;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
#pragma unroll
      for (int h = 0; h < CH / 4; ++h) {
        bool need = false;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int e = c * CH + h * 4 + j;
          need |= (h * 4 + j < nvalid[c]) && !(__fadd_rn(x[e], kGumbelHi) < floor_key);
        }
        if constexpr (P::kPruneNoise) {
          // Philox where the x test passes (divergent), then per column the uniform's
          // test; the noise under a warp vote, so a warp skips it unless a lane needs it
          // (all lanes are converged here: the loops are the same in every thread).
          Philox4 r{{0u, 0u, 0u, 0u}};
          if (need) r = philox_for_group(seed, step, static_cast<uint32_t>((col0[c] >> 2) + h));
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int e = c * CH + h * 4 + j;
            bool noise = (h * 4 + j < nvalid[c]) && !(__fadd_rn(x[e], kGumbelHi) < floor_key);
            if (prune && noise) {
              noise = !(__fsub_rn(1.0f, uniform_from_bits(r.w[j])) > noise_prune_ratio(x[e], floor_key));
            }
            if (__any_sync(kFullMask, noise) && noise) {
              const Best cand{__fadd_rn(x[e], gumbel_from_bits<P>(r.w[j])),
                              static_cast<int32_t>(col0[c] + h * 4 + j), x[e]};
              if (better(cand, g)) g = cand;
            }
          }
        } else if (need) {
          const Philox4 r =
              philox_for_group(seed, step, static_cast<uint32_t>((col0[c] >> 2) + h));
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int e = c * CH + h * 4 + j;
            if ((h * 4 + j < nvalid[c]) && !(__fadd_rn(x[e], kGumbelHi) < floor_key)) {
              const Best cand{__fadd_rn(x[e], gumbel_from_bits<P>(r.w[j])),
                              static_cast<int32_t>(col0[c] + h * 4 + j), x[e]};
              if (better(cand, g)) g = cand;
            }
          }
        }
      }
    }
  }
  sum = warp_sum(sum);
  g = warp_best(g);
  if (lane == 0) {
    r2_sum[warp] = sum;
    r2_g[warp] = g;
  }
  __syncthreads();
  float slice_sum = 0.0f;
  Best slice_g = no_best();
  // v0.5: only thread 0 writes the record, so only it reduces (after the filtered
  // branch's barriers, which leave r1_* and r2_* untouched). Same order, same bits.
  auto reduce_records = [&]() {
#pragma unroll
    for (int w = 0; w < kSliceWarps; ++w) {
      slice_sum = __fadd_rn(slice_sum, r2_sum[w]);
      if (better(r2_g[w], slice_g)) slice_g = r2_g[w];
    }
  };
  if constexpr (!P::kLeanK1) reduce_records();

  // Filtered rows: the slice's candidates (every key above tkey, at most cand_cap).
  uint32_t tkey = 0u;
  int32_t ncand = 0;
  if (filtered) {
    auto src = [&](auto&& f) {
#pragma unroll
      for (int c = 0; c < CPT; ++c) {
#pragma unroll
        for (int j = 0; j < CH; ++j) {
          f(j < nvalid[c], x[c * CH + j], static_cast<int32_t>(col0[c] + j));
        }
      }
    };
    const int cand_cap = a.cand_per_slice;
    SearchSpec spec{SearchMode::kRank, static_cast<uint32_t>(cand_cap) + 1u, 0u, false,
                    0.0f, false, 0.0, /*count_exit=*/false};
    const SearchOut so = radix_search<kSliceThreads, P::kWarpMass>(src, rs, spec, MassCtx{m, 1.0f});
    // The (cand_cap + 1)-th largest value's bin holds it alone or is a single key, so
    // at most cand_cap values lie above key_hi and the bound is as tight as the keys
    // allow; fewer than cand_cap + 1 finite values: store them all (tkey 0).
    tkey = so.found ? so.key_hi : 0u;
    Cand* out = a.cands + (row * a.num_slices + slice) * cand_cap;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const float xv = x[c * CH + j];
        if (j < nvalid[c] && isfinite(xv) && float_key(xv) > tkey) {
          const uint32_t slot = atomicAdd(&s_ncand, 1u);
          if (slot < static_cast<uint32_t>(cand_cap)) {
            out[slot] = Cand{xv, static_cast<int32_t>(col0[c] + j)};
          }
        }
      }
    }
    __syncthreads();
    ncand = s_ncand < static_cast<uint32_t>(cand_cap) ? static_cast<int32_t>(s_ncand)
                                                           : cand_cap;
    for (int i = ncand + tid; i < cand_cap; i += kSliceThreads) out[i] = Cand{-INFINITY, 0};
  }

  if (tid == 0) {
    if constexpr (P::kLeanK1) {
      reduce_records();
#pragma unroll
      for (int w = 0; w < kSliceWarps; ++w) {
        slice_flags |= r1_flags[w];
        if (better(r1_best[w], slice_best)) slice_best = r1_best[w];
      }
    }
    SlicePartial p;
    p.max = m;
    p.sum = slice_sum;
    p.best_x = slice_best.key;
    p.best_idx = slice_best.idx;
    p.gkey = slice_g.key;
    p.gidx = slice_g.idx;
    p.gx = slice_g.x;
    p.flags = slice_flags;
    p.tkey = tkey;
    p.ncand = ncand;
    a.partials[row * a.num_slices + slice] = p;
    // v07's spread plan: the row's K2 handshake starts from zero (K2 runs after this launch).
    if (slice == 0 && a.spread_ctl != nullptr) {
      a.spread_ctl[row].seq = 0u;
      a.spread_ctl[row].arrive = 0u;
    }
  }
}

template <class Loader, int EPT, class P>
__global__ void __launch_bounds__(kSliceThreads) slice_kernel(const KernelArgs a) {
  __shared__ RadixSmem rs;
  __shared__ float r1_max[kSliceWarps];
  __shared__ uint32_t r1_flags[kSliceWarps];
  __shared__ Best r1_best[kSliceWarps];
  __shared__ float r2_sum[kSliceWarps];
  __shared__ Best r2_g[kSliceWarps];
  __shared__ uint32_t s_ncand;
  slice_block<Loader, EPT, P>(a, SliceShared{rs, r1_max, r1_flags, r1_best, r2_sum, r2_g, s_ncand});
}

// ----------------------------------------------------------------------------- K2 sources

// Loads of what K1 wrote. kL2 (v06's fused kernel): the records were written by other
// blocks of the same launch, so they are read through L2 (ld.global.cg), never from a
// line this SM's L1 may hold from before they were written; the writer's fence and the
// row counter's atomic order them (fused_kernel). Otherwise (merge_kernel, a later
// launch) plain loads.
static_assert(sizeof(SlicePartial) == 40 && alignof(SlicePartial) == 4 &&
                  offsetof(SlicePartial, max) == 0 && offsetof(SlicePartial, sum) == 4,
              "SlicePartial: ten 4-byte fields, read as five 8-byte words (the array is "
              "8-byte aligned: the workspace starts at 256 bytes, records are 40 bytes)");
static_assert(sizeof(Cand) == 8 && alignof(Cand) == 8, "Cand: one 8-byte word");

__device__ __forceinline__ SlicePartial load_partial_l2(const SlicePartial* p) {
  const uint2* q = reinterpret_cast<const uint2*>(p);
  uint2 w[5];
#pragma unroll
  for (int i = 0; i < 5; ++i) w[i] = __ldcg(q + i);
  SlicePartial r;
  memcpy(&r, w, sizeof(r));
  return r;
}
__device__ __forceinline__ Cand load_cand_l2(const Cand* p) {
  const int2 w = __ldcg(reinterpret_cast<const int2*>(p));
  return Cand{__int_as_float(w.x), w.y};
}
template <bool kL2>
__device__ __forceinline__ Cand load_cand(const Cand* p) {
  if constexpr (kL2) {
    return load_cand_l2(p);
  } else {
    return *p;
  }
}

// Candidates (global or shared memory); only finite values with key >= dom_lo are active.
// kL2: global candidates (l2 set) are read through L2 (load_cand_l2); the shared-memory
// copy (l2 false) with plain loads.
template <int NT, bool kL2 = false>
struct CandSource {
  const Cand* p;
  int n;
  uint32_t dom_lo;
  bool l2 = kL2;
  template <class F>
  __device__ __forceinline__ void operator()(F&& f) const {
    for (int base = 0; base < n; base += NT) {
      const int i = base + static_cast<int>(threadIdx.x);
      Cand c{-INFINITY, 0};
      bool active = false;
      if (i < n) {
        if constexpr (kL2) {
          c = l2 ? load_cand_l2(p + i) : p[i];
        } else {
          c = p[i];
        }
        active = isfinite(c.x) && float_key(c.x) >= dom_lo;
      }
      f(active, c.x, c.idx);
    }
  }
};

// The whole row, recomputed from the inputs (the same z' as K1, bit for bit). kPart
// (v07's spread): only share `part` of `parts`, the rounds of NT * kRowUnroll chunks
// r = part (mod parts); the parts of a split list every value exactly once.
template <class Loader, int NT, class P, bool kPart = false>
struct RowSource {
  Loader ld;
  float alpha;
  TScale ts;
  int64_t vocab;
  int part = 0, parts = 1;  // kPart only
  template <class F>
  __device__ __forceinline__ void operator()(F&& f) const {
    const int64_t nchunks = (vocab + kChunk - 1) / kChunk;
    constexpr int64_t kRound = static_cast<int64_t>(NT) * kRowUnroll;
    const int64_t first = kPart ? part * kRound : 0;
    const int64_t stride = kPart ? parts * kRound : kRound;
    for (int64_t base = first; base < nchunks; base += stride) {
      float v[kRowUnroll][3][kChunk];
      int n[kRowUnroll];
      int64_t col0[kRowUnroll];
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        col0[u] = (base + static_cast<int64_t>(u) * NT + threadIdx.x) * kChunk;
        const int64_t left = vocab - col0[u];
        n[u] = left <= 0 ? 0 : (left >= kChunk ? kChunk : static_cast<int>(left));
        ld.load8(col0[u], n[u], v[u]);
      }
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          const bool valid = j < n[u];
          const float xp =
              valid ? scale_logit<P>(combine_logit(v[u][0][j], v[u][1][j], v[u][2][j], alpha), ts)
                    : -INFINITY;
          f(valid, xp, static_cast<int32_t>(col0[u] + j));
        }
      }
    }
  }
};

// ----------------------------------------------------------------------------- K2 filters

struct FilterCtx {
  RowFilter rf;
  float m;             // the row's max z'
  float scale;         // 2^F
  double t_ext;        // K1's total mass sum exp(z' - m), in fixed-point units
  int64_t seed, step;
};

__device__ __forceinline__ bool is_kept(float x, uint32_t thr, const FilterCtx& fc) {
  if (!isfinite(x) || float_key(x) < thr) return false;
  return !fc.rf.min_p_on || expf(__fsub_rn(x, fc.m)) >= fc.rf.min_p;
}

// The key threshold thr (keep key >= thr) of top_k then top_p over a source that holds
// every value of the row with key >= dom_lo (complete: every finite value). Returns false
// when the source cannot decide (fewer than k values, or the top_p mass is not reached).
template <int NT, class P, class Src, class Gather = NoGather>
__device__ bool find_threshold(const Src& src, RadixSmem& rs, const FilterCtx& fc,
                               uint32_t dom_lo, bool complete, uint32_t& thr_out,
                               Gather&& gather = Gather{}) {
  const MassCtx mc{fc.m, fc.scale};
  uint32_t thr = dom_lo;
  bool bounded = false;  // the top_k set lies inside the source
  if (fc.rf.top_k_on) {
    const SearchSpec spec{SearchMode::kRank, fc.rf.k, dom_lo, false, 0.0f, false, 0.0};
    const SearchOut so = radix_search<NT, P::kWarpMass>(src, rs, spec, mc, gather);
    if (so.found) {
      thr = umax(so.key_lo, dom_lo);
      bounded = true;
    } else if (!complete) {
      return false;
    }
  }
  if (fc.rf.top_p_on) {
    // The total is the top_k set's mass (or every value's) when the source holds it.
    const bool internal = complete || bounded;
    const SearchSpec spec{SearchMode::kMass, 0u, thr, true, fc.rf.top_p, !internal, fc.t_ext};
    const SearchOut so = radix_search<NT, P::kWarpMass>(src, rs, spec, mc, gather);
    if (so.found) {
      thr = umax(so.key_lo, thr);
    } else if (!internal) {
      return false;
    }
    // internal and not found: the reference's clamp to the last top_k value (no cut).
  }
  thr_out = thr;
  return true;
}

// The Gumbel-max over the source's kept values (key >= thr, min_p); every thread gets it.
template <int NT, class P, class Src, class Gather = NoGather>
__device__ Best block_draw(const Src& src, const FilterCtx& fc, uint32_t thr, Best* red,
                           Gather&& gather = Gather{}) {
  gather.publish_draw(thr, fc.m);
  Best b = no_best();
  const float floor_key = __fadd_rn(fc.m, kGumbelLo);
  src([&](bool active, float x, int32_t idx) {
    if (!active || !is_kept(x, thr, fc)) return;
    if (__fadd_rn(x, kGumbelHi) < floor_key) return;  // cannot beat the (kept) max
    const Philox4 r = philox_for_group(fc.seed, fc.step, static_cast<uint32_t>(idx) >> 2);
    const Best cand{__fadd_rn(x, gumbel_from_bits<P>(philox_word(r, idx & 3))), idx, x};
    if (better(cand, b)) b = cand;
  });
  return gather.collect_best(block_best<NT>(b, red));
}

template <class P, class Loader>
__device__ float zprime_at(const Loader& ld, int64_t col, float alpha, const TScale& ts) {
  float v[3][kChunk];
  ld.load8(col, 1, v);
  return scale_logit<P>(combine_logit(v[0][0], v[1][0], v[2][0], alpha), ts);
}

// ----------------------------------------------------------------------------- v07: spread K2
//
// v07's spread plan (cuda_sample.h, spread_blocks; args.spread = G > 1): merge_kernel
// runs G blocks a row. Block 0 of the row, the lead, runs merge_row as v05's K2 does;
// blocks 1..G-1, the helpers, only serve the lead's whole-row passes (the fallback's
// radix levels and its draw), each over its share of the row (RowSource's parts: rounds
// of 1024 chunks dealt out in turn), and wait for the lead's commands in between
// (SpreadCtl, cuda_sample.h). The lead does share 0 itself and adds the helpers' answers
// in: integer histograms and an arg-max, so a pass gives the same result split any way,
// and v07 returns v05's bits for every G (batch-invariant though G depends on the batch).
//   Handshake. Thread 0 of the lead writes a command's fields, fences and adds 1 to
//   seq; thread 0 of each helper waits for seq to reach its next count (ld.acquire),
//   reads the fields through L2 (ld.global.cg) and shares them through shared memory.
//   A helper writes its answer (every thread its bins: 256 counts and masses, zeros
//   where unused, so nothing stale is ever read), fences, and after a barrier thread 0
//   adds 1 to arrive; the lead waits for arrive to reach G - 1 per command issued so far,
//   fences, and reads the slots through L2. The lead issues the next command only after
//   every answer to the last one is in, so fields are never rewritten under a reader;
//   kSpreadExit comes last on every path, also when no pass was needed.
//   Progress. A lead waits for its helpers and helpers for their lead, so all G blocks
//   of a row must get to run. spread_blocks keeps batch * G <= the SM count (one K2 block
//   an SM), so on an idle GPU every block is resident at once; where other work holds SMs,
//   blocks start as that work finishes. A wait longer than kSpreadTimeoutNs traps (a
//   launch error instead of a hang, should that ever fail).
//   Zeroing. seq and arrive start at 0: K1's first block of each row zeroes them (the
//   workspace is at::empty), and K2 starts after K1 on the stream; no memset node (v06
//   pays one for its counters), so a CUDA graph of v07 has v05's two kernel nodes.
constexpr unsigned long long kSpreadTimeoutNs = 10000000000ull;  // 10 s

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
#else
  const uint32_t v = *reinterpret_cast<const volatile uint32_t*>(p);
  __threadfence();
  return v;
#endif
}

__device__ __forceinline__ unsigned long long global_time_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Thread 0 alone: waits until *p >= target (traps after kSpreadTimeoutNs).
__device__ __noinline__ void wait_at_least(const uint32_t* p, uint32_t target) {
  if (load_acquire(p) >= target) return;
  const unsigned long long t0 = global_time_ns();
  while (load_acquire(p) < target) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    __nanosleep(128);
#endif
    if (global_time_ns() - t0 > kSpreadTimeoutNs) __trap();
  }
}

// The lead's side (merge_row with kSpread): radix_search's and block_draw's Gather.
struct SpreadLead {
  SpreadCtl* ctl;
  const SpreadSlot* slots;  // the row's G - 1 helper slots
  int helpers;
  uint32_t expected = 0u;   // answers due so far

  __device__ SpreadLead(const KernelArgs& a, int64_t row)
      : ctl(a.spread_ctl + row), slots(a.spread_slots + row * (a.spread - 1)),
        helpers(a.spread - 1) {}

  __device__ __forceinline__ void publish(uint32_t cmd, uint32_t level, uint32_t prefix,
                                          uint32_t dom_lo, bool with_mass, uint32_t thr,
                                          float m) {
    if (threadIdx.x == 0) {
      ctl->cmd = cmd;
      ctl->level = level;
      ctl->prefix = prefix;
      ctl->dom_lo = dom_lo;
      ctl->with_mass = with_mass ? 1u : 0u;
      ctl->thr = thr;
      ctl->m = m;
      __threadfence();
      atomicAdd(&ctl->seq, 1u);
    }
  }
  // All threads: returns once every answer due is in and visible to the block.
  __device__ __forceinline__ void wait_answers() {
    expected += static_cast<uint32_t>(helpers);
    if (threadIdx.x == 0) {
      wait_at_least(&ctl->arrive, expected);
      __threadfence();
    }
    __syncthreads();
  }
  __device__ __forceinline__ void publish_hist(int level, uint32_t prefix, const SearchSpec& spec,
                                               const MassCtx& mc) {
    publish(kSpreadHist, static_cast<uint32_t>(level), prefix, spec.dom_lo, spec.with_mass, 0u,
            mc.m);
  }
  // After the block's own histogram (and a barrier): the helpers' bins added in.
  __device__ __forceinline__ void collect_hist(RadixSmem& sm) {
    wait_answers();
    const int tid = threadIdx.x;
    if (tid < 256) {
      uint32_t c = sm.cnt[tid];
      unsigned long long ms = sm.mass[tid];
      for (int h = 0; h < helpers; ++h) {
        c += __ldcg(slots[h].cnt + tid);
        ms += __ldcg(slots[h].mass + tid);
      }
      sm.cnt[tid] = c;
      sm.mass[tid] = ms;
    }
    __syncthreads();
  }
  __device__ __forceinline__ void publish_draw(uint32_t thr, float m) {
    publish(kSpreadDraw, 0u, 0u, 0u, false, thr, m);
  }
  __device__ __forceinline__ Best collect_best(Best b) {
    wait_answers();
    for (int h = 0; h < helpers; ++h) {
      const Best o{__ldcg(&slots[h].best_key), __ldcg(&slots[h].best_idx), __ldcg(&slots[h].best_x)};
      if (better(o, b)) b = o;
    }
    return b;
  }
  __device__ __forceinline__ void exit() { publish(kSpreadExit, 0u, 0u, 0u, false, 0u, 0.0f); }
};

struct SpreadCmd {
  uint32_t cmd, level, prefix, dom_lo, with_mass, thr;
  float m;
};

// ----------------------------------------------------------------------------- K2

struct MergeState {
  float m, sum;
  uint32_t flags, tstar;
  Best greedy, gumbel;
};

// K2's shared memory: where merge_row finds it (merge_kernel: arrays declared one by
// one, as before v06; fused_kernel: MergeSmem, overlaid with K1's).
struct MergeShared {
  RadixSmem& rs;
  MergeState& st;
  Best* red;
  float* red_sum;
  Cand* stage;
  uint32_t& nstage;
};
struct MergeSmem {
  RadixSmem rs;
  MergeState st;
  Best red[kMergeWarps];
  float red_sum[kMergeWarps];
  Cand stage[kCandStage];
  uint32_t nstage;
  __device__ MergeShared refs() { return MergeShared{rs, st, red, red_sum, stage, nstage}; }
};

// The overflow rule's sum over the row of exp(z - mx), reduced in the order a block of
// kMergeThreads threads reduces it, by a block of NT threads (NT divides kMergeThreads).
// NT == kMergeThreads: each thread's sum over its chunks, then block_sum. Smaller NT
// (v06's fused kernel): chunk c belongs to thread c % kMergeThreads of the wide block
// ("virtual" thread v), which adds its chunks in increasing order; RowSource gives thread
// t the chunks c = t (mod NT) in increasing order, so t keeps one sum per virtual thread
// v = t + k NT (k = (c / NT) % (kMergeThreads / NT)), each receiving exactly v's values
// in v's order; each sum then takes v's warp butterfly (same lane, same partners) and
// v's slot in red_sum, summed over all kMergeWarps slots in the same order. The result
// is merge_kernel's bit for bit, so a row's lse never depends on the launch plan. (Every
// other reduction of the merge is order-free: integer histograms, arg-max records.)
template <int NT, class Src>
__device__ __forceinline__ float row_exp_sum(const Src& zsrc, float mx, float* red_sum) {
  if constexpr (NT == kMergeThreads) {
    float s = 0.0f;
    zsrc([&](bool valid, float x, int32_t) {
      if (valid && x > -INFINITY) s = __fadd_rn(s, expf(__fsub_rn(x, mx)));
    });
    return block_sum<NT>(s, red_sum);
  } else {
    static_assert(kMergeThreads % NT == 0 && NT % 32 == 0, "NT divides kMergeThreads");
    constexpr int KV = kMergeThreads / NT;  // virtual threads per thread
    float s[KV];
#pragma unroll
    for (int k = 0; k < KV; ++k) s[k] = 0.0f;
    zsrc([&](bool valid, float x, int32_t idx) {
      if (valid && x > -INFINITY) {
        const int k = (idx / kChunk / NT) % KV;
        const float e = expf(__fsub_rn(x, mx));
#pragma unroll
        for (int kk = 0; kk < KV; ++kk) {
          if (kk == k) s[kk] = __fadd_rn(s[kk], e);
        }
      }
    });
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const float w = warp_sum(s[k]);
      if (lane == 0) red_sum[k * (NT / 32) + warp] = w;
    }
    __syncthreads();
    float r = 0.0f;
#pragma unroll
    for (int w = 0; w < kMergeWarps; ++w) r = __fadd_rn(r, red_sum[w]);
    __syncthreads();  // red_sum may be reused
    return r;
  }
}

// K2's work for one row, by a block of NT threads: merge_kernel runs it with NT =
// kMergeThreads (one block a row, after K1's launch), v06's fused_kernel with NT =
// kSliceThreads in the row's last K1 block, kL2 set (load_partial_l2). The row's result does
// not depend on NT (row_exp_sum) nor on who runs it: the partials are merged in one fixed
// order, the same code either way.
// kSpread (v07's spread plan, merge_kernel's lead blocks): the fallback's whole-row passes
// are shared with the row's helper blocks (SpreadLead); the same results.
template <class Loader, class P, int NT, bool kL2, bool kSpread = false>
__device__ __forceinline__ void merge_row(const KernelArgs& a, const int64_t row,
                                          const MergeShared& sm) {
  static_assert(NT >= 256 && NT % 32 == 0 && NT <= kMergeThreads,
                "the radix scan needs 256 threads; red and red_sum hold kMergeWarps entries");
  RadixSmem& rs = sm.rs;
  MergeState& st = sm.st;
  Best* const red = sm.red;
  float* const red_sum = sm.red_sum;
  Cand* const stage = sm.stage;
  uint32_t& s_nstage = sm.nstage;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int S = a.num_slices;
  const int64_t vocab = a.vocab;
  const float alpha = a.params.alpha[row];
  const TScale ts = make_tscale(a.params.temperature[row]);
  const bool sampling = ts.sampling;
  const RowFilter rf = read_filter(a.params, row, vocab);
  const bool filtered = sampling && rf.any();
  const Loader ld(a, row);

  if (warp == 0) {
    const SlicePartial* parts = a.partials + row * S;
    float mx = -INFINITY;
    uint32_t fl = 0u, tstar = 0u;
    Best gb = no_best(), gg = no_best();
    for (int s = lane; s < S; s += 32) {
      SlicePartial q;
      if constexpr (kL2) {
        q = load_partial_l2(parts + s);
      } else {
        q = parts[s];
      }
      mx = fmaxf(mx, q.max);
      fl |= q.flags;
      tstar = umax(tstar, q.tkey);
      const Best b1{q.best_x, q.best_idx, q.best_x};
      if (better(b1, gb)) gb = b1;
      const Best b2{q.gkey, q.gidx, q.gx};
      if (better(b2, gg)) gg = b2;
    }
    mx = warp_max(mx);
    fl = warp_or(fl);
    tstar = warp_umax(tstar);
    gb = warp_best(gb);
    gg = warp_best(gg);
    float sum = 0.0f;
    if (mx > -INFINITY) {
      for (int s = lane; s < S; s += 32) {
        float ms, ss;
        if constexpr (kL2) {  // max and sum: adjacent, 8-byte aligned
          const float2 q = __ldcg(reinterpret_cast<const float2*>(parts + s));
          ms = q.x;
          ss = q.y;
        } else {
          ms = parts[s].max;
          ss = parts[s].sum;
        }
        if (ms > -INFINITY) sum = __fadd_rn(sum, __fmul_rn(ss, expf(__fsub_rn(ms, mx))));
      }
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      st.m = mx;
      st.sum = sum;
      st.flags = fl;
      st.tstar = tstar;
      st.greedy = gb;
      st.gumbel = gg;
    }
  }
  if (tid == 0) s_nstage = 0u;
  __syncthreads();

  const float m = st.m;
  float lse = m > -INFINITY ? __fadd_rn(m, logf(st.sum)) : -INFINITY;
  const uint32_t flags = st.flags;
  const int32_t status = ((flags & (kFlagNan | kFlagPosInf)) ? kStatusNonfinite : 0) |
                         ((flags & kFlagLive) ? 0 : kStatusEmpty);
  const SampleResult& out = a.result;

  if (status != 0) {
    if (tid == 0) {
      const float l = (flags & kFlagNan) ? NAN : ((flags & kFlagPosInf) ? INFINITY : lse);
      out.tokens[row] = -1;
      out.lse[row] = l;
      out.logprobs[row] = __fsub_rn(zprime_at<P>(ld, 0, alpha, ts), l);
      out.status[row] = status;
    }
    return;
  }

  Best result;
  bool scaled = sampling;  // the row's z' is z / T (else z' = z)
  if (sampling && !isfinite(m)) {
    // The overflow rule (proxykern/reference.py): a good sampled row whose max z / T is
    // +-inf is sampled as greedy -- one more pass over z, by this block. Rare.
    TScale none = ts;
    none.sampling = false;
    const RowSource<Loader, NT, P> zsrc{ld, alpha, none, vocab};
    Best b = no_best();
    zsrc([&](bool valid, float x, int32_t idx) {
      const Best c{x, idx, x};
      if (valid && better(c, b)) b = c;
    });
    b = block_best<NT>(b, red);  // max z (finite: the row is good), lowest column
    const float s = row_exp_sum<NT>(zsrc, b.key, red_sum);
    result = b;
    lse = __fadd_rn(b.key, logf(s));
    scaled = false;
  } else if (!sampling) {
    result = st.greedy;
  } else if (!filtered) {
    result = st.gumbel;
  } else {
    FilterCtx fc;
    fc.rf = rf;
    fc.m = m;
    fc.scale = a.mass_scale;
    fc.t_ext = static_cast<double>(st.sum) * static_cast<double>(a.mass_scale);
    fc.seed = a.params.seed[row];
    fc.step = a.params.step[row];

    const uint32_t tstar = st.tstar;
    // tstar == 0xFFFFFFFF (keys of NaN patterns) leaves no usable candidate.
    const bool use_c = tstar != 0xFFFFFFFFu;
    const bool c_complete = tstar == 0u;
    const uint32_t c_lo = c_complete ? 0u : tstar + 1u;
    const Cand* gc = a.cands + row * S * a.cand_per_slice;
    const int ntot = S * a.cand_per_slice;
    CandSource<NT, kL2> csrc{gc, ntot, c_lo};
    bool staged = false;
    // Copies the candidates above tstar into shared memory when they fit (block-uniform).
    auto stage_candidates = [&]() {
      if (staged) return;
      staged = true;
      for (int i = tid; i < ntot; i += NT) {
        const Cand c = load_cand<kL2>(gc + i);
        if (isfinite(c.x) && float_key(c.x) >= c_lo) {
          const uint32_t slot = atomicAdd(&s_nstage, 1u);
          if (slot < static_cast<uint32_t>(kCandStage)) stage[slot] = c;
        }
      }
      __syncthreads();
      const uint32_t n = s_nstage;
      if (n <= static_cast<uint32_t>(kCandStage)) {
        csrc = CandSource<NT, kL2>{stage, static_cast<int>(n), 0u, false};
      }
    };
    // The whole row: this block's share of it and the helpers' (kSpread), else all of it.
    const RowSource<Loader, NT, P, kSpread> rsrc{ld, alpha, ts, vocab, 0, kSpread ? a.spread : 1};
    std::conditional_t<kSpread, SpreadLead, NoGather> row_gather(a, row);

    // 1. Thresholds of top_k / top_p: from the candidates when they decide, else the row.
    uint32_t thr = 0u;
    bool have_thr = !(rf.top_k_on || rf.top_p_on);
    if (!have_thr && use_c) {
      stage_candidates();
      have_thr = find_threshold<NT, P>(csrc, rs, fc, c_lo, c_complete, thr);
    }
    if (!have_thr) find_threshold<NT, P>(rsrc, rs, fc, 0u, true, thr, row_gather);

    // 2. The unfiltered winner, if kept, is the answer.
    const Best gw = st.gumbel;
    if (gw.idx != kNoIndex && is_kept(gw.x, thr, fc)) {
      result = gw;
    } else {
      // 3. Gumbel-max over the kept set: from the candidates when it provably lies inside
      //    them (every value with key > tstar is a candidate).
      const bool c_holds_kept =
          use_c && (c_complete || thr > tstar ||
                    (rf.min_p_on && expf(__fsub_rn(key_value(tstar), m)) < rf.min_p));
      if (c_holds_kept) {
        stage_candidates();
        result = block_draw<NT, P>(csrc, fc, thr, red);
      } else {
        result = block_draw<NT, P>(rsrc, fc, thr, red, row_gather);
      }
    }
  }

  if (tid == 0) {
    int64_t token = result.idx;
    float x = result.x;
    if (result.idx == kNoIndex) {  // nothing kept (or every key NaN): the reference's argmax -> 0
      token = 0;
      TScale t0 = ts;
      t0.sampling = scaled;
      x = zprime_at<P>(ld, 0, alpha, t0);
    }
    out.tokens[row] = token;
    out.logprobs[row] = __fsub_rn(x, lse);
    out.lse[row] = lse;
    out.status[row] = 0;
  }
}

// A helper block of v07's spread plan: share `part` of the row's whole-row passes, one
// command at a time, until the lead's kSpreadExit (see "v07: spread K2" above).
template <class Loader, class P>
__device__ void spread_helper(const KernelArgs& a, const int64_t row, const int part,
                              RadixSmem& rs, Best* red, SpreadCmd& s_cmd) {
  constexpr int NT = kMergeThreads;
  const int tid = threadIdx.x;
  SpreadCtl* const ctl = a.spread_ctl + row;
  SpreadSlot* const slot = a.spread_slots + row * (a.spread - 1) + (part - 1);
  const RowSource<Loader, NT, P, true> src{Loader(a, row), a.params.alpha[row],
                                           make_tscale(a.params.temperature[row]), a.vocab,
                                           part, a.spread};
  for (uint32_t seen = 1u;; ++seen) {
    if (tid == 0) {
      wait_at_least(&ctl->seq, seen);
      s_cmd = SpreadCmd{__ldcg(&ctl->cmd), __ldcg(&ctl->level), __ldcg(&ctl->prefix),
                        __ldcg(&ctl->dom_lo), __ldcg(&ctl->with_mass), __ldcg(&ctl->thr),
                        __ldcg(&ctl->m)};
    }
    __syncthreads();
    const SpreadCmd c = s_cmd;  // thread 0 rewrites it only after this command's last barrier
    if (c.cmd == kSpreadHist) {
      for (int i = tid; i < 256; i += NT) {
        rs.cnt[i] = 0u;
        rs.mass[i] = 0ull;
      }
      __syncthreads();
      level_histogram<P::kWarpMass>(src, rs.cnt, rs.mass, c.dom_lo, c.with_mass != 0u,
                                    MassCtx{c.m, a.mass_scale}, static_cast<int>(c.level),
                                    c.prefix);
      __syncthreads();
      for (int i = tid; i < 256; i += NT) {
        slot->cnt[i] = rs.cnt[i];
        slot->mass[i] = rs.mass[i];
      }
    } else if (c.cmd == kSpreadDraw) {
      FilterCtx fc;
      fc.rf = read_filter(a.params, row, a.vocab);
      fc.m = c.m;
      fc.scale = a.mass_scale;
      fc.t_ext = 0.0;  // unused by a draw
      fc.seed = a.params.seed[row];
      fc.step = a.params.step[row];
      const Best b = block_draw<NT, P>(src, fc, c.thr, red);
      if (tid == 0) {
        slot->best_key = b.key;
        slot->best_idx = b.idx;
        slot->best_x = b.x;
      }
    } else {
      return;  // kSpreadExit (block-uniform)
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) atomicAdd(&ctl->arrive, 1u);
  }
}

// K2. kSpread (v07's spread plan): args.spread blocks a row, block 0 the row's lead
// (merge_row, then kSpreadExit), the others its helpers (spread_helper).
template <class Loader, class P, bool kSpread = false>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const KernelArgs a) {
  __shared__ RadixSmem rs;
  __shared__ MergeState st;
  __shared__ Best red[kMergeWarps];
  __shared__ float red_sum[kMergeWarps];
  __shared__ Cand stage[kCandStage];
  __shared__ uint32_t s_nstage;
  const MergeShared shared{rs, st, red, red_sum, stage, s_nstage};
  if constexpr (kSpread) {
    __shared__ SpreadCmd s_cmd;
    const int64_t row = static_cast<int64_t>(blockIdx.x) / a.spread;
    const int part = static_cast<int>(static_cast<int64_t>(blockIdx.x) - row * a.spread);
    if (part != 0) {
      spread_helper<Loader, P>(a, row, part, rs, red, s_cmd);
      return;
    }
    merge_row<Loader, P, kMergeThreads, false, true>(a, row, shared);
    SpreadLead(a, row).exit();  // after every pass of the row (merge_row waited for them)
  } else {
    merge_row<Loader, P, kMergeThreads, false>(a, blockIdx.x, shared);
  }
}

// ----------------------------------------------------------------------------- v06: K1 + K2

// K1's and K2's shared memory are never live at once (the barrier between them in
// fused_kernel), so they share one allocation: max(K1's 3.5 KB, K2's 19.9 KB).
union FusedSmem {
  SliceSmem slice;
  MergeSmem merge;
};

// v06's one launch (small grids, merge_in_slice_kernel): K1's grid and blocks; each block
// does slice_block, and the last block of a row to finish runs merge_row for the row
// (the "last block" pattern of the CUDA samples' threadFenceReduction). No block ever
// waits for another, so it is correct at any grid size and residency.
//   Ordering. Every thread fences (__threadfence: its partial / candidate stores are
//   visible at device scope before what follows), the barrier orders all of them before
//   thread 0's atomicAdd on the row's counter, and the block that draws ticket S - 1
//   (all S slices' stores are then visible) fences again (acquire side), publishes
//   "last" through shared memory and a barrier, and its merge reads the partials and
//   candidates with ld.global.cg (kL2): through L2, where the stores went, never from a
//   stale L1 line (another row's merge on this SM may have read the same 128-byte line
//   earlier in this launch).
//   Counters. args.counters holds one uint32 per row; the launcher's workspace is
//   at::empty, so launch_fused_ept zeroes the counters with cudaMemsetAsync before every
//   launch (stream-ordered, captured into CUDA graphs as a memset node: replays zero
//   them too). The last block also resets its row's counter to 0 once it has drawn the
//   last ticket (no block of this launch touches it again): not needed after the memset,
//   it keeps the counters zero between launches for free.
//   Threads. The merge runs with the block's kSliceThreads (256) threads, not K2's 512:
//   the radix scan needs 256, every reduction of the merge is order-free except the
//   overflow rule's sum, which row_exp_sum reduces in the 512-thread order, so the
//   results are merge_kernel's bit for bit. The alternative, 512-thread K1 blocks, would
//   change the slices (so the partials and their bits) or idle half of every K1 block and
//   cap it at 128 registers. Cost: the merge's row passes (the fallback, the overflow
//   rule) read with half the threads in flight; the common paths (greedy, unfiltered,
//   candidates) are a warp's merge of S records plus ~vocab / 64 staged candidates.
//   Registers: the kernel holds both bodies, so it allocates the larger count (the
//   merge's), bounded by __launch_bounds__'s second argument: 2 blocks an SM, 128
//   registers, no spills with the vector loaders (nvcc 13.0, sm_90a; unbounded, ptxas
//   took 135-168 and one block an SM). The unaligned and mixed-dtype loaders spilled at
//   128, so the kernel is built for the vector loaders only (kVecUniform). Residency is
//   what kFusedMaxBlocks (cuda_sample.h) bounds: 2 x 132 SMs on an H100 / H200.
constexpr int kFusedMinBlocks = 2;  // blocks per SM the register budget must allow

template <class Loader, int EPT, class P>
__global__ void __launch_bounds__(kSliceThreads, kFusedMinBlocks) fused_kernel(const KernelArgs a) {
  __shared__ FusedSmem sm;
  __shared__ uint32_t s_last;
  slice_block<Loader, EPT, P>(a, sm.slice.refs());
  __threadfence();
  __syncthreads();  // every thread's stores and fence are done; sm.slice is no longer read
  const int64_t row = static_cast<int64_t>(blockIdx.x) / a.num_slices;
  if (threadIdx.x == 0) {
    const uint32_t ticket = atomicAdd(a.counters + row, 1u);
    const bool last = ticket == static_cast<uint32_t>(a.num_slices - 1);
    if (last) {
      __threadfence();
      a.counters[row] = 0u;
    }
    s_last = last ? 1u : 0u;
  }
  __syncthreads();
  if (s_last == 0u) return;  // block-uniform
  merge_row<Loader, P, kSliceThreads, true>(a, row, sm.merge.refs());
}

// ----------------------------------------------------------------------------- launch

template <class Loader, int EPT, class P>
cudaError_t launch_ept(const KernelArgs& args, int64_t batch, cudaStream_t stream) {
  const int64_t blocks = batch * args.num_slices;
  slice_kernel<Loader, EPT, P><<<static_cast<unsigned>(blocks), kSliceThreads, 0, stream>>>(args);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  merge_kernel<Loader, typename P::Merge>
      <<<static_cast<unsigned>(batch), kMergeThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

// v07's spread plan: K1 (which zeroes the rows' SpreadCtl handshake words), then K2 with
// args.spread blocks a row.
template <class Loader, int EPT, class P>
cudaError_t launch_spread_ept(const KernelArgs& args, int64_t batch, cudaStream_t stream) {
  if (args.spread_ctl == nullptr || args.spread_slots == nullptr || args.spread < 2) {
    return cudaErrorInvalidValue;
  }
  const int64_t blocks = batch * args.num_slices;
  slice_kernel<Loader, EPT, P><<<static_cast<unsigned>(blocks), kSliceThreads, 0, stream>>>(args);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  merge_kernel<Loader, typename P::Merge, true>
      <<<static_cast<unsigned>(batch * args.spread), kMergeThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

// v06's one launch: the row counters zeroed, then fused_kernel.
template <class Loader, int EPT, class P>
cudaError_t launch_fused_ept(const KernelArgs& args, int64_t batch, cudaStream_t stream) {
  if (args.counters == nullptr) return cudaErrorInvalidValue;
  const cudaError_t err =
      cudaMemsetAsync(args.counters, 0, static_cast<size_t>(batch) * sizeof(uint32_t), stream);
  if (err != cudaSuccess) return err;
  const int64_t blocks = batch * args.num_slices;
  fused_kernel<Loader, EPT, P><<<static_cast<unsigned>(blocks), kSliceThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

// K1 and K2 for one loader and variant (kFused: v06's one fused launch; kSpread: v07's
// spread K2); ept: slice_elems_per_thread(vocab).
enum class Plan { kTwo, kFused, kSpread };

template <class Loader, class P, Plan kPlan = Plan::kTwo>
cudaError_t launch_kernels(const KernelArgs& args, int64_t batch, int ept, cudaStream_t stream) {
  if constexpr (kPlan == Plan::kSpread) {
    switch (ept) {
      case 16: return launch_spread_ept<Loader, 16, P>(args, batch, stream);
      case 8: return launch_spread_ept<Loader, 8, P>(args, batch, stream);
      case 4: return launch_spread_ept<Loader, 4, P>(args, batch, stream);
      default: return cudaErrorInvalidValue;
    }
  } else if constexpr (kPlan == Plan::kFused) {
    switch (ept) {
      case 16: return launch_fused_ept<Loader, 16, P>(args, batch, stream);
      case 8: return launch_fused_ept<Loader, 8, P>(args, batch, stream);
      case 4: return launch_fused_ept<Loader, 4, P>(args, batch, stream);
      default: return cudaErrorInvalidValue;
    }
  } else {
    switch (ept) {
      case 16: return launch_ept<Loader, 16, P>(args, batch, stream);
      case 8: return launch_ept<Loader, 8, P>(args, batch, stream);
      case 4: return launch_ept<Loader, 4, P>(args, batch, stream);
      default: return cudaErrorInvalidValue;
    }
  }
}

// Loaders fused_kernel is built for (merge_in_slice_kernel's vec_uniform): the vector
// loads of one dtype.
template <class Loader>
constexpr bool kVecUniform = false;
template <class D>
constexpr bool kVecUniform<UniformLoader<D, true>> = true;

// v06 is V05's policy: its two-launch plan runs v05's very kernels, its one-launch plan
// fused_kernel<..., V05> (merge_in_slice_kernel, cuda_sample.h, decides). v07 runs
// slice_kernel<..., V07> (v05's K1 with the noise pruned) and v05's K2 (V07::Merge), or
// where spread_blocks says so (the launcher sets args.spread by it) the spread K2
// merge_kernel<..., V05, true>.
template <class Loader>
cudaError_t launch_variant(const KernelArgs& args, int64_t batch, int ept, KernelVariant v,
                           cudaStream_t stream) {
  switch (v) {
    case KernelVariant::kV04: return launch_kernels<Loader, V04>(args, batch, ept, stream);
    case KernelVariant::kV05: return launch_kernels<Loader, V05>(args, batch, ept, stream);
    case KernelVariant::kV06:
      if constexpr (kVecUniform<Loader>) {
        if (merge_in_slice_kernel(v, batch, args.num_slices, true)) {
          return launch_kernels<Loader, V05, Plan::kFused>(args, batch, ept, stream);
        }
      }
      return launch_kernels<Loader, V05>(args, batch, ept, stream);
    case KernelVariant::kV07:
      if constexpr (kVecUniform<Loader>) {
        if (args.spread > 1) return launch_kernels<Loader, V07, Plan::kSpread>(args, batch, ept, stream);
      }
      return launch_kernels<Loader, V07>(args, batch, ept, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace proxykern
