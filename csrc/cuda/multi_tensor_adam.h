// Interface between the torch binding (multi_tensor_adam.cpp, host compiler) and the CUDA
// kernel (multi_tensor_adam_kernel.cu, nvcc). Plain C++ and CUDA runtime types only, so the
// .cu file builds without torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace zeroplan {

// Hyper-parameters of one step, as the caller gave them (doubles, like torch.optim's floats).
struct CudaAdamArgs {
  double step;  // 1-based
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled;        // AdamW (torch.optim.AdamW) when true, L2 (torch.optim.Adam) when false
  bool bias_correction;  // divide by 1 - beta^t as in the Adam paper; DeepSpeed can turn it off
  double grad_scale;     // multiplies each gradient as it is read (1/loss_scale * clip coef)
};

// Flat views of n_tensors tensors; bf16 is null or an array of n_tensors pointers.
struct CudaAdamTensors {
  int64_t n_tensors;
  float* const* params;
  const float* const* grads;
  float* const* exp_avgs;
  float* const* exp_avg_sqs;
  uint16_t* const* bf16;
  const int64_t* sizes;
};

// Updates every tensor with as few launches as the kernel-argument budget allows (one for
// up to kMaxTensors tensors / kMaxBlocks chunks) on `stream`. Returns the first CUDA error.
cudaError_t multi_tensor_adam_launch(const CudaAdamTensors& tensors, const CudaAdamArgs& args,
                                     cudaStream_t stream);

}  // namespace zeroplan
