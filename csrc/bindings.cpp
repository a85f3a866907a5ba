// The one binding file of fastdp._C: op schemas (TORCH_LIBRARY(fastdp)), input checks, and the CPU and (when built
// with FASTDP_WITH_CUDA) CUDA implementations that hand raw pointers to the kernel files (ops.h). Importing the module
// `fastdp._C` runs the registrations; the ops are then torch.ops.fastdp.*.
//
// Only this file includes torch headers (and only light ones: torch/library.h and ATen/core), which keeps the
// extension's build time to one heavy translation unit.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "dispatch.h"
#include "ops.h"

#ifdef FASTDP_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastdp {
namespace {

using at::Tensor;

// ---- checks ---------------------------------------------------------------------------------------------------------

DType to_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::Float32;
    case at::kDouble:
      return DType::Float64;
    case at::kBFloat16:
      return DType::BFloat16;
    default:
      TORCH_CHECK(false, "fastdp: unsupported dtype ", t.scalar_type());
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_device(const Tensor& t, const c10::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " (the device of the first input), got ",
              t.device());
}

void check_contiguous(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got sizes ", t.sizes(), " strides ",
              t.strides(), " (call .contiguous())");
}

void check_finite(double x, const char* op, const char* name) {
  TORCH_CHECK(std::isfinite(x), op, ": ", name, " must be finite, got ", x);
}

// ---- clip-and-reduce ----------------------------------------------------------------------------------------------

struct ClipReduceArgs {
  Tensor weights;  // (B,) in Acc of grads' dtype, contiguous
  int64_t B, P;
};

ClipReduceArgs check_clip_reduce(const Tensor& grads, const Tensor& weights, const Tensor& out, const char* op) {
  TORCH_CHECK(grads.dim() >= 1, op, ": grads must be (B, ...) per-example gradients, got a 0-dim tensor");
  TORCH_CHECK(grads.scalar_type() == at::kFloat || grads.scalar_type() == at::kDouble ||
                  grads.scalar_type() == at::kBFloat16,
              op, ": grads must be float32, float64 or bfloat16, got ", grads.scalar_type());
  check_contiguous(grads, op, "grads");
  const int64_t B = grads.size(0);
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == B, op, ": weights must be (B,) = (", B,
              ",) like grads' first dimension, got sizes ", weights.sizes());
  TORCH_CHECK(at::isFloatingType(weights.scalar_type()), op, ": weights must be floating point, got ",
              weights.scalar_type());
  check_device(weights, grads.device(), op, "weights");
  check_device(out, grads.device(), op, "out");
  check_contiguous(out, op, "out");
  TORCH_CHECK(out.sizes() == grads.sizes().slice(1), op, ": out must have grads' per-example shape ",
              grads.sizes().slice(1), ", got ", out.sizes());
  const bool same = out.scalar_type() == grads.scalar_type();
  const bool widened = grads.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kFloat;
  TORCH_CHECK(same || widened, op, ": out must have grads' dtype ", grads.scalar_type(),
              " (or float32 for bfloat16 grads), got ", out.scalar_type());
  ClipReduceArgs a;
  a.weights = weights.to(acc_type(grads.scalar_type())).contiguous();
  a.B = B;
  a.P = out.numel();
  return a;
}

Tensor& clip_reduce_out_cpu(const Tensor& grads, const Tensor& weights, Tensor& out) {
  const char* op = "fastdp::clip_reduce (CPU)";
  TORCH_CHECK(grads.device().is_cpu(), op, ": grads must be a CPU tensor, got ", grads.device());
  const ClipReduceArgs a = check_clip_reduce(grads, weights, out, op);
  if (a.P == 0) return out;
  clip_reduce_cpu(to_dtype(grads), to_dtype(out), grads.data_ptr(), a.weights.data_ptr(), out.data_ptr(), a.B, a.P,
                  at::get_num_threads());
  return out;
}

