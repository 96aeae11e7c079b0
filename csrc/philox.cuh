// Counter-based Philox 4x32-10, the noise contract of fastclu/ops/reference/philox.py:
// counter (j lo, j hi, tensor index, 0), key (seed lo, seed hi), Triton's round and key
// constants; two words -> one normal by tl.randn's recipe (uniform scale 4.6566127342e-10,
// u1 clamped at 1e-7, Box-Muller cosine branch). Host-callable too, so the exact integer
// stream can be checked against the reference on a machine without a GPU.
#pragma once

#include <cmath>
#include <cstdint>

namespace fastclu {

__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

__host__ __device__ __forceinline__ void philox4x32_10(uint64_t seed, uint32_t& c0, uint32_t& c1, uint32_t& c2,
                                                       uint32_t& c3) {
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffu), k1 = static_cast<uint32_t>(seed >> 32);
  // No "#pragma unroll": the host compiler rejects it, and nvcc unrolls a 10-trip loop anyway.
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi_b = mulhi32(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = mulhi32(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    const uint32_t n0 = hi_b ^ c1 ^ k0, n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

__host__ __device__ __forceinline__ void philox_words(uint64_t seed, uint32_t tidx, int64_t j, uint32_t w[4]) {
  w[0] = static_cast<uint32_t>(static_cast<uint64_t>(j) & 0xffffffffu);
  w[1] = static_cast<uint32_t>(static_cast<uint64_t>(j) >> 32);
  w[2] = tidx;
  w[3] = 0;
  philox4x32_10(seed, w[0], w[1], w[2], w[3]);
}

__host__ __device__ __forceinline__ float uint_to_uniform(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  if (s < 0) s = -s - 1;  // never overflows: -(-2^31) - 1 = 2^31 - 1
  // one fp32 product, rounded once, as the reference's fp32 tensor multiply
  return static_cast<float>(s) * 4.6566127342e-10f;
}

__host__ __device__ __forceinline__ float philox_normal(uint64_t seed, uint32_t tidx, int64_t j) {
  uint32_t w[4];
  philox_words(seed, tidx, j, w);
  const float u1 = fmaxf(uint_to_uniform(w[0]), 1.0e-7f);
  const float u2 = uint_to_uniform(w[1]);
  const float r = sqrtf(-2.0f * logf(u1));
  return r * cosf(6.28318530717958647692f * u2);
}

}  // namespace fastclu
