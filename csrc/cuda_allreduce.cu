// CUDA IPC all-reduce: see cuda_allreduce.h for the protocol. Runtime API only (cudart_static).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "cuda_allreduce.h"

namespace nemokern {

namespace {

constexpr int kMaxBlocks = 32;  // slots per rank; enough blocks to saturate NVLink reads
constexpr int kThreads = 512;
// Start of a block: [kMaxBlocks x kMaxRanks signal slots][claim word] then the data regions.
constexpr size_t kSlotBytes = sizeof(SignalSlot) * kMaxBlocks * kMaxRanks;
constexpr size_t kFlagBytes = (kSlotBytes + sizeof(int) + 255) / 256 * 256;
// One thread per peer signals and waits in block_barrier, all in warp 0, which syncs after the
// signal stores: no thread can trap before every peer was signalled, so every peer sees this
// rank's arrival (and its numel) and reaches the same verdict.
static_assert(kMaxRanks < 32 && kThreads >= 32, "block_barrier's peers fit in warp 0");

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so that later calls see their own
    throw std::runtime_error(std::string("nemokern CUDA all-reduce: ") + what + " failed: " +
                             cudaGetErrorString(e));
  }
}

// Restores the caller's current device (torch keeps its own notion of it per thread).
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int dev) {
    check(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != dev) check(cudaSetDevice(dev), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur;
    if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

struct Peers {
  char* block[kMaxRanks];  // every rank's workspace as mapped in this process
};

struct Params {
  Peers peers;
  int rank, world;
  uint64_t step;         // first step this call uses (two-shot also uses step + 1)
  size_t region_bytes;   // bytes per data parity
  size_t numel;
  int dtype;             // published with numel so that peers can check they reduce the same
  void* out;
  CollectiveError* error;  // mapped pinned host record
  int* claim;            // device word in the own block: the first failing thread writes error
  uint64_t timeout_ns;
};

// Slot through which rank `src` signals block b of the rank owning `block`.
__device__ __forceinline__ SignalSlot* slot(char* block, int b, int src) {
  return reinterpret_cast<SignalSlot*>(block) + b * kMaxRanks + src;
}

__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Relaxed system-scope accesses for the slot metadata: never served from a stale L1 line.
__device__ __forceinline__ void store_relaxed_sys(int64_t* p, int64_t v) {
  asm volatile("st.relaxed.sys.global.s64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ int64_t load_relaxed_sys(const int64_t* p) {
  int64_t v;
  asm volatile("ld.relaxed.sys.global.s64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Records why this kernel cannot finish and stops the CUDA context (see cuda_allreduce.h): the
// output is never handed back. The first failing thread of this process writes the record,
// kind last; the others wait for it, so the host never reads a half-written record.
// Arguments by value (a cold call must not make the kernel copy Params to local memory).
__device__ __noinline__ void fail(CollectiveError* error, int* claim, int rank,
                                  CollectiveError r) {
  __threadfence_system();  // this thread's signal to its peer lands before the trap
  volatile CollectiveError* e = error;
  if (atomicCAS(claim, 0, 1) == 0) {
    e->peer = r.peer;
    e->step = r.step;
    e->numel = r.numel;
    e->dtype = r.dtype;
    e->peer_numel = r.peer_numel;
    e->peer_dtype = r.peer_dtype;
    __threadfence_system();
    e->kind = r.kind;
    __threadfence_system();
    const char* what = r.kind == kSizeMismatch ? "reduces another size or dtype than"
                                               : "timed out waiting for";
    printf("nemokern all_reduce (CUDA IPC): rank %d %s rank %d at step %llu (%lld vs %lld "
           "elements); trapping so that no result is used\n",
           rank, what, r.peer, static_cast<unsigned long long>(r.step),
           static_cast<long long>(r.numel), static_cast<long long>(r.peer_numel));
  } else {
    while (e->kind == kNoError) {
    }
  }
  __trap();
}

// Block b of every rank meets block b of every other rank at `step`. The data a block reads
// after the barrier was written (before it) by the same block index on the peers, so no
// grid-wide synchronisation is needed. Thread t < world signals peer t (what this rank reduces,
// then the step) and waits for peer t's step, then checks that peer t reduces the same numel
// and dtype. A wait past the timeout or a mismatch ends in fail(), which stops the context
// before any output of this call (or anything after it) can be used.
__device__ void block_barrier(const Params& p, uint64_t step) {
  __syncthreads();
  const int t = threadIdx.x;
  if (t < p.world) {
    __threadfence_system();  // the block's writes (and the preceding copy) before the flag
    const int64_t numel = static_cast<int64_t>(p.numel);
    SignalSlot* out = slot(p.peers.block[t], blockIdx.x, p.rank);
    store_relaxed_sys(&out->meta[step & 1].numel, numel);
    store_relaxed_sys(&out->meta[step & 1].dtype, p.dtype);
    store_release_sys(&out->step, step);
    __syncwarp((1u << p.world) - 1);  // every peer is signalled before any thread may trap
    SignalSlot* in = slot(p.peers.block[p.rank], blockIdx.x, t);
    const uint64_t start = global_ns();
    while (load_acquire_sys(&in->step) < step) {
      if (global_ns() - start > p.timeout_ns)
        fail(p.error, p.claim, p.rank, {kPeerTimeout, t, step, numel, p.dtype, 0, 0});
    }
    const SignalSlot::Meta theirs{load_relaxed_sys(&in->meta[step & 1].numel),
                                  load_relaxed_sys(&in->meta[step & 1].dtype)};
    if (!same_call(theirs, numel, p.dtype))
      fail(p.error, p.claim, p.rank,
           {kSizeMismatch, t, step, numel, p.dtype, theirs.numel, theirs.dtype});
  }
  __syncthreads();
}

template <typename T>
struct Pack;  // 16 bytes of T, summed in fp32
template <>
struct Pack<float> {
  static constexpr int N = 16 / sizeof(float);
  __device__ static float get(const uint4& v, int i) { return reinterpret_cast<const float*>(&v)[i]; }
  __device__ static void put(uint4& v, int i, float x) { reinterpret_cast<float*>(&v)[i] = x; }
  __device__ static float load(const void* p, size_t i) { return __ldcg(static_cast<const float*>(p) + i); }
  __device__ static void store(void* p, size_t i, float x) { static_cast<float*>(p)[i] = x; }
};
template <>
struct Pack<__nv_bfloat16> {
  static constexpr int N = 16 / sizeof(__nv_bfloat16);
  __device__ static float get(const uint4& v, int i) {
    return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(&v)[i]);
  }
  __device__ static void put(uint4& v, int i, float x) {
    reinterpret_cast<__nv_bfloat16*>(&v)[i] = __float2bfloat16_rn(x);
  }
  __device__ static float load(const void* p, size_t i) {
    const unsigned short bits = __ldcg(static_cast<const unsigned short*>(p) + i);
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
  __device__ static void store(void* p, size_t i, float x) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x);
  }
};

__device__ __forceinline__ size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

__device__ __forceinline__ char* data(const Params& p, int r, int parity) {
  return p.peers.block[r] + kFlagBytes + p.region_bytes * parity;
}

// Peer data is read with ld.global.cg (L2, not L1): L1 is not coherent, and an SM that read the
// same address two steps ago must not see its stale copy.

// Sum of pack i over ranks 0..world-1 (that order on every rank: bitwise equal results).
template <typename T>
__device__ __forceinline__ uint4 sum_pack(const Params& p, int parity, size_t i) {
  float acc[Pack<T>::N];
  for (int r = 0; r < p.world; ++r) {
    const uint4 v = __ldcg(reinterpret_cast<const uint4*>(data(p, r, parity)) + i);
#pragma unroll
    for (int k = 0; k < Pack<T>::N; ++k) acc[k] = r == 0 ? Pack<T>::get(v, k) : acc[k] + Pack<T>::get(v, k);
  }
  uint4 out;
#pragma unroll
  for (int k = 0; k < Pack<T>::N; ++k) Pack<T>::put(out, k, acc[k]);
  return out;
}

template <typename T>
__device__ __forceinline__ void store_pack(void* out, size_t i, const uint4& v) {
  if ((reinterpret_cast<uintptr_t>(out) & 15) == 0) {
    reinterpret_cast<uint4*>(out)[i] = v;
  } else {  // a tensor view at an odd offset: element stores
    const T* e = reinterpret_cast<const T*>(&v);
    for (int k = 0; k < Pack<T>::N; ++k) static_cast<T*>(out)[i * Pack<T>::N + k] = e[k];
  }
}

// Elements past the last whole pack: every rank sums them itself (block 0).
template <typename T>
__device__ void sum_tail(const Params& p, int parity, size_t packs) {
  if (blockIdx.x != 0) return;
  for (size_t e = packs * Pack<T>::N + threadIdx.x; e < p.numel; e += blockDim.x) {
    float acc = 0.f;
    for (int r = 0; r < p.world; ++r) {
      const float v = Pack<T>::load(data(p, r, parity), e);
      acc = r == 0 ? v : acc + v;
    }
    Pack<T>::store(p.out, e, acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) one_shot_kernel(Params p) {
  const int parity = p.step & 1;
  block_barrier(p, p.step);
  const size_t packs = p.numel / Pack<T>::N;
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += gridDim.x * blockDim.x)
    store_pack<T>(p.out, i, sum_pack<T>(p, parity, i));
  sum_tail<T>(p, parity, packs);
}

// Rank r sums segment r of the packs into its other-parity region; after the second barrier
// every rank copies all segments out. Block b touches the same pack indices in both phases on
// every rank, so the per-block barrier orders each read after the write it needs.
template <typename T>
__global__ void __launch_bounds__(kThreads) two_shot_kernel(Params p) {
  const int parity = p.step & 1;
  block_barrier(p, p.step);
  const size_t packs = p.numel / Pack<T>::N;
  const size_t seg = (packs + p.world - 1) / p.world;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  const size_t first = blockIdx.x * blockDim.x + threadIdx.x;
  {
    const size_t lo = seg * p.rank, hi = min_sz(packs, seg * (p.rank + 1));
    uint4* dst = reinterpret_cast<uint4*>(data(p, p.rank, parity ^ 1));
    for (size_t i = lo + first; i < hi; i += stride) dst[i] = sum_pack<T>(p, parity, i);
  }
  sum_tail<T>(p, parity, packs);
  block_barrier(p, p.step + 1);
  for (int r = 0; r < p.world; ++r) {
    const size_t lo = seg * r, hi = min_sz(packs, seg * (r + 1));
    const uint4* src = reinterpret_cast<const uint4*>(data(p, r, parity ^ 1));
    for (size_t i = lo + first; i < hi; i += stride) store_pack<T>(p.out, i, __ldcg(src + i));
  }
}

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

CudaAllReduce::CudaAllReduce(int rank, int world_size, int device, size_t buffer_bytes,
                             double timeout_s, size_t one_shot_max_bytes)
    : rank_(rank), world_(world_size), device_(device), buffer_bytes_(buffer_bytes),
      one_shot_max_(one_shot_max_bytes), timeout_s_(timeout_s) {
  check_group("CUDA", rank, world_size);
  if (!(timeout_s > 0)) throw std::invalid_argument("nemokern CUDA all-reduce: timeout must be > 0");
  const int count = cuda_device_count();
  if (count == 0)
    throw std::runtime_error(
        "nemokern CUDA all-reduce: no CUDA device is usable here (no GPU or no driver); "
        "reduce CPU tensors (shared-memory path) or set NEMOKERN_CUSTOM_ALLREDUCE=0");
  if (device < 0 || device >= count)
    throw std::invalid_argument("nemokern CUDA all-reduce: device " + std::to_string(device) +
                                " does not exist (" + std::to_string(count) + " visible)");
  region_bytes_ = (std::max<size_t>(buffer_bytes, 16) + 255) / 256 * 256;
  DeviceGuard guard(device_);
  check(cudaMalloc(&block_, kFlagBytes + 2 * region_bytes_), "cudaMalloc of the IPC workspace");
  check(cudaMemset(block_, 0, kFlagBytes), "cudaMemset of the flags");
  check(cudaHostAlloc(&error_host_, sizeof(CollectiveError), cudaHostAllocMapped),
        "cudaHostAlloc");
  std::memset(error_host_, 0, sizeof(CollectiveError));
  check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_device_), error_host_, 0),
        "cudaHostGetDevicePointer");
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  peers_.assign(world_, nullptr);
  peers_[rank_] = block_;
}

CudaAllReduce::~CudaAllReduce() {
  int prev = -1;
  cudaGetDevice(&prev);
  cudaSetDevice(device_);
  cudaDeviceSynchronize();  // no kernel may still read a peer block we are about to unmap
  for (int r = 0; r < world_; ++r)
    if (r != rank_ && peers_.size() > size_t(r) && peers_[r]) cudaIpcCloseMemHandle(peers_[r]);
  if (block_) cudaFree(block_);
  if (error_host_) cudaFreeHost(error_host_);
  if (prev >= 0) cudaSetDevice(prev);
}

std::string CudaAllReduce::ipc_handle() const {
  DeviceGuard guard(device_);
  cudaIpcMemHandle_t h;
  check(cudaIpcGetMemHandle(&h, block_), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

void CudaAllReduce::open_peers(const std::vector<std::string>& handles) {
  if (opened_) throw std::runtime_error("nemokern CUDA all-reduce: peers are already open");
  if (handles.size() != size_t(world_))
    throw std::invalid_argument("nemokern CUDA all-reduce: expected " + std::to_string(world_) +
                                " handles, got " + std::to_string(handles.size()));
  DeviceGuard guard(device_);
  for (int r = 0; r < world_; ++r) {
    if (r == rank_) continue;
    if (handles[r].size() != sizeof(cudaIpcMemHandle_t))
      throw std::invalid_argument("nemokern CUDA all-reduce: handle of rank " + std::to_string(r) +
                                  " has " + std::to_string(handles[r].size()) + " bytes, not 64");
    cudaIpcMemHandle_t h;
    std::memcpy(&h, handles[r].data(), sizeof(h));
    void* p = nullptr;
    check(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
    peers_[r] = static_cast<char*>(p);
  }
  opened_ = true;
}

void CudaAllReduce::raise_if_failed() const {
  if (__atomic_load_n(&error_host_->kind, __ATOMIC_ACQUIRE) == kNoError) return;
  CollectiveError e;  // the kernel wrote the other fields before kind
  std::memcpy(&e, error_host_, sizeof(e));
  throw_collective_error("CUDA IPC", rank_, world_, timeout_s_, e);
}

void CudaAllReduce::all_reduce(uintptr_t ptr, int64_t numel, int dtype, uintptr_t stream) {
  const size_t esize = dtype_size(dtype);
  if (numel < 0) throw std::invalid_argument("nemokern all_reduce: numel must be >= 0");
  if (!opened_ && world_ > 1)
    throw std::runtime_error("nemokern CUDA all-reduce: open_peers() was not called");
  raise_if_failed();
  const size_t bytes = static_cast<size_t>(numel) * esize;
  if (bytes > buffer_bytes_)
    throw std::invalid_argument("nemokern CUDA all-reduce: " + std::to_string(bytes) +
                                " bytes exceed the workspace (" + std::to_string(buffer_bytes_) +
                                "); raise NEMOKERN_ALLREDUCE_MAX_BYTES or use torch.distributed");
  if (numel == 0 || world_ == 1) return;
  DeviceGuard guard(device_);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const cudaError_t query = cudaStreamIsCapturing(st, &capture);
  if (query != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
    if (query != cudaSuccess) cudaGetLastError();
    throw std::runtime_error(
        "nemokern CUDA all-reduce: the stream is being captured into a CUDA graph, which would "
        "freeze this call's step numbers and break the barriers on replay; reduce with "
        "torch.distributed while capturing (nemokern.parallel.all_reduce does)");
  }
  const bool one_shot = bytes <= one_shot_max_;
  Params p;
  for (int r = 0; r < world_; ++r) p.peers.block[r] = peers_[r];
  p.rank = rank_;
  p.world = world_;
  p.step = step_ + 1;
  step_ += one_shot ? 1 : 2;
  p.region_bytes = region_bytes_;
  p.numel = static_cast<size_t>(numel);
  p.dtype = dtype;
  p.out = reinterpret_cast<void*>(ptr);
  p.error = error_device_;
  p.claim = reinterpret_cast<int*>(block_ + kSlotBytes);
  p.timeout_ns = static_cast<uint64_t>(timeout_s_ * 1e9);
  char* mine = block_ + kFlagBytes + region_bytes_ * (p.step & 1);
  check(cudaMemcpyAsync(mine, p.out, bytes, cudaMemcpyDeviceToDevice, st), "cudaMemcpyAsync");
  const size_t packs = (bytes / 16) ? bytes / 16 : 1;
  const int blocks = static_cast<int>(std::min<size_t>(kMaxBlocks, (packs + kThreads - 1) / kThreads));
  if (dtype == kFloat32) {
    if (one_shot) one_shot_kernel<float><<<blocks, kThreads, 0, st>>>(p);
    else two_shot_kernel<float><<<blocks, kThreads, 0, st>>>(p);
  } else {
    if (one_shot) one_shot_kernel<__nv_bfloat16><<<blocks, kThreads, 0, st>>>(p);
    else two_shot_kernel<__nv_bfloat16><<<blocks, kThreads, 0, st>>>(p);
  }
  check(cudaGetLastError(), "launching the all-reduce kernel");
}

int CudaAllReduce::error_code() {
  int kind = __atomic_load_n(&error_host_->kind, __ATOMIC_ACQUIRE);
  if (kind != kNoError) return kind;  // a kernel trapped: a sync would only report that
  DeviceGuard guard(device_);
  const cudaError_t e = cudaDeviceSynchronize();
  kind = __atomic_load_n(&error_host_->kind, __ATOMIC_ACQUIRE);
  if (kind == kNoError) check(e, "cudaDeviceSynchronize");
  return kind;
}

}  // namespace nemokern
