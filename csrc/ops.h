// Raw-pointer entry points of the CPU (.cpp) and CUDA (.cu) kernels. Plain C++: no torch, no CUDA headers (streams
// travel as void*), so the kernel files compile without torch and bindings.cpp is the only file that sees both.
// Every function assumes the checks of bindings.cpp passed: contiguous buffers of the stated sizes and dtypes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "dispatch.h"

namespace fastdp {

// ---- clip-and-reduce: out[j] = sum_i w[i] * grads[i, j], grads (B, P) row-major --------------------------------
// weights are Acc (float32 for float32/bfloat16 grads, float64 for float64); out is `out_dtype` (grads' dtype, or
// float32 for bfloat16 grads).
void clip_reduce_cpu(DType grads_dtype, DType out_dtype, const void* grads, const void* weights, void* out, int64_t B,
                     int64_t P, int num_threads);
// CUDA: the rows are split over blocks when the columns alone cannot fill the GPU; the splits' partial sums need a
// workspace of clip_reduce_workspace_elems(B, P) Acc elements (0: none; for the current device's SM count).
int64_t clip_reduce_workspace_elems(int64_t B, int64_t P);
void clip_reduce_cuda(DType grads_dtype, DType out_dtype, const void* grads, const void* weights, void* out,
                      void* workspace, int64_t B, int64_t P, void* stream);

// ---- noisy optimizer step over a list of tensors ---------------------------------------------------------------
// All tensors of one call share `dtype` (float32 or float64). Tensor k has numels[k] elements and occupies noise
// elements offsets[k] .. offsets[k] + numels[k] - 1 of the step's stream.
struct StepTensors {
  DType dtype = DType::Float32;
  std::vector<void*> params;
  std::vector<const void*> sums;  // clipped sums S; nullptr = no contribution (an empty Poisson batch)
  std::vector<void*> state1;      // SGD momentum buffer / Adam exp_avg (empty for SGD without momentum)
  std::vector<void*> state2;      // Adam exp_avg_sq (empty for SGD)
  std::vector<int64_t> numels;
  std::vector<int64_t> offsets;
};

// g = (S + std * z) / batch_size, z the Philox stream of (seed, step); std == 0 draws no noise.
struct NoiseArgs {
  double std = 0.0;
  double batch_size = 1.0;
  uint64_t seed = 0;
  uint64_t step = 0;
};

// torch.optim.SGD: d = g + wd * p; buf = d (first step) or momentum * buf + (1 - dampening) * d;
// d = d + momentum * buf (nesterov) or buf; p -= lr * d.
struct SgdArgs {
  double lr = 0.0, momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
  bool nesterov = false, first_step = false;
};

// torch.optim.Adam / AdamW (amsgrad=False): t = `step` (1-based, after the increment), bias corrections from it.
struct AdamArgs {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  bool decoupled_weight_decay = false;
  int64_t step = 1;
};

void noisy_sgd_step_cpu(const StepTensors& t, const NoiseArgs& noise, const SgdArgs& args, int num_threads);
void noisy_adam_step_cpu(const StepTensors& t, const NoiseArgs& noise, const AdamArgs& args, int num_threads);
void noisy_sgd_step_cuda(const StepTensors& t, const NoiseArgs& noise, const SgdArgs& args, void* stream);
void noisy_adam_step_cuda(const StepTensors& t, const NoiseArgs& noise, const AdamArgs& args, void* stream);

// ---- the noise stream itself (tests, other backends) --------------------------------------------------------------
// out[k] = z(offset + k), float32.
void philox_normal_cpu(float* out, int64_t n, uint64_t seed, uint64_t step, int64_t offset, int num_threads);
void philox_normal_cuda(float* out, int64_t n, uint64_t seed, uint64_t step, int64_t offset, void* stream);
// out[4k + j] = word x_j of group group_offset + k (as int64), the uint32 words before any float arithmetic.
void philox_words_cpu(int64_t* out, int64_t ngroups, uint64_t seed, uint64_t step, int64_t group_offset);

// ---- per-example squared norm of a linear layer's weight gradient (CUDA) -----------------------------------------
// a (B, T, d), delta (B, T, p): out[b] = ||delta_b^T a_b||_F^2 without materialising the (p, d) gradients, unless
// grads != nullptr, where G_b = delta_b^T a_b is also written (B, p, d) in a's dtype. out and workspace are Acc.
int64_t linear_sq_norm_workspace_elems(int64_t B, int64_t d, int64_t p);
void linear_sq_norm_cuda(DType dtype, const void* a, const void* delta, void* grads, void* out, void* workspace,
                         int64_t B, int64_t T, int64_t d, int64_t p, void* stream);

// ---- the shifted ghost norm's summed Gram matrix (stride-1 convolutions) -----------------------------------------
// gram (n, K I, K I): X, the input's Gram matrix over channels, K views of I = in[0] in[1] in[2] positions;
// out (n, K O, K O), O = out[0] out[1] out[2]: out[b, k1, t, k2, s] = sum_o X[b, k1, t + a_o, k2, s + a_o] with
// a_o = o * dilation - padding per axis, zero where an index falls outside the input. Fewer than 3 spatial axes are
// padded with axes of size 1 and kernel 1 (bindings.cpp), so the kernels see three.
struct ShiftGeometry {
  int64_t in[3] = {1, 1, 1}, out[3] = {1, 1, 1};
  int64_t kernel[3] = {1, 1, 1}, dilation[3] = {1, 1, 1}, padding[3] = {0, 0, 0};
  int64_t views = 1;
  int64_t in_numel = 1, out_numel = 1;
};
void shifted_gram_cpu(DType dtype, const void* gram, void* out, const ShiftGeometry& g, int64_t n, int num_threads);
void shifted_gram_cuda(DType dtype, const void* gram, void* out, const ShiftGeometry& g, int64_t n, void* stream);

}  // namespace fastdp
