// gram: inner products of the (masked) role gradients, summed deterministically in fp64.
#include "common.cuh"
#include "ops.h"
#include "reduce.cuh"

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
    const unsigned mbyte = has_mask ? load_mask_byte(ch.ptr(GramRows::kMask), j) : 0xffu;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if (r < n_roles) {
        load8(ch.ptr(GramRows::kGrad0 + r), ch.dtype(GramRows::kGrad0 + r), j, cnt, vec, g[r]);
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

}  // namespace

void gram(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, int n_roles, unsigned masked_bits, uint64_t partial,
          uint64_t out, uint64_t stream) {
  const char* op = "gram";
  if (n_roles < 1 || n_roles > 4) fail(op, "n_roles must be in [1, 4]");
  const Table t = make_table(op, table, dyn, n_rows, GramRows::kOps, n_chunks);
  bool has_mask = masked_bits != 0;
  reduce(op, t, GramOp{n_roles, masked_bits, has_mask}, partial, out, n_roles, stream);
}

}  // namespace fastclu
