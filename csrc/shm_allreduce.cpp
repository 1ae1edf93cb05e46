// CPU shared-memory all-reduce: see shm_allreduce.h for the step/flag protocol.
#include "shm_allreduce.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <sstream>

namespace nemokern {

namespace {

constexpr uint64_t kMagic = 0x6e656d6f4b415231ull;  // "nemoKAR1"
constexpr size_t kPage = 4096;
constexpr size_t kLine = 128;  // two cache lines: adjacent-line prefetch must not false-share
constexpr size_t kBlock = 1024;  // elements summed per stack tile (fits L1 with kMaxRanks)

struct Header {
  uint64_t magic;
  uint64_t world;
  uint64_t chunk_bytes;
};

size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

std::string errno_text(const char* what, const std::string& name) {
  std::ostringstream s;
  s << "nemokern shm all-reduce: " << what << " '" << name << "' failed: " << std::strerror(errno);
  return s.str();
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even, NaN -> canonical quiet NaN: the same rule as torch's float->bfloat16,
// so a Python fixed-order reference (sum in fp32, then .to(bfloat16)) matches bit for bit.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t rounded = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : rounded;
}

// acc[0:m] (fp32) = sum over ranks of src[r][b:b+m], rank by rank in the fixed order 0..nsrc-1,
// then out = store(acc), and out2 too when given (one store pass instead of a later copy).
// out may alias a source: each tile is fully summed before it is stored. Vectorisation is across elements only, so the result does not depend
// on the ISA the clone below picked. No -ffast-math anywhere: reassociating the rank order
// would break bitwise agreement between ranks and with the fixed-order reference.
template <typename T, typename Load, typename Store>
__attribute__((always_inline)) inline void sum_tiles(T* out, T* out2, const T* const* src,
                                                     int nsrc, size_t n, Load load, Store store) {
  float acc[kBlock];
  for (size_t b = 0; b < n; b += kBlock) {
    const size_t m = std::min(kBlock, n - b);
    const T* s0 = src[0] + b;
    for (size_t i = 0; i < m; ++i) acc[i] = load(s0[i]);
    for (int r = 1; r < nsrc; ++r) {
      const T* s = src[r] + b;
      for (size_t i = 0; i < m; ++i) acc[i] += load(s[i]);
    }
    T* o = out + b;
    for (size_t i = 0; i < m; ++i) o[i] = store(acc[i]);
    if (out2) std::memcpy(out2 + b, o, m * sizeof(T));  // still in L1
  }
}

__attribute__((target_clones("avx2", "default")))
void sum_f32(float* out, float* out2, const float* const* src, int nsrc, size_t n) {
  auto same = [](float v) { return v; };
  sum_tiles(out, out2, src, nsrc, n, same, same);
}

__attribute__((target_clones("avx2", "default")))
void sum_bf16(uint16_t* out, uint16_t* out2, const uint16_t* const* src, int nsrc, size_t n) {
  sum_tiles(out, out2, src, nsrc, n, bf16_to_f32, f32_to_bf16);
}

// out[0:n] (and out2[0:n] unless null) = sum over ranks of srcs[r][0:n], in rank order.
void sum_ranks(void* out, void* out2, const char* const* srcs, int nsrc, size_t n, int dtype) {
  if (dtype == kFloat32)
    sum_f32(static_cast<float*>(out), static_cast<float*>(out2),
            reinterpret_cast<const float* const*>(srcs), nsrc, n);
  else
    sum_bf16(static_cast<uint16_t*>(out), static_cast<uint16_t*>(out2),
             reinterpret_cast<const uint16_t* const*>(srcs), nsrc, n);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace

ShmAllReduce::ShmAllReduce(const std::string& name, int rank, int world_size, size_t chunk_bytes,
                           bool create, double timeout_s, size_t one_shot_max_bytes)
    : name_(name), rank_(rank), world_(world_size), one_shot_max_(one_shot_max_bytes),
      timeout_s_(timeout_s) {
  static_assert(sizeof(SignalSlot) <= kLine, "a rank's signal slot must fit kLine bytes");
  check_group("shm", rank, world_size);
  if (chunk_bytes < kPage)
    throw std::invalid_argument("nemokern shm all-reduce: chunk_bytes must be at least 4096, got " +
                                std::to_string(chunk_bytes));
  if (!(timeout_s > 0))
    throw std::invalid_argument("nemokern shm all-reduce: timeout must be > 0 seconds");
  if (name.size() < 2 || name[0] != '/' || name.find('/', 1) != std::string::npos)
    throw std::invalid_argument("nemokern shm all-reduce: segment name must look like '/name', got '" +
                                name + "'");
  chunk_bytes_ = round_up(chunk_bytes, kPage);
  const size_t data_off = round_up(kPage + kLine * world_size, kPage);
  map_bytes_ = data_off + chunk_bytes_ * 2 * world_size;

  int fd = create ? shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600)
                  : shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) throw std::runtime_error(errno_text("shm_open", name));
  if (create) {
    linked_ = true;
    lock_fd_ = fd;  // kept open: it holds the liveness lock until unlink()
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
      std::string msg = errno_text("flock", name);
      unlink();
      throw std::runtime_error(msg);
    }
    if (ftruncate(fd, static_cast<off_t>(map_bytes_)) != 0) {
      std::string msg = errno_text("ftruncate (is /dev/shm full?)", name);
      unlink();
      throw std::runtime_error(msg);
    }
  } else {
    struct stat st;
    if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) != map_bytes_) {
      close(fd);
      throw std::runtime_error("nemokern shm all-reduce: segment '" + name +
                               "' has the wrong size: ranks disagree on world size or chunk bytes");
    }
  }
  void* p = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (!create) close(fd);
  if (p == MAP_FAILED) {
    std::string msg = errno_text("mmap", name);
    if (create) unlink();
    throw std::runtime_error(msg);
  }
  base_ = static_cast<char*>(p);
  auto* h = reinterpret_cast<Header*>(base_);
  if (create) {
    h->world = world_size;
    h->chunk_bytes = chunk_bytes_;
    __atomic_store_n(&h->magic, kMagic, __ATOMIC_RELEASE);
  } else if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != kMagic ||
             h->world != static_cast<uint64_t>(world_size) || h->chunk_bytes != chunk_bytes_) {
    munmap(base_, map_bytes_);
    base_ = nullptr;
    throw std::runtime_error("nemokern shm all-reduce: segment '" + name +
                             "' was made for another world size / chunk size or is not ours");
  }
}

