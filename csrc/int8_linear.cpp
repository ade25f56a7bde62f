// int8 weights times dynamically quantised int8 activations on the CPU (contract: fastface/ops/int8.py, int8_linear).
//
// Legend: M rows (tokens), K input features, N output features (weight rows); Kp = K rounded up to 4, Np = N rounded
// up to 16.
//
// Per row m:  s[m] = amax_k |x[m, k]| / 127 (1 for a row of zeros),  q[m, k] = clamp(round_half_even(x[m, k] / s[m]),
// -127, 127); then acc[m, n] = sum_k q[m, k] w[n, k] exactly in int32, and y[m, n] = float(acc) * s[m] * ws[n]
// (+ bias[n]), each operation rounded in that order, then once to the output's dtype. Those are the reference's
// operations, and the integer sums are exact, so the result is bitwise the reference's on every path.
//
// Weights come packed (ops.int8.pack_int8): panels of 16 output features, within a panel k in groups of 4, each group
// 16 features x 4 bytes -- one 64-byte vector per (panel, k-group), the operand layout of vpdpbusd. The AVX512-VNNI
// micro-kernel is an outer product: 6 rows x 4 panels (64 features) of int32 accumulators, per k-group 4 weight
// vectors and 6 broadcast activation quads, 24 vpdpbusd, no horizontal sums; the epilogue works on whole vectors of
// output features. vpdpbusd multiplies unsigned by signed bytes, so the activations are stored as q + 128 and
// 128 * sum_k w[n, k] (the weight's row sums, precomputed) comes off each sum. Without VNNI the same layout with the
// activations as signed bytes: AVX2 (vpmaddubsw / vpmaddwd, see micro_avx2_panel) or a plain loop. Work splits across
// threads by strips of 64 features x chunks of rows.
// |acc + 128 sum w| <= 255 * 127 * K must fit int32: K <= 65536.

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "simd.h"

namespace fastface {
namespace {

int g_products = -1;  // -1: the best this CPU has; else a Products value (tests, benchmarks)
bool g_simd = true;


// One row: its scale, and its int8 values plus offset as bytes. False if the row holds a non-finite value.
template <class T>
bool quantize_row(const T* x, int64_t K, int32_t offset, uint8_t* q, float* scale) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const float v = load_elem(x + k);
    finite = finite && std::isfinite(v);
    amax = std::fabs(v) > amax ? std::fabs(v) : amax;
  }
  if (!finite) return false;
  const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
  for (int64_t k = 0; k < K; ++k) {
    float r = std::nearbyint(load_elem(x + k) / s);  // round half to even, as torch.round
    r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
    q[k] = static_cast<uint8_t>(static_cast<int32_t>(r) + offset);
  }
  *scale = s;
  return true;
}

#if defined(__x86_64__) && defined(__GNUC__)
template <class T>
FF_AVX512 inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (sizeof(T) == 2) return load_bf16x16(reinterpret_cast<const uint16_t*>(p), m);
  else return _mm512_maskz_loadu_ps(m, p);
}

template <class T>
FF_AVX512 bool quantize_row_avx512(const T* x, int64_t K, int32_t offset, uint8_t* q, float* scale) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  __m512 amax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    const __m512 a = _mm512_and_ps(load16(x + k, m), abs_mask);
    bad |= _mm512_mask_cmp_ps_mask(m, a, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);  // inf or NaN
    amax = _mm512_max_ps(amax, a);
  }
  if (bad) return false;
  const float am = _mm512_reduce_max_ps(amax);
  const float s = am > 0.0f ? am / 127.0f : 1.0f;
  const __m512 sv = _mm512_set1_ps(s);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(offset);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(load16(x + k, m), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i v = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(r), lo), hi);
    v = _mm512_add_epi32(v, off);
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(v));
  }
  *scale = s;
  return true;
}