Tensor clip_reduce_cpu_op(const Tensor& grads, const Tensor& weights) {
  TORCH_CHECK(grads.dim() >= 1, "fastdp::clip_reduce: grads must be (B, ...) per-example gradients, got 0-dim");
  Tensor out = at::empty(grads.sizes().slice(1), grads.options());
  return clip_reduce_out_cpu(grads, weights, out);
}

// ---- noisy optimizer step -----------------------------------------------------------------------------------------

// Common checks of the step ops; fills t (pointers, sizes, offsets) and returns the device of the parameters.
c10::Device check_step(const char* op, at::TensorList params, const c10::List<std::optional<Tensor>>& sums,
                       at::TensorList state1, const char* state1_name, at::TensorList state2, const char* state2_name,
                       at::IntArrayRef offsets, double noise_std, double batch_size, int64_t step, StepTensors& t) {
  const size_t n = params.size();
  TORCH_CHECK(sums.size() == n, op, ": sums must have one entry (a tensor or None) per parameter: ", n,
              " parameters, got ", sums.size(), " sums");
  TORCH_CHECK(offsets.size() == n, op, ": offsets must have one entry per parameter: ", n, " parameters, got ",
              offsets.size());
  TORCH_CHECK(state1_name == nullptr || state1.size() == n, op, ": ", (state1_name ? state1_name : ""),
              " must have one tensor per parameter: ", n, " parameters, got ", state1.size());
  TORCH_CHECK(state2_name == nullptr || state2.size() == n, op, ": ", (state2_name ? state2_name : ""),
              " must have one tensor per parameter: ", n, " parameters, got ", state2.size());
  TORCH_CHECK(noise_std >= 0 && std::isfinite(noise_std), op, ": noise_std (sigma * C) must be finite and >= 0, got ",
              noise_std);
  TORCH_CHECK(batch_size > 0 && std::isfinite(batch_size), op,
              ": expected_batch_size must be finite and > 0, got ", batch_size);
  TORCH_CHECK(step >= 0, op, ": step must be >= 0, got ", step);
  c10::Device device = n ? params[0].device() : c10::Device(c10::kCPU);
  at::ScalarType dtype = n ? params[0].scalar_type() : at::kFloat;
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": parameters must be float32 or float64, got ", dtype);
  t.dtype = dtype == at::kDouble ? DType::Float64 : DType::Float32;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (size_t k = 0; k < n; ++k) {
    const Tensor& p = params[k];
    TORCH_CHECK(p.defined(), op, ": parameter ", k, " is undefined");
    TORCH_CHECK(p.scalar_type() == dtype, op, ": all parameters of one call must share a dtype: parameter 0 is ",
                dtype, ", parameter ", k, " is ", p.scalar_type(), " (call once per dtype)");
    check_device(p, device, op, "every parameter");
    TORCH_CHECK(p.is_contiguous(), op, ": parameter ", k, " must be contiguous, got sizes ", p.sizes(), " strides ",
                p.strides());
    auto check_like = [&](const Tensor& x, const char* what) {
      TORCH_CHECK(x.defined(), op, ": ", what, " ", k, " is undefined");
      TORCH_CHECK(x.sizes() == p.sizes(), op, ": ", what, " ", k, " must have its parameter's shape ", p.sizes(),
                  ", got ", x.sizes());
      TORCH_CHECK(x.scalar_type() == dtype, op, ": ", what, " ", k, " must have its parameter's dtype ", dtype,
                  ", got ", x.scalar_type());
      TORCH_CHECK(x.device() == device, op, ": ", what, " ", k, " must be on ", device, ", got ", x.device());
      TORCH_CHECK(x.is_contiguous(), op, ": ", what, " ", k, " must be contiguous, got strides ", x.strides());
    };
    const std::optional<Tensor> s = sums[k];
    if (s.has_value() && s->defined()) {
      check_like(*s, "sum");
      t.sums.push_back(s->data_ptr());
    } else {
      t.sums.push_back(nullptr);
    }
    if (state1_name) {
      check_like(state1[k], state1_name);
      t.state1.push_back(state1[k].data_ptr());
    }
    if (state2_name) {
      check_like(state2[k], state2_name);
      t.state2.push_back(state2[k].data_ptr());
    }
    TORCH_CHECK(offsets[k] >= 0, op, ": offsets must be >= 0, got ", offsets[k], " for parameter ", k);
    t.params.push_back(p.data_ptr());
    t.numels.push_back(p.numel());
    t.offsets.push_back(offsets[k]);
    if (p.numel() > 0) ranges.emplace_back(offsets[k], offsets[k] + p.numel());
  }
  // overlapping ranges would give two parameters the same noise: correlated noise breaks the privacy analysis
  std::sort(ranges.begin(), ranges.end());
  for (size_t k = 1; k < ranges.size(); ++k) {
    TORCH_CHECK(ranges[k].first >= ranges[k - 1].second, op,
                ": the parameters' noise ranges [offset, offset + numel) overlap: [", ranges[k - 1].first, ", ",
                ranges[k - 1].second, ") and [", ranges[k].first, ", ", ranges[k].second,
                "); lay the tensors end to end (offset of tensor k = sum of the numels before it)");
  }
  return device;
}