ShmAllReduce::~ShmAllReduce() {
  if (linked_) unlink();
  if (base_) munmap(base_, map_bytes_);
}

void ShmAllReduce::unlink() {
  if (linked_) {
    shm_unlink(name_.c_str());
    linked_ = false;
  }
  if (lock_fd_ >= 0) {  // the name is gone: nobody needs the liveness lock any more
    close(lock_fd_);
    lock_fd_ = -1;
  }
}

SignalSlot* ShmAllReduce::slot(int r) const {
  return reinterpret_cast<SignalSlot*>(base_ + kPage + kLine * r);
}

char* ShmAllReduce::region(int r, int parity) const {
  const size_t data_off = round_up(kPage + kLine * world_, kPage);
  return base_ + data_off + chunk_bytes_ * (2 * static_cast<size_t>(r) + parity);
}

void ShmAllReduce::arrive(uint64_t step, int64_t numel, int dtype) {
  SignalSlot* me = slot(rank_);
  me->meta[step & 1].numel = numel;
  me->meta[step & 1].dtype = dtype;
  __atomic_store_n(&me->step, step, __ATOMIC_RELEASE);
}

void ShmAllReduce::wait_all(uint64_t step, int64_t numel, int dtype) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  CollectiveError e{kNoError, 0, step, numel, dtype, 0, 0};
  for (int p = 0; p < world_ && e.kind == kNoError; ++p) {
    if (p == rank_) continue;
    SignalSlot* peer = slot(p);
    for (uint64_t spins = 0; __atomic_load_n(&peer->step, __ATOMIC_ACQUIRE) < step; ++spins) {
      if (spins < 256) {
        cpu_relax();
        continue;
      }
      // Ranks may outnumber cores (4 ranks on 2 cores): yield so the peer we wait for can run.
      sched_yield();
      if ((spins & 127) == 0) {
        const double waited = std::chrono::duration<double>(clock::now() - start).count();
        if (waited > 0.01) {  // a long wait: stop burning a core another rank may need
          struct timespec ts = {0, 50000};
          nanosleep(&ts, nullptr);
        }
        if (waited > timeout_s_) {
          e.kind = kPeerTimeout;
          e.peer = p;
          break;
        }
      }
    }
    const SignalSlot::Meta& m = peer->meta[step & 1];
    if (e.kind == kNoError && !same_call(m, numel, dtype)) {
      e = CollectiveError{kSizeMismatch, p, step, numel, dtype, m.numel, m.dtype};
    }
  }
  if (e.kind != kNoError) {
    broken_ = true;  // peers are at unknown steps now
    throw_collective_error("shm", rank_, world_, timeout_s_, e);
  }
}

