// Saliency masks, bit-packed: ratio_mask (one thread writes one mask byte) and topk_mask.
//
// topk_mask: exact global top-k by histogram radix select over ordered 32-bit keys.
// Four histogram passes (8 bits each, most significant first) find the k-th largest key T and
// how many r of the keys equal to T belong to the top k; a final pass writes the packed mask,
// giving the r slots to the earliest equal elements in global flat order (tensor, element):
// per-chunk counts of equal keys, an exclusive scan over chunks (table order is global order),
// and a block scan inside each chunk. Extra memory: 8 bytes per chunk of 8192 elements.
#include "common.cuh"
#include "ops.h"

namespace fastclu {

namespace {

struct RatioMaskOp {
  using Ctx = NoCtx;
  Scal gamma;
  float eps;
  __device__ Ctx prepare(const Chunk&) const { return {}; }
  __device__ void operator()(const Chunk& ch, Ctx, int64_t j, int cnt, bool vec) const {
    float a[8], b[8];
    load8(ch.ptr(RatioRows::kFForget), ch.dtype(RatioRows::kFForget), j, cnt, vec, a);
    load8(ch.ptr(RatioRows::kFRemain), ch.dtype(RatioRows::kFRemain), j, cnt, vec, b);
    const float gm = gamma.get();
    unsigned byte = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const bool keep = k < cnt && __fadd_rn(a[k], eps) >= __fmul_rn(gm, __fadd_rn(b[k], eps));  // padding bits 0
      byte |= static_cast<unsigned>(keep) << k;
    }
    store_mask_byte(ch.ptr(RatioRows::kOut), j, byte);
  }
};


// Device state (int64 words): [0] prefix of T found so far, [1] mask of the bits found,
// [2] k still to place among keys matching the prefix, [3] 1 if a NaN was seen, [4..260) histogram.
constexpr int kStateHist = 4;

__device__ __forceinline__ uint32_t ordered_key(float f) {
  if (f == 0.f) f = 0.f;  // -0.0 ranks with +0.0
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned keys8(const Chunk& ch, int64_t j, int cnt, bool vec, uint32_t key[8]) {
  float v[8];
  load8(ch.ptr(TopkRows::kScores), ch.dtype(TopkRows::kScores), j, cnt, vec, v);
#pragma unroll
  for (int k = 0; k < 8; ++k) key[k] = ordered_key(v[k]);
  return cnt >= 8 ? 0xffu : ((1u << cnt) - 1u);
}

__global__ void init_kernel(int64_t* st, int64_t k) {
  if (threadIdx.x == 0) {
    st[0] = 0;
    st[1] = 0;
    st[2] = k;
    st[3] = 0;
  }
  for (int b = threadIdx.x; b < 256; b += blockDim.x) st[kStateHist + b] = 0;
}

// NaN keys lie beyond the keys of +inf (0xff800000) and -inf (0x007fffff).
__device__ __forceinline__ bool nan_key(uint32_t key) { return key > 0xff800000u || key < 0x007fffffu; }

__global__ void __launch_bounds__(kThreads) hist_kernel(Table t, int64_t* st, int shift) {
  __shared__ unsigned int hist[256];
  __shared__ int saw_nan;
  for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
  if (threadIdx.x == 0) saw_nan = 0;
  __syncthreads();
  const uint32_t prefix = static_cast<uint32_t>(st[0]), pmask = static_cast<uint32_t>(st[1]);
  for (int64_t c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
    const Chunk ch = locate(t, c);
    const bool vec = all_aligned(ch, t.n_ops);
    for (int o = threadIdx.x; o < kOctetsPerChunk; o += kThreads) {
      const int64_t j = ch.begin + 8 * static_cast<int64_t>(o);
      if (j >= ch.numel) break;
      const int64_t left = ch.numel - j;
      uint32_t key[8];
      const unsigned valid = keys8(ch, j, left < 8 ? static_cast<int>(left) : 8, vec, key);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if (((valid >> k) & 1u) && (key[k] & pmask) == prefix) atomicAdd(&hist[(key[k] >> shift) & 255u], 1u);
        if (shift == 24 && ((valid >> k) & 1u) && nan_key(key[k])) saw_nan = 1;  // a benign race: all write 1
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && saw_nan) st[3] = 1;
  unsigned long long* g = reinterpret_cast<unsigned long long*>(st + kStateHist);
  for (int b = threadIdx.x; b < 256; b += kThreads)
    if (hist[b]) atomicAdd(&g[b], static_cast<unsigned long long>(hist[b]));  // integer: order-free
}

__global__ void select_kernel(int64_t* st, int shift) {
  if (threadIdx.x == 0) {
    const int64_t need = st[2];
    int64_t above = 0;
    int digit = 0;
    for (int d = 255; d >= 0; --d) {
      const int64_t c = st[kStateHist + d];
      if (above + c >= need) {
        digit = d;
        break;
      }
      above += c;
    }
    st[0] |= static_cast<int64_t>(static_cast<uint32_t>(digit) << shift);
    st[1] |= static_cast<int64_t>(255u << shift);
    st[2] = need - above;
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 256; b += blockDim.x) st[kStateHist + b] = 0;
}

__global__ void __launch_bounds__(kThreads) count_eq_kernel(Table t, const int64_t* st, int64_t* eqcount) {
  __shared__ int64_t sh[kThreads];
  const uint32_t thr = static_cast<uint32_t>(st[0]);
  for (int64_t c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
    const Chunk ch = locate(t, c);
    const bool vec = all_aligned(ch, t.n_ops);
    int64_t n = 0;
    for (int o = threadIdx.x; o < kOctetsPerChunk; o += kThreads) {
      const int64_t j = ch.begin + 8 * static_cast<int64_t>(o);
      if (j >= ch.numel) break;
      const int64_t left = ch.numel - j;
      uint32_t key[8];
      const unsigned valid = keys8(ch, j, left < 8 ? static_cast<int>(left) : 8, vec, key);
#pragma unroll
      for (int k = 0; k < 8; ++k) n += ((valid >> k) & 1u) && key[k] == thr;
    }
    n = block_sum(n, sh);
    if (threadIdx.x == 0) eqcount[c] = n;
  }
}

// Exclusive scan of eqcount in place, one block: each thread owns a contiguous run of chunks.
__global__ void __launch_bounds__(1024) scan_kernel(int64_t* eqcount, int64_t n) {
  __shared__ int64_t sh[1024];
  const int64_t per = (n + 1023) / 1024;
  const int64_t lo = threadIdx.x * per, hi = lo + per < n ? lo + per : n;
  int64_t own = 0;
  for (int64_t i = lo; i < hi; ++i) own += eqcount[i];
  sh[threadIdx.x] = own;
  __syncthreads();
  for (int off = 1; off < 1024; off <<= 1) {  // Hillis-Steele inclusive scan
    const int64_t v = threadIdx.x >= off ? sh[threadIdx.x - off] : 0;
    __syncthreads();
    sh[threadIdx.x] += v;
    __syncthreads();
  }
  int64_t run = sh[threadIdx.x] - own;
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t v = eqcount[i];
    eqcount[i] = run;
    run += v;
  }
}

// Exclusive block scan of small ints; returns the block total through `total`.
__device__ __forceinline__ int block_exclusive_scan(int v, int& total) {
  __shared__ int warp_tot[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int inc = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, inc, off);
    if (lane >= off) inc += u;
  }
  if (lane == 31) warp_tot[warp] = inc;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    const int x = warp_tot[w];
    if (w < warp) before += x;
    total += x;
  }
  __syncthreads();
  return before + inc - v;
}

