// Execution model of the FASTCLU_CPU build: every thread of a block is a fiber (ucontext) on
// one OS thread. A fiber runs until it reaches a barrier (__syncthreads, a warp collective) or
// returns; the scheduler then resumes a ready fiber. Each block draws one of two policies:
//  - uniform: the next fiber is any ready one, uniformly at random;
//  - priority: every fiber gets a random priority (drawn again whenever a __syncthreads opens)
//    and the highest-priority ready fiber runs, so the lowest ones lag as far behind as the
//    barriers allow. Half the time the priorities come in warp bands (each warp is early or
//    late as a whole, lanes random within), so whole warps lag behind the rest of the block.
//    This is what exposes a missing barrier that only threads left behind by a whole phase of
//    the block can trip over (e.g. shared memory reused by the next round of a loop).
// Blocks run one after another in a random order. Everything comes from one generator seeded by
// FASTCLU_CPU_SEED (random when unset), so a failure can be replayed.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "cuda_shim.h"

namespace fastclu_cpu {

uint3 g_thread_idx{0, 0, 0};
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {

constexpr size_t kStackBytes = 128 * 1024;
constexpr int kMaxThreads = 1024;

enum class St { Ready, AtBlock, AtWarp, Done };

struct Fiber {
  ucontext_t ctx;
  uint3 idx;
  int linear = 0;
  St st = St::Ready;
  unsigned warp_mask = 0;  // mask of the warp collective this fiber waits at
  int vote = 0;
  uint64_t priority = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<int> ready;
  int n_alive = 0, n_at_block = 0;
  std::vector<unsigned> warp_alive, warp_waiting;
  std::vector<uint64_t> slots;  // 32 exchange slots per warp
  ucontext_t sched;
  const std::function<void()>* body = nullptr;
  std::string fault;
  int policy = 0;  // 0 uniform, 1 priority per thread, 2 priority in warp bands
};


Block g_blk;
Fiber* g_cur = nullptr;
std::vector<char*> g_stacks;
std::mt19937_64 g_rng;
bool g_seeded = false;
cudaError_t g_last = cudaSuccess;
std::string g_last_msg;
std::mutex g_launch_mutex;

void seed_once() {
  if (g_seeded) return;
  const char* s = std::getenv("FASTCLU_CPU_SEED");
  uint64_t seed = s && *s ? std::strtoull(s, nullptr, 0) : (static_cast<uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  g_rng.seed(seed);
  g_seeded = true;
}

uint64_t rnd(uint64_t n) { return std::uniform_int_distribution<uint64_t>(0, n - 1)(g_rng); }

void draw_priorities() {
  std::vector<uint64_t> band((g_blk.fibers.size() + 31) / 32);
  for (uint64_t& b : band) b = g_rng() & 1u;  // early or late warp
  for (Fiber& f : g_blk.fibers) {
    const uint64_t lane_noise = g_rng() >> 1;
    f.priority = g_blk.policy == 2 ? (band[f.linear / 32] << 63) | lane_noise : lane_noise;
  }
}

void set_error(cudaError_t e, const std::string& msg) {
  if (g_last == cudaSuccess) {
    g_last = e;
    g_last_msg = msg;
  }
}

char* stack_of(int i) {
  while (static_cast<int>(g_stacks.size()) <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("fastclu cpu shim: mmap");
      std::abort();
    }
    mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    g_stacks.push_back(static_cast<char*>(p) + page);
  }
  return g_stacks[i];
}

void make_ready(Fiber& f) {
  f.st = St::Ready;
  g_blk.ready.push_back(f.linear);
}

void release_block_if_complete() {
  if (g_blk.n_at_block == 0 || g_blk.n_at_block != g_blk.n_alive) return;
  g_blk.n_at_block = 0;
  for (Fiber& f : g_blk.fibers)
    if (f.st == St::AtBlock) make_ready(f);
  draw_priorities();
}

// Lanes of warp w waiting at a collective whose mask lanes have all arrived are released.
void release_warp(int w) {
  const unsigned waiting = g_blk.warp_waiting[w];
  unsigned released = 0;
  for (int lane = 0; lane < 32; ++lane) {
    if (!((waiting >> lane) & 1u)) continue;
    const Fiber& f = g_blk.fibers[w * 32 + lane];
    if ((f.warp_mask & ~waiting) == 0) released |= 1u << lane;
  }
  g_blk.warp_waiting[w] &= ~released;
  for (int lane = 0; lane < 32; ++lane)
    if ((released >> lane) & 1u) make_ready(g_blk.fibers[w * 32 + lane]);
}

void fault(const std::string& msg) {
  if (g_blk.fault.empty()) g_blk.fault = msg;
}

void yield() {
  Fiber* me = g_cur;
  swapcontext(&me->ctx, &g_blk.sched);
}

void fiber_main() {
  Fiber* me = g_cur;
  (*g_blk.body)();
  me->st = St::Done;
  --g_blk.n_alive;
  const int w = me->linear / 32;
  g_blk.warp_alive[w] &= ~(1u << (me->linear & 31));
  for (int lane = 0; lane < 32 && w * 32 + lane < static_cast<int>(g_blk.fibers.size()); ++lane) {
    const Fiber& f = g_blk.fibers[w * 32 + lane];
    if (f.st == St::AtWarp && ((f.warp_mask >> (me->linear & 31)) & 1u))
      fault("thread " + std::to_string(me->linear) + " exited while lanes of its warp wait for it at a collective");
  }
  release_block_if_complete();
  // returning resumes uc_link: the scheduler
}

std::string describe_deadlock() {
  int at_block = 0, at_warp = 0;
  for (const Fiber& f : g_blk.fibers) {
    at_block += f.st == St::AtBlock;
    at_warp += f.st == St::AtWarp;
  }
  return "deadlock in block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) + "," +
         std::to_string(g_block_idx.z) + "): " + std::to_string(at_block) + " threads wait at __syncthreads, " +
         std::to_string(at_warp) + " at a warp collective, " + std::to_string(g_blk.n_alive) + " alive";
}

void run_block(dim3 block, const std::function<void()>& body) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  g_blk.fibers.assign(n, Fiber{});
  g_blk.ready.clear();
  g_blk.n_alive = n;
  g_blk.n_at_block = 0;
  const int n_warps = (n + 31) / 32;
  g_blk.warp_alive.assign(n_warps, 0);
  g_blk.warp_waiting.assign(n_warps, 0);
  g_blk.slots.assign(static_cast<size_t>(n_warps) * 32, 0);
  g_blk.body = &body;
  g_blk.fault.clear();
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_blk.fibers[i];
    f.linear = i;
    f.idx = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    g_blk.warp_alive[i / 32] |= 1u << (i & 31);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack_of(i);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g_blk.sched;
    makecontext(&f.ctx, fiber_main, 0);
    g_blk.ready.push_back(i);
  }
  const uint64_t pick = rnd(4);
  g_blk.policy = pick == 0 ? 0 : (pick == 1 ? 1 : 2);
  draw_priorities();
  while (g_blk.fault.empty()) {
    if (g_blk.ready.empty()) {
      if (g_blk.n_alive > 0) fault(describe_deadlock());
      break;
    }
    size_t k = 0;
    if (g_blk.policy != 0) {
      for (size_t r = 1; r < g_blk.ready.size(); ++r)
        if (g_blk.fibers[g_blk.ready[r]].priority > g_blk.fibers[g_blk.ready[k]].priority) k = r;
    } else {
      k = rnd(g_blk.ready.size());
    }
    const int i = g_blk.ready[k];
    g_blk.ready[k] = g_blk.ready.back();
    g_blk.ready.pop_back();
    g_cur = &g_blk.fibers[i];
    g_thread_idx = g_cur->idx;
    swapcontext(&g_blk.sched, &g_cur->ctx);
  }
  g_cur = nullptr;
  // An abandoned block (fault) leaves fibers suspended on their stacks; they own no resources.
}

