// CPU all-reduce (sum) over a POSIX shared-memory workspace shared by the ranks of one host.
// Plain C++ (no libtorch, no pybind11): buffers arrive as raw pointers + element counts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "collective.h"  // dtype codes, kMaxRanks, SignalSlot, CollectiveError

namespace nemokern {

// Workspace layout (one mapping per rank, same bytes on every rank):
//   [header page][per-rank SignalSlot lines][data: rank-major, 2 parities x chunk_bytes]
// Every collective is a sequence of "steps". At step s rank r writes only its own region of
// parity s%2, publishes its SignalSlot (what it reduces, then step = s, release), waits for
// every peer's step >= s (acquire), checks that the peer reduces the same element count and
// dtype, then reads peers' regions of parity s%2. Rank r can only reach step s+2 after all
// peers flagged s+1, which they do after finishing the reads of step s: double buffering
// replaces a trailing barrier.
class ShmAllReduce {
 public:
  // create=true (one rank): O_EXCL-creates and sizes the segment `name` ("/nemokern_...") and
  // holds an exclusive flock(2) on it until unlink(): the kernel drops the lock when this
  // process dies, so a name whose lock is free was left by a dead creator (the liveness test
  // of nemokern.parallel.all_reduce.cleanup_stale_segments; pids would not do across pid
  // namespaces). Others open the existing one. one_shot_max_bytes: messages up to this size
  // (and up to chunk_bytes) are reduced one-shot (each rank sums every peer); larger ones go
  // reduce-scatter + all-gather, chunk by chunk.
  ShmAllReduce(const std::string& name, int rank, int world_size, size_t chunk_bytes, bool create,
               double timeout_s, size_t one_shot_max_bytes);
  ~ShmAllReduce();
  ShmAllReduce(const ShmAllReduce&) = delete;
  ShmAllReduce& operator=(const ShmAllReduce&) = delete;

  // Removes the name from /dev/shm and drops the creator's lock; the mappings stay valid.
  // Call once every rank has mapped.
  void unlink();
  // In-place sum of `numel` elements at `ptr` across all ranks. Every rank gets bitwise the
  // same result: the fixed-order sum rank 0 + rank 1 + ... (fp32 accumulation for bf16).
  void all_reduce(uintptr_t ptr, int64_t numel, int dtype);

  int rank() const { return rank_; }
  int world_size() const { return world_; }
  size_t chunk_bytes() const { return chunk_bytes_; }
  size_t one_shot_max_bytes() const { return one_shot_max_; }
  const std::string& name() const { return name_; }
  uint64_t steps() const { return step_; }

 private:
  SignalSlot* slot(int r) const;
  char* region(int r, int parity) const;
  void arrive(uint64_t step, int64_t numel, int dtype);
  void wait_all(uint64_t step, int64_t numel, int dtype);
  void one_shot(char* data, size_t n, int dtype);
  void two_shot_chunk(char* data, size_t n, int dtype, int64_t total, size_t esize);
  void check_usable() const;

  std::string name_;
  int rank_, world_;
  size_t chunk_bytes_, one_shot_max_, map_bytes_;
  double timeout_s_;
  char* base_ = nullptr;
  bool linked_ = false;  // this rank created the name and has not unlinked it yet
  int lock_fd_ = -1;     // the creator's descriptor holding the flock while linked_
  bool broken_ = false;  // a timeout or mismatch left peers at unknown steps
  uint64_t step_ = 0;
};

}  // namespace nemokern