NoiseArgs noise_args(double noise_std, double batch_size, int64_t seed, int64_t step) {
  NoiseArgs a;
  a.std = noise_std;
  a.batch_size = batch_size;
  a.seed = uint64_t(seed);  // the key is the seed's 64-bit two's complement pattern, as philox.py's masks
  a.step = uint64_t(step);
  return a;
}

SgdArgs sgd_args(const char* op, double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                 bool first_step) {
  check_finite(lr, op, "lr");
  check_finite(momentum, op, "momentum");
  check_finite(dampening, op, "dampening");
  check_finite(weight_decay, op, "weight_decay");
  TORCH_CHECK(momentum >= 0, op, ": momentum must be >= 0, got ", momentum);
  TORCH_CHECK(!nesterov || (momentum > 0 && dampening == 0), op,
              ": Nesterov momentum requires a momentum > 0 and zero dampening, got momentum ", momentum,
              ", dampening ", dampening);
  SgdArgs a;
  a.lr = lr;
  a.momentum = momentum;
  a.dampening = dampening;
  a.weight_decay = weight_decay;
  a.nesterov = nesterov;
  a.first_step = first_step;
  return a;
}

AdamArgs adam_args(const char* op, double lr, double beta1, double beta2, double eps, double weight_decay,
                   bool decoupled, int64_t adam_step) {
  check_finite(lr, op, "lr");
  check_finite(eps, op, "eps");
  check_finite(weight_decay, op, "weight_decay");
  TORCH_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, op, ": betas must be in [0, 1), got (", beta1, ", ",
              beta2, ")");
  TORCH_CHECK(adam_step >= 1, op, ": adam_step is the 1-based step count after this step's increment, got ",
              adam_step);
  AdamArgs a;
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.decoupled_weight_decay = decoupled;
  a.step = adam_step;
  return a;
}

constexpr const char* kSgdOp = "fastdp::noisy_sgd_step_";
constexpr const char* kAdamOp = "fastdp::noisy_adam_step_";

void noisy_sgd_step_cpu_op(at::TensorList params, const c10::List<std::optional<Tensor>>& sums,
                           at::TensorList momentum_buffers, at::IntArrayRef offsets, double noise_std,
                           double expected_batch_size, int64_t seed, int64_t step, double lr, double momentum,
                           double dampening, double weight_decay, bool nesterov, bool first_step) {
  const SgdArgs a = sgd_args(kSgdOp, lr, momentum, dampening, weight_decay, nesterov, first_step);
  StepTensors t;
  const bool with_buf = momentum != 0;
  const c10::Device dev = check_step(kSgdOp, params, sums, momentum_buffers, with_buf ? "momentum_buffers" : nullptr,
                                     {}, nullptr, offsets, noise_std, expected_batch_size, step, t);
  TORCH_CHECK(dev.is_cpu(), kSgdOp, ": the CPU kernel got tensors on ", dev);
  noisy_sgd_step_cpu(t, noise_args(noise_std, expected_batch_size, seed, step), a, at::get_num_threads());
}