Fiber& me_checked(const char* what) {
  if (g_cur == nullptr) {
    std::fprintf(stderr, "fastclu cpu shim: %s called outside a kernel\n", what);
    std::abort();
  }
  return *g_cur;
}

}  // namespace

void run_kernel(dim3 grid, dim3 block, size_t smem, cudaStream_t, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  seed_once();
  const uint64_t nb = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  const uint64_t nt = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (nb == 0 || nt == 0 || nt > kMaxThreads || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, "invalid launch configuration: grid " + std::to_string(nb) + " blocks of " +
                                                 std::to_string(nt) + " threads");
    return;
  }
  if (smem != 0) {
    set_error(cudaErrorInvalidValue, "dynamic shared memory is not supported by the CPU shim");
    return;
  }
  g_grid_dim = grid;
  g_block_dim = block;
  std::vector<uint64_t> order(nb);
  for (uint64_t b = 0; b < nb; ++b) order[b] = b;
  for (uint64_t b = nb; b > 1; --b) std::swap(order[b - 1], order[rnd(b)]);
  for (uint64_t b : order) {
    g_block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                        static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    run_block(block, body);
    if (!g_blk.fault.empty()) {
      set_error(cudaErrorLaunchFailure, g_blk.fault);
      break;
    }
  }
  g_blk.fibers.clear();
}

