// Scalar math for the CPU kernel, written so that GCC auto-vectorizes loops that call it:
// branch-free, no libm calls, integer tricks through std::bit_cast. Every helper uses only
// IEEE-exact basic operations (the build passes -ffp-contract=off, so nothing is fused),
// hence each target clone (SSE2, AVX2, AVX-512) computes bitwise the same values.
#pragma once
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>

#define PK_INLINE inline __attribute__((always_inline))

// The hot loops' target clones (AVX-512, AVX2, baseline; picked at load time). Defining
// PK_MULTIVERSION empty (-DPK_MULTIVERSION=) builds one version for the -march given,
// which is how the clones are checked against each other.
#ifndef PK_MULTIVERSION
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PK_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PK_MULTIVERSION
#endif
#endif

namespace proxykern::cpu {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLowest = std::numeric_limits<float>::lowest();  // the smallest finite float

// c ? a : b on already computed values, through integer masks. A plain ?: whose arm is a
// float operation lets GCC sink that operation into a branch, which it then refuses to
// if-convert under -ftrapping-math (its default), and the loop stays scalar.
PK_INLINE float select(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(a) & m) | (std::bit_cast<uint32_t>(b) & ~m));
}

PK_INLINE int32_t select(bool c, int32_t a, int32_t b) {
  const int32_t m = -static_cast<int32_t>(c);
  return (a & m) | (b & ~m);
}

PK_INLINE uint32_t select(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

PK_INLINE float bf16_to_float(uint16_t h) { return std::bit_cast<float>(uint32_t{h} << 16); }

// IEEE half -> float, exact for every input (subnormals, inf, NaN payloads). The subnormal
// case goes through an int -> float conversion rather than scaling a float subnormal,
// which would cost a microcode assist on Intel cores.
PK_INLINE float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t mag = h & 0x7FFFu;
  const uint32_t normal = (mag << 13) + (112u << 23);        // rebias the exponent 15 -> 127
  const uint32_t special = (mag << 13) | 0x7F800000u;        // inf / NaN keep their payload
  const uint32_t subnormal = std::bit_cast<uint32_t>(static_cast<float>(static_cast<int32_t>(mag)) * 0x1p-24f);
  uint32_t bits = select(mag >= 0x7C00u, special, normal);
  bits = select(mag < 0x0400u, subnormal, bits);
  return std::bit_cast<float>(bits | sign);
}

// exp(x) for x <= 88 (Cephes expf: Cody-Waite reduction + degree-6 polynomial, ~1 ulp).
// Returns 0 for x < -87 and for NaN: callers only sum these values against a maximum
// term of 1, where anything below e^-87 is invisible.
PK_INLINE float fast_exp(float x) {
  const bool live = x >= -87.0f;  // false for NaN too
  float xc = select(live, x, -87.0f);
  xc = select(xc < 88.0f, xc, 88.0f);
  // Round x*log2(e) to an integer with the 1.5*2^23 shifter: t's low mantissa bits are n.
  const float shifter = 12582912.0f;
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const int32_t ni = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(shifter);
  float r = xc - n * 0.693359375f;  // ln2 split in two: n * hi is exact
  r = r - n * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const float scale = std::bit_cast<float>((ni + 127) << 23);  // 2^n, n in [-126, 127]
  return select(live, p * scale, 0.0f);
}

// log(x) for positive normal finite x (Cephes logf, ~1 ulp). Accurate in relative terms
// near x = 1, where -log(u) for u close to 1 must keep its digits.
PK_INLINE float fast_log(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  int32_t e = static_cast<int32_t>(bits >> 23) - 126;  // x = m * 2^e, m in [0.5, 1)
  const float m = std::bit_cast<float>((bits & 0x007FFFFFu) | 0x3F000000u);
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  const float f = select(low, (m + m) - 1.0f, m - 1.0f);  // in [-0.293, 0.414], exact
  const float f2 = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = p * f * f2;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * f2;
  float r = f + y;
  r = r + fe * 0.693359375f;
  return r;
}

// Standard Gumbel noise from one Philox word: the spec's u = ((x >> 9) + 0.5) * 2^-23
// (the same value as philox.h's uniform_from_bits), g = -log(-log(u)).
PK_INLINE float gumbel_from_bits(uint32_t x) {
  const float u = static_cast<float>(static_cast<int32_t>(x >> 9)) * 0x1p-23f + 0x1p-24f;
  return -fast_log(-fast_log(u));
}

// Reductions run on explicit 16-lane vectors (GCC vector extensions, lowered to whatever
// the target clone has: 1 zmm, 2 ymm or 4 xmm registers). Auto-vectorizing the same code
// written over lane arrays turned out to depend on inlining context; these do not, and
// the lane layout fixes the reduction order, so every clone gives the same bits.
// Vectors are only passed between always-inlined helpers, never across a real call, so
// GCC's ABI note (-Wpsabi) does not apply; it is silenced for the including file (this
// header is private to proxy_sample_cpu.cpp).
#pragma GCC diagnostic ignored "-Wpsabi"
using f32x16 = float __attribute__((vector_size(64)));
using i32x16 = int32_t __attribute__((vector_size(64)));
constexpr int kVecLanes = 16;
constexpr i32x16 kIota16 = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

PK_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

PK_INLINE f32x16 splat16(float x) { return x - f32x16{}; }  // x - 0 keeps -0.0
PK_INLINE i32x16 splat16(int32_t x) { return i32x16{} + x; }

// Bit l set where lane l of a comparison result is true (a log-step OR across lanes).
PK_INLINE uint32_t mask16(const i32x16& lanes) {
  const i32x16 bit = {1 << 0, 1 << 1, 1 << 2,  1 << 3,  1 << 4,  1 << 5,  1 << 6,  1 << 7,
                      1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 15};
  i32x16 m = lanes & bit;
  m |= __builtin_shufflevector(m, m, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  m |= __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  m |= __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  m |= __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return static_cast<uint32_t>(m[0]);
}

// An upper bound on gumbel_from_bits: u <= 1 - 2^-24 gives g <= 16.6355. Tokens whose
// z' + kGumbelBound is below the best key so far cannot win and need no noise.
constexpr double kGumbelBound = 16.7;

}  // namespace proxykern::cpu
