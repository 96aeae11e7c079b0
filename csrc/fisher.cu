// fisher_accumulate_: diagonal Fisher / saliency accumulation, in fp32 (fp16/bf16 widened on load,
// rounded to nearest-even on store), in the operation order of the reference backend.
#include "common.cuh"
#include "ops.h"

namespace fastclu {

namespace {

struct FisherOp {
  using Ctx = NoCtx;
  Scal scale;
  int power;
  __device__ Ctx prepare(const Chunk&) const { return {}; }
  __device__ void operator()(const Chunk& ch, Ctx, int64_t j, int cnt, bool vec) const {
    float f[8], g[8];
    load8(ch.ptr(FisherRows::kFisher), ch.dtype(FisherRows::kFisher), j, cnt, vec, f);
    load8(ch.ptr(FisherRows::kGrad), ch.dtype(FisherRows::kGrad), j, cnt, vec, g);
    const float s = scale.get();
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float term = power == 2 ? g[k] * g[k] : fabsf(g[k]);
      f[k] = __fadd_rn(f[k], __fmul_rn(s, term));  // no FMA: the square is rounded first, as in the reference
    }
    store8(ch.ptr(FisherRows::kFisher), ch.dtype(FisherRows::kFisher), j, cnt, vec, f);
  }
};

}  // namespace

void fisher_accumulate(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double scale, uint64_t scale_ptr, int power,
                       uint64_t stream) {
  const char* op = "fisher_accumulate_";
  launch_mt(op, make_table(op, table, dyn, n_rows, FisherRows::kOps, n_chunks), FisherOp{as_scal(scale, scale_ptr), power}, stream);
}

}  // namespace fastclu
