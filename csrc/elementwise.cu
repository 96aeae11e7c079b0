// Elementwise multi-tensor ops: Fisher accumulation, ratio mask, fast-slow sync, finite
// differences, P&M merge, restore. All math in fp32 (fp16/bf16 are widened on load and
// rounded to nearest-even on store), in the operation order of the reference backend.
#include "common.cuh"
#include "ops.h"

namespace fastclu {

int64_t chunk_elements() { return kChunk; }
int row_header() { return kRowHeader; }

namespace {

struct FisherOp {
  using Ctx = NoCtx;
  Scal scale;
  int power;
  __device__ Ctx prepare(const Chunk&) const { return {}; }
  __device__ void operator()(const Chunk& ch, Ctx, int64_t j, int cnt, bool vec) const {
    float f[8], g[8];
    load8(ch.ptr(0), ch.dtype(0), j, cnt, vec, f);
    load8(ch.ptr(1), ch.dtype(1), j, cnt, vec, g);
    const float s = scale.get();
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float term = power == 2 ? g[k] * g[k] : fabsf(g[k]);
      f[k] = __fadd_rn(f[k], __fmul_rn(s, term));  // no FMA: the square is rounded first, as in the reference
    }
    store8(ch.ptr(0), ch.dtype(0), j, cnt, vec, f);
  }
};

struct RatioMaskOp {
  using Ctx = NoCtx;
  Scal gamma;
  float eps;
  __device__ Ctx prepare(const Chunk&) const { return {}; }
  __device__ void operator()(const Chunk& ch, Ctx, int64_t j, int cnt, bool vec) const {
    float a[8], b[8];
    load8(ch.ptr(0), ch.dtype(0), j, cnt, vec, a);
    load8(ch.ptr(1), ch.dtype(1), j, cnt, vec, b);
    const float gm = gamma.get();
    unsigned byte = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const bool keep = k < cnt && __fadd_rn(a[k], eps) >= __fmul_rn(gm, __fadd_rn(b[k], eps));  // padding bits 0
      byte |= static_cast<unsigned>(keep) << k;
    }
    static_cast<uint8_t*>(ch.ptr(2))[j >> 3] = static_cast<uint8_t>(byte);
  }
};

struct LerpSyncOp {
  using Ctx = NoCtx;
  Scal beta;
  __device__ Ctx prepare(const Chunk&) const { return {}; }
  __device__ void operator()(const Chunk& ch, Ctx, int64_t j, int cnt, bool vec) const {
    float s[8], f[8];
    load8(ch.ptr(0), ch.dtype(0), j, cnt, vec, s);
    load8(ch.ptr(1), ch.dtype(1), j, cnt, vec, f);
    const float b = beta.get();
#pragma unroll
    for (int k = 0; k < 8; ++k) s[k] = __fadd_rn(s[k], __fmul_rn(b, __fsub_rn(f[k], s[k])));
    store8(ch.ptr(0), ch.dtype(0), j, cnt, vec, s);
    // fast receives the stored slow value: round through slow's dtype first.
    if (ch.dtype(0) != kF32) load8(ch.ptr(0), ch.dtype(0), j, cnt, vec, s);
    store8(ch.ptr(1), ch.dtype(1), j, cnt, vec, s);
  }
};

struct FdHvpOp {
  using Ctx = NoCtx;
  Scal eps;
  bool accumulate;
  __device__ Ctx prepare(const Chunk&) const { return {}; }
  __device__ void operator()(const Chunk& ch, Ctx, int64_t j, int cnt, bool vec) const {
    float o[8], p[8], m[8];
    load8(ch.ptr(1), ch.dtype(1), j, cnt, vec, p);
    load8(ch.ptr(2), ch.dtype(2), j, cnt, vec, m);
    const float two_eps = eps.get() * 2.0f;
    if (accumulate) load8(ch.ptr(0), ch.dtype(0), j, cnt, vec, o);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float h = __fdiv_rn(__fsub_rn(p[k], m[k]), two_eps);
      o[k] = accumulate ? __fadd_rn(o[k], h) : h;
    }
    store8(ch.ptr(0), ch.dtype(0), j, cnt, vec, o);
  }
};

