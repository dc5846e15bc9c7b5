// Multi-tensor fused Adam/AdamW: one kernel launch updates a whole list of tensors.
//
// The host loop packs tensor addresses and a block -> (tensor, chunk) map into the kernel's
// argument struct and launches when it is full, the scheme of apex's multi_tensor_apply
// (apex/csrc/multi_tensor_apply.cuh). Each block updates one chunk of kChunk elements.
// Per-element arithmetic follows torch.optim's single-tensor Adam (see
// csrc/cpu_adam/adam_math.h); the FMAs are explicit and the file builds with --fmad=false so
// that nvcc contracts nothing else.
#include <cmath>
#include <cstdint>

#include "multi_tensor_adam.h"

namespace zeroplan {
namespace {

constexpr int kMaxTensors = 24;  // 5 lists x 24 pointers + maps: ~2.8 KB of the 4 KB argument limit
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

struct TensorListMeta {
  void* addresses[5][kMaxTensors];  // param, grad, exp_avg, exp_avg_sq, bf16 (may be null)
  int64_t sizes[kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
};

struct Consts {
  float grad_scale, l2, decay, w1, beta2, c2, bc2_sqrt, eps, neg_step;
  bool apply_l2, apply_decay, w1_small;
};

Consts make_consts(const CudaAdamArgs& a) {
  Consts c;
  c.grad_scale = static_cast<float>(a.grad_scale);
  c.apply_l2 = !a.decoupled && a.weight_decay != 0.0;
  c.apply_decay = a.decoupled && a.weight_decay != 0.0;
  c.l2 = static_cast<float>(a.weight_decay);
  c.decay = static_cast<float>(1.0 - a.lr * a.weight_decay);
  c.w1 = static_cast<float>(1.0 - a.beta1);
  c.w1_small = c.w1 < 0.5f && c.w1 > -0.5f;
  c.beta2 = static_cast<float>(a.beta2);
  c.c2 = static_cast<float>(1.0 - a.beta2);
  const double bc1 = a.bias_correction ? 1.0 - std::pow(a.beta1, a.step) : 1.0;
  const double bc2 = a.bias_correction ? 1.0 - std::pow(a.beta2, a.step) : 1.0;
  c.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));
  c.eps = static_cast<float>(a.eps);
  c.neg_step = static_cast<float>(-(a.lr / bc1));
  return c;
}

// Round-to-nearest-even on the bit pattern, NaN -> 0x7FC0, as c10::BFloat16 does.
__device__ __forceinline__ uint16_t bf16_rne(float x) {
  if (isnan(x)) return 0x7FC0u;
  const uint32_t bits = __float_as_uint(x);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

__global__ void __launch_bounds__(kThreads) adam_kernel(TensorListMeta meta, Consts c) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(meta.sizes[t], begin + kChunk);
  float* __restrict__ param = static_cast<float*>(meta.addresses[0][t]);
  const float* __restrict__ grad = static_cast<const float*>(meta.addresses[1][t]);
  float* __restrict__ exp_avg = static_cast<float*>(meta.addresses[2][t]);
  float* __restrict__ exp_avg_sq = static_cast<float*>(meta.addresses[3][t]);
  uint16_t* __restrict__ bf16 = static_cast<uint16_t*>(meta.addresses[4][t]);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float g = grad[i] * c.grad_scale;
    float p = param[i];
    if (c.apply_l2) g = __fmaf_rn(p, c.l2, g);
    if (c.apply_decay) p = p * c.decay;
    float m = exp_avg[i];
    const float diff = g - m;
    m = c.w1_small ? __fmaf_rn(c.w1, diff, m) : __fmaf_rn(c.w1 - 1.0f, diff, g);
    const float v = __fmaf_rn(c.c2 * g, g, exp_avg_sq[i] * c.beta2);
    const float denom = sqrtf(v) / c.bc2_sqrt + c.eps;
    p = p + (c.neg_step * m) / denom;
    param[i] = p;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (bf16 != nullptr) bf16[i] = bf16_rne(p);
  }
}

void put(TensorListMeta& meta, int slot, const CudaAdamTensors& ts, int64_t t) {
  meta.addresses[0][slot] = ts.params[t];
  meta.addresses[1][slot] = const_cast<float*>(ts.grads[t]);
  meta.addresses[2][slot] = ts.exp_avgs[t];
  meta.addresses[3][slot] = ts.exp_avg_sqs[t];
  meta.addresses[4][slot] = ts.bf16 != nullptr ? ts.bf16[t] : nullptr;
  meta.sizes[slot] = ts.sizes[t];
}

}  // namespace

cudaError_t multi_tensor_adam_launch(const CudaAdamTensors& ts, const CudaAdamArgs& args,
                                     cudaStream_t stream) {
  const Consts c = make_consts(args);
  TensorListMeta meta;
  int tensors = 0;
  int blocks = 0;
  for (int64_t t = 0; t < ts.n_tensors; ++t) {
    if (ts.sizes[t] == 0) continue;
    put(meta, tensors++, ts, t);
    const int64_t chunks = (ts.sizes[t] + kChunk - 1) / kChunk;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
      meta.block_to_chunk[blocks] = static_cast<int>(chunk);
      ++blocks;
      const bool last_chunk = chunk == chunks - 1;
      if (blocks == kMaxBlocks || (tensors == kMaxTensors && last_chunk) ||
          (t == ts.n_tensors - 1 && last_chunk)) {
        adam_kernel<<<blocks, kThreads, 0, stream>>>(meta, c);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // the current tensor continues in the next launch, in slot 0
          put(meta, 0, ts, t);
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) {  // trailing empty tensors after the last non-empty one
    adam_kernel<<<blocks, kThreads, 0, stream>>>(meta, c);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace zeroplan