void noisy_adam_step_cpu_op(at::TensorList params, const c10::List<std::optional<Tensor>>& sums,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::IntArrayRef offsets,
                            double noise_std, double expected_batch_size, int64_t seed, int64_t step, double lr,
                            double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                            int64_t adam_step) {
  const AdamArgs a = adam_args(kAdamOp, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, adam_step);
  StepTensors t;
  const c10::Device dev = check_step(kAdamOp, params, sums, exp_avgs, "exp_avgs", exp_avg_sqs, "exp_avg_sqs",
                                     offsets, noise_std, expected_batch_size, step, t);
  TORCH_CHECK(dev.is_cpu(), kAdamOp, ": the CPU kernel got tensors on ", dev);
  noisy_adam_step_cpu(t, noise_args(noise_std, expected_batch_size, seed, step), a, at::get_num_threads());
}

// ---- the noise stream ---------------------------------------------------------------------------------------------

void check_philox_out(const Tensor& out, int64_t step, int64_t offset, const char* op) {
  TORCH_CHECK(out.scalar_type() == at::kFloat, op, ": out must be float32, got ", out.scalar_type());
  check_contiguous(out, op, "out");
  TORCH_CHECK(step >= 0 && offset >= 0, op, ": step and offset must be >= 0, got step ", step, ", offset ", offset);
}

Tensor& philox_normal_cpu_op(Tensor& out, int64_t seed, int64_t step, int64_t offset) {
  check_philox_out(out, step, offset, "fastdp::philox_normal_");
  philox_normal_cpu(out.data_ptr<float>(), out.numel(), uint64_t(seed), uint64_t(step), offset,
                    at::get_num_threads());
  return out;
}

Tensor philox_words_op(int64_t ngroups, int64_t seed, int64_t step, int64_t group_offset) {
  TORCH_CHECK(ngroups >= 0 && step >= 0 && group_offset >= 0,
              "fastdp::philox_words: ngroups, step and group_offset must be >= 0, got ", ngroups, ", ", step, ", ",
              group_offset);
  Tensor out = at::empty({ngroups, 4}, at::TensorOptions().dtype(at::kLong));
  philox_words_cpu(out.data_ptr<int64_t>(), ngroups, uint64_t(seed), uint64_t(step), group_offset);
  return out;
}

// ---- per-example squared norms of a linear layer ----------------------------------------------------------------

Tensor linear_sq_norms_cpu_op(const Tensor& a, const Tensor& delta, const std::optional<Tensor>& grads) {
  (void)a;
  (void)delta;
  (void)grads;
  TORCH_CHECK(false,
              "fastdp::linear_sq_norms has a CUDA kernel only; on the CPU the engine's torch rules compute these "
              "norms (got CPU tensors)");
}

// ---- CUDA ---------------------------------------------------------------------------------------------------------

// ---- the shifted ghost norm's summed Gram matrix ----------------------------------------------------------------

// Bounds of shifted_gram's geometry, far above any convolution's: every size, offset and position then fits the
// kernels' 32-bit arithmetic (CUDA) and no product of the checks below overflows.
constexpr int64_t kMaxShiftAxis = int64_t(1) << 24;  // a spatial size, kernel, dilation or padding: below this
constexpr int64_t kMaxShiftSide = INT32_MAX;          // a side of gram or S (views * positions): at most this

