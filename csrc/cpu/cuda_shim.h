// Host shim for compiling the unchanged csrc CUDA kernels with g++ (FASTCLU_CPU test builds).
//
// Threads of a block are cooperative fibers (see runtime.cpp): __syncthreads and the warp
// collectives are real barriers, blocks run one at a time in a seeded random order, and at every
// barrier the waiting threads resume in a random order, so a missing barrier or a dependency
// between blocks shows up as wrong results. Memory is host memory; streams are ignored and every
// launch and copy completes before it returns.
//
// Semantics that differ from a GPU, by design or by necessity:
//  - __fadd_rn/__fmul_rn/__fdiv_rn/sqrtf are IEEE on both (bit-identical, built with
//    -ffp-contract=off so nothing is fused); logf/cosf/expf/pow come from glibc (correctly
//    rounded or within 1 ulp) where CUDA's are within 1-2 ulp; the approximate intrinsics
//    (__expf, __logf, __fdividef, rsqrtf, ...) are computed exactly here, so a result that
//    depends on their GPU error is not reproduced.
//  - fp16/bf16 conversions are bit-exact round-to-nearest-even, NaN -> 0x7fff as on the GPU.
//  - Atomics are trivially atomic (one OS thread runs a launch); memory-model subtleties, races
//    between concurrently running blocks, coalescing, speed and graph capture are not modelled.
//  - Dynamic shared memory (extern __shared__) is not supported.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define FASTCLU_CPU_SHIM 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
// One block runs at a time, so a function-static variable is exactly one copy per block.
#define __shared__ static
#define __constant__ static
#define __managed__

// ---- vector and index types --------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define FASTCLU_VEC2(T, N, A) \
  struct alignas(A) N {       \
    T x, y;                   \
  };                          \
  inline N make_##N(T x, T y) { return N{x, y}; }
#define FASTCLU_VEC4(T, N, A) \
  struct alignas(A) N {       \
    T x, y, z, w;             \
  };                          \
  inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
FASTCLU_VEC2(float, float2, 8)
FASTCLU_VEC4(float, float4, 16)
FASTCLU_VEC2(int, int2, 8)
FASTCLU_VEC4(int, int4, 16)
FASTCLU_VEC2(unsigned, uint2, 8)
FASTCLU_VEC4(unsigned, uint4, 16)
FASTCLU_VEC2(double, double2, 16)
FASTCLU_VEC2(long long, longlong2, 16)
FASTCLU_VEC2(unsigned long long, ulonglong2, 16)
FASTCLU_VEC4(unsigned char, uchar4, 4)
FASTCLU_VEC4(signed char, char4, 4)
#undef FASTCLU_VEC2
#undef FASTCLU_VEC4
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

// ---- CUDA runtime subset (implemented in runtime.cpp, synchronous, host memory) ------------
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
};

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorName(cudaError_t e);
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaSetDevice(int dev);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind);
cudaError_t cudaMemsetAsync(void* dst, int value, size_t n, cudaStream_t s = nullptr);
cudaError_t cudaMemset(void* dst, int value, size_t n);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaDeviceSynchronize();

// ---- the execution model (runtime.cpp) ---------------------------------------------------
namespace fastclu_cpu {
extern uint3 g_thread_idx;
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

// Runs body once per thread of every block of the grid (threads as fibers, see above).
void run_kernel(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const std::function<void()>& body);
void block_barrier();
int block_barrier_count(int pred);  // __syncthreads_count: threads with pred != 0
// Warp collectives: the lanes named in mask meet (a barrier among them) and exchange values.
void warp_barrier(unsigned mask);
uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane);
unsigned warp_ballot(unsigned mask, int pred);
unsigned warp_active_mask();
int lane_id();

template <class... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  template <class... A>
  void operator()(A&&... a) const {
    // The launch parameters are copied once, then every thread gets its own copy (by value).
    const std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
    auto k = kernel;
    const std::function<void()> body = [&args, k] { std::apply([k](const auto&... x) { k(x...); }, args); };
    run_kernel(grid, block, smem, stream, body);
  }
};

template <class... P>
Launch<P...> make_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
  return Launch<P...>{kernel, grid, block, smem, stream};
}

template <class T>
inline uint64_t to_bits64(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp shuffles move up to 8 bytes");
  uint64_t r = 0;
  std::memcpy(&r, &v, sizeof(T));
  return r;
}
template <class T>
inline T from_bits64(uint64_t r) {
  T v;
  std::memcpy(&v, &r, sizeof(T));
  return v;
}
template <class To, class From>
inline To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast sizes");
  To r;
  std::memcpy(&r, &v, sizeof(To));
  return r;
}
}  // namespace fastclu_cpu

#define FASTCLU_LAUNCH(kernel, ...) ::fastclu_cpu::make_launch(kernel, __VA_ARGS__)
#define FASTCLU_ASSUME_GLOBAL(p) static_cast<void>(p)  // one address space on the host

#define threadIdx (static_cast<const uint3&>(::fastclu_cpu::g_thread_idx))
#define blockIdx (static_cast<const uint3&>(::fastclu_cpu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::fastclu_cpu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::fastclu_cpu::g_grid_dim))
constexpr int warpSize = 32;

