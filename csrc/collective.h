// What the two all-reduce back ends (shm_allreduce: CPU, /dev/shm; cuda_allreduce: CUDA IPC)
// share: dtype codes, the rank limit, the signal slot a rank publishes at every step, and the
// errors a collective can end in. Host-compiler clean (no CUDA headers): module.cpp and the
// CPU back end include it; cuda_allreduce.cu includes it too, where NEMOKERN_HD makes the
// small helpers callable from device code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define NEMOKERN_HD __host__ __device__
#else
#define NEMOKERN_HD
#endif

namespace nemokern {

// Ranks in one group of either back end: one node's GPUs (a tensor-parallel group). Python
// reads it as nemokern._C.MAX_RANKS; larger groups use torch.distributed.
constexpr int kMaxRanks = 8;

// dtype codes (Python maps torch dtypes onto them: _C.DTYPE_FLOAT32, _C.DTYPE_BFLOAT16).
enum DType : int { kFloat32 = 0, kBFloat16 = 1 };

// Bytes per element of a dtype code; throws std::invalid_argument naming the code otherwise.
size_t dtype_size(int dtype);

// What rank r publishes to its peers at step s: slot.meta[s % 2] = what it reduces, then
// slot.step = s with release order. A peer that acquires step >= s reads meta[s % 2] and
// compares it with its own call. Two parities suffice: r can publish s + 2 only after every
// peer published s + 1, which each does after checking step s.
struct SignalSlot {
  uint64_t step;
  uint64_t reserved;
  struct Meta {
    int64_t numel;
    int64_t dtype;
  } meta[2];
};

// True when a peer's published call is the same as ours (same element count and dtype).
NEMOKERN_HD inline bool same_call(const SignalSlot::Meta& peer, int64_t numel, int64_t dtype) {
  return peer.numel == numel && peer.dtype == dtype;
}

// A peer did not arrive within the timeout; Python sees it as a TimeoutError subclass.
struct CollectiveTimeout : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// How a collective failed, as the rank that saw it records it. The CUDA kernels write it into
// mapped pinned host memory (kind last), the CPU back end on its stack; either way
// throw_collective_error turns it into the exception.
enum ErrorKind : int32_t { kNoError = 0, kPeerTimeout = 1, kSizeMismatch = 2 };

struct CollectiveError {
  int32_t kind;  // ErrorKind; written last
  int32_t peer;  // the rank that did not arrive, or that passed another size/dtype
  uint64_t step;
  int64_t numel, dtype;            // this rank's call
  int64_t peer_numel, peer_dtype;  // the peer's call (kSizeMismatch only)
};

// Throws CollectiveTimeout (kPeerTimeout) or std::invalid_argument (kSizeMismatch; Python's
// ValueError) with a message naming the back end, both ranks, the sizes and the fix.
// `backend` is e.g. "shm" or "CUDA IPC"; timeout_s is the limit that expired.
[[noreturn]] void throw_collective_error(const std::string& backend, int rank, int world,
                                         double timeout_s, const CollectiveError& e);

// Checks a group description shared by both back ends; throws std::invalid_argument naming
// `backend` when world_size is outside 1..kMaxRanks or rank outside 0..world_size-1.
void check_group(const std::string& backend, int rank, int world_size);

}  // namespace nemokern
