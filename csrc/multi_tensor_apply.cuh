// Multi-tensor apply (apex style): one kernel launch walks a list of tensors. The host cuts every tensor into chunks
// and writes a table, passed by value as the kernel's parameter, that maps each CUDA block to (tensor, chunk) and holds
// each tensor's addresses (DEPTH of them: param, sum, state...), element count and global noise offset.
//
// Table size: CUDA 12.1+ allows 32764 bytes of kernel parameters on Volta and newer (sm_70+), so the table holds
// hundreds of tensors and kMaxBlocks blocks; older toolkits keep apex's 4 KB. The chunk size is chosen so that the
// model's chunks fit in kMaxBlocks (at least kMinChunk elements per block), which makes the whole step ONE launch
// whenever the tensor count fits the table; beyond that the table is flushed and refilled (apex's scheme) and a
// tensor cut by a flush resumes in the next launch.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "cuda_check.cuh"

namespace fastdp {
namespace mta {

#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kParamBytes = 31 * 1024;  // of 32764: room for the functor's scalars
constexpr int kMaxBlocks = 1280;
#else
constexpr int kParamBytes = 3 * 1024 + 512;  // of 4096
constexpr int kMaxBlocks = 256;
#endif
constexpr int64_t kMinChunk = 4096;  // elements per block at least: 4 Philox groups per thread at 256 threads

template <int DEPTH>
struct Table {
  // per tensor: DEPTH pointers + numel + offset; per block: tensor index (uint16) + chunk index (int32)
  static constexpr int kMaxTensors = (kParamBytes - kMaxBlocks * 6 - 64) / (8 * DEPTH + 16);
  static_assert(kMaxTensors > 8 && kMaxTensors < 65536, "table layout");

  void* ptr[DEPTH][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t offset[kMaxTensors];
  uint16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

// Elements per chunk for tensors of these sizes: a multiple of 1024 (keeps 16-byte alignment of every chunk start),
// at least kMinChunk, and large enough that all chunks fit one table when the tensors do.
inline int64_t chunk_size(const std::vector<int64_t>& numels, int max_tensors) {
  int64_t total = 0, tensors = 0;
  for (int64_t n : numels) {
    total += n;
    tensors += n > 0;
  }
  const int64_t tensors_per_launch = std::min<int64_t>(tensors, max_tensors);
  const int64_t launches = std::max<int64_t>(1, (tensors + max_tensors - 1) / max_tensors);
  const int64_t per_launch = (total + launches - 1) / launches;
  const int64_t free_blocks = std::max<int64_t>(1, kMaxBlocks - tensors_per_launch);  // one partial chunk per tensor
  const int64_t want = (per_launch + free_blocks - 1) / free_blocks;
  return std::max(kMinChunk, (want + 1023) / 1024 * 1024);
}

// Fills tables and calls launch(table, nblocks, chunk) once per table (once for most models).
// ptrs[k][d] is the d-th address of tensor k (nullptr allowed where the kernel accepts it).
template <int DEPTH, typename Launch>
void apply(const std::vector<std::array<void*, DEPTH>>& ptrs, const std::vector<int64_t>& numels,
           const std::vector<int64_t>& offsets, Launch&& launch) {
  using T = Table<DEPTH>;
  const int64_t chunk = chunk_size(numels, T::kMaxTensors);
  T table;
  int nt = 0, nb = 0;
  const size_t ntensors = numels.size();
  for (size_t k = 0; k < ntensors; ++k) {
    const int64_t n = numels[k];
    if (n == 0) continue;
    for (int d = 0; d < DEPTH; ++d) table.ptr[d][nt] = ptrs[k][d];
    table.numel[nt] = n;
    table.offset[nt] = offsets[k];
    ++nt;
    const int64_t nchunks = (n + chunk - 1) / chunk;
    for (int64_t c = 0; c < nchunks; ++c) {
      table.block_tensor[nb] = uint16_t(nt - 1);
      table.block_chunk[nb] = int32_t(c);
      ++nb;
      const bool last_chunk = c == nchunks - 1;
      const bool tensors_full = nt == T::kMaxTensors && last_chunk;
      const bool blocks_full = nb == kMaxBlocks;
      if (tensors_full || blocks_full) {
        launch(table, nb, chunk);
        nb = 0;
        if (last_chunk) {
          nt = 0;
        } else {  // the current tensor continues in the next table, as its entry 0
          for (int d = 0; d < DEPTH; ++d) table.ptr[d][0] = table.ptr[d][nt - 1];
          table.numel[0] = table.numel[nt - 1];
          table.offset[0] = table.offset[nt - 1];
          nt = 1;
        }
      }
    }
  }
  if (nb > 0) launch(table, nb, chunk);
}

}  // namespace mta
}  // namespace fastdp
