// gram: inner products of the (masked) role gradients, summed deterministically in fp64.
#include "common.cuh"
#include "ops.h"
#include "reduce.cuh"

namespace fastclu {

namespace {

constexpr int kGramPairs = 10;  // r <= s for R = 4 (the partial layout for every R)

// R, the number of roles, is a template parameter: a kernel for 2 roles keeps 2 octets of
// gradients and 3 accumulators live, not 4 and 10 (registers: nvcc -Xptxas -v, sm_90).
// Pairs with s >= R stay 0; fold_kernel reads only r, s < R.
template <int R>
struct GramOp {
  static constexpr int P = kGramPairs;
  unsigned masked_bits;
  bool has_mask;
  __device__ void accumulate(const Chunk& ch, int64_t j, int cnt, bool vec, double acc[P]) const {
    float g[R][8];
    const unsigned mbyte = has_mask ? load_mask_byte(ch.ptr(GramRows::kMask), j) : 0xffu;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      load8(ch.ptr(GramRows::kGrad0 + r), ch.dtype(GramRows::kGrad0 + r), j, cnt, vec, g[r]);
      if ((masked_bits >> r) & 1u) {
#pragma unroll
        for (int k = 0; k < 8; ++k) g[r][k] = ((mbyte >> k) & 1u) ? g[r][k] : 0.f;
      }
    }
    int p = 0;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (int s = r; s < 4; ++s, ++p) {
        if (s >= R) continue;  // p still advances: the pair layout is the same for every R
        double t = 0.0;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += static_cast<double>(g[r][k]) * static_cast<double>(g[s][k]);
        acc[p] += t;
      }
    }
  }
};

template <int R>
void gram_roles(const Table& t, unsigned masked_bits, uint64_t partial, uint64_t out, uint64_t stream) {
  reduce("gram", t, GramOp<R>{masked_bits, masked_bits != 0}, partial, out, R, stream);
}

}  // namespace

void gram(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, int n_roles, unsigned masked_bits, uint64_t partial,
          uint64_t out, uint64_t stream) {
  const char* op = "gram";
  if (n_roles < 1 || n_roles > 4) fail(op, "n_roles must be in [1, 4]");
  const Table t = make_table(op, table, dyn, n_rows, GramRows::kOps, n_chunks);
  if (n_roles == 1) gram_roles<1>(t, masked_bits, partial, out, stream);
  else if (n_roles == 2) gram_roles<2>(t, masked_bits, partial, out, stream);
  else if (n_roles == 3) gram_roles<3>(t, masked_bits, partial, out, stream);
  else gram_roles<4>(t, masked_bits, partial, out, stream);
}

}  // namespace fastclu
