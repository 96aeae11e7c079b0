// combine_step_: the saliency-masked combination of up to 4 role gradients fused into an update
// rule (a Rule template parameter: csrc/rules/<rule>.cuh), in torch.optim's single-tensor
// operation order, all in fp32. This file is the shared prologue, written once, and the rule
// table (one line per rule).
#include "combine.cuh"
#include "common.cuh"
#include "ops.h"
#include "rules/adamw.cuh"
#include "rules/classp.cuh"
#include "rules/sgd.cuh"

namespace fastclu {

namespace {

template <class Rule>
struct CombineOp {
  using Ctx = typename Rule::Ctx;
  CombineArgs a;

  __device__ Ctx prepare(const Chunk& ch) const { return Rule::prepare(a, ch, a.lr.get()); }

  __device__ void operator()(const Chunk& ch, const Ctx& cx, int64_t j, int cnt, bool vec) const {
    float theta[8], g[8], tmp[8];
    load8(ch.ptr(a.has_restore ? kRestore : kParam), ch.dtype(a.has_restore ? kRestore : kParam), j, cnt, vec, theta);
    // The reference restores first (params.copy_(restore_from)), so theta is restore_from rounded
    // to the params' dtype when the two differ (fp32 clean copy of fp16/bf16 weights).
    if (a.has_restore && ch.dtype(kRestore) != ch.dtype(kParam)) round8(ch.dtype(kParam), theta);
    const unsigned mbyte = a.has_mask ? load_mask_byte(ch.ptr(kMask), j) : 0xffu;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if (r >= a.n_roles) break;
      load8(ch.ptr(kGrad0 + r), ch.dtype(kGrad0 + r), j, cnt, vec, tmp);
      const float c = a.coeff[r].get();
      const bool gated = (a.masked_bits >> r) & 1u;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        // where(), not a product: an inf/NaN gradient under a zero bit must not leak.
        const float x = (gated && !((mbyte >> k) & 1u)) ? 0.f : tmp[k];
        const float term = __fmul_rn(x, c);
        g[k] = r == 0 ? term : __fadd_rn(g[k], term);  // 0 + x would turn -0.0 into +0.0
      }
    }
    const float s = a.scale.get();
    const float gs = a.has_grad_scale ? a.grad_scale.get() : 1.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      g[k] = __fmul_rn(s, g[k]);
      if (a.has_grad_scale) g[k] = __fdiv_rn(g[k], gs);
    }
    if (a.has_penalty) {
      float imp[8], anc[8];
      load8(ch.ptr(kImportance), ch.dtype(kImportance), j, cnt, vec, imp);
      load8(ch.ptr(kAnchor), ch.dtype(kAnchor), j, cnt, vec, anc);
      const float pen = a.penalty.get();
#pragma unroll
      for (int k = 0; k < 8; ++k) g[k] = __fadd_rn(g[k], __fmul_rn(__fmul_rn(pen, imp[k]), __fsub_rn(theta[k], anc[k])));
    }
    if (a.maximize) {
#pragma unroll
      for (int k = 0; k < 8; ++k) g[k] = -g[k];
    }
    // update mode: a zero bit freezes the weight and its state (the weight is still written
    // when it was read from restore_from, so the fused restore holds for frozen entries too).
    const unsigned live = a.update_mode ? mbyte : 0xffu;
    float out[8];
    Rule::update(a, ch, cx, theta, g, live, j, cnt, vec, out);
    store8(ch.ptr(kParam), ch.dtype(kParam), j, cnt, vec, out);
  }
};

