// Python binding, SIMD dispatch and OpenMP tiling for the CPU Adam/AdamW step.
//
// One call updates a rank's flat fp32 shard in a single pass over memory: the gradient is
// read once and multiplied by grad_scale (1/loss_scale times the clip coefficient), the
// moments and the parameter are updated, and the bf16 copy of the new parameter is written
// while it is still in a register. Arithmetic: adam_math.h.
//
// Dispatch is at run time (__builtin_cpu_supports, which also checks that the OS saves the
// wider registers), so one cached binary runs on every x86-64 CPU; "scalar" is always there.
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <vector>

#include "adam_math.h"

namespace zeroplan {
namespace {

using RangeFn = void (*)(const AdamConsts&, const AdamBuffers&, int64_t, int64_t);

// Elements per OpenMP work item: 128 KiB of each fp32 stream, long enough for the hardware
// prefetcher to ramp up and for one claim of a dynamic-schedule counter to cost nothing
// beside it (~800 claims per 25M-element step), short enough that the tiles left when one
// thread is descheduled (the cores are often shared) are spread over the others.
constexpr int64_t kTile = 32 * 1024;

bool cpu_has(const std::string& path) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (path == "avx512") return __builtin_cpu_supports("avx512f");
  if (path == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return path == "scalar";
}

// Paths this CPU can run, fastest first.
std::vector<std::string> simd_paths() {
  std::vector<std::string> paths;
  for (const char* p : {"avx512", "avx2", "scalar"}) {
    if (cpu_has(p)) paths.emplace_back(p);
  }
  return paths;
}

RangeFn pick_path(const std::string& simd) {
  const std::string path = simd == "auto" ? simd_paths().front() : simd;
  TORCH_CHECK_VALUE(path == "avx512" || path == "avx2" || path == "scalar",
                    "simd must be one of auto, avx512, avx2, scalar; got '", simd, "'");
  TORCH_CHECK_VALUE(cpu_has(path), "simd='", path, "' is not supported by this CPU; ",
                    "supported: ", c10::Join(", ", simd_paths()));
  if (path == "avx512") return adam_range_avx512;
  if (path == "avx2") return adam_range_avx2;
  return adam_range_scalar;
}

void check_fp32(const torch::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == torch::kFloat32, name, " must be float32, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(t.numel() == numel, name, " has ", t.numel(),
                    " elements but param has ", numel);
}

// The GIL is released for the whole step so that a communication thread keeps running.
void adam_step(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg,
               torch::Tensor exp_avg_sq, std::optional<torch::Tensor> bf16_out, double step,
               double lr, double beta1, double beta2, double eps, double weight_decay,
               bool decoupled, bool bias_correction, double grad_scale, int64_t threads,
               const std::string& simd) {
  const int64_t n = param.numel();
  check_fp32(param, "param", n);
  check_fp32(grad, "grad", n);
  check_fp32(exp_avg, "exp_avg", n);
  check_fp32(exp_avg_sq, "exp_avg_sq", n);
  uint16_t* bf16 = nullptr;
  if (bf16_out.has_value()) {
    const torch::Tensor& out = *bf16_out;
    TORCH_CHECK_VALUE(out.device().is_cpu() && out.scalar_type() == torch::kBFloat16,
                      "bf16_out must be a CPU bfloat16 tensor, got ", out.scalar_type());
    TORCH_CHECK_VALUE(out.is_contiguous(), "bf16_out must be contiguous");
    TORCH_CHECK_VALUE(out.numel() == n, "bf16_out has ", out.numel(),
                      " elements but param has ", n);
    bf16 = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  }
  TORCH_CHECK_VALUE(threads >= 1, "threads must be >= 1, got ", threads);
  TORCH_CHECK_VALUE(step >= 1, "step must be >= 1 (1-based, as in torch.optim), got ", step);
  const RangeFn range = pick_path(simd);
  const AdamConsts c = make_adam_consts(step, lr, beta1, beta2, eps, weight_decay, decoupled,
                                        bias_correction, grad_scale);
  const AdamBuffers b{param.data_ptr<float>(), grad.data_ptr<float>(),
                      exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), bf16};
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int team = static_cast<int>(std::max<int64_t>(1, std::min(threads, tiles)));
  pybind11::gil_scoped_release no_gil;
  // Dynamic, not static: the step is memory-bound, so the threads run at the same speed
  // unless one is preempted, and with a static split the whole step then waits for it.
#pragma omp parallel for num_threads(team) schedule(dynamic)
  for (int64_t t = 0; t < tiles; ++t) {
    range(c, b, t * kTile, std::min(n, (t + 1) * kTile));
  }
}

}  // namespace
}  // namespace zeroplan

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zeroplan CPU Adam/AdamW over flat fp32 buffers (AVX-512 / AVX2 / scalar, OpenMP)";
  m.def("adam_step", &zeroplan::adam_step, "One Adam/AdamW step over flat fp32 buffers",
        pybind11::arg("param"), pybind11::arg("grad"), pybind11::arg("exp_avg"),
        pybind11::arg("exp_avg_sq"), pybind11::arg("bf16_out"), pybind11::arg("step"),
        pybind11::arg("lr"), pybind11::arg("beta1"), pybind11::arg("beta2"),
        pybind11::arg("eps"), pybind11::arg("weight_decay"), pybind11::arg("decoupled"),
        pybind11::arg("bias_correction"), pybind11::arg("grad_scale"),
        pybind11::arg("threads"), pybind11::arg("simd"));
  m.def("simd_paths", &zeroplan::simd_paths, "SIMD paths this CPU supports, fastest first");
}
