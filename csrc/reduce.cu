// Deterministic multi-tensor reductions (gram, merge_stats): stage 1 writes one fp64 partial
// per (chunk, quantity) from a fixed-order block tree; stage 2, a single block, folds the
// partials in a fixed order. No float atomics, so equal inputs give equal bits on every run.
#include "common.cuh"
#include "ops.h"

namespace fastclu {

namespace {

constexpr int kGramPairs = 10;  // r <= s for R = 4

struct GramOp {
  static constexpr int P = kGramPairs;
  int n_roles;
  unsigned masked_bits;
  bool has_mask;
  __device__ void accumulate(const Chunk& ch, int64_t j, int cnt, bool vec, double acc[P]) const {
    float g[4][8];
    const unsigned mbyte = has_mask ? load_mask_byte(ch.ptr(4), j) : 0xffu;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if (r < n_roles) {
        load8(ch.ptr(r), ch.dtype(r), j, cnt, vec, g[r]);
        if ((masked_bits >> r) & 1u) {
#pragma unroll
          for (int k = 0; k < 8; ++k) g[r][k] = ((mbyte >> k) & 1u) ? g[r][k] : 0.f;
        }
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) g[r][k] = 0.f;
      }
    }
    int p = 0;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int s = r; s < 4; ++s, ++p) {
        double t = 0.0;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += static_cast<double>(g[r][k]) * static_cast<double>(g[s][k]);
        acc[p] += t;
      }
    }
  }
};

struct MergeStatsOp {
  static constexpr int P = 2;
  __device__ void accumulate(const Chunk& ch, int64_t j, int cnt, bool vec, double acc[P]) const {
    float p[8], a[8], f[8], ft[8];
    load8(ch.ptr(0), ch.dtype(0), j, cnt, vec, p);
    load8(ch.ptr(1), ch.dtype(1), j, cnt, vec, a);
    load8(ch.ptr(2), ch.dtype(2), j, cnt, vec, f);
    load8(ch.ptr(3), ch.dtype(3), j, cnt, vec, ft);
#pragma unroll
    for (int k = 0; k < 8; ++k) {  // padding lanes are all zero, so they add 0
      const double d = static_cast<double>(p[k]) - static_cast<double>(a[k]);
      const double f64 = f[k];
      acc[0] += d * (static_cast<double>(ft[k]) - static_cast<double>(a[k]) * f64);
      acc[1] += d * d * f64;
    }
  }
};

template <class Op>
__global__ void __launch_bounds__(kThreads) partial_kernel(Table t, Op op, double* partial) {
  __shared__ double sh[kThreads];
  for (int64_t c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
    const Chunk ch = locate(t, c);
    const bool vec = all_aligned(ch, t.n_ops);
    double acc[Op::P];
#pragma unroll
    for (int p = 0; p < Op::P; ++p) acc[p] = 0.0;
    for (int o = threadIdx.x; o < kOctetsPerChunk; o += kThreads) {
      const int64_t j = ch.begin + 8 * static_cast<int64_t>(o);
      if (j >= ch.numel) break;
      const int64_t left = ch.numel - j;
      op.accumulate(ch, j, left < 8 ? static_cast<int>(left) : 8, vec, acc);
    }
#pragma unroll
    for (int p = 0; p < Op::P; ++p) {
      const double s = block_sum(acc[p], sh);
      if (threadIdx.x == 0) partial[c * Op::P + p] = s;
    }
  }
}

// n_roles > 0: out is the [R, R] gram matrix filled from the r <= s pairs; else out[p] = sum_p.
__global__ void __launch_bounds__(kThreads) fold_kernel(const double* partial, int64_t n_chunks, int P, int n_roles,
                                                        float* out) {
  __shared__ double sh[kThreads];
  int p = 0;
  for (int r = 0; r < (n_roles > 0 ? 4 : 1); ++r) {
    for (int s = (n_roles > 0 ? r : 0); s < (n_roles > 0 ? 4 : P); ++s, ++p) {
      double acc = 0.0;
      for (int64_t c = threadIdx.x; c < n_chunks; c += kThreads) acc += partial[c * P + p];
      acc = block_sum(acc, sh);
      if (threadIdx.x != 0) continue;
      if (n_roles == 0) {
        out[s] = static_cast<float>(acc);
      } else if (r < n_roles && s < n_roles) {
        out[r * n_roles + s] = static_cast<float>(acc);
        out[s * n_roles + r] = static_cast<float>(acc);
      }
    }
  }
}

template <class Op>
void reduce(const char* op_name, const Table& t, const Op& op, uint64_t partial, uint64_t out, int n_roles,
            uint64_t stream) {
  double* part = reinterpret_cast<double*>(static_cast<uintptr_t>(partial));
  if (t.n_chunks > 0) {
    if (part == nullptr) fail(op_name, "null partial buffer");
    FASTCLU_LAUNCH(partial_kernel<Op>, grid_for(op_name, t.n_chunks), kThreads, 0, as_stream(stream))(t, op, part);
    check_launch(op_name);
  }
  FASTCLU_LAUNCH(fold_kernel, 1, kThreads, 0, as_stream(stream))(part, t.n_chunks > 0 ? t.n_chunks : 0, Op::P, n_roles,
                                                     reinterpret_cast<float*>(static_cast<uintptr_t>(out)));
  check_launch(op_name);
}

}  // namespace

void gram(uint64_t table, int n_rows, int64_t n_chunks, int n_roles, unsigned masked_bits, uint64_t partial,
          uint64_t out, uint64_t stream) {
  const char* op = "gram";
  if (n_roles < 1 || n_roles > 4) fail(op, "n_roles must be in [1, 4]");
  const Table t = make_table(op, table, n_rows, 5, n_chunks);
  bool has_mask = masked_bits != 0;
  reduce(op, t, GramOp{n_roles, masked_bits, has_mask}, partial, out, n_roles, stream);
}

void merge_stats(uint64_t table, int n_rows, int64_t n_chunks, uint64_t partial, uint64_t out, uint64_t stream) {
  const char* op = "merge_stats";
  reduce(op, make_table(op, table, n_rows, 4, n_chunks), MergeStatsOp{}, partial, out, 0, stream);
}

}  // namespace fastclu
