// AVX2 + FMA path, 8 floats per vector. Compiled with a function-level target attribute
// instead of -mavx2, so the same binary loads on any x86-64 CPU and cpu_adam.cpp picks this
// path only when __builtin_cpu_supports reports avx2 and fma. Same operation order as
// adam_element (see adam_math.h); the tail of each range goes through adam_element.
#include <immintrin.h>

#include "adam_math.h"

#define ZP_AVX2 __attribute__((target("avx2,fma")))

namespace zeroplan {
namespace {

// Round-to-nearest-even fp32 -> bf16 for 8 lanes, NaN -> 0x7FC0 (as float_to_bf16_rne).
ZP_AVX2 inline __m128i bf16_rne_avx2(__m256 p) {
  const __m256i bits = _mm256_castps_si256(p);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256 is_nan = _mm256_cmp_ps(p, p, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(is_nan));
  // packus works per 128-bit lane: [a0..a3 a0..a3 | a4..a7 a4..a7]; gather the low halves.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  return _mm256_castsi256_si128(packed);
}

}  // namespace

ZP_AVX2 void adam_range_avx2(const AdamConsts& c, const AdamBuffers& b, int64_t begin,
                             int64_t end) {
  const __m256 grad_scale = _mm256_set1_ps(c.grad_scale);
  const __m256 l2 = _mm256_set1_ps(c.l2);
  const __m256 decay = _mm256_set1_ps(c.decay);
  const __m256 lerp_w = _mm256_set1_ps(c.w1_small ? c.w1 : c.w1 - 1.0f);
  const __m256 beta2 = _mm256_set1_ps(c.beta2);
  const __m256 c2 = _mm256_set1_ps(c.c2);
  const __m256 bc2_sqrt = _mm256_set1_ps(c.bc2_sqrt);
  const __m256 eps = _mm256_set1_ps(c.eps);
  const __m256 neg_step = _mm256_set1_ps(c.neg_step);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256 g = _mm256_mul_ps(_mm256_loadu_ps(b.grad + i), grad_scale);
    __m256 p = _mm256_loadu_ps(b.param + i);
    if (c.apply_l2) g = _mm256_fmadd_ps(p, l2, g);
    if (c.apply_decay) p = _mm256_mul_ps(p, decay);
    __m256 m = _mm256_loadu_ps(b.exp_avg + i);
    const __m256 diff = _mm256_sub_ps(g, m);
    m = _mm256_fmadd_ps(lerp_w, diff, c.w1_small ? m : g);
    const __m256 v_decayed = _mm256_mul_ps(_mm256_loadu_ps(b.exp_avg_sq + i), beta2);
    const __m256 v = _mm256_fmadd_ps(_mm256_mul_ps(c2, g), g, v_decayed);
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2_sqrt), eps);
    p = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(neg_step, m), denom));
    _mm256_storeu_ps(b.param + i, p);
    _mm256_storeu_ps(b.exp_avg + i, m);
    _mm256_storeu_ps(b.exp_avg_sq + i, v);
    if (b.bf16) _mm_storeu_si128(reinterpret_cast<__m128i*>(b.bf16 + i), bf16_rne_avx2(p));
  }
  adam_range_scalar(c, b, i, end);
}

}  // namespace zeroplan
