// MEHL-Soup: soup_combine (out = base + sum_k c[k, col] * diff_k, fp32 math, k in increasing
// order) and soup_coef_grads (<grad, diff_k> per tensor for all K in one pass: fp64 per-chunk
// partials, then one block per tensor folds its chunks in a fixed order; no float atomics).
#include "common.cuh"
#include "ops.h"

namespace fastclu {

namespace {

constexpr int kSoupMaxK = SoupCombineRows::kOps - SoupCombineRows::kDiff0;  // out, base, 12 differences <= 15
static_assert(SoupGradRows::kOps - SoupGradRows::kDiff0 == kSoupMaxK, "both soup tables hold the same K");
// row header columns read by the fold (fastclu/ops/_table.py COL_START, COL_NUMEL, COL_INDEX)
constexpr int kColChunkStart = 0, kColNumel = 1, kColIndex = 3;

struct SoupCombineOp {
  struct Ctx {
    float c[kSoupMaxK];
  };
  const float* coefs;  // [K, n_cols], row-major
  int K;
  int n_cols;
  __device__ Ctx prepare(const Chunk& ch) const {
    Ctx ctx;
    const int col = n_cols > 1 ? ch.tidx : 0;
    for (int k = 0; k < kSoupMaxK; ++k) ctx.c[k] = k < K ? coefs[k * n_cols + col] : 0.f;
    return ctx;
  }
  __device__ void operator()(const Chunk& ch, const Ctx& ctx, int64_t j, int cnt, bool vec) const {
    float acc[8], d[8];
    load8(ch.ptr(SoupCombineRows::kBase), ch.dtype(SoupCombineRows::kBase), j, cnt, vec, acc);
    for (int k = 0; k < K; ++k) {
      load8(ch.ptr(SoupCombineRows::kDiff0 + k), ch.dtype(SoupCombineRows::kDiff0 + k), j, cnt, vec, d);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = __fadd_rn(acc[e], __fmul_rn(ctx.c[k], d[e]));
    }
    store8(ch.ptr(SoupCombineRows::kOut), ch.dtype(SoupCombineRows::kOut), j, cnt, vec, acc);
  }
};

// partial[c * K + k] = sum over chunk c of grad * diff_k (fp32 products, fp64 sums).
__global__ void __launch_bounds__(kThreads) soup_partials_kernel(Table t, int K, double* partial) {
  __shared__ double sh[kThreads];
  for (int64_t c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
    const Chunk ch = locate(t, c);
    const bool vec = all_aligned(ch, t.n_ops);
    double acc[kSoupMaxK];
    for (int k = 0; k < kSoupMaxK; ++k) acc[k] = 0.0;
    for (int o = threadIdx.x; o < kOctetsPerChunk; o += kThreads) {
      const int64_t j = ch.begin + 8 * static_cast<int64_t>(o);
      if (j >= ch.numel) break;
      const int64_t left = ch.numel - j;
      const int cnt = left < 8 ? static_cast<int>(left) : 8;
      float g[8], d[8];
      load8(ch.ptr(SoupGradRows::kGrads), ch.dtype(SoupGradRows::kGrads), j, cnt, vec, g);
      for (int k = 0; k < K; ++k) {
        load8(ch.ptr(SoupGradRows::kDiff0 + k), ch.dtype(SoupGradRows::kDiff0 + k), j, cnt, vec, d);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[k] += static_cast<double>(__fmul_rn(g[e], d[e]));  // padding adds 0
      }
    }
    for (int k = 0; k < K; ++k) {
      const double s = block_sum(acc[k], sh);
      if (threadIdx.x == 0) partial[c * K + k] = s;
    }
  }
}

// One block per table row (non-empty tensor): out[k * n_tensors + tidx] = sum of its chunks' partials.
__global__ void __launch_bounds__(kThreads) soup_fold_kernel(Table t, int K, int n_tensors, const double* partial,
                                                             double* out) {
  __shared__ double sh[kThreads];
  const int64_t* row = t.rows + static_cast<int64_t>(blockIdx.x) * (kRowHeader + t.n_ops);
  const int64_t first = row[kColChunkStart];  // the table's chunk index of the row's first chunk
  const int64_t n = (row[kColNumel] + kChunk - 1) / kChunk;
  for (int k = 0; k < K; ++k) {
    double acc = 0.0;
    for (int64_t c = threadIdx.x; c < n; c += kThreads) acc += partial[(first + c) * K + k];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) out[static_cast<int64_t>(k) * n_tensors + row[kColIndex]] = acc;
  }
}

void check_k(const char* op, int K, int n_ops, int fixed) {
  if (K < 1 || K > kSoupMaxK) fail(op, "K must be in 1..12");
  if (n_ops != fixed + K) fail(op, "operand count does not match K");
}

}  // namespace

void soup_combine(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, int K, uint64_t coefs, int n_cols,
                  uint64_t stream) {
  const char* op = "soup_combine_";
  check_k(op, K, SoupCombineRows::kDiff0 + K, SoupCombineRows::kDiff0);
  if (n_chunks > 0 && coefs == 0) fail(op, "null coefficients");
  const SoupCombineOp f{reinterpret_cast<const float*>(static_cast<uintptr_t>(coefs)), K, n_cols};
  launch_mt(op, make_table(op, table, dyn, n_rows, SoupCombineRows::kDiff0 + K, n_chunks), f, stream);
}

void soup_coef_grads(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, int K, int n_tensors,
                     uint64_t partial, uint64_t out, uint64_t stream) {
  const char* op = "soup_coef_grads";
  check_k(op, K, SoupGradRows::kDiff0 + K, SoupGradRows::kDiff0);
  const Table t = make_table(op, table, dyn, n_rows, SoupGradRows::kDiff0 + K, n_chunks);
  if (t.n_chunks <= 0) return;
  double* part = reinterpret_cast<double*>(static_cast<uintptr_t>(partial));
  if (part == nullptr || out == 0) fail(op, "null output buffer");
  FASTCLU_LAUNCH(soup_partials_kernel, grid_for(op, t.n_chunks), kThreads, 0, as_stream(stream))(t, K, part);
  check_launch(op);
  FASTCLU_LAUNCH(soup_fold_kernel, n_rows, kThreads, 0, as_stream(stream))(
      t, K, n_tensors, part, reinterpret_cast<double*>(static_cast<uintptr_t>(out)));
  check_launch(op);
}

}  // namespace fastclu
