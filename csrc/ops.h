// Host entry points of the fastclu kernels, called by bindings.cpp. Plain integer/double
// arguments only (addresses as uint64, CUDA stream as uint64) so this header needs neither
// CUDA nor pybind11. Every function throws std::runtime_error naming the op on a CUDA error.
//
// A table argument is (address of the device int64 table, rows, total chunks); see
// common.cuh for the row layout. A scalar is (host value, device fp32 address or 0).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fastclu {

int64_t chunk_elements();
int row_header();

// operands: 0 fisher, 1 grads
void fisher_accumulate(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double scale, uint64_t scale_ptr, int power,
                       uint64_t stream);
// operands: 0 f_forget, 1 f_remain, 2 packed mask (out)
void ratio_mask(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double gamma, uint64_t gamma_ptr, double eps,
                uint64_t stream);
// operands: 0 slow, 1 fast
void lerp_sync(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double beta, uint64_t beta_ptr, uint64_t stream);
// operands: 0 out, 1 grads_plus, 2 grads_minus
void fd_hvp(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double eps, uint64_t eps_ptr, bool accumulate,
            uint64_t stream);
// operands: 0 params, 1 anchor
void merge(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double alpha, uint64_t alpha_ptr, uint64_t stream);
// operands: 0 params, 1 backup (or null), 2 anchor (mode 0) / direction (mode 1)
void perturb_dir(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double scale, uint64_t scale_ptr, int mode,
                 uint64_t stream);
// Host evaluation of the kernels' Philox stream (for checks without a GPU).
std::vector<uint32_t> philox_words_host(uint64_t seed, uint32_t tidx, int64_t j);
float philox_normal_host(uint64_t seed, uint32_t tidx, int64_t j);
// Row table (chunks are rows, aux = row length): operands 0 params, 1 fp32 norms (out).
void row_norms(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, uint64_t stream);
// operands: 0 params, 1 backup (or null), 2 fp32 row norms; aux = row length
void perturb_noise(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double scale, uint64_t scale_ptr, uint64_t seed,
                   uint64_t stream);
// operands: 0..3 role grads, 4 mask (or null). partial: fp64 [n_chunks * 10]; out fp32 [R, R].
void gram(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, int n_roles, unsigned masked_bits, uint64_t partial,
          uint64_t out, uint64_t stream);
// operands: 0 params, 1 anchor, 2 fisher_sum, 3 fisher_theta_sum. partial fp64 [n_chunks * 2]; out fp32 [2].
void merge_stats(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, uint64_t partial, uint64_t out, uint64_t stream);
// operands: 0 out, 1 base, 2..K+1 differences (K <= 12); coefs fp32 [K, n_cols] (n_cols 1: one per ingredient).
void soup_combine(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, int K, uint64_t coefs, int n_cols,
                  uint64_t stream);
// operands: 0 grads, 1..K differences. partial fp64 [n_chunks * K]; out fp64 [K, n_tensors] (tensor index order;
// entries of empty tensors are not written).
void soup_coef_grads(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, int K, int n_tensors,
                     uint64_t partial, uint64_t out, uint64_t stream);
// topk: state is an int64 [4 + 256] device buffer; eqcount int64 [n_chunks]. operands 0 scores, 1 mask (out).
void topk_mask(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, int64_t k, uint64_t state, uint64_t eqcount,
               uint64_t stream);
// operands: 0 params (out), 1 backup; same dtype (fp32/fp16/bf16): one launch for every tensor.
void restore_mt(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, uint64_t stream);

