// CLASSP (arXiv 2405.09637): where g*g > threshold, acc += |g|**p and
// theta -= lr * g / (acc + eps)**(1/p) (or theta -= lr * g without scaling); elsewhere neither
// the weight nor acc moves. Slots (fastclu/ops/rules.py): h[0] threshold, h[1] p, h[2] 1/p,
// h[3] eps. Switches: sw[0] scaling, sw[1] power mode (0: p = 1, 1: p = 2, 2: any other p).
// State row: acc.
#pragma once

#include "../combine.cuh"

namespace fastclu {

struct Classp {
  struct Ctx {
    float lr;
  };
  static __device__ Ctx prepare(const CombineArgs&, const Chunk&, float lr) { return Ctx{lr}; }

  // |g|**p and d**(1/p), exact for p = 1 and correctly rounded for p = 2 (as torch's pow does)
  static __device__ __forceinline__ float power(float x, int mode, float p) {
    return mode == 0 ? x : mode == 1 ? __fmul_rn(x, x) : powf(x, p);
  }
  static __device__ __forceinline__ float root(float x, int mode, float inv_p) {
    return mode == 0 ? x : mode == 1 ? sqrtf(x) : powf(x, inv_p);
  }

  static __device__ void update(const CombineArgs& a, const Chunk& ch, const Ctx& cx, const float theta[8],
                                const float g[8], unsigned live, int64_t j, int cnt, bool vec, float out[8]) {
    const float threshold = static_cast<float>(a.h[0]), p = static_cast<float>(a.h[1]);
    const float inv_p = static_cast<float>(a.h[2]), eps = static_cast<float>(a.h[3]);
    const bool scaling = a.sw[0] != 0;
    const int mode = a.sw[1];
    float acc[8];
    if (scaling) load8(ch.ptr(kState0), ch.dtype(kState0), j, cnt, vec, acc);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      // a comparison, not a product: a NaN gradient does not pass the gate
      const bool on = ((live >> k) & 1u) && __fmul_rn(g[k], g[k]) > threshold;
      if (!on) {
        out[k] = theta[k];
        continue;
      }
      float upd = g[k];
      if (scaling) {
        acc[k] = __fadd_rn(acc[k], power(fabsf(g[k]), mode, p));
        upd = __fdiv_rn(g[k], root(__fadd_rn(acc[k], eps), mode, inv_p));
      }
      out[k] = __fadd_rn(theta[k], __fmul_rn(-cx.lr, upd));
    }
    if (scaling) store8(ch.ptr(kState0), ch.dtype(kState0), j, cnt, vec, acc);
  }
};

}  // namespace fastclu