// Checks of shifted_gram; the geometry with fewer than 3 spatial axes padded by axes of size 1 and kernel 1.
ShiftGeometry check_shifted_gram(const Tensor& gram, at::IntArrayRef in_shape, at::IntArrayRef out_shape,
                                 at::IntArrayRef kernel, at::IntArrayRef dilation, at::IntArrayRef padding,
                                 int64_t views, const char* op) {
  const size_t nd = in_shape.size();
  TORCH_CHECK(nd >= 1 && nd <= 3, op, ": in_shape must have 1 to 3 spatial sizes, got ", in_shape);
  TORCH_CHECK(out_shape.size() == nd && kernel.size() == nd && dilation.size() == nd && padding.size() == nd, op,
              ": out_shape, kernel, dilation and padding must have one entry per spatial axis of in_shape ", in_shape,
              ", got ", out_shape, ", ", kernel, ", ", dilation, ", ", padding);
  TORCH_CHECK(views >= 1 && views <= kMaxShiftSide, op, ": views must be in [1, 2^31), got ", views);
  ShiftGeometry g;
  g.views = views;
  for (size_t j = 0; j < nd; ++j) {
    const size_t k = j + 3 - nd;  // the given axes are the last ones
    TORCH_CHECK(in_shape[j] >= 1 && kernel[j] >= 1 && dilation[j] >= 1 && padding[j] >= 0, op,
                ": sizes, kernel and dilation must be >= 1 and padding >= 0, got in_shape ", in_shape, ", kernel ",
                kernel, ", dilation ", dilation, ", padding ", padding);
    TORCH_CHECK(in_shape[j] < kMaxShiftAxis && kernel[j] < kMaxShiftAxis && dilation[j] < kMaxShiftAxis &&
                    padding[j] < kMaxShiftAxis,
                op, ": sizes, kernel, dilation and padding must be below 2^24, got in_shape ", in_shape, ", kernel ",
                kernel, ", dilation ", dilation, ", padding ", padding);
    // the stride-1 convolution's output size: the shifts are only defined for it
    const int64_t expect = in_shape[j] + 2 * padding[j] - dilation[j] * (kernel[j] - 1);
    TORCH_CHECK(out_shape[j] == expect && expect >= 1, op, ": out_shape ", out_shape,
                " is not the stride-1 convolution's output size of in_shape ", in_shape, " (kernel ", kernel,
                ", dilation ", dilation, ", padding ", padding, ")");
    g.in[k] = in_shape[j];
    g.out[k] = out_shape[j];
    g.kernel[k] = kernel[j];
    g.dilation[k] = dilation[j];
    g.padding[k] = padding[j];
    // each factor is below 2^24 and each partial product at most 2^31: no product can overflow
    g.in_numel *= in_shape[j];
    g.out_numel *= out_shape[j];
    TORCH_CHECK(views * g.in_numel <= kMaxShiftSide, op,
                ": a side of gram, views * prod(in_shape), must be below 2^31, got views ", views, " and in_shape ",
                in_shape);
  }
  TORCH_CHECK(gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble, op,
              ": gram must be float32 or float64, got ", gram.scalar_type());
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == views * g.in_numel && gram.size(2) == views * g.in_numel, op,
              ": gram must be (n, views * I, views * I) = (n, ", views * g.in_numel, ", ", views * g.in_numel,
              ") for in_shape ", in_shape, " and views ", views, ", got sizes ", gram.sizes());
  check_contiguous(gram, op, "gram");
  return g;
}

Tensor shifted_gram_cpu_op(const Tensor& gram, at::IntArrayRef in_shape, at::IntArrayRef out_shape,
                           at::IntArrayRef kernel, at::IntArrayRef dilation, at::IntArrayRef padding, int64_t views) {
  const char* op = "fastdp::shifted_gram (CPU)";
  const ShiftGeometry g = check_shifted_gram(gram, in_shape, out_shape, kernel, dilation, padding, views, op);
  const int64_t n = gram.size(0), side = views * g.out_numel;
  Tensor out = at::empty({n, side, side}, gram.options());
  if (out.numel() == 0) return out;
  shifted_gram_cpu(to_dtype(gram), gram.data_ptr(), out.data_ptr(), g, n, at::get_num_threads());
  return out;
}

#ifdef FASTDP_WITH_CUDA
struct LinearNormArgs {
  int64_t B, T, d, p;
};

