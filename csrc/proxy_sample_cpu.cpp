// CPU kernel of the fused proxy-tuning sampler (semantics: proxykern/reference.py).
//
// Per row, in fixed chunks of kChunk columns:
//   scan   one pass over the three inputs: convert to fp32, combine, divide by T, and keep
//          the running max / argmax, the sum of exp(z' - max) (online log-sum-exp) and the
//          status flags. Sampled rows keep z' in a buffer: the whole row when filtered
//          (L2-resident), one chunk otherwise (their keys follow each chunk's scan).
//   plan   status, lse, and for filtered rows one threshold: kept = z' >= thr. top_k and
//          top_p first profile the row at a few nested cuts below the max (counts and
//          masses), then select (nth_element / weighted quickselect) among the tokens above
//          the cut that surely holds the answer: no sort. min_p is a direct threshold.
//   keys   Gumbel-max over the kept tokens, seeded with a max token's key. Noise goes
//          only to tokens with z' + max_noise >= the best key so far:
//          compacted and vectorized (Philox across lanes, polynomial logs) when few, in
//          whole blocks when many, one by one when very few. Greedy rows need no noise.
// Determinism: chunk boundaries depend only on vocab, each chunk yields a partial summary,
// and partials are merged in chunk order, whether the chunks of a row ran on one thread
// (batch >= threads) or on many (small batches). So results do not depend on the batch
// size or the thread count. The hot functions are compiled for AVX-512, AVX2 and baseline
// x86-64 (target_clones); all of them compute bitwise the same results (no FMA contraction,
// fixed reduction order).
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "philox.h"
#include "proxy_sample.h"

