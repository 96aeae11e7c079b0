// Shared pieces of combine_step_ and its update rules (csrc/rules/<rule>.cuh).
//
// A Rule is a struct with a per-chunk context type and two static device functions, called by
// the fused kernel of combine.cu once its shared prologue (mask, role weights, scale, AMP
// unscale, penalty, maximize, fused restore) has formed the step's gradient g[8] for 8
// consecutive elements:
//   using Ctx = ...;                                           per-tensor values of one chunk
//   Ctx prepare(const CombineArgs&, const Chunk&, float lr)    once per chunk
//   update(const CombineArgs&, const Chunk&, const Ctx&, const float theta[8],
//          const float g[8], unsigned live, int64_t j, int cnt, bool vec, float out[8])
// update writes the new weights to out[k] (theta[k] where bit k of `live` is 0: update mode
// freezes the weight and its state) and loads / stores its own state rows kState0..kStateMax.
// Its hyperparameters are the slots a.h[] (doubles) and switches a.sw[] that
// fastclu/ops/rules.py declares for it; nothing in the prologue knows a rule.
#pragma once

#include "common.cuh"
#include "ops.h"

namespace fastclu {

// operand rows of the combine table: enum CombineRow in ops.h

struct CombineArgs {
  int n_roles;
  unsigned masked_bits;
  bool update_mode, has_mask, has_restore, has_penalty, maximize, has_grad_scale;
  double h[kRuleSlots];  // the rule's hyperparameter slots
  int sw[kRuleFlags];    // the rule's switches
  double lr_host;        // lr as a double when it is a host value (torch forms lr * wd, lr / bc1 in double)
  Scal lr, scale, penalty, grad_scale;
  Scal coeff[4];
  const float* found_inf;
  // per-tensor step counters (rules that keep them): see CombineConfig::step_mode
  int step_mode;
  double step;
  const float* steps;

  // the (already incremented) step counter of the chunk's tensor
  __device__ double step_of(const Chunk& ch) const {
    if (step_mode == 1) return steps[ch.tidx];
    // written by an earlier launch (mode 3: advance_steps_kernel), read-only in this one
    if (step_mode == 2) return __ldg(static_cast<const float*>(ch.ptr(kStep)));
    return step;
  }
};

}  // namespace fastclu