template <class Rule>
__global__ void __launch_bounds__(kThreads) combine_kernel(Table t, CombineOp<Rule> op) {
  // AMP skip: one read per block, no host sync; weights and state stay as they are, except
  // that a fused restore still happens (a skipped step must not leave the weights perturbed).
  if (op.a.found_inf != nullptr && *op.a.found_inf != 0.f) {
    if (!op.a.has_restore) return;
    for (int64_t c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
      const Chunk ch = locate(t, c);
      const bool vec = all_aligned(ch, t.n_ops);
      for (int o = threadIdx.x; o < kOctetsPerChunk; o += kThreads) {
        const int64_t j = ch.begin + 8 * static_cast<int64_t>(o);
        if (j >= ch.numel) break;
        const int64_t left = ch.numel - j;
        const int cnt = left < 8 ? static_cast<int>(left) : 8;
        if (ch.dtype(kRestore) == ch.dtype(kParam)) {
          copy8(ch.ptr(kParam), ch.ptr(kRestore), ch.dtype(kParam), j, cnt, vec);  // bit-exact restore
        } else {
          float v[8];
          load8(ch.ptr(kRestore), ch.dtype(kRestore), j, cnt, vec, v);
          store8(ch.ptr(kParam), ch.dtype(kParam), j, cnt, vec, v);
        }
      }
    }
    return;
  }
  for (int64_t c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
    const Chunk ch = locate(t, c);
    const bool vec = all_aligned(ch, t.n_ops);
    const auto ctx = op.prepare(ch);
    for (int o = threadIdx.x; o < kOctetsPerChunk; o += kThreads) {
      const int64_t j = ch.begin + 8 * static_cast<int64_t>(o);
      if (j >= ch.numel) break;
      const int64_t left = ch.numel - j;
      op(ch, ctx, j, left < 8 ? static_cast<int>(left) : 8, vec);
    }
  }
}

// The clip factor of the contract (fastclu.ops.combine_step_), in fp64, by one thread, into the
// scratch scalar the step then reads as its scale: min(1, clip / (sqrt(max(c^T G c, 0)) / gs +
// 1e-6)), NaN kept (comparisons, not fmax). A launch of its own rather than a prologue of the
// fused kernel: there, its fp64 work cost AdamW's kernel registers (80 -> 87) or spills (sm_90).
struct ClipArgs {
  const float* gram;
  int n;
  Scal coeff[4], scale, grad_scale;
  bool has_grad_scale;
  double clip_host;
  const float* clip_ptr;
  float* out;
};

__global__ void clip_scale_kernel(ClipArgs c) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double n2 = 0;
  for (int r = 0; r < c.n; ++r) {
    double v = 0;
    for (int q = 0; q < c.n; ++q) v = __dadd_rn(v, __dmul_rn(c.coeff[q].get(), c.gram[q * c.n + r]));
    n2 = __dadd_rn(n2, __dmul_rn(v, c.coeff[r].get()));
  }
  double norm = sqrt(n2 < 0 ? 0.0 : n2);
  if (c.has_grad_scale) norm = norm / static_cast<double>(c.grad_scale.get());
  const double bound = c.clip_ptr ? static_cast<double>(*c.clip_ptr) : c.clip_host;
  const double f = bound / (norm + 1e-6);
  *c.out = __fmul_rn(c.scale.get(), static_cast<float>(f > 1.0 ? 1.0 : f));
}

// Step mode 3: the step's own launch advances the rule's per-tensor fp32 counters (by 1, or 0 on a
// found-inf step: the fused kernel then skips) before the fused kernel reads them as in mode 2. One
// thread per row; replaces a separate torch._foreach_add_ (a dispatch, its own multi-tensor launch).
__global__ void advance_steps_kernel(Table t, const float* found_inf) {
  const float inc = (found_inf != nullptr && *found_inf != 0.f) ? 0.f : 1.f;  // NaN: 0, as (fi == 0)
  const int64_t stride = kRowHeader + t.n_ops;
  for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < t.n_rows; r += gridDim.x * blockDim.x) {
    float* s = static_cast<float*>(row_ptr(t.rows + r * stride, t.dyn, kStep));
    *s = __fadd_rn(*s, inc);
  }
}

Scal scal_of(double v, uint64_t p) { return as_scal(v, p); }

template <class Rule>
void launch_rule(const Table& t, const CombineArgs& a, int grid, uint64_t stream) {
  FASTCLU_LAUNCH(combine_kernel<Rule>, grid, kThreads, 0, as_stream(stream))(t, CombineOp<Rule>{a});
}

struct RuleEntry {
  const char* name;
  void (*launch)(const Table&, const CombineArgs&, int, uint64_t);
};

// One line per rule of fastclu.ops.rules.RULES; the index is the rule's id (checked by a test).
const RuleEntry kRuleTable[] = {
    {"sgd", launch_rule<Sgd>},
    {"adamw", launch_rule<AdamW>},
    {"classp", launch_rule<Classp>},
};
constexpr int kNumRules = static_cast<int>(sizeof(kRuleTable) / sizeof(kRuleTable[0]));

}  // namespace