// y[j] = float(acc[j] - offset * wsum[j]) * sa * ws[j] (+ bias[j]) for j < n, products and sum rounded one by one
template <class T>
FF_AVX512 void epilogue_avx512(const int32_t* acc, int64_t n, int32_t offset, const int32_t* wsum, float sa,
                               const float* ws, const float* bias, T* y) {
  const __m512 sav = _mm512_set1_ps(sa);
  const __m512i off = _mm512_set1_epi32(offset);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512i a = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(m, acc + j),
                                       _mm512_mullo_epi32(off, _mm512_maskz_loadu_epi32(m, wsum + j)));
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), sav);
    v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, ws + j));
    if (bias) {
      __asm__("" : "+v"(v));  // no FMA contraction: the reference rounds the product
      v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + j));
    }
    if constexpr (sizeof(T) == 4) {
      _mm512_mask_storeu_ps(y + j, m, v);
    } else {
      __m512i u = _mm512_castps_si512(v);  // round to nearest even (finite: the inputs were checked)
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
      _mm256_mask_storeu_epi16(y + j, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    }
  }
}
#endif

template <class T>
void epilogue_scalar(const int32_t* acc, int64_t n, int32_t offset, const int32_t* wsum, float sa, const float* ws,
                     const float* bias, T* y) {
  for (int64_t j = 0; j < n; ++j) {
    volatile float v = static_cast<float>(acc[j] - offset * wsum[j]) * sa;
    v = v * ws[j];
    store_elem(y + j, bias ? v + bias[j] : static_cast<float>(v));
  }
}

constexpr int kMR = 6, kNP = 4;        // micro-kernel: 6 rows x 4 panels of 16 features
constexpr int64_t kRowChunk = 48;       // rows per task (a multiple of kMR)

inline int32_t load_quad(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Portable: acc[i][c] for rows i < mr, features c < 16 * np of panels starting at w (panel stride ps bytes).
void micro_portable(int mr, int np, const uint8_t* a, int64_t lda, const int8_t* w, int64_t ps, int64_t kq,
                    int32_t* acc /* [kMR][kNP * 16] */) {
  for (int i = 0; i < mr; ++i) {
    const int8_t* ai = reinterpret_cast<const int8_t*>(a + i * lda);  // offset 0: signed bytes
    for (int j = 0; j < np; ++j) {
      int32_t* out = acc + i * kNP * 16 + j * 16;
      for (int c = 0; c < 16; ++c) out[c] = 0;
      const int8_t* wp = w + j * ps;
      for (int64_t q = 0; q < kq; ++q)
        for (int c = 0; c < 16; ++c)
          for (int t = 0; t < 4; ++t) out[c] += int32_t(ai[q * 4 + t]) * int32_t(wp[q * 64 + c * 4 + t]);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FF_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

template <int MR, int NP>
FF_VNNI void micro_vnni(const uint8_t* a, int64_t lda, const int8_t* w, int64_t ps, int64_t kq, int32_t* acc_out) {
  __m512i acc[MR][NP];  // fully unrolled, so the accumulators live in registers (24 + 4 weights + 1 broadcast)
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t q = 0; q < kq; ++q) {
    __m512i b[NP];
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) b[j] = _mm512_loadu_si512(w + j * ps + q * 64);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i av = _mm512_set1_epi32(load_quad(a + i * lda + q * 4));
#pragma GCC unroll 8
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av, b[j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) _mm512_storeu_si512(acc_out + i * kNP * 16 + j * 16, acc[i][j]);
}

template <int MR>
FF_VNNI void micro_vnni_np(int np, const uint8_t* a, int64_t lda, const int8_t* w, int64_t ps, int64_t kq, int32_t* acc) {
  switch (np) {
    case 4: return micro_vnni<MR, 4>(a, lda, w, ps, kq, acc);
    case 3: return micro_vnni<MR, 3>(a, lda, w, ps, kq, acc);
    case 2: return micro_vnni<MR, 2>(a, lda, w, ps, kq, acc);
    default: return micro_vnni<MR, 1>(a, lda, w, ps, kq, acc);
  }
}

FF_VNNI void micro_vnni_any(int mr, int np, const uint8_t* a, int64_t lda, const int8_t* w, int64_t ps, int64_t kq,
                            int32_t* acc) {
  switch (mr) {
    case 6: return micro_vnni_np<6>(np, a, lda, w, ps, kq, acc);
    case 5: return micro_vnni_np<5>(np, a, lda, w, ps, kq, acc);
    case 4: return micro_vnni_np<4>(np, a, lda, w, ps, kq, acc);
    case 3: return micro_vnni_np<3>(np, a, lda, w, ps, kq, acc);
    case 2: return micro_vnni_np<2>(np, a, lda, w, ps, kq, acc);
    default: return micro_vnni_np<1>(np, a, lda, w, ps, kq, acc);
  }
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define FF_AVX2 __attribute__((target("avx2,fma")))

template <class T>
FF_AVX2 inline __m256 load8(const T* p) {
  if constexpr (sizeof(T) == 2) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));  // bf16 -> f32: exact
  } else {
    return _mm256_loadu_ps(p);
  }
}

// quantize_row with 8 lanes (the tail, K % 8, by the scalar operations): the same max, division and rounding.
template <class T>
FF_AVX2 bool quantize_row_avx2(const T* x, int64_t K, int32_t offset, uint8_t* q, float* scale) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), inf = _mm256_set1_ps(INFINITY);
  __m256 amax = _mm256_setzero_ps();
  int bad = 0;
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 a = _mm256_and_ps(load8(x + k), abs_mask);
    bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // inf or NaN
    amax = _mm256_max_ps(amax, a);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, amax);
  float am = 0.0f;
  for (float v : lanes) am = v > am ? v : am;
  for (int64_t k = K8; k < K; ++k) {
    const float v = std::fabs(load_elem(x + k));
    bad |= !(v < INFINITY);
    am = v > am ? v : am;
  }
  if (bad) return false;
  const float s = am > 0.0f ? am / 127.0f : 1.0f;
  const __m256 sv = _mm256_set1_ps(s);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127), off = _mm256_set1_epi32(offset);
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(load8(x + k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i v = _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(r), lo), hi), off);
    const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));  // -127..255
    const __m128i v8 = offset ? _mm_packus_epi16(v16, v16) : _mm_packs_epi16(v16, v16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), v8);
  }
  for (int64_t k = K8; k < K; ++k) {
    float r = std::nearbyint(load_elem(x + k) / s);
    r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
    q[k] = static_cast<uint8_t>(static_cast<int32_t>(r) + offset);
  }
  *scale = s;
  return true;
}

