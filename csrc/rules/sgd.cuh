// SGD with momentum / dampening / Nesterov / weight decay, torch.optim.SGD's single-tensor op order.
#pragma once

#include "../combine.cuh"

namespace fastclu {

struct Sgd {
  static __device__ void prepare(const CombineArgs&, const Chunk&, RuleCtx&) {}

  static __device__ void update(const CombineArgs& a, const Chunk& ch, const RuleCtx& cx, const float theta[8],
                                const float g[8], unsigned live, int64_t j, int cnt, bool vec, float out[8]) {
    float buf[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const bool mom = a.momentum != 0.f;
    // init_momentum overwrites the buffer, so it is only read where update mode keeps old values.
    if (mom && (!a.init_momentum || a.update_mode)) load8(ch.ptr(kState0), ch.dtype(kState0), j, cnt, vec, buf);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const bool on = (live >> k) & 1u;
      float d = g[k];
      if (a.weight_decay != 0.f) d = __fadd_rn(d, __fmul_rn(a.weight_decay, theta[k]));
      if (mom) {
        float b;
        if (a.init_momentum) b = d;
        else b = __fadd_rn(__fmul_rn(buf[k], a.momentum), __fmul_rn(a.one_minus_dampening, d));
        if (on) buf[k] = b;
        d = a.nesterov ? __fadd_rn(d, __fmul_rn(a.momentum, b)) : b;
      }
      out[k] = on ? __fadd_rn(theta[k], __fmul_rn(-cx.lr, d)) : theta[k];
    }
    if (mom) store8(ch.ptr(kState0), ch.dtype(kState0), j, cnt, vec, buf);
  }
};

}  // namespace fastclu
