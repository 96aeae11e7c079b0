// P&M merge: merge_ (theta = anchor + alpha * (theta - anchor), fp32 math) and merge_stats
// (the two sums of alpha, fp64 partials folded deterministically).
#include "common.cuh"
#include "ops.h"
#include "reduce.cuh"

namespace fastclu {

namespace {

struct MergeOp {
  using Ctx = NoCtx;
  Scal alpha;
  __device__ Ctx prepare(const Chunk&) const { return {}; }
  __device__ void operator()(const Chunk& ch, Ctx, int64_t j, int cnt, bool vec) const {
    float p[8], a[8];
    load8(ch.ptr(MergeRows::kParam), ch.dtype(MergeRows::kParam), j, cnt, vec, p);
    load8(ch.ptr(MergeRows::kAnchor), ch.dtype(MergeRows::kAnchor), j, cnt, vec, a);
    const float al = alpha.get();
#pragma unroll
    for (int k = 0; k < 8; ++k) p[k] = __fadd_rn(a[k], __fmul_rn(al, __fsub_rn(p[k], a[k])));
    store8(ch.ptr(MergeRows::kParam), ch.dtype(MergeRows::kParam), j, cnt, vec, p);
  }
};

struct MergeStatsOp {
  static constexpr int P = 2;
  __device__ void accumulate(const Chunk& ch, int64_t j, int cnt, bool vec, double acc[P]) const {
    float p[8], a[8], f[8], ft[8];
    load8(ch.ptr(MergeStatsRows::kParam), ch.dtype(MergeStatsRows::kParam), j, cnt, vec, p);
    load8(ch.ptr(MergeStatsRows::kAnchor), ch.dtype(MergeStatsRows::kAnchor), j, cnt, vec, a);
    load8(ch.ptr(MergeStatsRows::kFisherSum), ch.dtype(MergeStatsRows::kFisherSum), j, cnt, vec, f);
    load8(ch.ptr(MergeStatsRows::kFisherThetaSum), ch.dtype(MergeStatsRows::kFisherThetaSum), j, cnt, vec, ft);
#pragma unroll
    for (int k = 0; k < 8; ++k) {  // padding lanes are all zero, so they add 0
      const double d = static_cast<double>(p[k]) - static_cast<double>(a[k]);
      const double f64 = f[k];
      acc[0] += d * (static_cast<double>(ft[k]) - static_cast<double>(a[k]) * f64);
      acc[1] += d * d * f64;
    }
  }
};

}  // namespace

void merge(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double alpha, uint64_t alpha_ptr, uint64_t stream) {
  const char* op = "merge_";
  launch_mt(op, make_table(op, table, dyn, n_rows, MergeRows::kOps, n_chunks), MergeOp{as_scal(alpha, alpha_ptr)}, stream);
}

void merge_stats(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, uint64_t partial, uint64_t out, uint64_t stream) {
  const char* op = "merge_stats";
  reduce(op, make_table(op, table, dyn, n_rows, MergeStatsRows::kOps, n_chunks), MergeStatsOp{}, partial, out, 0, stream);
}

}  // namespace fastclu