void block_barrier() {
  Fiber& me = me_checked("__syncthreads");
  me.st = St::AtBlock;
  ++g_blk.n_at_block;
  release_block_if_complete();
  yield();
}

int block_barrier_count(int pred) {
  Fiber& me = me_checked("__syncthreads_count");
  me.vote = pred != 0;
  block_barrier();
  int n = 0;
  for (const Fiber& f : g_blk.fibers) n += f.vote;
  block_barrier();  // nobody changes its vote before everyone has counted
  return n;
}

int lane_id() { return me_checked("a warp intrinsic").linear & 31; }

unsigned warp_active_mask() { return g_blk.warp_alive[me_checked("__activemask").linear / 32]; }

void warp_barrier(unsigned mask) {
  Fiber& me = me_checked("a warp collective");
  const int w = me.linear / 32, lane = me.linear & 31;
  if (!((mask >> lane) & 1u)) fault("a warp collective's mask does not name the calling lane");
  if (mask & ~g_blk.warp_alive[w]) fault("a warp collective's mask names lanes that have exited or do not exist");
  me.st = St::AtWarp;
  me.warp_mask = mask;
  g_blk.warp_waiting[w] |= 1u << lane;
  release_warp(w);
  yield();
}

uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane) {
  Fiber& me = me_checked("a warp shuffle");
  const int w = me.linear / 32;
  g_blk.slots[static_cast<size_t>(w) * 32 + (me.linear & 31)] = value;
  warp_barrier(mask);
  const bool src_ok = src_lane >= 0 && src_lane < 32 && ((mask >> src_lane) & 1u);
  const uint64_t got = src_ok ? g_blk.slots[static_cast<size_t>(w) * 32 + src_lane] : value;
  if (!src_ok) fault("a warp shuffle reads a lane outside its mask");
  warp_barrier(mask);  // slots are reused by the next collective only after every lane has read
  return got;
}

unsigned warp_ballot(unsigned mask, int pred) {
  Fiber& me = me_checked("a warp vote");
  const int w = me.linear / 32;
  g_blk.slots[static_cast<size_t>(w) * 32 + (me.linear & 31)] = pred != 0;
  warp_barrier(mask);
  unsigned bits = 0;
  for (int lane = 0; lane < 32; ++lane)
    if (((mask >> lane) & 1u) && g_blk.slots[static_cast<size_t>(w) * 32 + lane]) bits |= 1u << lane;
  warp_barrier(mask);
  return bits;
}

}  // namespace fastclu_cpu

using fastclu_cpu::g_last;
using fastclu_cpu::g_last_msg;

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return g_last; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t) {
  // The message of the latest failure (the shim keeps one); the caller reads it right away.
  static thread_local std::string msg;
  msg = "FASTCLU_CPU shim: " + (g_last_msg.empty() ? std::string("error") : g_last_msg);
  return msg.c_str();
}

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int dev) { return dev == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: {
      // A few "SMs", varied per query, so grid-stride loops run both with one chunk per block
      // and with several.
      std::lock_guard<std::mutex> lock(fastclu_cpu::g_launch_mutex);
      fastclu_cpu::seed_once();
      *value = 1 + static_cast<int>(fastclu_cpu::rnd(4));
      return cudaSuccess;
    }
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t) {
  if (n && (dst == nullptr || src == nullptr)) return cudaErrorInvalidValue;
  std::memmove(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind k) { return cudaMemcpyAsync(dst, src, n, k); }
cudaError_t cudaMemsetAsync(void* dst, int value, size_t n, cudaStream_t) {
  if (n && dst == nullptr) return cudaErrorInvalidValue;
  std::memset(dst, value, n);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* dst, int value, size_t n) { return cudaMemsetAsync(dst, value, n); }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
