// Error checks of the CUDA launchers (no torch): a failed launch throws std::runtime_error, which the dispatcher
// turns into a Python RuntimeError.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace fastdp {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastdp: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// After a <<<...>>> launch: configuration errors surface here, execution errors at the next synchronisation.
inline void check_launch(const char* what) { cuda_check(cudaGetLastError(), what); }

}  // namespace fastdp