struct MergeOp {
  using Ctx = NoCtx;
  Scal alpha;
  __device__ Ctx prepare(const Chunk&) const { return {}; }
  __device__ void operator()(const Chunk& ch, Ctx, int64_t j, int cnt, bool vec) const {
    float p[8], a[8];
    load8(ch.ptr(0), ch.dtype(0), j, cnt, vec, p);
    load8(ch.ptr(1), ch.dtype(1), j, cnt, vec, a);
    const float al = alpha.get();
#pragma unroll
    for (int k = 0; k < 8; ++k) p[k] = __fadd_rn(a[k], __fmul_rn(al, __fsub_rn(p[k], a[k])));
    store8(ch.ptr(0), ch.dtype(0), j, cnt, vec, p);
  }
};

// Bit-exact copy (restore_): raw 16-byte moves, no float round trip, every tensor in one launch.
struct CopyOp {
  using Ctx = NoCtx;
  __device__ Ctx prepare(const Chunk&) const { return {}; }
  __device__ void operator()(const Chunk& ch, Ctx, int64_t j, int cnt, bool vec) const {
    copy8(ch.ptr(0), ch.ptr(1), ch.dtype(0), j, cnt, vec);
  }
};

}  // namespace

void fisher_accumulate(uint64_t table, int n_rows, int64_t n_chunks, double scale, uint64_t scale_ptr, int power,
                       uint64_t stream) {
  const char* op = "fisher_accumulate_";
  launch_mt(op, make_table(op, table, n_rows, 2, n_chunks), FisherOp{as_scal(scale, scale_ptr), power}, stream);
}

void ratio_mask(uint64_t table, int n_rows, int64_t n_chunks, double gamma, uint64_t gamma_ptr, double eps,
                uint64_t stream) {
  const char* op = "ratio_mask";
  launch_mt(op, make_table(op, table, n_rows, 3, n_chunks),
            RatioMaskOp{as_scal(gamma, gamma_ptr), static_cast<float>(eps)}, stream);
}

void lerp_sync(uint64_t table, int n_rows, int64_t n_chunks, double beta, uint64_t beta_ptr, uint64_t stream) {
  const char* op = "lerp_sync_";
  launch_mt(op, make_table(op, table, n_rows, 2, n_chunks), LerpSyncOp{as_scal(beta, beta_ptr)}, stream);
}

void fd_hvp(uint64_t table, int n_rows, int64_t n_chunks, double eps, uint64_t eps_ptr, bool accumulate,
            uint64_t stream) {
  const char* op = "fd_hvp_";
  launch_mt(op, make_table(op, table, n_rows, 3, n_chunks), FdHvpOp{as_scal(eps, eps_ptr), accumulate}, stream);
}

void merge(uint64_t table, int n_rows, int64_t n_chunks, double alpha, uint64_t alpha_ptr, uint64_t stream) {
  const char* op = "merge_";
  launch_mt(op, make_table(op, table, n_rows, 2, n_chunks), MergeOp{as_scal(alpha, alpha_ptr)}, stream);
}

void restore_mt(uint64_t table, int n_rows, int64_t n_chunks, uint64_t stream) {
  const char* op = "restore_";
  launch_mt(op, make_table(op, table, n_rows, 2, n_chunks), CopyOp{}, stream);
}

void restore(const std::vector<uint64_t>& dst, const std::vector<uint64_t>& src, const std::vector<int64_t>& nbytes,
             uint64_t stream) {
  const char* op = "restore_";
  if (dst.size() != src.size() || dst.size() != nbytes.size()) fail(op, "dst, src and nbytes differ in length");
  for (size_t i = 0; i < dst.size(); ++i) {
    if (nbytes[i] <= 0) continue;
    check(op, cudaMemcpyAsync(reinterpret_cast<void*>(static_cast<uintptr_t>(dst[i])),
                              reinterpret_cast<const void*>(static_cast<uintptr_t>(src[i])),
                              static_cast<size_t>(nbytes[i]), cudaMemcpyDeviceToDevice, as_stream(stream)));
  }
}

}  // namespace fastclu
