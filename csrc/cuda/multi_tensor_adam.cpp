// torch binding of the multi-tensor CUDA Adam/AdamW (kernel: multi_tensor_adam_kernel.cu).
// Validates the lists, collects raw pointers and launches on the current CUDA stream of the
// parameters' device, so the step orders correctly with the surrounding torch work.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <vector>

#include "multi_tensor_adam.h"

namespace {

void check_list(const std::vector<at::Tensor>& list, const char* name,
                const std::vector<at::Tensor>& params, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(list.size() == params.size(), name, " has ", list.size(),
                    " tensors but params has ", params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK_VALUE(t.device() == params[0].device(), name, "[", i, "] is on ", t.device(),
                      ", params[0] on ", params[0].device());
    TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, "[", i, "] must be ", dtype, ", got ",
                      t.scalar_type());
    TORCH_CHECK_VALUE(t.is_contiguous(), name, "[", i, "] must be contiguous");
    TORCH_CHECK_VALUE(t.numel() == params[i].numel(), name, "[", i, "] has ", t.numel(),
                      " elements but params[", i, "] has ", params[i].numel());
  }
}

template <typename T>
std::vector<T*> pointers(const std::vector<at::Tensor>& list) {
  std::vector<T*> out;
  out.reserve(list.size());
  for (const at::Tensor& t : list) out.push_back(static_cast<T*>(t.data_ptr()));
  return out;
}

void multi_tensor_adam(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                       const std::vector<at::Tensor>& exp_avgs,
                       const std::vector<at::Tensor>& exp_avg_sqs,
                       const std::optional<std::vector<at::Tensor>>& bf16_outs, double step,
                       double lr, double beta1, double beta2, double eps, double weight_decay,
                       bool decoupled, bool bias_correction, double grad_scale) {
  if (params.empty()) return;
  TORCH_CHECK_VALUE(params[0].is_cuda(), "params must be CUDA tensors, got ", params[0].device());
  check_list(params, "params", params, at::kFloat);
  check_list(grads, "grads", params, at::kFloat);
  check_list(exp_avgs, "exp_avgs", params, at::kFloat);
  check_list(exp_avg_sqs, "exp_avg_sqs", params, at::kFloat);
  std::vector<uint16_t*> bf16;
  if (bf16_outs.has_value()) {
    check_list(*bf16_outs, "bf16_outs", params, at::kBFloat16);
    bf16 = pointers<uint16_t>(*bf16_outs);
  }
  std::vector<int64_t> sizes;
  for (const at::Tensor& p : params) sizes.push_back(p.numel());
  const auto p = pointers<float>(params);
  const auto g = pointers<float>(grads);
  const auto m = pointers<float>(exp_avgs);
  const auto v = pointers<float>(exp_avg_sqs);
  const zeroplan::CudaAdamTensors tensors{static_cast<int64_t>(params.size()), p.data(),
                                          g.data(), m.data(), v.data(),
                                          bf16.empty() ? nullptr : bf16.data(), sizes.data()};
  const zeroplan::CudaAdamArgs args{step, lr, beta1, beta2, eps, weight_decay,
                                    decoupled, bias_correction, grad_scale};
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaError_t err =
      zeroplan::multi_tensor_adam_launch(tensors, args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "multi_tensor_adam launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zeroplan multi-tensor fused Adam/AdamW for CUDA";
  m.def("multi_tensor_adam", &multi_tensor_adam, "One Adam/AdamW step over lists of tensors",
        pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("exp_avgs"),
        pybind11::arg("exp_avg_sqs"), pybind11::arg("bf16_outs"), pybind11::arg("step"),
        pybind11::arg("lr"), pybind11::arg("beta1"), pybind11::arg("beta2"),
        pybind11::arg("eps"), pybind11::arg("weight_decay"), pybind11::arg("decoupled"),
        pybind11::arg("bias_correction"), pybind11::arg("grad_scale"));
}
