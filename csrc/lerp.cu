// lerp_sync_: fast-slow (Lookahead) synchronisation in one pass, math in fp32.
#include "common.cuh"
#include "ops.h"

namespace fastclu {

namespace {

struct LerpSyncOp {
  using Ctx = NoCtx;
  Scal beta;
  __device__ Ctx prepare(const Chunk&) const { return {}; }
  __device__ void operator()(const Chunk& ch, Ctx, int64_t j, int cnt, bool vec) const {
    float s[8], f[8];
    load8(ch.ptr(LerpRows::kSlow), ch.dtype(LerpRows::kSlow), j, cnt, vec, s);
    load8(ch.ptr(LerpRows::kFast), ch.dtype(LerpRows::kFast), j, cnt, vec, f);
    const float b = beta.get();
#pragma unroll
    for (int k = 0; k < 8; ++k) s[k] = __fadd_rn(s[k], __fmul_rn(b, __fsub_rn(f[k], s[k])));
    store8(ch.ptr(LerpRows::kSlow), ch.dtype(LerpRows::kSlow), j, cnt, vec, s);
    // fast receives the stored slow value: round through slow's dtype first.
    if (ch.dtype(LerpRows::kSlow) != kF32) load8(ch.ptr(LerpRows::kSlow), ch.dtype(LerpRows::kSlow), j, cnt, vec, s);
    store8(ch.ptr(LerpRows::kFast), ch.dtype(LerpRows::kFast), j, cnt, vec, s);
  }
};

}  // namespace

void lerp_sync(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double beta, uint64_t beta_ptr, uint64_t stream) {
  const char* op = "lerp_sync_";
  launch_mt(op, make_table(op, table, dyn, n_rows, LerpRows::kOps, n_chunks), LerpSyncOp{as_scal(beta, beta_ptr)}, stream);
}

}  // namespace fastclu
