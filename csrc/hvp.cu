// fd_hvp_: central finite-difference Hessian-vector product, math in fp32.
#include "common.cuh"
#include "ops.h"

namespace fastclu {

namespace {

struct FdHvpOp {
  using Ctx = NoCtx;
  Scal eps;
  bool accumulate;
  __device__ Ctx prepare(const Chunk&) const { return {}; }
  __device__ void operator()(const Chunk& ch, Ctx, int64_t j, int cnt, bool vec) const {
    float o[8], p[8], m[8];
    load8(ch.ptr(HvpRows::kGradPlus), ch.dtype(HvpRows::kGradPlus), j, cnt, vec, p);
    load8(ch.ptr(HvpRows::kGradMinus), ch.dtype(HvpRows::kGradMinus), j, cnt, vec, m);
    const float two_eps = eps.get() * 2.0f;
    if (accumulate) load8(ch.ptr(HvpRows::kOut), ch.dtype(HvpRows::kOut), j, cnt, vec, o);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float h = __fdiv_rn(__fsub_rn(p[k], m[k]), two_eps);
      o[k] = accumulate ? __fadd_rn(o[k], h) : h;
    }
    store8(ch.ptr(HvpRows::kOut), ch.dtype(HvpRows::kOut), j, cnt, vec, o);
  }
};

}  // namespace

void fd_hvp(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double eps, uint64_t eps_ptr, bool accumulate,
            uint64_t stream) {
  const char* op = "fd_hvp_";
  launch_mt(op, make_table(op, table, dyn, n_rows, HvpRows::kOps, n_chunks), FdHvpOp{as_scal(eps, eps_ptr), accumulate}, stream);
}

}  // namespace fastclu
