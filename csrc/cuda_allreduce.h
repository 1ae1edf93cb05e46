// CUDA all-reduce (sum) of device buffers between the ranks of one node through CUDA IPC.
// This header includes no CUDA headers, so module.cpp compiles with the host compiler alone;
// streams and pointers cross it as integers. Only the CUDA runtime API is used (linked
// statically): the module imports on a machine without a driver, and without a device every
// entry point raises a clear error instead.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "collective.h"  // dtype codes, kMaxRanks, SignalSlot, CollectiveError

namespace nemokern {

// Devices the CUDA runtime sees; 0 when there is no driver or no GPU (never throws).
int cuda_device_count();

// One rank's workspace: a cudaMalloc'ed block [signal slots | data parity 0 | data parity 1]
// exported by IPC handle; every rank maps every peer's block. The same step/parity protocol as
// the CPU backend (shm_allreduce.h, SignalSlot in collective.h), per thread block: block b of
// rank r writes what it reduces (numel, dtype) and then step s into slot[b][r] of every peer
// (release, system scope), waits for slot[b][p].step >= s (acquire) and checks that peer p
// reduces the same numel and dtype. All calls on one workspace must be ordered on the device
// (one stream, or synchronised streams): the protocol relies on kernel k finishing before
// kernel k+1 starts on each rank.
//
// Failures never hand back a result. A kernel that waits past the timeout for a peer, or finds
// a peer reducing another numel or dtype, records a CollectiveError in mapped pinned host
// memory and executes a trap: the CUDA context of that process is then in a sticky error
// state, so no later kernel, copy or synchronisation can consume the unfinished output (every
// later CUDA call fails, as after a device-side assert). With different sizes every rank's
// kernel sees the mismatch, so every rank stops. Host side, raise_if_failed() (and every
// all_reduce call) turns the record into CollectiveTimeout or std::invalid_argument naming
// the ranks and sizes; the process has to be restarted, as after NCCL's watchdog abort.
//
// CUDA graphs: a launch bakes the step numbers into its arguments, so a replayed graph would
// wait for steps already passed and skip the barriers. Capturing is refused (all_reduce
// throws); the Python front end sends captured all-reduces to torch.distributed instead.
class CudaAllReduce {
 public:
  CudaAllReduce(int rank, int world_size, int device, size_t buffer_bytes, double timeout_s,
                size_t one_shot_max_bytes);
  ~CudaAllReduce();
  CudaAllReduce(const CudaAllReduce&) = delete;
  CudaAllReduce& operator=(const CudaAllReduce&) = delete;

  // cudaIpcMemHandle_t of this rank's block, as 64 raw bytes.
  std::string ipc_handle() const;
  // handles[p] = rank p's ipc_handle(); maps the peers' blocks (own entry ignored).
  void open_peers(const std::vector<std::string>& handles);
  // Enqueue on `stream` an in-place sum of numel elements at device address ptr: one-shot (each
  // rank reads every peer, 16-byte loads, fp32 accumulation in rank order) up to
  // one_shot_max_bytes, reduce-scatter + all-gather above, at most buffer_bytes. Throws
  // (raise_if_failed) if an earlier kernel recorded a failure, and std::runtime_error if
  // `stream` is being captured into a CUDA graph.
  void all_reduce(uintptr_t ptr, int64_t numel, int dtype, uintptr_t stream);
  // Throws the recorded failure of an earlier kernel (CollectiveTimeout for a missing peer,
  // std::invalid_argument for another size or dtype on a peer); no synchronisation.
  void raise_if_failed() const;
  // Synchronises the device and returns the recorded ErrorKind (0 = fine). A sync that fails
  // because one of our kernels trapped returns that kind instead of throwing.
  int error_code();
  size_t buffer_bytes() const { return buffer_bytes_; }

 private:
  int rank_, world_, device_;
  size_t buffer_bytes_, one_shot_max_, region_bytes_;
  double timeout_s_;
  char* block_ = nullptr;          // own device block
  std::vector<char*> peers_;       // every rank's block as mapped here (own = block_)
  CollectiveError* error_host_ = nullptr;    // pinned, mapped: kernels record failures here
  CollectiveError* error_device_ = nullptr;  // the same record as the kernels address it
  uint64_t step_ = 0;
  bool opened_ = false;
};

}  // namespace nemokern
