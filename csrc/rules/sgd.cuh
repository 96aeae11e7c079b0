// SGD with momentum / dampening / Nesterov / weight decay, torch.optim.SGD's single-tensor op order.
// Slots (fastclu/ops/rules.py): h[0] weight_decay, h[1] momentum, h[2] 1 - dampening (formed in
// double, as torch's alpha=1 - dampening). Switches: sw[0] weight decay, sw[1] momentum,
// sw[2] Nesterov, sw[3] first step (buffer = d_p).
#pragma once

#include "../combine.cuh"

namespace fastclu {

struct Sgd {
  struct Ctx {
    float lr;
  };
  static __device__ Ctx prepare(const CombineArgs&, const Chunk&, float lr) { return Ctx{lr}; }

  static __device__ void update(const CombineArgs& a, const Chunk& ch, const Ctx& cx, const float theta[8],
                                const float g[8], unsigned live, int64_t j, int cnt, bool vec, float out[8]) {
    const bool wd_on = a.sw[0] != 0, mom = a.sw[1] != 0, nesterov = a.sw[2] != 0, init = a.sw[3] != 0;
    const float wd = static_cast<float>(a.h[0]), momentum = static_cast<float>(a.h[1]);
    const float one_minus_dampening = static_cast<float>(a.h[2]);
    float buf[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    // init overwrites the buffer, so it is only read where update mode keeps old values.
    if (mom && (!init || a.update_mode)) load8(ch.ptr(kState0), ch.dtype(kState0), j, cnt, vec, buf);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const bool on = (live >> k) & 1u;
      float d = g[k];
      if (wd_on) d = __fadd_rn(d, __fmul_rn(wd, theta[k]));
      if (mom) {
        float b;
        if (init) b = d;
        else b = __fadd_rn(__fmul_rn(buf[k], momentum), __fmul_rn(one_minus_dampening, d));
        if (on) buf[k] = b;
        d = nesterov ? __fadd_rn(d, __fmul_rn(momentum, b)) : b;
      }
      out[k] = on ? __fadd_rn(theta[k], __fmul_rn(-cx.lr, d)) : theta[k];
    }
    if (mom) store8(ch.ptr(kState0), ch.dtype(kState0), j, cnt, vec, buf);
  }
};

}  // namespace fastclu