namespace proxykern {
namespace {

using cpu::f32x16;
using cpu::fast_exp;
using cpu::gumbel_from_bits;
using cpu::i32x16;
using cpu::kGumbelBound;
using cpu::kInf;
using cpu::kIota16;
using cpu::kLowest;
using cpu::kVecLanes;
using cpu::load16;
using cpu::mask16;
using cpu::select;
using cpu::splat16;

constexpr int kBlock = 512;           // columns per inner block (working set stays in L1)
constexpr int64_t kChunk = 8192;      // columns per chunk: the unit of work and of merging
constexpr int kLanes = 16;            // accumulators of the auto-vectorized exp sum
constexpr int kGroups = kBlock / 4;   // Philox calls per block (one serves 4 tokens)
constexpr int kScalarTokens = 8;      // noise one token at a time up to this many per block
constexpr int kCompactTokens = 128;   // ... compacted and vectorized up to this many, else dense
constexpr int64_t kMinParallelWork = 65536;  // elements below which threads cost more than they save

static_assert(kChunk % kBlock == 0 && kBlock % kLanes == 0 && kBlock % 4 == 0);

// ------------------------------------------------------------------------------ row setup

struct Problem {
  LogitsView base, expert, anti;
  RowParams params;
  SampleResult out;
  int64_t batch, vocab, n_chunks;
  // Another producer of z (program_sample_cpu.cpp); null: z = base + alpha (expert - anti).
  const LogitsSource* source = nullptr;
};

struct RowSpec {
  float alpha, temperature;
  bool greedy;    // temperature == 0: argmax, no noise, no filters
  bool divide;    // z' = z / T needs a division (T != 1)
  bool filtered;  // some filter may cut the row (top_k is settled once the finite count is known)
  bool fused;     // sampled without filters: each chunk draws its own Gumbel-max right away
  int64_t top_k;
  float top_p, min_p;
  int64_t seed, step;
};

// force_greedy: the overflow rule (proxykern/reference.py) -- a row whose largest z / T
// overflowed is sampled again as greedy. Temperatures below the smallest normal fp32
// are greedy from the start (the same rule).
RowSpec make_spec(const Problem& p, int64_t row, bool force_greedy = false) {
  const RowParams& q = p.params;
  RowSpec s;
  s.alpha = q.alpha != nullptr ? q.alpha[row] : 0.0f;  // (a LogitsSource has its own)
  s.temperature = q.temperature[row];
  s.greedy = force_greedy || std::fabs(s.temperature) < std::numeric_limits<float>::min();
  s.divide = !s.greedy && s.temperature != 1.0f;
  s.top_k = q.top_k[row];
  s.top_p = q.top_p[row];
  s.min_p = q.min_p[row];
  s.seed = q.seed[row];
  s.step = q.step[row];
  // NaN top_p / min_p compare false: no filter (the Python layer flags them).
  s.filtered = !s.greedy && ((s.top_k > 0 && s.top_k < p.vocab) || s.top_p < 1.0f || s.min_p > 0.0f);
  s.fused = !s.greedy && !s.filtered;
  return s;
}

float gumbel_at(const RowSpec& spec, int64_t token) {
  const Philox4 w = philox_for_group(spec.seed, spec.step, static_cast<uint32_t>(token >> 2));
  return gumbel_from_bits(w.w[token & 3]);
}

// ------------------------------------------------------------------------------ loading

template <typename T>
const T* row_ptr(const LogitsView& v, int64_t row, int64_t col) {
  return static_cast<const T*>(v.data) + (row * v.row_stride + col);  // int64: may pass 2^31
}

PK_INLINE void load_block(const LogitsView& v, int64_t row, int64_t col, int n, float* dst) {
  switch (v.dtype) {
    case LogitsDtype::kFloat32:
      std::memcpy(dst, row_ptr<float>(v, row, col), sizeof(float) * n);
      break;
    case LogitsDtype::kBFloat16: {
      const uint16_t* src = row_ptr<uint16_t>(v, row, col);
      for (int i = 0; i < n; ++i) dst[i] = cpu::bf16_to_float(src[i]);
      break;
    }
    case LogitsDtype::kFloat16: {
      const uint16_t* src = row_ptr<uint16_t>(v, row, col);
      for (int i = 0; i < n; ++i) dst[i] = cpu::fp16_to_float(src[i]);
      break;
    }
  }
}

float load_one(const LogitsView& v, int64_t row, int64_t col) {
  float x;
  load_block(v, row, col, 1, &x);
  return x;
}

// z = b + alpha * (e - a), -inf wherever any input is -inf. One element, for the rare
// places that need a value the scan did not keep.
float combine_one(float b, float e, float a, float alpha) {
  const float z = b + alpha * (e - a);
  return (b == -kInf || e == -kInf || a == -kInf) ? -kInf : z;
}

float scaled_logit_at(const Problem& p, const RowSpec& spec, int64_t row, int64_t col) {
  if (p.source != nullptr) {
    float z;
    p.source->combine(row, col, 1, &z);
    return spec.divide ? z / spec.temperature : z;
  }
  const float z = combine_one(load_one(p.base, row, col), load_one(p.expert, row, col),
                              load_one(p.anti, row, col), spec.alpha);
  return spec.divide ? z / spec.temperature : z;
}

// ------------------------------------------------------------------------------ block kernels
// Element-wise loops are auto-vectorized; reductions run over a fixed number of lanes
// (vector types or lane arrays), so their order, hence every result bit, does not depend
// on the vector width of the clone that runs them.

struct Flags {
  int32_t nan = 0, posinf = 0, live = 0;  // on z: any NaN, any +inf, any z > -inf
};

PK_INLINE void combine_block(const float* b, const float* e, const float* a, int n,
                             const RowSpec& spec, float* z, Flags& flags) {
  const float alpha = spec.alpha;
  int32_t nan = 0, posinf = 0, live = 0;
  for (int i = 0; i < n; ++i) {
    const float d = e[i] - a[i];
    const float combined = b[i] + alpha * d;
    const bool excluded = (b[i] == -kInf) | (e[i] == -kInf) | (a[i] == -kInf);
    const float zi = select(excluded, -kInf, combined);
    nan |= zi != zi;
    posinf |= zi == kInf;
    live |= zi > -kInf;
    z[i] = zi;
  }
  if (spec.divide) {
    const float t = spec.temperature;
    for (int i = 0; i < n; ++i) z[i] = z[i] / t;  // a true division, as the spec
  }
  flags.nan |= nan;
  flags.posinf |= posinf;
  flags.live |= live;
}

// The flags and z' = z / T of a block of z from a LogitsSource (what combine_block does
// after its combination, on the same values: the same bits).
PK_INLINE void finish_block(float* z, int n, const RowSpec& spec, Flags& flags) {
  int32_t nan = 0, posinf = 0, live = 0;
  for (int i = 0; i < n; ++i) {
    const float zi = z[i];
    nan |= zi != zi;
    posinf |= zi == kInf;
    live |= zi > -kInf;
  }
  if (spec.divide) {
    const float t = spec.temperature;
    for (int i = 0; i < n; ++i) z[i] = z[i] / t;
  }
  flags.nan |= nan;
  flags.posinf |= posinf;
  flags.live |= live;
}

struct BlockBest {
  float value;
  int32_t index;  // within the block
};

// Max and the lowest index holding it over x[0, len), len a multiple of 16 (NaN never wins).
PK_INLINE BlockBest lane_argmax(const float* x, int len) {
  f32x16 best = splat16(-kInf);
  i32x16 where = kIota16, index = kIota16;
  for (int i = 0; i < len; i += kVecLanes) {
    const f32x16 v = load16(x + i);
    const i32x16 gt = v > best;  // strict: each lane keeps its first occurrence
    best = gt ? v : best;
    where = gt ? index : where;
    index += kVecLanes;
  }
  BlockBest r{best[0], where[0]};
  for (int l = 1; l < kVecLanes; ++l) {
    if (best[l] > r.value || (best[l] == r.value && where[l] < r.index)) r = {best[l], where[l]};
  }
  return r;
}

// Sum of exp(x - m) over a full block; m >= every x.
PK_INLINE double block_sumexp(const float* x, float m) {
  float acc[kLanes] = {};
  for (int i = 0; i < kBlock; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += fast_exp(x[i + l] - m);
  }
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// Philox4x32-10 for `count` counters at once (count a multiple of 16): the four output
// words of counter (group[j], step, 0) under the row's key. Vectorized across j: every
// round is a loop of 32x32->64 multiplies and xors.
PK_INLINE void philox_lanes(const uint32_t* group, int count, const RowSpec& spec, uint32_t* w0,
                            uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const uint64_t seed = static_cast<uint64_t>(spec.seed), step = static_cast<uint64_t>(spec.step);
  for (int j = 0; j < count; ++j) {
    w0[j] = group[j];
    w1[j] = static_cast<uint32_t>(step);
    w2[j] = static_cast<uint32_t>(step >> 32);
    w3[j] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int j = 0; j < count; ++j) {
      const uint64_t pa = uint64_t{kPhiloxRoundA} * w0[j];
      const uint64_t pb = uint64_t{kPhiloxRoundB} * w2[j];
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ w1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ w3[j] ^ k1;
      w1[j] = static_cast<uint32_t>(pb);
      w3[j] = static_cast<uint32_t>(pa);
      w0[j] = n0;
      w2[j] = n2;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// Gumbel keys z' + g of a full block where z' >= cut, else -inf; returns their argmax.
// One Philox call per 4 tokens; used when most of the block needs noise.
PK_INLINE BlockBest dense_keys(const float* z, int64_t col0, float cut, const RowSpec& spec) {
  alignas(64) uint32_t group[kGroups], w0[kGroups], w1[kGroups], w2[kGroups], w3[kGroups];
  alignas(64) float key[kBlock];
  const uint32_t group0 = static_cast<uint32_t>(col0 >> 2);  // col0 is a multiple of 4
  for (int j = 0; j < kGroups; ++j) group[j] = group0 + static_cast<uint32_t>(j);
  philox_lanes(group, kGroups, spec, w0, w1, w2, w3);
  for (int j = 0; j < kGroups; ++j) {  // token 4j + w takes word w
    key[4 * j] = select(z[4 * j] >= cut, z[4 * j] + gumbel_from_bits(w0[j]), -kInf);
    key[4 * j + 1] = select(z[4 * j + 1] >= cut, z[4 * j + 1] + gumbel_from_bits(w1[j]), -kInf);
    key[4 * j + 2] = select(z[4 * j + 2] >= cut, z[4 * j + 2] + gumbel_from_bits(w2[j]), -kInf);
    key[4 * j + 3] = select(z[4 * j + 3] >= cut, z[4 * j + 3] + gumbel_from_bits(w3[j]), -kInf);
  }
  return lane_argmax(key, kBlock);
}

// The same for a block where few tokens need noise (n > 0 of them): those are compacted
// first and get one Philox call each (its word picked by column & 3), so the cost of noise
// scales with their number.
PK_INLINE BlockBest compact_keys(const float* z, int64_t col0, float cut, const RowSpec& spec) {
  alignas(64) int32_t column[kBlock + kVecLanes];
  alignas(64) uint32_t group[kBlock], w0[kBlock], w1[kBlock], w2[kBlock], w3[kBlock];
  alignas(64) float zc[kBlock], key[kBlock];
  int n = 0;
  const f32x16 c = splat16(cut);
  for (int i = 0; i < kBlock; i += kVecLanes) {
    // Compaction: the set bits of each vector's mask. The first four are written without a
    // test (excess writes land past n and are overwritten), so the usual case never branches.
    uint32_t m = mask16(load16(z + i) >= c);
    const int count = std::popcount(m);
    for (int k = 0; k < 4; ++k, m &= m - 1) column[n + k] = i + std::countr_zero(m);
    for (int k = 4; m != 0; ++k, m &= m - 1) column[n + k] = i + std::countr_zero(m);
    n += count;
  }
  const int lanes = (n + kVecLanes - 1) / kVecLanes * kVecLanes;
  for (int s = n; s < lanes; ++s) column[s] = column[0];  // padding repeats a real column
  const uint32_t group0 = static_cast<uint32_t>(col0 >> 2);
  for (int s = 0; s < lanes; ++s) {
    zc[s] = s < n ? z[column[s]] : -kInf;  // ... whose key can never win
    group[s] = group0 + static_cast<uint32_t>(column[s] >> 2);
  }
  philox_lanes(group, lanes, spec, w0, w1, w2, w3);
  for (int s = 0; s < lanes; ++s) {
    const uint32_t word = static_cast<uint32_t>(column[s] & 3);
    const uint32_t bits = select(word == 0u, w0[s], select(word == 1u, w1[s], select(word == 2u, w2[s], w3[s])));
    key[s] = zc[s] + gumbel_from_bits(bits);
  }
  const BlockBest top = lane_argmax(key, lanes);  // slots ascend with columns: ties keep the lowest
  return {top.value, column[top.index]};
}

// Tokens of a full block with z' >= cut.
PK_INLINE int32_t count_at_least(const float* z, float cut) {
  i32x16 count = splat16(0);
  const f32x16 c = splat16(cut);
  for (int i = 0; i < kBlock; i += kVecLanes) count -= load16(z + i) >= c;  // true is -1
  int32_t r = 0;
  for (int l = 0; l < kVecLanes; ++l) r += count[l];
  return r;
}

// ------------------------------------------------------------------------------ scan

struct ScanSummary {
  float max = -kInf;     // max z' (NaN ignored)
  int64_t argmax = -1;   // lowest column holding max; -1 only in the empty summary
  double sumexp = 0.0;   // sum of exp(z' - max)
  Flags flags;
  // Filtered rows only: the finite z' (> -inf) and their smallest value.
  int64_t finite = 0;
  float min = kInf;
};

// Count and min of the finite z' of a full block (padding is -inf, so never counted).
PK_INLINE void block_finite_stats(const float* z, int64_t& finite, float& min) {
  f32x16 mn = splat16(kInf);
  i32x16 count = splat16(0);
  const f32x16 lowest = splat16(kLowest);
  for (int i = 0; i < kBlock; i += kVecLanes) {
    const f32x16 v = load16(z + i);
    const i32x16 live = v >= lowest;
    const f32x16 candidate = live ? v : splat16(kInf);  // two plain selects vectorize well;
    mn = candidate < mn ? candidate : mn;               // a select on (a & b) did not
    count -= live;
  }
  for (int l = 0; l < kVecLanes; ++l) {
    finite += count[l];
    min = mn[l] < min ? mn[l] : min;
  }
}

// Appends `next` (the columns right after `acc`'s) to `acc`. Always applied in chunk order.
void merge_scan(ScanSummary& acc, const ScanSummary& next) {
  const float m = next.max > acc.max ? next.max : acc.max;
  double s = 0.0;
  if (m > -kInf) {
    s = acc.sumexp * std::exp(double{acc.max} - double{m}) +
        next.sumexp * std::exp(double{next.max} - double{m});
  }
  if (acc.argmax < 0 || next.max > acc.max) acc.argmax = next.argmax;
  acc.max = m;
  acc.sumexp = s;
  acc.flags.nan |= next.flags.nan;
  acc.flags.posinf |= next.flags.posinf;
  acc.flags.live |= next.flags.live;
  acc.finite += next.finite;
  acc.min = next.min < acc.min ? next.min : acc.min;
}

// Columns [begin, end) of a row: one pass over the inputs. `store` (nullable) receives z'.
PK_MULTIVERSION
ScanSummary scan_chunk(const Problem& p, const RowSpec& spec, int64_t row, int64_t begin,
                       int64_t end, float* store) {
  alignas(64) float b[kBlock], e[kBlock], a[kBlock], z[kBlock];
  ScanSummary s;
  s.argmax = begin;
  for (int64_t col = begin; col < end; col += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, end - col));
    if (p.source != nullptr) {
      p.source->combine(row, col, n, z);
      finish_block(z, n, spec, s.flags);
    } else {
      load_block(p.base, row, col, n, b);
      load_block(p.expert, row, col, n, e);
      load_block(p.anti, row, col, n, a);
      combine_block(b, e, a, n, spec, z, s.flags);
    }
    for (int i = n; i < kBlock; ++i) z[i] = -kInf;  // pad: contributes nothing below
    if (store != nullptr) std::memcpy(store + (col - begin), z, sizeof(float) * n);

    if (spec.filtered) block_finite_stats(z, s.finite, s.min);
    const BlockBest top = lane_argmax(z, kBlock);
    const float m = top.value > s.max ? top.value : s.max;
    if (m > -kInf) {
      // Online log-sum-exp: rescale the running sum only when the max moves (rarely).
      if (m != s.max) s.sumexp *= std::exp(double{s.max} - double{m});
      s.sumexp += block_sumexp(z, m);
    }
    if (top.value > s.max) {
      s.max = top.value;
      s.argmax = col + top.index;
    }
  }
  return s;
}

// ------------------------------------------------------------------------------ keys

struct KeySummary {
  float key = -kInf;
  int64_t token = -1;  // -1: none yet
};

// Gumbel-max order: the larger key, the lower token on equal keys.
PK_INLINE void offer(KeySummary& best, float key, int64_t token) {
  if (best.token < 0 || key > best.key || (key == best.key && token < best.token)) {
    best = {key, token};
  }
}

// Below this z' a token cannot reach `best` whatever its noise: z' + g <= z' + 16.64 stays
// under best - 0.06, and the extra relative slack keeps fl(z' + g) strictly below best
// even where a float ulp exceeds that gap (|best| >= 2^20), so not even a tie is lost.
PK_INLINE float prune_limit(const KeySummary& best) {
  if (best.token < 0) return -kInf;
  const double b = double{best.key};
  const double limit = b - kGumbelBound - std::fabs(b) * 0x1p-22;
  float f = static_cast<float>(limit);
  if (double{f} > limit) f = std::nextafter(f, -kInf);  // round toward -inf
  return f;
}

// Best key among the kept tokens (z' >= thr, thr finite) of columns [begin, end), whose z'
// are zc[0, end - begin). `best` starts as a key known to exist in the row (a max token's)
// or as none; only tokens that can still beat the best key so far get noise.
PK_MULTIVERSION
KeySummary key_chunk(const float* zc, int64_t begin, int64_t end, float thr, const RowSpec& spec,
                     KeySummary best) {
  alignas(64) float padded[kBlock];
  for (int64_t col = begin; col < end; col += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, end - col));
    const float* zb = zc + (col - begin);
    if (n < kBlock) {
      std::memcpy(padded, zb, sizeof(float) * n);
      for (int i = n; i < kBlock; ++i) padded[i] = -kInf;
      zb = padded;
    }
    const float cut = std::max(thr, prune_limit(best));
    const int32_t candidates = count_at_least(zb, cut);
    if (candidates == 0) continue;
    if (candidates <= kScalarTokens) {
      for (int i = 0; i < n; ++i) {
        if (zb[i] >= cut) offer(best, zb[i] + gumbel_at(spec, col + i), col + i);
      }
      continue;
    }
    const BlockBest top = candidates <= kCompactTokens ? compact_keys(zb, col, cut, spec)
                                                       : dense_keys(zb, col, cut, spec);
    if (top.value > -kInf) offer(best, top.value, col + top.index);
  }
  return best;
}

// ------------------------------------------------------------------------------ filters

struct Scratch {
  std::vector<float> row;    // z' of one row (filtered) or one chunk (unfiltered), rows mode
  std::vector<float> split;  // z' of all rows (split mode; the calling thread's)
  std::vector<float> values;                      // the top set a selection works on
  std::vector<std::pair<float, float>> weighted;  // (z', mass) for top_p
};

// Per-thread buffers, grown on demand and reused across calls (OpenMP threads persist).
Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

template <typename T>
T* grown(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Values z'[i] >= cut (cut finite), appended in column order: a vector compare per 16
// columns, then a walk over the set bits, so the cost is n / 16 plus the hits.
PK_MULTIVERSION
void collect_at_least(const float* z, int64_t n, float cut, std::vector<float>& out) {
  const f32x16 c = splat16(cut);
  const int64_t full = n - n % kVecLanes;
  for (int64_t i = 0; i < full; i += kVecLanes) {
    for (uint32_t m = mask16(load16(z + i) >= c); m != 0; m &= m - 1) {
      out.push_back(z[i + std::countr_zero(m)]);
    }
  }
  for (int64_t i = full; i < n; ++i) {
    if (z[i] >= cut) out.push_back(z[i]);
  }
}

// A coarse profile of the row from the top: for nested cuts m - range * 4^-j, how many
// finite z' (and how much mass exp(z' - m), if asked) lie at or above each. It tells the
// selections below how far down the answer can lie, so they collect only that top set.
constexpr int kLevels = 8;

struct Levels {
  float cut[kLevels];       // decreasing: cut[kLevels - 1] is the lowest finite z'
  int64_t count[kLevels] = {};
  double mass[kLevels] = {};
};

// Takes and returns the Levels by value: GCC 12's IPA-CP + modref lost the stores of an
// earlier version that filled a Levels& out-parameter (once `with_mass` was propagated
// as a constant, the clone's summary still named the old parameter index).
PK_MULTIVERSION
Levels profile_levels(const float* z, int64_t n, float m, bool with_mass, Levels lv) {
  alignas(64) float padded[kBlock], w[kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    const int len = static_cast<int>(std::min<int64_t>(kBlock, n - start));
    const float* zb = z + start;
    if (len < kBlock) {
      std::memcpy(padded, zb, sizeof(float) * len);
      for (int i = len; i < kBlock; ++i) padded[i] = -kInf;
      zb = padded;
    }
    if (with_mass) {
      for (int i = 0; i < kBlock; ++i) w[i] = fast_exp(zb[i] - m);  // 0 for -inf
    }
    for (int j = 0; j < kLevels; ++j) {
      const f32x16 c = splat16(lv.cut[j]);
      i32x16 count = splat16(0);
      f32x16 mass = splat16(0.0f);
      for (int i = 0; i < kBlock; i += kVecLanes) {
        const i32x16 in = load16(zb + i) >= c;
        count -= in;
        if (with_mass) mass += in ? load16(w + i) : splat16(0.0f);
      }
      double block_mass = 0.0;  // per block in float, then double: bounded rounding
      for (int l = 0; l < kVecLanes; ++l) {
        lv.count[j] += count[l];
        block_mass += mass[l];
      }
      lv.mass[j] += block_mass;
    }
  }
  return lv;
}

Levels make_levels(float m, float lowest) {
  Levels lv;
  const float range = m - lowest;  // +inf for a huge spread: then all levels are the last
  for (int j = 0; j < kLevels - 1; ++j) {
    const float cut = m - range * std::ldexp(1.0f, -2 * (kLevels - 1 - j));
    lv.cut[j] = std::max(cut, lowest);
  }
  lv.cut[kLevels - 1] = lowest;  // the last level holds every finite z'
  return lv;
}

// The k-th largest z' (1 <= k < number of finite z'); ties count, as in the spec.
float kth_largest(const float* z, int64_t n, int64_t k, const ScanSummary& scan, Scratch& s) {
  const Levels lv = profile_levels(z, n, scan.max, false, make_levels(scan.max, scan.min));
  int j = 0;
  while (lv.count[j] < k) ++j;  // the last level holds every finite z', and k < that count
  s.values.clear();
  collect_at_least(z, n, lv.cut[j], s.values);
  const auto nth = s.values.begin() + (k - 1);
  std::nth_element(s.values.begin(), nth, s.values.end(), std::greater<float>());
  return *nth;
}

// The value v with before + W(> v) < target <= before + W(>= v), W summing the weights of
// `items` (value, weight); the smallest value when the target is never reached. Weighted
// quickselect with a 3-way partition, so runs of equal values cost one pass; pivots come
// from a fixed sequence, so the result is deterministic.
float weighted_select(std::vector<std::pair<float, float>>& items, double before, double target) {
  size_t lo = 0, hi = items.size();
  uint64_t state = 0x9E3779B97F4A7C15ull;
  for (;;) {
    const size_t len = hi - lo;
    auto pick = [&] {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      return items[lo + static_cast<size_t>((state >> 33) % len)].first;
    };
    const float x = pick(), y = pick(), w = pick();
    const float pivot = std::max(std::min(x, y), std::min(std::max(x, y), w));  // median
    size_t gt = lo, i = lo, lt = hi;  // [lo, gt) > pivot, [gt, i) == pivot, [lt, hi) < pivot
    double w_gt = 0.0, w_eq = 0.0;
    while (i < lt) {
      if (items[i].first > pivot) {
        w_gt += items[i].second;
        std::swap(items[i++], items[gt++]);
      } else if (items[i].first < pivot) {
        std::swap(items[i], items[--lt]);
      } else {
        w_eq += items[i++].second;
      }
    }
    if (gt > lo && before + w_gt >= target) {
      hi = gt;
    } else if (before + w_gt + w_eq >= target || lt == hi) {
      return pivot;
    } else {
      before += w_gt + w_eq;
      lo = lt;
    }
  }
}

// top_p over `values` (every finite z' >= some cut, in any order) given the total mass of
// the kept set: the value of the first entry, in descending order, at which the cumulative
// mass exp(z' - m) reaches top_p * total.
float top_p_select(const std::vector<float>& values, float m, double total, float top_p,
                   Scratch& s) {
  s.weighted.resize(values.size());
  for (size_t i = 0; i < values.size(); ++i) s.weighted[i] = {values[i], fast_exp(values[i] - m)};
  return weighted_select(s.weighted, 0.0, double{top_p} * total);
}

// top_p over every finite z' (no top_k): the level profile gives the total mass and a cut
// above which the target mass surely lies; only the tokens above it are selected among.
float top_p_threshold(const float* z, int64_t n, const ScanSummary& scan, float top_p,
                      Scratch& s) {
  const Levels lv = profile_levels(z, n, scan.max, true, make_levels(scan.max, scan.min));
  const double total = lv.mass[kLevels - 1];
  // The margin covers the level sums' float rounding (per block) against the selection's.
  const double target = double{top_p} * total, needed = target + 1e-5 * total;
  int j = 0;
  while (j < kLevels - 1 && lv.mass[j] < needed) ++j;
  s.values.clear();
  collect_at_least(z, n, lv.cut[j], s.values);
  return top_p_select(s.values, scan.max, total, top_p, s);
}

// The smallest z' with exp(z' - m) >= min_p (fp32, as the spec), at least m. Values clearly
// on either side of m + log(min_p) are decided by comparison; only a narrow band pays an exp.
float min_p_threshold(const float* z, int64_t n, float m, float min_p, Scratch& s) {
  const double log_p = std::log(double{min_p});
  const double band = 1e-3 * (1.0 + std::fabs(log_p));
  const double lo = double{m} + log_p - band, hi = double{m} + log_p + band;
  float best = m;
  if (lo >= double{m}) return best;
  s.values.clear();
  collect_at_least(z, n, lo < double{kLowest} ? kLowest : static_cast<float>(lo), s.values);
  for (const float v : s.values) {
    if (v < best && (v >= hi || std::exp(v - m) >= min_p)) best = v;
  }
  return best;
}

// The row's kept set is {z' >= threshold}: every filter keeps an upper set of values, and
// top_p is taken over the top_k survivors as the spec says. scan.max is finite.
float filter_threshold(const float* z, int64_t n, const ScanSummary& scan, const RowSpec& spec,
                       Scratch& s) {
  const float m = scan.max;
  float thr = kLowest;
  const bool top_k = spec.top_k > 0 && spec.top_k < scan.finite;
  if (top_k) thr = kth_largest(z, n, spec.top_k, scan, s);
  if (spec.top_p < 1.0f) {
    if (top_k) {
      // The top_k set is in s.values already (a superset of it): select among it.
      std::vector<float>& kept = s.values;
      kept.erase(std::remove_if(kept.begin(), kept.end(), [&](float v) { return !(v >= thr); }),
                 kept.end());
      double total = 0.0;
      for (const float v : kept) total += fast_exp(v - m);
      thr = top_p_select(kept, m, total, spec.top_p, s);
    } else {
      thr = top_p_threshold(z, n, scan, spec.top_p, s);
    }
  }
  if (spec.min_p > 0.0f) thr = std::max(thr, min_p_threshold(z, n, m, spec.min_p, s));
  return thr;
}

// ------------------------------------------------------------------------------ rows

struct RowPlan {
  RowSpec spec;
  ScanSummary scan;
  int32_t status = 0;
  float lse = 0.0f;
  bool needs_keys = false;  // a sampled row with a finite max
  float threshold = kLowest;
  KeySummary seed;          // filtered rows: the max token's key, a lower bound on the best
};

float logsumexp(const ScanSummary& s) {
  if (s.flags.nan) return std::nanf("");
  if (s.max == kInf || s.max == -kInf) return s.max;
  return static_cast<float>(double{s.max} + std::log(s.sumexp));
}

// The key of the max token of a scan: a key the Gumbel-max must at least reach.
KeySummary max_token_key(const RowSpec& spec, const ScanSummary& scan) {
  if (!std::isfinite(scan.max)) return {};
  return {scan.max + gumbel_at(spec, scan.argmax), scan.argmax};
}

// One chunk's scan; for a fused row also its Gumbel-max, which needs nothing from the
// other chunks, so a sampled row without filters reads its inputs once and never waits for
// the rest of the row. The pruning is seeded with the chunk's max token's key and with
// `known`, a key already found in the row (none when chunks run in parallel); neither
// changes the result. zc receives the chunk's z' (a row buffer slice or a chunk-sized
// scratch); greedy rows pass nullptr.
struct ChunkResult {
  ScanSummary scan;
  KeySummary keys;
};

ChunkResult process_chunk(const Problem& p, const RowSpec& spec, int64_t row, int64_t c,
                          float* zc, KeySummary known = {}) {
  const int64_t begin = c * kChunk, end = std::min(p.vocab, begin + kChunk);
  ChunkResult r;
  r.scan = scan_chunk(p, spec, row, begin, end, zc);
  if (spec.fused) {
    const KeySummary own = max_token_key(spec, r.scan);
    if (own.token >= 0) offer(known, own.key, own.token);
    r.keys = key_chunk(zc, begin, end, kLowest, spec, known);
  }
  return r;
}

// Everything between the scan and the key pass: status, lse, filter threshold, seed key.
RowPlan plan_row(const Problem& p, const RowSpec& spec, const ScanSummary& scan, const float* z,
                 Scratch& s) {
  RowPlan plan;
  plan.spec = spec;
  plan.scan = scan;
  plan.status = ((scan.flags.nan || scan.flags.posinf) ? kStatusNonfinite : 0) |
                (scan.flags.live ? 0 : kStatusEmpty);
  plan.lse = logsumexp(scan);
  // A max of +inf (z' overflowed for a tiny T) or -inf leaves no usable key: such rows
  // fall back to the argmax, which is also where the spec's keys put them.
  plan.needs_keys = plan.status == 0 && !spec.greedy && std::isfinite(scan.max);
  if (plan.needs_keys && spec.filtered) {
    plan.threshold = filter_threshold(z, p.vocab, scan, spec, s);
    plan.seed = max_token_key(spec, scan);
  }
  return plan;
}

void write_row(const Problem& p, int64_t row, const RowPlan& plan, const KeySummary& best) {
  int64_t token;
  if (plan.status != 0) {
    token = -1;
  } else if (plan.needs_keys) {
    token = best.token;
  } else {
    token = plan.scan.argmax;
  }
  // z'[token] again from the inputs (the same arithmetic as the scan, so the same bits);
  // bad rows report z'[0] - lse, as the reference does.
  const float zt = scaled_logit_at(p, plan.spec, row, token < 0 ? 0 : token);
  p.out.tokens[row] = token;
  p.out.logprobs[row] = zt - plan.lse;
  p.out.lse[row] = plan.lse;
  p.out.status[row] = plan.status;
}

int64_t chunk_begin(int64_t c) { return c * kChunk; }
int64_t chunk_end(const Problem& p, int64_t c) { return std::min(p.vocab, (c + 1) * kChunk); }

// One row start to finish on the calling thread (its chunks in order). Filtered rows keep
// the whole row's z' for the threshold; the others need at most one chunk of it.
void sample_row(const Problem& p, int64_t row, bool force_greedy = false) {
  Scratch& s = thread_scratch();
  const RowSpec spec = make_spec(p, row, force_greedy);
  float* z = nullptr;
  if (spec.filtered) z = grown(s.row, static_cast<size_t>(p.vocab));
  if (spec.fused) z = grown(s.row, static_cast<size_t>(kChunk));
  ScanSummary scan;
  KeySummary best;
  for (int64_t c = 0; c < p.n_chunks; ++c) {
    float* zc = spec.filtered ? z + chunk_begin(c) : z;
    const ChunkResult r = process_chunk(p, spec, row, c, zc, best);
    merge_scan(scan, r.scan);
    if (r.keys.token >= 0) offer(best, r.keys.key, r.keys.token);
  }
  const RowPlan plan = plan_row(p, spec, scan, z, s);
  if (plan.needs_keys && spec.filtered) {
    best = plan.seed;
    for (int64_t c = 0; c < p.n_chunks; ++c) {
      const KeySummary k = key_chunk(z + chunk_begin(c), chunk_begin(c), chunk_end(p, c),
                                     plan.threshold, spec, plan.seed);
      if (k.token >= 0) offer(best, k.key, k.token);
    }
  }
  write_row(p, row, plan, best);
}

// Few rows, many threads: the chunks of all rows run in parallel, and partials are merged
// per row in chunk order, exactly as sample_row does. Rows without filters are done after
// one parallel pass; filtered rows take a threshold step and a second pass over chunks.
void sample_rows_split(const Problem& p) {
  const int64_t items = p.batch * p.n_chunks;
  float* zall = grown(thread_scratch().split, static_cast<size_t>(p.batch * p.vocab));
  std::vector<RowSpec> specs(p.batch);
  std::vector<ChunkResult> chunks(items);
  std::vector<RowPlan> plans(p.batch);
  bool any_filtered = false;
  for (int64_t r = 0; r < p.batch; ++r) {
    specs[r] = make_spec(p, r);
    any_filtered |= specs[r].filtered;
  }
  auto row_buffer = [&](int64_t r) { return specs[r].greedy ? nullptr : zall + r * p.vocab; };
  auto merged_keys = [&](int64_t r, KeySummary best) {
    for (int64_t c = 0; c < p.n_chunks; ++c) {
      const KeySummary& k = chunks[r * p.n_chunks + c].keys;
      if (k.token >= 0) offer(best, k.key, k.token);
    }
    return best;
  };

#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t r = it / p.n_chunks, c = it % p.n_chunks;
      float* z = row_buffer(r);
      chunks[it] = process_chunk(p, specs[r], r, c, z != nullptr ? z + chunk_begin(c) : nullptr);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < p.batch; ++r) {
      ScanSummary scan;
      for (int64_t c = 0; c < p.n_chunks; ++c) merge_scan(scan, chunks[r * p.n_chunks + c].scan);
      plans[r] = plan_row(p, specs[r], scan, row_buffer(r), thread_scratch());
      if (!specs[r].filtered) write_row(p, r, plans[r], merged_keys(r, KeySummary{}));
    }
    if (any_filtered) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < items; ++it) {
        const int64_t r = it / p.n_chunks, c = it % p.n_chunks;
        if (plans[r].needs_keys && specs[r].filtered) {
          chunks[it].keys = key_chunk(row_buffer(r) + chunk_begin(c), chunk_begin(c),
                                      chunk_end(p, c), plans[r].threshold, specs[r],
                                      plans[r].seed);
        }
      }
#pragma omp for schedule(static)
      for (int64_t r = 0; r < p.batch; ++r) {
        if (specs[r].filtered) write_row(p, r, plans[r], merged_keys(r, plans[r].seed));
      }
    }
  }
}

}  // namespace

