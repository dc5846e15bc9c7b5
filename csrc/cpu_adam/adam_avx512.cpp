// AVX-512F path, 16 floats per vector; the twin of adam_avx2.cpp (same operation order,
// same runtime-dispatch rationale). Only AVX-512F instructions are used, so it runs on every
// AVX-512 CPU (Skylake-SP onwards, Zen 4); the bf16 rounding is done on the bit pattern rather
// than with AVX512_BF16's vcvtneps2bf16, which flushes denormals and would differ from torch.
#include <immintrin.h>

#include "adam_math.h"

#define ZP_AVX512 __attribute__((target("avx512f")))

namespace zeroplan {
namespace {

ZP_AVX512 inline __m256i bf16_rne_avx512(__m512 p) {
  const __m512i bits = _mm512_castps_si512(p);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 is_nan = _mm512_cmp_ps_mask(p, p, _CMP_UNORD_Q);
  r = _mm512_mask_blend_epi32(is_nan, r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);  // vpmovdw: keeps the low 16 bits of each lane
}

}  // namespace

ZP_AVX512 void adam_range_avx512(const AdamConsts& c, const AdamBuffers& b, int64_t begin,
                                 int64_t end) {
  const __m512 grad_scale = _mm512_set1_ps(c.grad_scale);
  const __m512 l2 = _mm512_set1_ps(c.l2);
  const __m512 decay = _mm512_set1_ps(c.decay);
  const __m512 lerp_w = _mm512_set1_ps(c.w1_small ? c.w1 : c.w1 - 1.0f);
  const __m512 beta2 = _mm512_set1_ps(c.beta2);
  const __m512 c2 = _mm512_set1_ps(c.c2);
  const __m512 bc2_sqrt = _mm512_set1_ps(c.bc2_sqrt);
  const __m512 eps = _mm512_set1_ps(c.eps);
  const __m512 neg_step = _mm512_set1_ps(c.neg_step);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m512 g = _mm512_mul_ps(_mm512_loadu_ps(b.grad + i), grad_scale);
    __m512 p = _mm512_loadu_ps(b.param + i);
    if (c.apply_l2) g = _mm512_fmadd_ps(p, l2, g);
    if (c.apply_decay) p = _mm512_mul_ps(p, decay);
    __m512 m = _mm512_loadu_ps(b.exp_avg + i);
    const __m512 diff = _mm512_sub_ps(g, m);
    m = _mm512_fmadd_ps(lerp_w, diff, c.w1_small ? m : g);
    const __m512 v_decayed = _mm512_mul_ps(_mm512_loadu_ps(b.exp_avg_sq + i), beta2);
    const __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(c2, g), g, v_decayed);
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), bc2_sqrt), eps);
    p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(neg_step, m), denom));
    _mm512_storeu_ps(b.param + i, p);
    _mm512_storeu_ps(b.exp_avg + i, m);
    _mm512_storeu_ps(b.exp_avg_sq + i, v);
    if (b.bf16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(b.bf16 + i), bf16_rne_avx512(p));
  }
  adam_range_scalar(c, b, i, end);
}

}  // namespace zeroplan
