// Element-wise maths of the noisy step, shared by the CPU loops (noisy_step_cpu.cpp) and the CUDA kernel
// (noisy_step.cu) so that both follow torch.optim operation by operation. No torch.
//
//   g = (S + std * z) / B                 DPOptimizer: S.add_(z, alpha=std).div_(B)
//   SGD:  d = g + wd p;  buf = d (first step) | momentum buf + (1 - dampening) d;  d = d + momentum buf (Nesterov)
//         | buf;  p = p - lr d                                        (torch.optim.SGD, single-tensor path)
//   Adam: g = g + wd p (L2) | p = p (1 - lr wd) (AdamW);  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2;
//         p = p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)          (torch.optim.Adam/AdamW, amsgrad=False)
// Scalars are formed as torch forms them (Python floats, i.e. double, cast to the tensor dtype at the kernel).
#pragma once

#include <cmath>

#include "dispatch.h"
#include "ops.h"

namespace fastdp {

template <typename T>
struct SgdCoef {
  T std, batch, lr, momentum, one_minus_dampening, wd;
  bool nesterov, first_step, has_wd;

  static SgdCoef make(const NoiseArgs& n, const SgdArgs& a) {
    return SgdCoef{T(n.std),        T(n.batch_size), T(a.lr),     T(a.momentum),           T(1.0 - a.dampening),
                   T(a.weight_decay), a.nesterov,    a.first_step, a.weight_decay != 0.0};
  }
};

template <typename T>
struct AdamCoef {
  T std, batch, wd, decay;           // decay = 1 - lr * wd (AdamW)
  T w1, one_minus_w1, one_minus_b2;  // lerp weight 1 - beta1 and its complement; 1 - beta2
  T beta2, bc2_sqrt, eps, neg_step_size;
  bool l2, decoupled, small_w1;      // L2 weight decay; decoupled weight decay; lerp weight < 0.5

  static AdamCoef make(const NoiseArgs& n, const AdamArgs& a) {
    const double bc1 = 1.0 - std::pow(a.beta1, double(a.step));
    const double bc2 = 1.0 - std::pow(a.beta2, double(a.step));
    AdamCoef h{};
    h.std = T(n.std);
    h.batch = T(n.batch_size);
    h.wd = T(a.weight_decay);
    h.decay = T(1.0 - a.lr * a.weight_decay);
    h.w1 = T(1.0 - a.beta1);
    h.one_minus_w1 = T(1) - h.w1;  // torch's lerp forms 1 - weight in the tensor's dtype
    h.one_minus_b2 = T(1.0 - a.beta2);
    h.beta2 = T(a.beta2);
    h.bc2_sqrt = T(std::sqrt(bc2));
    h.eps = T(a.eps);
    h.neg_step_size = T(-(a.lr / bc1));
    h.l2 = a.weight_decay != 0.0 && !a.decoupled_weight_decay;
    h.decoupled = a.weight_decay != 0.0 && a.decoupled_weight_decay;
    h.small_w1 = std::abs(1.0 - a.beta1) < 0.5;
    return h;
  }
};

template <typename T>
FASTDP_HD T noisy_grad(T s, float z, T std, T batch) {
  return (s + std * T(z)) / batch;
}

// One parameter element; buf is unused without momentum.
template <typename T, bool kMomentum>
FASTDP_HD void sgd_update(T& p, T s, T& buf, float z, const SgdCoef<T>& h) {
  const T g = noisy_grad(s, z, h.std, h.batch);
  const T pj = p;
  T d = h.has_wd ? g + h.wd * pj : g;  // d_p = grad.add(param, alpha=wd)
  if (kMomentum) {
    const T b = h.first_step ? d : buf * h.momentum + h.one_minus_dampening * d;  // clone | mul_(m).add_(d, 1-damp)
    buf = b;
    d = h.nesterov ? d + h.momentum * b : b;
  }
  p = pj + (-h.lr) * d;  // param.add_(d_p, alpha=-lr)
}

template <typename T>
FASTDP_HD void adam_update(T& p, T s, T& m_, T& v_, float z, const AdamCoef<T>& h) {
  T g = noisy_grad(s, z, h.std, h.batch);
  T pj = p;
  g = h.l2 ? g + h.wd * pj : g;           // grad = grad.add(param, alpha=wd)
  pj = h.decoupled ? pj * h.decay : pj;   // param.mul_(1 - lr * wd)
  const T m0 = m_;
  const T m = h.small_w1 ? m0 + h.w1 * (g - m0) : g - (g - m0) * h.one_minus_w1;  // exp_avg.lerp_(grad, 1 - beta1)
  const T v = v_ * h.beta2 + (h.one_minus_b2 * g) * g;  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
  using std::sqrt;
  const T denom = sqrt(v) / h.bc2_sqrt + h.eps;  // (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
  m_ = m;
  v_ = v;
  p = pj + (h.neg_step_size * m) / denom;  // param.addcdiv_(exp_avg, denom, value=-step_size)
}

}  // namespace fastdp