// epilogue_scalar with 8 lanes, the same operations in the same order (the tail by the scalar loop).
template <class T>
FF_AVX2 void epilogue_avx2(const int32_t* acc, int64_t n, int32_t offset, const int32_t* wsum, float sa,
                           const float* ws, const float* bias, T* y) {
  const __m256 sav = _mm256_set1_ps(sa);
  const __m256i off = _mm256_set1_epi32(offset);
  const int64_t n8 = n / 8 * 8;
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256i a = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j)),
                                       _mm256_mullo_epi32(off, _mm256_loadu_si256(
                                                                   reinterpret_cast<const __m256i*>(wsum + j))));
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(a), sav);
    v = _mm256_mul_ps(v, _mm256_loadu_ps(ws + j));
    if (bias) {
      __asm__("" : "+x"(v));  // no FMA contraction: the reference rounds the product
      v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    }
    if constexpr (sizeof(T) == 4) {
      _mm256_storeu_ps(y + j, v);
    } else {
      __m256i u = _mm256_castps_si256(v);  // round to nearest even (finite: the inputs were checked)
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y + j),
                       _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
    }
  }
  if (n8 < n) epilogue_scalar(acc + n8, n - n8, offset, wsum + n8, sa, ws + n8, bias ? bias + n8 : nullptr, y + n8);
}

// AVX2: per (row, k-group, 8 features) vpmaddubsw(|a|, w * sign(a)) -- each pair |a| |w| <= 2 * 127 * 127 fits int16,
// so nothing saturates -- then vpmaddwd by ones sums the pairs into the feature's int32 lane: the same exact sums as
// vpdpbusd over the same layout, in three instructions. MR rows x one panel (two 8-feature halves).
template <int MR>
FF_AVX2 void micro_avx2_panel(const uint8_t* a, int64_t lda, const int8_t* wp, int64_t kq, int32_t* acc) {
  __m256i lo[MR], hi[MR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) lo[i] = hi[i] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t q = 0; q < kq; ++q) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + q * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + q * 64 + 32));
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256i av = _mm256_set1_epi32(load_quad(a + i * lda + q * 4));  // signed bytes (offset 0)
      const __m256i ua = _mm256_abs_epi8(av);                                // |a| <= 127
      lo[i] = _mm256_add_epi32(lo[i], _mm256_madd_epi16(_mm256_maddubs_epi16(ua, _mm256_sign_epi8(w0, av)), ones));
      hi[i] = _mm256_add_epi32(hi[i], _mm256_madd_epi16(_mm256_maddubs_epi16(ua, _mm256_sign_epi8(w1, av)), ones));
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i * kNP * 16), lo[i]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i * kNP * 16 + 8), hi[i]);
  }
}

