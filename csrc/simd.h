// AVX-512 helpers shared by the kernels that need them (d3diff.cpp, attention.cpp); each function carries its own
// target attribute, so the including file is built for baseline x86-64 and calls them only after a runtime check
// (cpu_features().avx512).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define FF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define FF_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace fastface {

// exp on 16 lanes: range reduction by ln 2, degree-7 Taylor on |r| <= ln2/2 (truncation error 5e-9 relative),
// scalef for 2^n. exp(-inf) = 0 exactly; NaN stays NaN.
FF_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);  // exp(-inf) = 0; NaN stays NaN (second operand)
  x = _mm512_min_ps(_mm512_set1_ps(128.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 16 bf16 (the low bits of a uint16 array) widened to fp32; masked lanes read nothing and give 0.
FF_AVX512 inline __m512 load_bf16x16(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

}  // namespace fastface
#endif
