// Shared pieces of combine_step_ and its update rules (csrc/rules/<rule>.cuh).
//
// A Rule is a struct with two static device functions, called by the fused kernel of
// combine.cu once its shared prologue (mask, role weights, scale, AMP unscale, penalty, fused
// restore) has formed the step's gradient g[8] for 8 consecutive elements:
//   prepare(const CombineArgs&, const Chunk&, RuleCtx&)      once per chunk (per-tensor values)
//   update(const CombineArgs&, const Chunk&, const RuleCtx&, const float theta[8],
//          const float g[8], unsigned live, int64_t j, int cnt, bool vec, float out[8])
// update writes the new weights to out[k] (theta[k] where bit k of `live` is 0: update mode
// freezes the weight and its state) and loads / stores its own state rows kState0..kStateMax.
#pragma once

#include "common.cuh"
#include "ops.h"

namespace fastclu {

// operand rows of the combine table: enum CombineRow in ops.h

struct CombineArgs {
  int n_roles;
  unsigned masked_bits;
  bool update_mode, has_mask, has_restore, has_penalty, maximize, nesterov, init_momentum, amsgrad;
  bool has_grad_scale;
  float momentum, dampening, weight_decay, beta1, beta2, eps;
  double weight_decay_d;
  float one_minus_dampening;  // formed in double on the host, as torch's alpha=1 - dampening
  double beta1_d, beta2_d;
  double lr_host;  // lr as a double when it is a host value (torch forms lr * wd and lr / bc1 in double)
  Scal lr, scale, penalty, grad_scale;
  Scal coeff[4];
  const float* found_inf;
  int step_mode;
  double step;
  const float* steps;
};

// Per-chunk values: lr is read by every rule; the rest belong to the rule that sets them.
struct RuleCtx {
  float lr;
  float step_size;  // AdamW: lr / bias_correction1
  float bc2_sqrt;
  float decay;  // AdamW: 1 - lr * weight_decay
};

}  // namespace fastclu
