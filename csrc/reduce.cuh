// Deterministic multi-tensor reductions shared by gram and merge_stats: stage 1 writes one fp64
// partial per (chunk, quantity) from a fixed-order block tree; stage 2, a single block, folds
// the partials in a fixed order. No float atomics, so equal inputs give equal bits on every run.
// An Op provides `static constexpr int P` (quantities per chunk) and
// `__device__ void accumulate(const Chunk&, int64_t j, int cnt, bool vec, double acc[P])`.
#pragma once

#include "common.cuh"

namespace fastclu {

namespace {

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

}  // namespace fastclu
