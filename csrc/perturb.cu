// perturb_ / restore_: backup + move along a task vector / direction / counter-based Philox noise,
// and the deterministic per-row norms that scale the noise.
#include "common.cuh"
#include "ops.h"
#include "philox.cuh"

namespace fastclu {

namespace {

struct PerturbDirOp {
  using Ctx = NoCtx;
  Scal scale;
  int mode;  // 0: d = theta - anchor, 1: d = direction
  __device__ Ctx prepare(const Chunk&) const { return {}; }
  __device__ void operator()(const Chunk& ch, Ctx, int64_t j, int cnt, bool vec) const {
    float p[8], d[8];
    load8(ch.ptr(PerturbRows::kParam), ch.dtype(PerturbRows::kParam), j, cnt, vec, p);
    if (ch.ptr(PerturbRows::kBackup)) copy8(ch.ptr(PerturbRows::kBackup), ch.ptr(PerturbRows::kParam), ch.dtype(PerturbRows::kParam), j, cnt, vec);  // same dtype (checked by the op)
    load8(ch.ptr(PerturbRows::kSource), ch.dtype(PerturbRows::kSource), j, cnt, vec, d);
    const float s = scale.get();
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float dk = mode == 0 ? __fsub_rn(p[k], d[k]) : d[k];
      p[k] = __fadd_rn(p[k], __fmul_rn(s, dk));
    }
    store8(ch.ptr(PerturbRows::kParam), ch.dtype(PerturbRows::kParam), j, cnt, vec, p);
  }
};

struct PerturbNoiseOp {
  struct Ctx {
    float root_n;
  };
  Scal scale;
  uint64_t seed;
  __device__ Ctx prepare(const Chunk& ch) const { return {static_cast<float>(sqrt(static_cast<double>(ch.aux)))}; }
  __device__ void operator()(const Chunk& ch, Ctx ctx, int64_t j, int cnt, bool vec) const {
    float p[8];
    load8(ch.ptr(PerturbRows::kParam), ch.dtype(PerturbRows::kParam), j, cnt, vec, p);
    if (ch.ptr(PerturbRows::kBackup)) copy8(ch.ptr(PerturbRows::kBackup), ch.ptr(PerturbRows::kParam), ch.dtype(PerturbRows::kParam), j, cnt, vec);
    const float* norms = static_cast<const float*>(ch.ptr(PerturbRows::kSource));
    const float s = scale.get();
    const int64_t n = ch.aux;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (k >= cnt) break;
      const int64_t e = j + k;
      const float sigma = __fdiv_rn(__ldg(norms + e / n), ctx.root_n);  // read-only here: global, cached
      const float d = __fmul_rn(philox_normal(seed, static_cast<uint32_t>(ch.tidx), e), sigma);
      p[k] = __fadd_rn(p[k], __fmul_rn(s, d));
    }
    store8(ch.ptr(PerturbRows::kParam), ch.dtype(PerturbRows::kParam), j, cnt, vec, p);
  }
};

// One block per row (grid-stride over all rows of all tensors); fp64 sum of squares in a fixed
// order, rounded once to fp32 like the reference's fp64 vector_norm.
__global__ void __launch_bounds__(kThreads) row_norms_kernel(Table t) {
  __shared__ double sh[kThreads];
  for (int64_t c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
    const int stride = kRowHeader + t.n_ops;
    int lo = 0, hi = t.n_rows - 1;
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if (t.rows[static_cast<int64_t>(mid) * stride] <= c) lo = mid; else hi = mid - 1;
    }
    const int64_t* row = t.rows + static_cast<int64_t>(lo) * stride;
    const int64_t r = c - row[0], n = row[4];
    const int dt = static_cast<int>(row[2] & 15);
    const void* base = row_ptr(row, t.dyn, RowNormRows::kParam);
    double acc = 0.0;
    for (int64_t e = threadIdx.x; e < n; e += kThreads) {
      float v[8];
      load8(base, dt, r * n + e, 1, false, v);
      acc += static_cast<double>(v[0]) * static_cast<double>(v[0]);
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) {
      float* out = static_cast<float*>(row_ptr(row, t.dyn, RowNormRows::kNorms));
      out[r] = static_cast<float>(sqrt(acc));
    }
  }
}

// Bit-exact copy (restore_): raw 16-byte moves, no float round trip, every tensor in one launch.
struct CopyOp {
  using Ctx = NoCtx;
  __device__ Ctx prepare(const Chunk&) const { return {}; }
  __device__ void operator()(const Chunk& ch, Ctx, int64_t j, int cnt, bool vec) const {
    copy8(ch.ptr(RestoreRows::kParam), ch.ptr(RestoreRows::kBackup), ch.dtype(RestoreRows::kParam), j, cnt, vec);
  }
};

}  // namespace

std::vector<uint32_t> philox_words_host(uint64_t seed, uint32_t tidx, int64_t j) {
  uint32_t w[4];
  philox_words(seed, tidx, j, w);
  return {w[0], w[1], w[2], w[3]};
}

float philox_normal_host(uint64_t seed, uint32_t tidx, int64_t j) { return philox_normal(seed, tidx, j); }

void perturb_dir(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double scale, uint64_t scale_ptr, int mode,
                 uint64_t stream) {
  const char* op = "perturb_";
  launch_mt(op, make_table(op, table, dyn, n_rows, PerturbRows::kOps, n_chunks), PerturbDirOp{as_scal(scale, scale_ptr), mode}, stream);
}

void perturb_noise(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double scale, uint64_t scale_ptr, uint64_t seed,
                   uint64_t stream) {
  const char* op = "perturb_";
  launch_mt(op, make_table(op, table, dyn, n_rows, PerturbRows::kOps, n_chunks), PerturbNoiseOp{as_scal(scale, scale_ptr), seed}, stream);
}

void row_norms(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, uint64_t stream) {
  const char* op = "perturb_ (row norms)";
  const Table t = make_table(op, table, dyn, n_rows, RowNormRows::kOps, n_chunks);
  if (n_chunks <= 0) return;
  FASTCLU_LAUNCH(row_norms_kernel, grid_for(op, n_chunks), kThreads, 0, as_stream(stream))(t);
  check_launch(op);
}

void restore_mt(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, uint64_t stream) {
  const char* op = "restore_";
  launch_mt(op, make_table(op, table, dyn, n_rows, RestoreRows::kOps, n_chunks), CopyOp{}, stream);
}

}  // namespace fastclu