FF_AVX2 void micro_avx2_any(int mr, int np, const uint8_t* a, int64_t lda, const int8_t* w, int64_t ps, int64_t kq,
                            int32_t* acc) {
  for (int j = 0; j < np; ++j) {
    for (int i0 = 0; i0 < mr; i0 += 3) {  // 3 rows: 6 accumulators, 2 weight vectors and temporaries in 16 registers
      const uint8_t* ai = a + i0 * lda;
      int32_t* out = acc + i0 * kNP * 16 + j * 16;
      switch (mr - i0 < 3 ? mr - i0 : 3) {
        case 3: micro_avx2_panel<3>(ai, lda, w + j * ps, kq, out); break;
        case 2: micro_avx2_panel<2>(ai, lda, w + j * ps, kq, out); break;
        default: micro_avx2_panel<1>(ai, lda, w + j * ps, kq, out); break;
      }
    }
  }
}
#endif

enum class Products { Portable = 0, Avx2 = 1, Vnni = 2 };

Products choose_products() {
  if (g_products >= 0) return static_cast<Products>(g_products);
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_features().avx512_vnni) return Products::Vnni;
  if (cpu_features().avx2_fma) return Products::Avx2;
#endif
  return Products::Portable;
}

// The quantisation and epilogue: AVX-512 where the CPU has it, AVX2 beside AVX2 products (there they are what an
// AVX2-only CPU runs), scalar when SIMD kernels are off (tests) or the CPU has neither.
enum class Helpers { Scalar, Avx2, Avx512 };

Helpers choose_helpers(Products products, bool simd) {
  const CpuFeatures& f = cpu_features();
  if (!simd) return Helpers::Scalar;
  if (f.avx512 && products != Products::Avx2) return Helpers::Avx512;
  return f.avx2_fma ? Helpers::Avx2 : Helpers::Scalar;
}

template <class T>
int64_t run(const T* x, int64_t M, int64_t K, const int8_t* w, int64_t N, const float* ws, const int32_t* wsum,
            const float* bias, T* y, bool simd) {
  const Products products = choose_products();
  const Helpers helpers = choose_helpers(products, simd);
  const int32_t offset = products == Products::Vnni ? 128 : 0;
  const int64_t Kp = (K + 3) / 4 * 4, kq = Kp / 4, ps = kq * 64, panels = (N + 15) / 16;
  std::vector<uint8_t> q(static_cast<size_t>(M * Kp));  // padding k: zero weights there, any value works
  std::vector<float> sa(static_cast<size_t>(M));
  int64_t bad_row = -1;
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    bool ok;
#if defined(__x86_64__) && defined(__GNUC__)
    if (helpers == Helpers::Avx512) ok = quantize_row_avx512(x + m * K, K, offset, q.data() + m * Kp, sa.data() + m);
    else if (helpers == Helpers::Avx2) ok = quantize_row_avx2(x + m * K, K, offset, q.data() + m * Kp, sa.data() + m);
    else
#endif
      ok = quantize_row(x + m * K, K, offset, q.data() + m * Kp, sa.data() + m);
    if (!ok) {
#pragma omp critical
      if (bad_row < 0 || m < bad_row) bad_row = m;
    }
  }
  if (bad_row >= 0) return bad_row;
  const int64_t strips = (panels + kNP - 1) / kNP, chunks = (M + kRowChunk - 1) / kRowChunk;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < strips * chunks; ++t) {
    const int64_t p0 = (t / chunks) * kNP, r0 = (t % chunks) * kRowChunk;  // consecutive tasks share a strip
    const int np = static_cast<int>(panels - p0 < kNP ? panels - p0 : kNP);
    const int64_t n0 = p0 * 16, nn = N - n0 < 16 * np ? N - n0 : 16 * np;
    const int64_t r1 = M - r0 < kRowChunk ? M : r0 + kRowChunk;
    alignas(64) int32_t acc[kMR * kNP * 16];
    for (int64_t m = r0; m < r1; m += kMR) {
      const int mr = static_cast<int>(r1 - m < kMR ? r1 - m : kMR);
      const uint8_t* a = q.data() + m * Kp;
#if defined(__x86_64__) && defined(__GNUC__)
      if (products == Products::Vnni) micro_vnni_any(mr, np, a, Kp, w + p0 * ps, ps, kq, acc);
      else if (products == Products::Avx2) micro_avx2_any(mr, np, a, Kp, w + p0 * ps, ps, kq, acc);
      else
#endif
        micro_portable(mr, np, a, Kp, w + p0 * ps, ps, kq, acc);
      for (int i = 0; i < mr; ++i) {
        const int32_t* a = acc + i * kNP * 16;
        T* out = y + (m + i) * N + n0;
        const float* b = bias ? bias + n0 : nullptr;
#if defined(__x86_64__) && defined(__GNUC__)
        if (helpers == Helpers::Avx512) {
          epilogue_avx512(a, nn, offset, wsum + n0, sa[m + i], ws + n0, b, out);
          continue;
        }
        if (helpers == Helpers::Avx2) {
          epilogue_avx2(a, nn, offset, wsum + n0, sa[m + i], ws + n0, b, out);
          continue;
        }
#endif
        epilogue_scalar(a, nn, offset, wsum + n0, sa[m + i], ws + n0, b, out);
      }
    }
  }
  return -1;
}

}  // namespace