void ShmAllReduce::check_usable() const {
  if (!base_) throw std::runtime_error("nemokern shm all-reduce: workspace is closed");
  if (broken_)
    throw std::runtime_error(
        "nemokern all_reduce (shm): an earlier timeout or mismatch left the ranks out of step; "
        "this workspace cannot be used again (recreate the process group)");
}

void ShmAllReduce::one_shot(char* data, size_t n, int dtype) {
  const size_t bytes = n * dtype_size(dtype);
  const uint64_t s = ++step_;
  const int par = s & 1;
  std::memcpy(region(rank_, par), data, bytes);
  arrive(s, static_cast<int64_t>(n), dtype);
  wait_all(s, static_cast<int64_t>(n), dtype);
  const char* srcs[kMaxRanks];
  for (int r = 0; r < world_; ++r) srcs[r] = region(r, par);
  sum_ranks(data, nullptr, srcs, world_, n, dtype);
}

// Reduce-scatter then all-gather of one chunk: rank j sums segment j of every rank's copy into
// its region of the other parity (the next step's), then everyone copies all segments out.
// Nobody but rank r reads segment r of rank r's input, so that part is read in place and never
// copied into the workspace.
void ShmAllReduce::two_shot_chunk(char* data, size_t n, int dtype, int64_t total, size_t esize) {
  // 64-byte aligned segments keep the vector loops and the copies on whole cache lines.
  const size_t align = 64 / esize;
  const size_t seg = round_up((n + world_ - 1) / world_, align);
  const size_t lo = std::min(n, seg * rank_), hi = std::min(n, seg * (rank_ + 1));

  const uint64_t s = ++step_;
  const int par = s & 1;
  char* mine = region(rank_, par);
  std::memcpy(mine, data, lo * esize);
  std::memcpy(mine + hi * esize, data + hi * esize, (n - hi) * esize);
  arrive(s, total, dtype);
  wait_all(s, total, dtype);
  if (hi > lo) {
    const char* srcs[kMaxRanks];
    for (int r = 0; r < world_; ++r) srcs[r] = (r == rank_ ? data : region(r, par)) + lo * esize;
    // the result lands in place (the input's own segment, read only here) and in the workspace
    sum_ranks(data + lo * esize, region(rank_, par ^ 1) + lo * esize, srcs, world_, hi - lo,
              dtype);
  }

  const uint64_t s2 = ++step_;
  arrive(s2, total, dtype);
  wait_all(s2, total, dtype);
  for (int r = 0; r < world_; ++r) {
    const size_t a = std::min(n, seg * r), b = std::min(n, seg * (r + 1));
    if (b > a && r != rank_) std::memcpy(data + a * esize, region(r, par ^ 1) + a * esize, (b - a) * esize);
  }
}

void ShmAllReduce::all_reduce(uintptr_t ptr, int64_t numel, int dtype) {
  const size_t esize = dtype_size(dtype);
  if (numel < 0) throw std::invalid_argument("nemokern all_reduce: numel must be >= 0");
  check_usable();
  if (numel == 0 || world_ == 1) return;
  if (ptr == 0) throw std::invalid_argument("nemokern all_reduce: null data pointer");
  char* data = reinterpret_cast<char*>(ptr);
  const size_t n = static_cast<size_t>(numel), bytes = n * esize;
  if (bytes <= one_shot_max_ && bytes <= chunk_bytes_) {
    one_shot(data, n, dtype);
    return;
  }
  const size_t chunk_elems = chunk_bytes_ / esize;
  for (size_t off = 0; off < n; off += chunk_elems)
    two_shot_chunk(data + off * esize, std::min(chunk_elems, n - off), dtype, numel, esize);
}

}  // namespace nemokern
