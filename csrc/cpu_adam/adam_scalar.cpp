// Portable path: one element at a time through adam_element. It is the reference the SIMD
// paths are tested against and what runs on CPUs without AVX2/FMA.
#include "adam_math.h"

namespace zeroplan {

void adam_range_scalar(const AdamConsts& c, const AdamBuffers& b, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    adam_element(c, b.param + i, b.grad + i, b.exp_avg + i, b.exp_avg_sq + i,
                 b.bf16 ? b.bf16 + i : nullptr);
  }
}

}  // namespace zeroplan
