// Counter-based noise shared by the CPU and CUDA kernels (no torch headers).
// The mapping is the spec's (proxykern/reference.py):
//   key     = (seed lo32, seed hi32)
//   counter = (token >> 2, step lo32, step hi32, 0); word = token & 3
//   u       = ((x >> 9) + 0.5) * 2^-23 in (0, 1);  g = -log(-log(u))
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PK_HOST_DEVICE inline
#endif

namespace proxykern {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

struct Philox4 {
  uint32_t w[4];
};

PK_HOST_DEVICE uint32_t mul_hi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 (Salmon et al. 2011), identical to Triton's tl.randint4x.
PK_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                     uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_a = mul_hi32(kPhiloxRoundA, c0), lo_a = kPhiloxRoundA * c0;
    const uint32_t hi_b = mul_hi32(kPhiloxRoundB, c2), lo_b = kPhiloxRoundB * c2;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four words serving tokens 4*group .. 4*group+3 of a row.
PK_HOST_DEVICE Philox4 philox_for_group(int64_t seed, int64_t step, uint32_t group) {
  const uint64_t s = static_cast<uint64_t>(seed), t = static_cast<uint64_t>(step);
  return philox4x32_10(group, static_cast<uint32_t>(t), static_cast<uint32_t>(t >> 32), 0u,
                       static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
}

// u in (0, 1), exact in fp32: (2k + 1) * 2^-24 for the top 23 bits k of x.
PK_HOST_DEVICE float uniform_from_bits(uint32_t x) {
  return static_cast<float>(x >> 9) * 0x1p-23f + 0x1p-24f;
}

}  // namespace proxykern