std::vector<std::pair<std::string, int>> combine_rules() {
  std::vector<std::pair<std::string, int>> out;
  for (int i = 0; i < kNumRules; ++i) out.emplace_back(kRuleTable[i].name, i);
  return out;
}

void combine_step(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, const CombineConfig& cfg, uint64_t stream) {
  const char* op = "combine_step_";
  const Table t = make_table(op, table, dyn, n_rows, kCombineOps, n_chunks);
  if (cfg.rule < 0 || cfg.rule >= kNumRules) fail(op, "unknown rule id");
  if (cfg.n_roles < 1 || cfg.n_roles > 4) fail(op, "n_roles must be in [1, 4]");
  if (cfg.step_mode < 0 || cfg.step_mode > 3) fail(op, "bad step_mode");
  if (cfg.step_mode == 1 && cfg.steps_ptr == 0) fail(op, "step_mode 1 needs steps_ptr");
  if (n_chunks <= 0) return;
  CombineArgs a{};
  a.n_roles = cfg.n_roles;
  // update mode never gates the roles: frozen entries discard the whole update instead.
  a.masked_bits = (cfg.has_mask && !cfg.update_mode) ? cfg.masked_bits : 0u;
  a.update_mode = cfg.update_mode && cfg.has_mask;
  a.has_mask = cfg.has_mask;
  a.has_restore = cfg.has_restore;
  a.has_penalty = cfg.has_penalty;
  a.maximize = cfg.maximize;
  a.has_grad_scale = cfg.has_grad_scale;
  for (int i = 0; i < kRuleSlots; ++i) a.h[i] = cfg.hparams[i];
  for (int i = 0; i < kRuleFlags; ++i) a.sw[i] = cfg.flags[i];
  a.lr_host = cfg.lr;
  a.lr = scal_of(cfg.lr, cfg.lr_ptr);
  a.scale = scal_of(cfg.scale, cfg.scale_ptr);
  a.penalty = scal_of(cfg.penalty, cfg.penalty_ptr);
  a.grad_scale = scal_of(cfg.grad_scale, cfg.grad_scale_ptr);
  for (int r = 0; r < 4; ++r) a.coeff[r] = scal_of(cfg.coeff[r], cfg.coeff_ptr[r]);
  a.found_inf = reinterpret_cast<const float*>(static_cast<uintptr_t>(cfg.found_inf_ptr));
  if (cfg.has_clip) {  // the clip factor first, into the scratch scalar the step reads as its scale
    if (cfg.clip_out_ptr == 0) fail(op, "a clip needs clip_out_ptr");
    ClipArgs c{};
    c.gram = reinterpret_cast<const float*>(static_cast<uintptr_t>(cfg.clip_gram_ptr));
    c.n = cfg.n_roles;
    for (int r = 0; r < 4; ++r) c.coeff[r] = a.coeff[r];
    c.scale = a.scale;
    c.grad_scale = a.grad_scale;
    c.has_grad_scale = a.has_grad_scale;
    c.clip_host = cfg.clip;
    c.clip_ptr = reinterpret_cast<const float*>(static_cast<uintptr_t>(cfg.clip_ptr));
    c.out = reinterpret_cast<float*>(static_cast<uintptr_t>(cfg.clip_out_ptr));
    FASTCLU_LAUNCH(clip_scale_kernel, 1, 1, 0, as_stream(stream))(c);
    check_launch(op);
    a.scale = as_scal(0, cfg.clip_out_ptr);
  }
  if (cfg.step_mode == 3) {  // counters advanced here, then read through the table as in mode 2
    const int blocks = (t.n_rows + kThreads - 1) / kThreads;
    FASTCLU_LAUNCH(advance_steps_kernel, blocks, kThreads, 0, as_stream(stream))(t, a.found_inf);
    check_launch(op);
  }
  a.step_mode = cfg.step_mode == 3 ? 2 : cfg.step_mode;
  a.step = cfg.step;
  a.steps = reinterpret_cast<const float*>(static_cast<uintptr_t>(cfg.steps_ptr));
  kRuleTable[cfg.rule].launch(t, a, grid_for(op, n_chunks), stream);
  check_launch(op);
}

}  // namespace fastclu