LinearNormArgs check_linear_sq_norms(const Tensor& a, const Tensor& delta, const std::optional<Tensor>& grads,
                                     const char* op) {
  TORCH_CHECK(a.dim() == 3 && delta.dim() == 3, op, ": a must be (B, T, d) and delta (B, T, p), got sizes ",
              a.sizes(), " and ", delta.sizes());
  TORCH_CHECK(a.size(0) == delta.size(0) && a.size(1) == delta.size(1), op,
              ": a and delta must agree in B and T, got sizes ", a.sizes(), " and ", delta.sizes());
  TORCH_CHECK(a.scalar_type() == delta.scalar_type(), op, ": a and delta must share a dtype, got ", a.scalar_type(),
              " and ", delta.scalar_type());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble || a.scalar_type() == at::kBFloat16,
              op, ": a and delta must be float32, float64 or bfloat16, got ", a.scalar_type());
  check_device(delta, a.device(), op, "delta");
  check_contiguous(a, op, "a");
  check_contiguous(delta, op, "delta");
  LinearNormArgs r{a.size(0), a.size(1), a.size(2), delta.size(2)};
  if (grads.has_value() && grads->defined()) {
    const Tensor& g = *grads;
    TORCH_CHECK(g.dim() == 3 && g.size(0) == r.B && g.size(1) == r.p && g.size(2) == r.d, op,
                ": grads must be (B, p, d) = (", r.B, ", ", r.p, ", ", r.d, "), got sizes ", g.sizes());
    TORCH_CHECK(g.scalar_type() == a.scalar_type(), op, ": grads must have a's dtype ", a.scalar_type(), ", got ",
                g.scalar_type());
    check_device(g, a.device(), op, "grads");
    check_contiguous(g, op, "grads");
  }
  return r;
}

void* current_stream(const c10::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()).stream(); }

Tensor& clip_reduce_out_cuda(const Tensor& grads, const Tensor& weights, Tensor& out) {
  const char* op = "fastdp::clip_reduce (CUDA)";
  TORCH_CHECK(grads.is_cuda(), op, ": grads must be a CUDA tensor, got ", grads.device());
  const ClipReduceArgs a = check_clip_reduce(grads, weights, out, op);
  if (a.P == 0) return out;
  const c10::cuda::CUDAGuard guard(grads.device());
  // the splits' partial sums, in the weights' (accumulation) dtype; none when the columns fill the GPU
  const int64_t ws = clip_reduce_workspace_elems(a.B, a.P);
  Tensor workspace = ws > 0 ? at::empty({ws}, a.weights.options()) : Tensor();
  clip_reduce_cuda(to_dtype(grads), to_dtype(out), grads.data_ptr(), a.weights.data_ptr(), out.data_ptr(),
                   ws > 0 ? workspace.data_ptr() : nullptr, a.B, a.P, current_stream(grads.device()));
  return out;
}

Tensor clip_reduce_cuda_op(const Tensor& grads, const Tensor& weights) {
  TORCH_CHECK(grads.dim() >= 1, "fastdp::clip_reduce: grads must be (B, ...) per-example gradients, got 0-dim");
  Tensor out = at::empty(grads.sizes().slice(1), grads.options());
  return clip_reduce_out_cuda(grads, weights, out);
}

