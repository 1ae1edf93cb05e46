// Host-side pieces both all-reduce back ends share: see collective.h.
#include "collective.h"

#include <sstream>

namespace nemokern {

size_t dtype_size(int dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kBFloat16: return 2;
  }
  throw std::invalid_argument("nemokern all-reduce: dtype code " + std::to_string(dtype) +
                              " is not supported; use 0 (float32) or 1 (bfloat16)");
}

void throw_collective_error(const std::string& backend, int rank, int world, double timeout_s,
                            const CollectiveError& e) {
  std::ostringstream s;
  s << "nemokern all_reduce (" << backend << ", " << world << " ranks): rank " << rank;
  if (e.kind == kSizeMismatch) {
    s << " reduces " << e.numel << " elements of dtype code " << e.dtype << " but rank "
      << e.peer << " reduces " << e.peer_numel << " of dtype code " << e.peer_dtype
      << " (step " << e.step << "); every rank must pass the same shape and dtype";
    throw std::invalid_argument(s.str());
  }
  s << " timed out after " << timeout_s << " s waiting for rank " << e.peer << " at step "
    << e.step << "; that rank crashed or did not call all_reduce. "
    << "Set NEMOKERN_ALLREDUCE_TIMEOUT (seconds) to change the limit.";
  throw CollectiveTimeout(s.str());
}

void check_group(const std::string& backend, int rank, int world_size) {
  if (world_size < 1 || world_size > kMaxRanks)
    throw std::invalid_argument("nemokern " + backend + " all-reduce: world_size must be in 1.." +
                                std::to_string(kMaxRanks) + " (one node), got " +
                                std::to_string(world_size));
  if (rank < 0 || rank >= world_size)
    throw std::invalid_argument("nemokern " + backend + " all-reduce: rank " +
                                std::to_string(rank) + " is outside 0.." +
                                std::to_string(world_size - 1));
}

}  // namespace nemokern
