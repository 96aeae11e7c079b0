// Shared pieces of the fastclu CUDA kernels: the multi-tensor table, typed 8-element
// loads/stores, device scalars, deterministic block reductions and launch checks.
//
// The multi-tensor table is a device array of int64 rows, one per non-empty tensor, built by
// fastclu/ops/_table.py (the layout's one description; Triton walks the same rows):
//   [chunk_start, numel, dtype codes (4 bits per operand), tensor index, aux, rank0, ptr_0 .. ptr_{K-1}]
// chunk_start is the cumulative number of chunks of the rows before it, so a block finds its
// tensor for global chunk c by binary search (no per-chunk map, the table stays O(tensors)).
// A per-step operand (gradients, fresh outputs) holds -(1 + i) in its ptr slot: its address is
// dyn[i], a small pointer array uploaded apart so that moving gradients never rebuild the table.
// Each thread handles "octets": 8 consecutive elements, which is also one byte of a bit-packed
// mask, so masks are read and written a whole byte at a time without atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

// Every kernel launch goes through this macro, so that the same sources can also be compiled for
// the CPU execution mode of the test suite (FASTCLU_CPU), where g++ cannot parse <<<...>>>.
#ifndef FASTCLU_LAUNCH
#define FASTCLU_LAUNCH(kernel, ...) kernel<<<__VA_ARGS__>>>
#endif
// Operand addresses come from tables (integers), so nvcc cannot infer their state space and
// would emit generic loads and stores; every table address is a torch allocation in global memory.
#ifndef FASTCLU_ASSUME_GLOBAL
#define FASTCLU_ASSUME_GLOBAL(p) __builtin_assume(__isGlobal(p))
#endif

namespace fastclu {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 8192;  // elements per chunk: 4 rounds of 256 threads x 8 elements
constexpr int kOctetsPerChunk = static_cast<int>(kChunk / 8);
constexpr int kRowHeader = 6;
constexpr int kMaxOperands = 16;  // dtype codes are packed 4 bits each into one int64

// kPtr: a pointer that is not an element array (e.g. a per-tensor 0-d step counter).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kU8 = 3, kPtr = 14, kNone = 15 };

struct Table {
  const int64_t* rows;
  const int64_t* dyn;  // per-step operand addresses (null when the op has none)
  int n_rows;
  int n_ops;
  int64_t n_chunks;
};

// Address of operand k of a row: in the row, or (negative slot) in the per-step pointer array.
__device__ __forceinline__ void* row_ptr(const int64_t* row, const int64_t* dyn, int k) {
  int64_t v = row[kRowHeader + k];
  if (v < 0) v = dyn[-v - 1];
  return reinterpret_cast<void*>(static_cast<uintptr_t>(v));
}

struct Chunk {
  const int64_t* row;
  const int64_t* dyn;
  int64_t begin;  // first element of this chunk within its tensor
  int64_t numel;  // elements of the whole tensor
  int64_t aux;
  int tidx;  // index of the tensor in the caller's list (empty tensors are not in the table)
  int local;  // chunk index within the tensor (or row index for row tables)