void noisy_sgd_step_cuda_op(at::TensorList params, const c10::List<std::optional<Tensor>>& sums,
                            at::TensorList momentum_buffers, at::IntArrayRef offsets, double noise_std,
                            double expected_batch_size, int64_t seed, int64_t step, double lr, double momentum,
                            double dampening, double weight_decay, bool nesterov, bool first_step) {
  const SgdArgs a = sgd_args(kSgdOp, lr, momentum, dampening, weight_decay, nesterov, first_step);
  StepTensors t;
  const bool with_buf = momentum != 0;
  const c10::Device dev = check_step(kSgdOp, params, sums, momentum_buffers, with_buf ? "momentum_buffers" : nullptr,
                                     {}, nullptr, offsets, noise_std, expected_batch_size, step, t);
  if (params.empty()) return;
  TORCH_CHECK(dev.is_cuda(), kSgdOp, ": the CUDA kernel got tensors on ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  noisy_sgd_step_cuda(t, noise_args(noise_std, expected_batch_size, seed, step), a, current_stream(dev));
}

void noisy_adam_step_cuda_op(at::TensorList params, const c10::List<std::optional<Tensor>>& sums,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::IntArrayRef offsets,
                             double noise_std, double expected_batch_size, int64_t seed, int64_t step, double lr,
                             double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                             int64_t adam_step) {
  const AdamArgs a = adam_args(kAdamOp, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, adam_step);
  StepTensors t;
  const c10::Device dev = check_step(kAdamOp, params, sums, exp_avgs, "exp_avgs", exp_avg_sqs, "exp_avg_sqs",
                                     offsets, noise_std, expected_batch_size, step, t);
  if (params.empty()) return;
  TORCH_CHECK(dev.is_cuda(), kAdamOp, ": the CUDA kernel got tensors on ", dev);
  const c10::cuda::CUDAGuard guard(dev);
  noisy_adam_step_cuda(t, noise_args(noise_std, expected_batch_size, seed, step), a, current_stream(dev));
}

Tensor& philox_normal_cuda_op(Tensor& out, int64_t seed, int64_t step, int64_t offset) {
  check_philox_out(out, step, offset, "fastdp::philox_normal_");
  TORCH_CHECK(out.is_cuda(), "fastdp::philox_normal_: out must be a CUDA tensor, got ", out.device());
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(out.device());
  philox_normal_cuda(out.data_ptr<float>(), out.numel(), uint64_t(seed), uint64_t(step), offset,
                     current_stream(out.device()));
  return out;
}

Tensor linear_sq_norms_cuda_op(const Tensor& a, const Tensor& delta, const std::optional<Tensor>& grads) {
  const char* op = "fastdp::linear_sq_norms";
  TORCH_CHECK(a.is_cuda(), op, ": a must be a CUDA tensor, got ", a.device());
  const LinearNormArgs r = check_linear_sq_norms(a, delta, grads, op);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto acc = a.options().dtype(acc_type(a.scalar_type()));
  Tensor out = at::empty({r.B}, acc);
  Tensor workspace = at::empty({std::max<int64_t>(1, linear_sq_norm_workspace_elems(r.B, r.d, r.p))}, acc);
  void* g = (grads.has_value() && grads->defined()) ? grads->data_ptr() : nullptr;
  linear_sq_norm_cuda(to_dtype(a), a.data_ptr(), delta.data_ptr(), g, out.data_ptr(), workspace.data_ptr(), r.B, r.T,
                      r.d, r.p, current_stream(a.device()));
  return out;
}

Tensor shifted_gram_cuda_op(const Tensor& gram, at::IntArrayRef in_shape, at::IntArrayRef out_shape,
                            at::IntArrayRef kernel, at::IntArrayRef dilation, at::IntArrayRef padding, int64_t views) {
  const char* op = "fastdp::shifted_gram (CUDA)";
  TORCH_CHECK(gram.is_cuda(), op, ": gram must be a CUDA tensor, got ", gram.device());
  const ShiftGeometry g = check_shifted_gram(gram, in_shape, out_shape, kernel, dilation, padding, views, op);
  const c10::cuda::CUDAGuard guard(gram.device());
  const int64_t n = gram.size(0), side = views * g.out_numel;
  Tensor out = at::empty({n, side, side}, gram.options());
  if (out.numel() == 0) return out;
  shifted_gram_cuda(to_dtype(gram), gram.data_ptr(), out.data_ptr(), g, n, current_stream(gram.device()));
  return out;
}
#endif

bool compiled_with_cuda() {
#ifdef FASTDP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace fastdp

TORCH_LIBRARY(fastdp, m) {
  // S = sum_i weights[i] * grads[i] over the first dimension (the clip-and-reduce of kept per-example gradients)
  m.def("clip_reduce(Tensor grads, Tensor weights) -> Tensor");
  // the out / inplace tags let AOTAutograd functionalize the ops returning their mutated argument (torch.compile)
  m.def("clip_reduce.out(Tensor grads, Tensor weights, *, Tensor(a!) out) -> Tensor(a!)", {at::Tag::out});
  // g = (S + noise_std * z) / expected_batch_size with z the Philox stream, then torch.optim.SGD / Adam(W) in place
  m.def(
      "noisy_sgd_step_(Tensor(a!)[] params, Tensor?[] sums, Tensor(b!)[] momentum_buffers, int[] offsets, "
      "float noise_std, float expected_batch_size, int seed, int step, float lr, float momentum, float dampening, "
      "float weight_decay, bool nesterov, bool first_step) -> ()");
  m.def(
      "noisy_adam_step_(Tensor(a!)[] params, Tensor?[] sums, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "int[] offsets, float noise_std, float expected_batch_size, int seed, int step, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled_weight_decay, int adam_step) -> ()");
  // the noise stream itself: out[k] = z(offset + k); words: the uint32 Philox outputs of groups (as int64)
  m.def("philox_normal_(Tensor(a!) out, int seed, int step, int offset) -> Tensor(a!)", {at::Tag::inplace});
  m.def("philox_words(int ngroups, int seed, int step, int group_offset) -> Tensor");
  // ||delta_b^T a_b||_F^2 per example b for a (B, T, d), delta (B, T, p); optionally writes G_b into grads
  m.def("linear_sq_norms(Tensor a, Tensor delta, Tensor(a!)? grads=None) -> Tensor");
  // the shifted ghost norm's Gram matrix summed over a stride-1 convolution's kernel offsets (ops.h)
  m.def(
      "shifted_gram(Tensor gram, int[] in_shape, int[] out_shape, int[] kernel, int[] dilation, int[] padding, "
      "int views) -> Tensor");
  m.def("compiled_with_cuda() -> bool", &fastdp::compiled_with_cuda);
}

TORCH_LIBRARY_IMPL(fastdp, CPU, m) {
  m.impl("clip_reduce", &fastdp::clip_reduce_cpu_op);
  m.impl("clip_reduce.out", &fastdp::clip_reduce_out_cpu);
  m.impl("noisy_sgd_step_", &fastdp::noisy_sgd_step_cpu_op);
  m.impl("noisy_adam_step_", &fastdp::noisy_adam_step_cpu_op);
  m.impl("philox_normal_", &fastdp::philox_normal_cpu_op);
  m.impl("linear_sq_norms", &fastdp::linear_sq_norms_cpu_op);
  m.impl("shifted_gram", &fastdp::shifted_gram_cpu_op);
}

// no tensor inputs to dispatch on: CompositeExplicitAutograd (a catch-all kernel would be traced into, on fakes)
TORCH_LIBRARY_IMPL(fastdp, CompositeExplicitAutograd, m) { m.impl("philox_words", &fastdp::philox_words_op); }

#ifdef FASTDP_WITH_CUDA
TORCH_LIBRARY_IMPL(fastdp, CUDA, m) {
  m.impl("clip_reduce", &fastdp::clip_reduce_cuda_op);
  m.impl("clip_reduce.out", &fastdp::clip_reduce_out_cuda);
  m.impl("noisy_sgd_step_", &fastdp::noisy_sgd_step_cuda_op);
  m.impl("noisy_adam_step_", &fastdp::noisy_adam_step_cuda_op);
  m.impl("philox_normal_", &fastdp::philox_normal_cuda_op);
  m.impl("linear_sq_norms", &fastdp::linear_sq_norms_cuda_op);
  m.impl("shifted_gram", &fastdp::shifted_gram_cuda_op);
}
#endif

// `import fastdp._C` loads this library (running the registrations above); the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "fastdp's compiled ops, registered as torch.ops.fastdp.*", -1, nullptr, nullptr,
      nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