__global__ void __launch_bounds__(kThreads) write_kernel(Table t, const int64_t* st, const int64_t* eqprefix) {
  const uint32_t thr = static_cast<uint32_t>(st[0]);
  const int64_t r = st[2];  // how many keys equal to T are in the top k
  for (int64_t c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
    const Chunk ch = locate(t, c);
    const bool vec = all_aligned(ch, t.n_ops);
    int64_t run = eqprefix[c];
    // Every thread takes part in every round (the scan needs the whole block).
    for (int round = 0; round < kOctetsPerChunk / kThreads; ++round) {
      const int64_t j = ch.begin + 8 * static_cast<int64_t>(round * kThreads + threadIdx.x);
      unsigned gt = 0, eq = 0;
      if (j < ch.numel) {
        const int64_t left = ch.numel - j;
        uint32_t key[8];
        const unsigned valid = keys8(ch, j, left < 8 ? static_cast<int>(left) : 8, vec, key);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          gt |= static_cast<unsigned>(((valid >> k) & 1u) && key[k] > thr) << k;
          eq |= static_cast<unsigned>(((valid >> k) & 1u) && key[k] == thr) << k;
        }
      }
      int total = 0;
      const int before = block_exclusive_scan(__popc(eq), total);
      if (j < ch.numel) {
        int64_t rank = run + before;
        unsigned byte = gt;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          if ((eq >> k) & 1u) {
            if (rank < r) byte |= 1u << k;
            ++rank;
          }
        }
        store_mask_byte(ch.ptr(TopkRows::kOut), j, byte);
      }
      run += total;
    }
  }
}

}  // namespace

void topk_mask(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, int64_t k, uint64_t state, uint64_t eqcount,
               uint64_t stream) {
  const char* op = "topk_mask";
  const Table t = make_table(op, table, dyn, n_rows, TopkRows::kOps, n_chunks);
  if (n_chunks <= 0) return;
  if (state == 0 || eqcount == 0) fail(op, "null state or eqcount buffer");
  int64_t* st = reinterpret_cast<int64_t*>(static_cast<uintptr_t>(state));
  int64_t* eqc = reinterpret_cast<int64_t*>(static_cast<uintptr_t>(eqcount));
  const cudaStream_t s = as_stream(stream);
  const int grid = grid_for(op, n_chunks);
  FASTCLU_LAUNCH(init_kernel, 1, 256, 0, s)(st, k);
  check_launch(op);
  for (int shift = 24; shift >= 0; shift -= 8) {
    FASTCLU_LAUNCH(hist_kernel, grid, kThreads, 0, s)(t, st, shift);
    check_launch(op);
    FASTCLU_LAUNCH(select_kernel, 1, 256, 0, s)(st, shift);
    check_launch(op);
  }
  FASTCLU_LAUNCH(count_eq_kernel, grid, kThreads, 0, s)(t, st, eqc);
  check_launch(op);
  FASTCLU_LAUNCH(scan_kernel, 1, 1024, 0, s)(eqc, n_chunks);
  check_launch(op);
  FASTCLU_LAUNCH(write_kernel, grid, kThreads, 0, s)(t, st, eqc);
  check_launch(op);
}

void ratio_mask(uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, double gamma, uint64_t gamma_ptr, double eps,
                uint64_t stream) {
  const char* op = "ratio_mask";
  launch_mt(op, make_table(op, table, dyn, n_rows, RatioRows::kOps, n_chunks),
            RatioMaskOp{as_scal(gamma, gamma_ptr), static_cast<float>(eps)}, stream);
}

}  // namespace fastclu