  __device__ __forceinline__ void* ptr(int k) const { return row_ptr(row, dyn, k); }
  __device__ __forceinline__ int dtype(int k) const { return static_cast<int>((row[2] >> (4 * k)) & 15); }
};

__device__ __forceinline__ Chunk locate(const Table& t, int64_t c) {
  const int stride = kRowHeader + t.n_ops;
  int lo = 0, hi = t.n_rows - 1;
  while (lo < hi) {  // last row whose chunk_start <= c
    int mid = (lo + hi + 1) >> 1;
    if (t.rows[static_cast<int64_t>(mid) * stride] <= c) lo = mid; else hi = mid - 1;
  }
  Chunk ch;
  ch.row = t.rows + static_cast<int64_t>(lo) * stride;
  ch.dyn = t.dyn;
  ch.local = static_cast<int>(c - ch.row[0]);
  ch.begin = static_cast<int64_t>(ch.local) * kChunk;
  ch.numel = ch.row[1];
  ch.tidx = static_cast<int>(ch.row[3]);
  ch.aux = ch.row[4];
  return ch;
}

// 16-byte vector accesses are legal when every operand's base is 16-byte aligned: octet
// offsets are multiples of 8 elements, i.e. of 16 bytes for 2-byte types and 32 for fp32.
__device__ __forceinline__ bool all_aligned(const Chunk& ch, int n_ops) {
  bool ok = true;
  for (int k = 0; k < n_ops; ++k) {
    const int dt = ch.dtype(k);
    if (dt == kU8 || dt == kPtr) continue;  // masks are read bytewise, pointers once
    ok = ok && ((reinterpret_cast<uintptr_t>(ch.ptr(k)) & 15u) == 0);
  }
  return ok;
}

__device__ __forceinline__ void load8(const void* base, int dt, int64_t j, int cnt, bool vec, float v[8]) {
  if (dt == kF32) {
    const float* p = static_cast<const float*>(base) + j;
    FASTCLU_ASSUME_GLOBAL(p);
    if (vec && cnt == 8) {
      float4 a = reinterpret_cast<const float4*>(p)[0];
      float4 b = reinterpret_cast<const float4*>(p)[1];
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = k < cnt ? p[k] : 0.f;
    }
  } else if (dt == kF16) {
    const __half* p = static_cast<const __half*>(base) + j;
    FASTCLU_ASSUME_GLOBAL(p);
    if (vec && cnt == 8) {
      uint4 u = *reinterpret_cast<const uint4*>(p);
      const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float2 f = __half22float2(h[q]);
        v[2 * q] = f.x; v[2 * q + 1] = f.y;
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = k < cnt ? __half2float(p[k]) : 0.f;
    }
  } else if (dt == kBF16) {
    const __nv_bfloat16* p = static_cast<const __nv_bfloat16*>(base) + j;
    FASTCLU_ASSUME_GLOBAL(p);
    if (vec && cnt == 8) {
      uint4 u = *reinterpret_cast<const uint4*>(p);
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float2 f = __bfloat1622float2(h[q]);
        v[2 * q] = f.x; v[2 * q + 1] = f.y;
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = k < cnt ? __bfloat162float(p[k]) : 0.f;
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = 0.f;
  }
}

__device__ __forceinline__ void store8(void* base, int dt, int64_t j, int cnt, bool vec, const float v[8]) {
  if (dt == kF32) {
    float* p = static_cast<float*>(base) + j;
    FASTCLU_ASSUME_GLOBAL(p);
    if (vec && cnt == 8) {
      reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k)  // unrolled: v stays in registers
        if (k < cnt) p[k] = v[k];
    }
  } else if (dt == kF16) {
    __half* p = static_cast<__half*>(base) + j;
    FASTCLU_ASSUME_GLOBAL(p);
    if (vec && cnt == 8) {
      uint4 u;
      __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
      for (int q = 0; q < 4; ++q) h[q] = __floats2half2_rn(v[2 * q], v[2 * q + 1]);
      *reinterpret_cast<uint4*>(p) = u;
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k)  // unrolled: v stays in registers
        if (k < cnt) p[k] = __float2half_rn(v[k]);
    }
  } else if (dt == kBF16) {
    __nv_bfloat16* p = static_cast<__nv_bfloat16*>(base) + j;
    FASTCLU_ASSUME_GLOBAL(p);
    if (vec && cnt == 8) {
      uint4 u;
      __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
      for (int q = 0; q < 4; ++q) h[q] = __floats2bfloat162_rn(v[2 * q], v[2 * q + 1]);
      *reinterpret_cast<uint4*>(p) = u;
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k)  // unrolled: v stays in registers
        if (k < cnt) p[k] = __float2bfloat16_rn(v[k]);
    }
  }
}

// Round fp32 values to what a store into dtype dt followed by a load would give (RNE).
__device__ __forceinline__ void round8(int dt, float v[8]) {
  if (dt == kF16) {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = __half2float(__float2half_rn(v[k]));
  } else if (dt == kBF16) {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = __bfloat162float(__float2bfloat16_rn(v[k]));
  }
}

// Raw copy of 8 elements of the same dtype: bit-exact even for NaN payloads (no float trip).
__device__ __forceinline__ void copy8(void* dst, const void* src, int dt, int64_t j, int cnt, bool vec) {
  if (dt == kF32) {
    const uint32_t* s = static_cast<const uint32_t*>(src) + j;
    uint32_t* d = static_cast<uint32_t*>(dst) + j;
    FASTCLU_ASSUME_GLOBAL(s);
    FASTCLU_ASSUME_GLOBAL(d);
    if (vec && cnt == 8) {
      reinterpret_cast<uint4*>(d)[0] = reinterpret_cast<const uint4*>(s)[0];
      reinterpret_cast<uint4*>(d)[1] = reinterpret_cast<const uint4*>(s)[1];
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (k < cnt) d[k] = s[k];
    }
  } else if (dt == kF16 || dt == kBF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + j;
    uint16_t* d = static_cast<uint16_t*>(dst) + j;
    FASTCLU_ASSUME_GLOBAL(s);
    FASTCLU_ASSUME_GLOBAL(d);
    if (vec && cnt == 8) {
      *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(s);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k)
        if (k < cnt) d[k] = s[k];
    }
  }
}