inline void __syncthreads() { ::fastclu_cpu::block_barrier(); }
inline int __syncthreads_count(int p) { return ::fastclu_cpu::block_barrier_count(p); }
inline int __syncthreads_or(int p) { return ::fastclu_cpu::block_barrier_count(p) != 0; }
inline int __syncthreads_and(int p) {
  return ::fastclu_cpu::block_barrier_count(p) ==
         static_cast<int>(::fastclu_cpu::g_block_dim.x * ::fastclu_cpu::g_block_dim.y * ::fastclu_cpu::g_block_dim.z);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::fastclu_cpu::warp_barrier(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline unsigned __activemask() { return ::fastclu_cpu::warp_active_mask(); }
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::fastclu_cpu::warp_ballot(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return ::fastclu_cpu::warp_ballot(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return ::fastclu_cpu::warp_ballot(mask, pred) == mask; }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::fastclu_cpu::lane_id(), base = lane & ~(width - 1);
  return ::fastclu_cpu::from_bits64<T>(
      ::fastclu_cpu::warp_exchange(mask, ::fastclu_cpu::to_bits64(v), base + (src & (width - 1))));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::fastclu_cpu::lane_id(), base = lane & ~(width - 1);
  const int src = lane - static_cast<int>(delta) < base ? lane : lane - static_cast<int>(delta);
  return ::fastclu_cpu::from_bits64<T>(::fastclu_cpu::warp_exchange(mask, ::fastclu_cpu::to_bits64(v), src));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::fastclu_cpu::lane_id(), base = lane & ~(width - 1);
  const int src = lane + static_cast<int>(delta) >= base + width ? lane : lane + static_cast<int>(delta);
  return ::fastclu_cpu::from_bits64<T>(::fastclu_cpu::warp_exchange(mask, ::fastclu_cpu::to_bits64(v), src));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::fastclu_cpu::lane_id(), base = lane & ~(width - 1);
  const int src = (lane ^ lane_mask) >= base + width ? lane : (lane ^ lane_mask);
  return ::fastclu_cpu::from_bits64<T>(::fastclu_cpu::warp_exchange(mask, ::fastclu_cpu::to_bits64(v), src));
}

// ---- atomics: a launch runs on one OS thread and never switches fibers inside one ---------
template <class T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
inline T atomicSub(T* p, T v) {
  const T old = *p;
  *p = old - v;
  return old;
}
template <class T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <class T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <class T>
inline T atomicCAS(T* p, T cmp, T v) {
  const T old = *p;
  if (old == cmp) *p = v;
  return old;
}
template <class T>
inline T atomicOr(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}
template <class T>
inline T atomicAnd(T* p, T v) {
  const T old = *p;
  *p = old & v;
  return old;
}
template <class T>
inline T atomicXor(T* p, T v) {
  const T old = *p;
  *p = old ^ v;
  return old;
}
inline unsigned atomicInc(unsigned* p, unsigned lim) {
  const unsigned old = *p;
  *p = old >= lim ? 0u : old + 1u;
  return old;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// ---- bit and float intrinsics ------------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline unsigned __float_as_uint(float f) { return ::fastclu_cpu::bit_cast<unsigned>(f); }
inline int __float_as_int(float f) { return ::fastclu_cpu::bit_cast<int>(f); }
inline float __uint_as_float(unsigned u) { return ::fastclu_cpu::bit_cast<float>(u); }
inline float __int_as_float(int u) { return ::fastclu_cpu::bit_cast<float>(u); }
inline long long __double_as_longlong(double d) { return ::fastclu_cpu::bit_cast<long long>(d); }
inline double __longlong_as_double(long long v) { return ::fastclu_cpu::bit_cast<double>(v); }
// IEEE round-to-nearest operations: exact on both sides (the build disables FMA contraction).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
// Approximate on the GPU (documented error bounds of a few ulp); exact here.
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __sinf(float a) { return std::sin(a); }
inline float __cosf(float a) { return std::cos(a); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline float __saturatef(float a) { return a != a ? 0.f : (a < 0.f ? 0.f : (a > 1.f ? 1.f : a)); }
inline int __float2int_rn(float a) { return static_cast<int>(std::nearbyint(a)); }
inline int __float2int_rz(float a) { return static_cast<int>(a); }
inline float __int2float_rn(int a) { return static_cast<float>(a); }

// ---- fp16 / bf16: storage types and bit-exact round-to-nearest-even conversions ----------
struct alignas(2) __half {
  uint16_t __x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(2) __nv_bfloat16 {
  uint16_t __x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
typedef __half half;
typedef __half2 half2;

namespace fastclu_cpu {
// float -> binary16, round to nearest even; NaN -> 0x7fff like the GPU's cvt.rn.f16.f32.
inline uint16_t float_to_half_bits(float f) {
  uint32_t u = bit_cast<uint32_t>(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return 0x7fffu;
  if (u >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65536: inf
  if (u < 0x38800000u) {  // below 2^-14: subnormal or zero; the FPU's own RNE does the rounding
    const uint32_t magic = ((127 - 15) + (23 - 10) + 1) << 23;  // 0.5f: aligns the half ulp 2^-24
    const float sum = bit_cast<float>(u) + bit_cast<float>(magic);
    return static_cast<uint16_t>(sign | (bit_cast<uint32_t>(sum) - magic));
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + odd;  // rebias, round half to even
  return static_cast<uint16_t>(sign | (u >> 13));  // an overflow carries into the inf pattern
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: exact in fp32
    const float v = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24
    u = sign | bit_cast<uint32_t>(v);
  }
  return bit_cast<float>(u);
}
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) { return bit_cast<float>(static_cast<uint32_t>(b) << 16); }
}  // namespace fastclu_cpu

inline __half __float2half_rn(float f) { return __half{::fastclu_cpu::float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return ::fastclu_cpu::half_bits_to_float(h.__x); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{::fastclu_cpu::float_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ::fastclu_cpu::bf16_bits_to_float(b.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return float2{__bfloat162float(b.x), __bfloat162float(b.y)}; }
inline float __low2float(__nv_bfloat162 b) { return __bfloat162float(b.x); }
inline float __high2float(__nv_bfloat162 b) { return __bfloat162float(b.y); }