// Operand rows of every other table, named once: the same names and numbers as the enums of
// fastclu/ops/tables.py (checked by tests/ops/test_tables.py through fastclu._C.TABLE_ROWS).
struct FisherRows { enum : int { kFisher = 0, kGrad = 1, kOps = 2 }; };
struct RatioRows { enum : int { kFForget = 0, kFRemain = 1, kOut = 2, kOps = 3 }; };
struct TopkRows { enum : int { kScores = 0, kOut = 1, kOps = 2 }; };
struct LerpRows { enum : int { kSlow = 0, kFast = 1, kOps = 2 }; };
struct HvpRows { enum : int { kOut = 0, kGradPlus = 1, kGradMinus = 2, kOps = 3 }; };
struct MergeRows { enum : int { kParam = 0, kAnchor = 1, kOps = 2 }; };
struct MergeStatsRows { enum : int { kParam = 0, kAnchor = 1, kFisherSum = 2, kFisherThetaSum = 3, kOps = 4 }; };
struct PerturbRows { enum : int { kParam = 0, kBackup = 1, kSource = 2, kOps = 3 }; };  // source: anchor/direction/norms
struct RowNormRows { enum : int { kParam = 0, kNorms = 1, kOps = 2 }; };
struct GramRows { enum : int { kGrad0 = 0, kMask = 4, kOps = 5 }; };  // role r at kGrad0 + r
struct RestoreRows { enum : int { kParam = 0, kBackup = 1, kOps = 2 }; };
// soup tables hold K <= 12 differences (ingredient k at kDiff0 + k); kOps: the largest K's count
struct SoupCombineRows { enum : int { kOut = 0, kBase = 1, kDiff0 = 2, kOps = 14 }; };
struct SoupGradRows { enum : int { kGrads = 0, kDiff0 = 1, kOps = 13 }; };

// Hyperparameter slots and switches of an update rule (fastclu/ops/rules.py N_SLOTS, N_FLAGS).
constexpr int kRuleSlots = 6;
constexpr int kRuleFlags = 4;

struct CombineConfig {
  int rule = 0;  // index into combine.cu's rule table (fastclu.ops.rules.RULES[name].id)
  int n_roles = 1;
  unsigned masked_bits = 0;  // bit r: role r is gated by the mask
  bool update_mode = false;
  bool has_mask = false, has_restore = false, has_penalty = false;
  bool maximize = false;
  double hparams[kRuleSlots] = {0, 0, 0, 0, 0, 0};  // the rule's slots (StepConfig.slots)
  int flags[kRuleFlags] = {0, 0, 0, 0};            // the rule's switches (StepConfig.flags)
  double lr = 0; uint64_t lr_ptr = 0;
  double scale = 1; uint64_t scale_ptr = 0;
  double penalty = 0; uint64_t penalty_ptr = 0;
  double coeff[4] = {1, 1, 1, 1}; uint64_t coeff_ptr[4] = {0, 0, 0, 0};
  double grad_scale = 1; uint64_t grad_scale_ptr = 0; bool has_grad_scale = false;
  uint64_t found_inf_ptr = 0;
  // The global-norm clip, formed on the device before the step (its own one-thread launch): an
  // [n_roles, n_roles] fp32 gram (row-major) and the bound; scale * min(1, clip / (sqrt(c^T G c)
  // / grad_scale + 1e-6)) is written to the fp32 scratch at clip_out_ptr, which the step reads.
  bool has_clip = false; uint64_t clip_gram_ptr = 0, clip_out_ptr = 0;
  double clip = 1; uint64_t clip_ptr = 0;
  // Step counters of a rule that keeps them: 0 one host value for every tensor, 1 fp32 device
  // array indexed by tensor index, 2 each row's operand 12 points to the (already incremented)
  // fp32 step counter, 3 as 2 but this call increments them first (by 0 on a found-inf step; every
  // tensor of the step must have a row, i.e. be non-empty).
  int step_mode = 0; double step = 1; uint64_t steps_ptr = 0;
};
// The update rules of combine.cu's table, as (name, id) in id order (exposed as _C.COMBINE_RULES).
std::vector<std::pair<std::string, int>> combine_rules();
// Operand rows of the combine table; the same names and numbers as fastclu/ops/tables.py
// CombineRow (checked by a test through fastclu._C.COMBINE_ROWS).
enum CombineRow : int {
  kParam = 0, kRestore = 1, kGrad0 = 2, kMask = 6, kState0 = 7, kState1 = 8, kStateMax = 9,
  kImportance = 10, kAnchor = 11, kStep = 12, kCombineOps = 13
};
// operands: 0 params, 1 restore_from, 2..5 role grads, 6 mask, 7..9 the rule's state lists
// (SGD: momentum_buffer; AdamW: exp_avg, exp_avg_sq, max_exp_avg_sq; CLASSP: acc), 10 importance,
// 11 anchor, 12 step counter (kPtr)
void combine_step(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, const CombineConfig& cfg, uint64_t stream);

}  // namespace fastclu