void int8_linear_set_simd(bool enabled) { g_simd = enabled; }
void int8_linear_set_products(const std::string& path) {
  const CpuFeatures& f = cpu_features();
  if (path == "auto") g_products = -1;
  else if (path == "portable") g_products = static_cast<int>(Products::Portable);
  else if (path == "avx2" && f.avx2_fma) g_products = static_cast<int>(Products::Avx2);
  else if (path == "vnni" && f.avx512_vnni) g_products = static_cast<int>(Products::Vnni);
  else if (path == "avx2" || path == "vnni") value_error("int8_linear: this CPU has no " + path + " products");
  else value_error("path must be one of 'auto', 'vnni', 'avx2', 'portable', got '" + path + "'");
}

std::string int8_linear_products() {
  switch (choose_products()) {
    case Products::Vnni: return "vnni";
    case Products::Avx2: return "avx2";
    default: return "portable";
  }
}

void int8_linear(const py::object& x_obj, const py::object& w_obj, const py::object& scale_obj,
                 const py::object& sums_obj, const py::object& bias_obj, const py::object& out_obj) {
  Arg x = require(x_obj, "x", 2, {DType::F32, DType::BF16});
  const int64_t M = x.dim(0), K = x.dim(1);
  if (K > 65536) value_error("int8_linear: K (in features) must be at most 65536 for exact int32 sums, got " +
                             std::to_string(K));
  Arg s = require(scale_obj, "scale", 1, {DType::F32});
  const int64_t N = s.dim(0);
  Arg w = require(w_obj, "weight", 3, {DType::I8});
  require_shape(w, {(N + 15) / 16, (K + 3) / 4, 64});
  Arg sums = require(sums_obj, "sums", 1, {DType::I32});
  require_shape(sums, {N});
  const float* bias = nullptr;
  if (!bias_obj.is_none()) {
    Arg b = require(bias_obj, "bias", 1, {DType::F32});
    require_shape(b, {N});
    bias = b.data<float>();
  }
  Arg o = require(out_obj, "out", 2, {DType::F32, DType::BF16}, /*writable=*/true);
  require_same_dtype(o, x);
  require_shape(o, {M, N});
  const bool simd = g_simd;
  int64_t bad_row;
  {
    py::gil_scoped_release nogil;
    if (x.dtype == DType::F32) {
      bad_row = run(x.data<float>(), M, K, w.data<int8_t>(), N, s.data<float>(), sums.data<int32_t>(), bias,
                    o.mutable_data<float>(), simd);
    } else {
      bad_row = run(x.data<uint16_t>(), M, K, w.data<int8_t>(), N, s.data<float>(), sums.data<int32_t>(), bias,
                    o.mutable_data<uint16_t>(), simd);
    }
  }
  if (bad_row >= 0) value_error("int8_linear: x row " + std::to_string(bad_row) + " holds a non-finite value");
}

}  // namespace fastface
