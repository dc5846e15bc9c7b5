// Per-element Adam/AdamW arithmetic shared by every CPU path (scalar, AVX2, AVX-512).
//
// The operation order mirrors torch.optim's single-tensor Adam
// (torch/optim/adam.py::_single_tensor_adam) op for op, so that our results agree with
// torch.optim.Adam / AdamW to the last bit or two rather than to a loose tolerance:
//
//   g  = grad * grad_scale                        (unscale + clip, folded into the read)
//   g  = fma(p, wd, g)                            L2 only: grad.add(param, alpha=wd)
//   p  = p * (1 - lr * wd)                        decoupled only: param.mul_(1 - lr*wd)
//   m  = fma(1 - beta1, g - m, m)                 exp_avg.lerp_(grad, 1 - beta1)
//   v  = fma((1 - beta2) * g, g, v * beta2)       exp_avg_sq.mul_(beta2).addcmul_(g, g, 1-beta2)
//   d  = sqrt(v) / sqrt(1 - beta2^t) + eps        (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
//   p  = p + (-lr / (1 - beta1^t) * m) / d        param.addcdiv_(m, d, value=-step_size)
//
// The lerp, the L2 add and the addcmul use an FMA because ATen's vectorised kernels do
// (LerpKernel.cpp lerp_vec, the ufunc add with alpha, PointwiseOpsKernel.cpp addcmul); no other
// step may be contracted, so the sources build with -ffp-contract=off. The parameters then
// equal those of torch's fused CPU AdamW bit for bit (checked with torch 2.13 on AVX2 over 100
// steps): switching kernels.optimizer between cpu_adam and torch_fused does not change a run,
// which tests/runtime/kernels/test_engine_native_kernel.py relies on.
//
// Why two divisions and not one: multiplying by 1/sqrt(1 - beta2^t) (DeepSpeed's form) saves
// a division, and on cache-resident data the loop is bound by the divide/square-root unit
// (AVX2, Zen 3: 0.33 against 0.46 ns per element). From 25M parameters on the step is mostly
// memory-bound: the gain shrank to under 10% at one thread and none at two on a shared
// machine (bench/results/optimizer_kernels-2026-11-28.md), while the one-division form moves
// a quarter of the parameters by an ulp against torch's fused kernel.
// Adam itself: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015;
// decoupled weight decay: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace zeroplan {

// Step constants, rounded to fp32 exactly where torch rounds its Python-double scalars.
struct AdamConsts {
  float grad_scale;  // multiplies the gradient as it is read (1/loss_scale * clip coef)
  float l2;          // weight decay added to the gradient (Adam); 0 when decoupled
  float decay;       // 1 - lr * wd multiplying the parameter (AdamW); 1 when L2
  bool apply_decay;  // torch skips param.mul_ when weight_decay == 0
  bool apply_l2;
  float w1;          // 1 - beta1, the lerp weight
  bool w1_small;     // lerp branch, ATen's is_lerp_weight_small: |w| < 0.5
  float beta2;
  float c2;          // 1 - beta2
  float bc2_sqrt;    // sqrt(1 - beta2^t), or 1 without bias correction
  float eps;
  float neg_step;    // -lr / (1 - beta1^t), or -lr without bias correction
};

// Computes the constants in double, as torch.optim does in Python, then rounds once.
inline AdamConsts make_adam_consts(double step, double lr, double beta1, double beta2,
                                   double eps, double weight_decay, bool decoupled,
                                   bool bias_correction, double grad_scale) {
  AdamConsts c;
  c.grad_scale = static_cast<float>(grad_scale);
  c.apply_l2 = !decoupled && weight_decay != 0.0;
  c.apply_decay = decoupled && weight_decay != 0.0;
  c.l2 = c.apply_l2 ? static_cast<float>(weight_decay) : 0.0f;
  c.decay = c.apply_decay ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  c.w1 = static_cast<float>(1.0 - beta1);
  c.w1_small = std::fabs(c.w1) < 0.5f;
  c.beta2 = static_cast<float>(beta2);
  c.c2 = static_cast<float>(1.0 - beta2);
  double bc1 = bias_correction ? 1.0 - std::pow(beta1, step) : 1.0;
  double bc2 = bias_correction ? 1.0 - std::pow(beta2, step) : 1.0;
  c.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));
  c.eps = static_cast<float>(eps);
  c.neg_step = static_cast<float>(-(lr / bc1));
  return c;
}

// fp32 -> bf16 with round-to-nearest-even on the bit pattern, NaN -> 0x7FC0; the same
// rule as c10::BFloat16's round_to_nearest_even, so the copy equals param.to(torch.bfloat16).
inline uint16_t float_to_bf16_rne(float x) {
  if (std::isnan(x)) return UINT16_C(0x7FC0);
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  uint32_t rounding_bias = UINT32_C(0x7FFF) + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

// One element; also the tail of the SIMD loops, so every path rounds identically.
inline void adam_element(const AdamConsts& c, float* p_ptr, const float* g_ptr, float* m_ptr,
                         float* v_ptr, uint16_t* bf16_ptr) {
  float g = *g_ptr * c.grad_scale;
  float p = *p_ptr;
  if (c.apply_l2) g = std::fma(p, c.l2, g);
  if (c.apply_decay) p = p * c.decay;
  float m = *m_ptr;
  float diff = g - m;
  m = c.w1_small ? std::fma(c.w1, diff, m) : std::fma(c.w1 - 1.0f, diff, g);
  float v = std::fma(c.c2 * g, g, *v_ptr * c.beta2);
  float denom = std::sqrt(v) / c.bc2_sqrt + c.eps;
  p = p + (c.neg_step * m) / denom;
  *p_ptr = p;
  *m_ptr = m;
  *v_ptr = v;
  if (bf16_ptr != nullptr) *bf16_ptr = float_to_bf16_rne(p);
}

// A half-open range [begin, end) of the flat buffers; bf16 may be null.
struct AdamBuffers {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  uint16_t* bf16;
};

void adam_range_scalar(const AdamConsts& c, const AdamBuffers& b, int64_t begin, int64_t end);
void adam_range_avx2(const AdamConsts& c, const AdamBuffers& b, int64_t begin, int64_t end);
void adam_range_avx512(const AdamConsts& c, const AdamBuffers& b, int64_t begin, int64_t end);

}  // namespace zeroplan