__device__ __forceinline__ void store_mask_byte(void* base, int64_t j, unsigned byte) {
  uint8_t* p = static_cast<uint8_t*>(base);
  FASTCLU_ASSUME_GLOBAL(p);
  p[j >> 3] = static_cast<uint8_t>(byte);
}

__device__ __forceinline__ unsigned load_mask_byte(const void* base, int64_t j) {
  const uint8_t* p = static_cast<const uint8_t*>(base);
  FASTCLU_ASSUME_GLOBAL(p);
  return p[j >> 3];
}

// A scalar that is either a host value or the address of a device fp32 (0-d tensor), so a
// step never needs a host sync to read lr / coefficients / grad_scale.
struct Scal {
  float v;
  const float* p;
  __device__ __forceinline__ float get() const { return p ? *p : v; }
};

// Fixed-shape tree reduction over a block of kThreads: same inputs give the same bits
// whatever the launch configuration, because the order depends only on threadIdx.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  T r = sh[0];
  __syncthreads();
  return r;
}

[[noreturn]] inline void fail(const char* op, const std::string& what) {
  throw std::runtime_error(std::string("fastclu._C.") + op + ": " + what);
}

inline void check(const char* op, cudaError_t e) {
  if (e != cudaSuccess) fail(op, std::string("CUDA error ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

inline void check_launch(const char* op) { check(op, cudaGetLastError()); }

// Grid for a grid-stride loop over chunks: enough blocks to fill the device, never more than
// there are chunks. Queried per call (cheap) so the current device decides.
inline int grid_for(const char* op, int64_t n_chunks) {
  int dev = 0, sms = 0;
  check(op, cudaGetDevice(&dev));
  check(op, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  int64_t g = static_cast<int64_t>(sms) * 8;
  if (n_chunks < g) g = n_chunks;
  return static_cast<int>(g < 1 ? 1 : g);
}

// Grid-stride loop over the chunks of a table; Op supplies a per-chunk context (prepare) and
// the per-octet work (operator()). cnt < 8 only in a tensor's last octet.
template <class Op>
__global__ void __launch_bounds__(kThreads) mt_kernel(Table t, Op op) {
  for (int64_t c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
    const Chunk ch = locate(t, c);
    const bool vec = all_aligned(ch, t.n_ops);
    const typename Op::Ctx ctx = op.prepare(ch);
    for (int o = threadIdx.x; o < kOctetsPerChunk; o += kThreads) {
      const int64_t j = ch.begin + 8 * static_cast<int64_t>(o);
      if (j >= ch.numel) break;
      const int64_t left = ch.numel - j;
      op(ch, ctx, j, left < 8 ? static_cast<int>(left) : 8, vec);
    }
  }
}

struct NoCtx {};

inline Table make_table(const char* op, uint64_t rows, uint64_t dyn, int n_rows, int n_ops, int64_t n_chunks) {
  if (n_ops < 0 || n_ops > kMaxOperands) fail(op, "bad operand count");
  if (n_rows > 0 && rows == 0) fail(op, "null table");
  return Table{reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(rows)),
               reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(dyn)), n_rows, n_ops, n_chunks};
}

// A table without per-step operands.
inline Table make_table(const char* op, uint64_t rows, int n_rows, int n_ops, int64_t n_chunks) {
  return make_table(op, rows, 0, n_rows, n_ops, n_chunks);
}

template <class Op>
void launch_mt(const char* op_name, const Table& t, const Op& op, uint64_t stream) {
  if (t.n_chunks <= 0) return;
  FASTCLU_LAUNCH(mt_kernel<Op>, grid_for(op_name, t.n_chunks), kThreads, 0, reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream)))(t, op);
  check_launch(op_name);
}

inline cudaStream_t as_stream(uint64_t s) { return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(s)); }

inline Scal as_scal(double v, uint64_t p) {
  return Scal{static_cast<float>(v), reinterpret_cast<const float*>(static_cast<uintptr_t>(p))};
}

}  // namespace fastclu
