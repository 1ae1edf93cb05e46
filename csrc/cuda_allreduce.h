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

namespace nemokern {

// Devices the CUDA runtime sees; 0 when there is no driver or no GPU (never throws).
int cuda_device_count();

// One rank's workspace: a cudaMalloc'ed block [flags | data parity 0 | data parity 1] exported
// by IPC handle; every rank maps every peer's block. The same step/parity protocol as the CPU
// backend (shm_allreduce.h), per thread block: block b of rank r publishes step s into
// flags[b][r] of every peer (release, system scope) and waits for flags[b][p] >= s (acquire).
// All calls on one workspace must be ordered on the device (one stream, or synchronised
// streams): the protocol relies on kernel k finishing before kernel k+1 starts on each rank.
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
  // CollectiveTimeout if an earlier call found a peer missing past the timeout.
  void all_reduce(uintptr_t ptr, int64_t numel, int dtype, uintptr_t stream);
  // Synchronises the device; 0 = fine, 1 = a kernel gave up waiting for a peer.
  int error_code();
  size_t buffer_bytes() const { return buffer_bytes_; }

 private:
  int rank_, world_, device_;
  size_t buffer_bytes_, one_shot_max_, region_bytes_;
  double timeout_s_;
  char* block_ = nullptr;          // own device block
  std::vector<char*> peers_;       // every rank's block as mapped here (own = block_)
  int* error_host_ = nullptr;      // pinned, mapped: kernels flag timeouts without a sync
  int* error_device_ = nullptr;    // the same int as the kernels address it
  uint64_t step_ = 0;
  bool opened_ = false;
};

}  // namespace nemokern
