// Launch helpers shared by the CUDA kernels: grid-stride loops over n items.
#pragma once

#include <algorithm>
#include <cstdint>

namespace cpr_d2 {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n items (at least 1, at most 2^20).
inline unsigned int blocks_for(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(wanted, 1 << 20)));
}

}  // namespace cpr_d2

#define CPR_GRID_STRIDE_LOOP(i, n)                                                        \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
