// AdamW (decoupled weight decay, optional AMSGrad), torch.optim.adam's single-tensor op order.
#pragma once

#include "../combine.cuh"

namespace fastclu {

// torch.lerp's two-sided formula (exact at both ends), used by AdamW's exp_avg.lerp_.
__device__ __forceinline__ float torch_lerp(float a, float b, float w) {
  return w < 0.5f ? __fadd_rn(a, __fmul_rn(w, __fsub_rn(b, a))) : __fsub_rn(b, __fmul_rn(__fsub_rn(b, a), 1.0f - w));
}

struct AdamW {
  // lr / bias_correction1 and sqrt(bias_correction2), formed once per chunk from its tensor's step.
  static __device__ void prepare(const CombineArgs& a, const Chunk& ch, RuleCtx& c) {
    const double lr = a.lr.p ? static_cast<double>(c.lr) : a.lr_host;
    if (a.weight_decay != 0.f) {
      c.decay = a.lr.p ? 1.0f - __fmul_rn(c.lr, a.weight_decay)
                       : static_cast<float>(1.0 - a.lr_host * static_cast<double>(a.weight_decay_d));
    }
    double step = a.step;
    if (a.step_mode == 1) step = a.steps[ch.tidx];
    else if (a.step_mode == 2) step = *static_cast<const float*>(ch.ptr(kStep));
    const double bc1 = 1.0 - pow(a.beta1_d, step), bc2 = 1.0 - pow(a.beta2_d, step);
    // host lr: a double division as in Python; device lr: an fp32 tensor op
    c.step_size = a.lr.p ? __fdiv_rn(c.lr, static_cast<float>(bc1)) : static_cast<float>(lr / bc1);
    c.bc2_sqrt = static_cast<float>(sqrt(bc2));
  }

  static __device__ void update(const CombineArgs& a, const Chunk& ch, const RuleCtx& cx, const float theta[8],
                                const float g[8], unsigned live, int64_t j, int cnt, bool vec, float out[8]) {
    float m[8], v[8], vmax[8];
    load8(ch.ptr(kState0), ch.dtype(kState0), j, cnt, vec, m);
    load8(ch.ptr(kState1), ch.dtype(kState1), j, cnt, vec, v);
    if (a.amsgrad) load8(ch.ptr(kStateMax), ch.dtype(kStateMax), j, cnt, vec, vmax);
    const float decay = cx.decay;
    const float w1 = static_cast<float>(1.0 - a.beta1_d), w2 = static_cast<float>(1.0 - a.beta2_d);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (!((live >> k) & 1u)) {
        out[k] = theta[k];
        continue;
      }
      const float th = __fmul_rn(theta[k], decay);
      m[k] = torch_lerp(m[k], g[k], w1);
      v[k] = __fadd_rn(__fmul_rn(v[k], a.beta2), __fmul_rn(__fmul_rn(w2, g[k]), g[k]));
      float vv = v[k];
      if (a.amsgrad) {
        // torch.maximum propagates NaN where fmaxf would drop it
        vmax[k] = (isnan(vmax[k]) || isnan(v[k])) ? __int_as_float(0x7fc00000) : fmaxf(vmax[k], v[k]);
        vv = vmax[k];
      }
      const float denom = __fadd_rn(__fdiv_rn(sqrtf(vv), cx.bc2_sqrt), a.eps);
      out[k] = __fadd_rn(th, __fmul_rn(-cx.step_size, __fdiv_rn(m[k], denom)));
    }
    store8(ch.ptr(kState0), ch.dtype(kState0), j, cnt, vec, m);
    store8(ch.ptr(kState1), ch.dtype(kState1), j, cnt, vec, v);
    if (a.amsgrad) store8(ch.ptr(kStateMax), ch.dtype(kStateMax), j, cnt, vec, vmax);
  }
};

}  // namespace fastclu