namespace {

void run_problem(const Problem& p) {
  const int64_t batch = p.batch, vocab = p.vocab;
  const SampleResult& out = p.out;
  const int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  const bool parallel = threads > 1 && batch * vocab >= kMinParallelWork;
  if (parallel && batch < threads && p.n_chunks > 1) {
    sample_rows_split(p);
  } else {
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (int64_t row = 0; row < batch; ++row) sample_row(p, row);
  }
  // The overflow rule: a good sampled row whose max z' is +-inf (its lse is then that
  // max; a finite max always gives a finite lse) is sampled again as greedy. Rare.
  for (int64_t row = 0; row < batch; ++row) {
    if (out.status[row] == 0 && !make_spec(p, row).greedy && std::isinf(out.lse[row])) {
      sample_row(p, row, /*force_greedy=*/true);
    }
  }
}

}  // namespace

void proxy_sample_cpu(LogitsView base, LogitsView expert, LogitsView anti, RowParams params,
                      SampleResult out, int64_t batch, int64_t vocab) {
  if (batch <= 0 || vocab <= 0) return;
  run_problem(Problem{base, expert, anti, params, out, batch, vocab, (vocab + kChunk - 1) / kChunk});
}

void sample_cpu(const LogitsSource& source, RowParams params, SampleResult out, int64_t batch,
                int64_t vocab) {
  if (batch <= 0 || vocab <= 0) return;
  Problem p{LogitsView{}, LogitsView{}, LogitsView{}, params, out, batch, vocab,
            (vocab + kChunk - 1) / kChunk};
  p.source = &source;
  run_problem(p);
}

}  // namespace proxykern
