// AdamW (decoupled weight decay, optional AMSGrad), torch.optim.adam's single-tensor op order.
// Slots (fastclu/ops/rules.py): h[0] weight_decay, h[1] beta1, h[2] beta2, h[3] eps.
// Switches: sw[0] weight decay, sw[1] AMSGrad. State rows: exp_avg, exp_avg_sq, max_exp_avg_sq.
#pragma once

#include "../combine.cuh"

namespace fastclu {

// torch.lerp's two-sided formula (exact at both ends), used by AdamW's exp_avg.lerp_.
__device__ __forceinline__ float torch_lerp(float a, float b, float w) {
  return w < 0.5f ? __fadd_rn(a, __fmul_rn(w, __fsub_rn(b, a))) : __fsub_rn(b, __fmul_rn(__fsub_rn(b, a), 1.0f - w));
}

struct AdamW {
  struct Ctx {
    float step_size;  // lr / bias_correction1
    float bc2_sqrt;
    float decay;  // 1 - lr * weight_decay
  };

  // formed once per chunk from its tensor's step
  static __device__ Ctx prepare(const CombineArgs& a, const Chunk& ch, float lr_f) {
    Ctx c;
    const double lr = a.lr.p ? static_cast<double>(lr_f) : a.lr_host;
    c.decay = 1.f;
    if (a.sw[0]) {
      c.decay = a.lr.p ? 1.0f - __fmul_rn(lr_f, static_cast<float>(a.h[0])) : static_cast<float>(1.0 - a.lr_host * a.h[0]);
    }
    const double step = a.step_of(ch);
    const double bc1 = 1.0 - pow(a.h[1], step), bc2 = 1.0 - pow(a.h[2], step);
    // host lr: a double division as in Python; device lr: an fp32 tensor op
    c.step_size = a.lr.p ? __fdiv_rn(lr_f, static_cast<float>(bc1)) : static_cast<float>(lr / bc1);
    c.bc2_sqrt = static_cast<float>(sqrt(bc2));
    return c;
  }

  static __device__ void update(const CombineArgs& a, const Chunk& ch, const Ctx& cx, const float theta[8],
                                const float g[8], unsigned live, int64_t j, int cnt, bool vec, float out[8]) {
    const bool amsgrad = a.sw[1] != 0;
    float m[8], v[8], vmax[8];
    load8(ch.ptr(kState0), ch.dtype(kState0), j, cnt, vec, m);
    load8(ch.ptr(kState1), ch.dtype(kState1), j, cnt, vec, v);
    if (amsgrad) load8(ch.ptr(kStateMax), ch.dtype(kStateMax), j, cnt, vec, vmax);
    const float decay = cx.decay;
    const float w1 = static_cast<float>(1.0 - a.h[1]), w2 = static_cast<float>(1.0 - a.h[2]);
    const float beta2 = static_cast<float>(a.h[2]), eps = static_cast<float>(a.h[3]);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (!((live >> k) & 1u)) {
        out[k] = theta[k];
        continue;
      }
      const float th = __fmul_rn(theta[k], decay);
      m[k] = torch_lerp(m[k], g[k], w1);
      v[k] = __fadd_rn(__fmul_rn(v[k], beta2), __fmul_rn(__fmul_rn(w2, g[k]), g[k]));
      float vv = v[k];
      if (amsgrad) {
        // torch.maximum propagates NaN where fmaxf would drop it
        vmax[k] = (isnan(vmax[k]) || isnan(v[k])) ? __int_as_float(0x7fc00000) : fmaxf(vmax[k], v[k]);
        vv = vmax[k];
      }
      const float denom = __fadd_rn(__fdiv_rn(sqrtf(vv), cx.bc2_sqrt), eps);
      out[k] = __fadd_rn(th, __fmul_rn(-cx.step_size, __fdiv_rn(m[k], denom)));
    }
    store8(ch.ptr(kState0), ch.dtype(kState0), j, cnt, vec, m);
    store8(ch.ptr(kState1), ch.dtype(kState1), j, cnt, vec, v);
    if (amsgrad) store8(ch.ptr(kStateMax), ch.dtype(kStateMax), j, cnt, vec, vmax);
  }
};

}  // namespace fastclu
