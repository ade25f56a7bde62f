// Rotary position embedding (NeoX rotate-half) on the CPU, one pass (contract: fastface/ops/attention.py, rotary).
//
// Legend: N rows (tokens), M vectors per row (heads, of q and k together), hd head dim, rd rotated dims, h = rd / 2.
//
// out[n, m, j] = x[n, m, j] * cos[n, j] + rot[n, m, j] * sin[n, j]   for j < rd, rot = (-x[j + h] for j < h,
// x[j - h] for j >= h), and x[n, m, j] for j >= rd -- in float32, each product rounded, then the sum, then the
// output's dtype: the reference's operations one for one (no fused multiply-add), so the result is bitwise the
// reference's. x may be a strided view (the q and k parts of a qkv projection); out is contiguous.
// Measured: the reference's elementwise ops on a [B, L, 2, nh, hd] view took 30% of a bf16 face-s decoding run.

#include <omp.h>

#include <cstdint>
#include <cstring>

#include "common.h"
#include "simd.h"

namespace fastface {
namespace {

bool g_simd = true;


template <class T>
void row_scalar(const T* x, const float* c, const float* s, int64_t hd, int64_t rd, T* o) {
  const int64_t h = rd / 2;
  for (int64_t j = 0; j < rd; ++j) {
    const float r = j < h ? -load_elem(x + j + h) : load_elem(x + j - h);
    volatile float p = load_elem(x + j) * c[j];  // rounded before the sum, as the reference
    volatile float q = r * s[j];
    store_elem(o + j, p + q);
  }
  for (int64_t j = rd; j < hd; ++j) o[j] = x[j];
}

#if defined(__x86_64__) && defined(__GNUC__)
template <class T>
FF_AVX512 inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (sizeof(T) == 2) return load_bf16x16(reinterpret_cast<const uint16_t*>(p), m);
  else return _mm512_maskz_loadu_ps(m, p);
}

FF_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
FF_AVX512 inline void store16(uint16_t* p, __m512 v, __mmask16 m) {
  // round to nearest even (finite inputs; NaN stays NaN through the quiet bit)
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  u = _mm512_mask_mov_epi32(u, nan, _mm512_set1_epi32(0x7fc00000));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

template <class T>
FF_AVX512 void row_avx512(const T* x, const float* c, const float* s, int64_t hd, int64_t rd, T* o) {
  const int64_t h = rd / 2;
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t j = 0; j < h; j += 16) {
    const int64_t n = h - j < 16 ? h - j : 16;
    const __mmask16 m = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    const __m512 x1 = load16(x + j, m), x2 = load16(x + j + h, m);
    __m512 p1 = _mm512_mul_ps(x1, _mm512_maskz_loadu_ps(m, c + j));
    __m512 q1 = _mm512_mul_ps(_mm512_xor_ps(x2, sign), _mm512_maskz_loadu_ps(m, s + j));
    __m512 p2 = _mm512_mul_ps(x2, _mm512_maskz_loadu_ps(m, c + j + h));
    __m512 q2 = _mm512_mul_ps(x1, _mm512_maskz_loadu_ps(m, s + j + h));
    __asm__("" : "+v"(p1), "+v"(q1), "+v"(p2), "+v"(q2));  // no FMA contraction: the reference rounds products
    store16(o + j, _mm512_add_ps(p1, q1), m);
    store16(o + j + h, _mm512_add_ps(p2, q2), m);
  }
  if (rd < hd) std::memcpy(o + rd, x + rd, static_cast<size_t>(hd - rd) * sizeof(T));
}
#endif

template <class T>
void run(const T* x, int64_t sn, int64_t sm, const float* c, const float* s, int64_t N, int64_t M, int64_t hd,
         int64_t rd, T* o, bool simd) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* cn = c + n * rd;
    const float* snr = s + n * rd;
    for (int64_t m = 0; m < M; ++m) {
      const T* xr = x + n * sn + m * sm;
      T* orow = o + (n * M + m) * hd;
#if defined(__x86_64__) && defined(__GNUC__)
      if (simd) {
        row_avx512(xr, cn, snr, hd, rd, orow);
        continue;
      }
#endif
      row_scalar(xr, cn, snr, hd, rd, orow);
    }
  }
}

}  // namespace

void rotary_set_simd(bool enabled) { g_simd = enabled; }

void rotary(const py::object& x_obj, const py::object& cos_obj, const py::object& sin_obj, const py::object& out_obj) {
  Arg x = require_rows(x_obj, "x", 3, {DType::F32, DType::BF16});
  const int64_t N = x.dim(0), M = x.dim(1), hd = x.dim(2);
  Arg c = require(cos_obj, "cos", 2, {DType::F32});
  Arg s = require(sin_obj, "sin", 2, {DType::F32});
  const int64_t rd = c.dim(1);
  require_shape(c, {N, -1});
  require_shape(s, {N, rd});
  if (rd % 2 != 0 || rd > hd) {
    value_error("cos must have an even width of at most x's last dim " + std::to_string(hd) + ", got shape " +
                shape_str(c.info.shape));
  }
  Arg o = require(out_obj, "out", 3, {DType::F32, DType::BF16}, /*writable=*/true);
  require_same_dtype(o, x);
  require_shape(o, {N, M, hd});
  const int64_t sn = x.info.strides[0] / x.info.itemsize, sm = x.info.strides[1] / x.info.itemsize;
  const bool simd = g_simd && cpu_features().avx512;
  py::gil_scoped_release nogil;
  if (x.dtype == DType::F32) {
    run(x.data<float>(), sn, sm, c.data<float>(), s.data<float>(), N, M, hd, rd, o.mutable_data<float>(), simd);
  } else {
    run(x.data<uint16_t>(), sn, sm, c.data<float>(), s.data<float>(), N, M, hd, rd, o.mutable_data<uint16_t>(),
        simd);
  }
}

}  // namespace fastface
