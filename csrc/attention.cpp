// Scaled dot-product attention, forward, on the CPU (contract: fastface/ops/attention.py).
//
// Legend: B batch, nh heads, L queries, Lk keys, hd head dim; Mb, Mh the mask's batch and head sizes (1 =
// broadcast); QT queries per tile; Lkp = Lk rounded up to 16 (score lanes); hp = hd rounded up to 16.
//
// out[b, l, h, :] = softmax(scale * q[b, h, l] . k[b, h]^T + mask[b, h, l]) . v[b, h]  (fp32 arithmetic; a bool
// mask is 0 where True and -inf where False). One task per (b, h); the softmax is exact over each query's whole
// score row (no online rescaling: rows are at most a few thousand keys, and one pass over them is cheaper):
//   1. the task packs its keys once as K^T [hd, Lkp] fp32 and its values as [Lk, hp] fp32 (bf16 widened),
//      zero-padded, so both products run as broadcast-FMA outer products with no horizontal sums;
//   2. per tile of QT queries: s = q K^T in register tiles of 4 queries x 64 keys; s * scale + mask; row max;
//      p = exp(s - max) (exp512: exp(-inf) = 0); row sum;
//   3. o = (p V) / sum in register tiles of NQ queries x hp, written once in the output's dtype.
// Rows in which the mask allows no key are an error (the reference gives NaN there); nothing reads them.
// Threads: OpenMP over tasks; every output element is computed by one thread in an order that does not depend on
// the thread count or on the other rows.
// Paths: AVX-512 (fp32 products; bf16 inputs widened while packing); for bf16 inputs on AVX512-BF16 CPUs the same
// tiles over pairs -- K^T packed in head-dim pairs, V in key pairs, q and p (rounded to bf16, as flash attention does
// on GPUs) broadcast as pairs, vdpbf16ps with fp32 accumulation (1.4-1.5x the widened path at the engine's shapes);
// a portable scalar loop elsewhere and for head dims above 128. The Python wrapper (fastface/_cpp.py) sends tasks of fewer than 8 queries to
// torch's kernel: packing costs more than their products.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "simd.h"

namespace fastface {
namespace {

constexpr int64_t kQT = 8;       // queries per tile
constexpr int64_t kMaxHd = 128;  // widest head of the AVX-512 path (8 vectors of 16)
std::atomic<bool> g_simd{true};      // false: the portable path only (tests)
std::atomic<bool> g_bf16_dot{true};  // false: bf16 inputs widened to fp32 on the AVX-512 path (tests)

enum class MaskKind { None, Bool, F32, BF16 };


struct Mask {
  MaskKind kind = MaskKind::None;
  const char* base = nullptr;
  int64_t sb = 0, sh = 0, sl = 0;  // byte strides of batch, head, query row (0 where broadcast)
  const char* row(int64_t b, int64_t h, int64_t l) const { return base + b * sb + h * sh + l * sl; }
};

// One (b, h) task's operands: element strides of a query / key / value / output row.
template <class In, class Out>
struct Task {
  const In *q, *k, *v;
  int64_t qs, ks, vs;
  Out* o;
  int64_t os;
  int64_t L, Lk, hd;
  float scale;
};

float mask_value(const Mask& m, const char* row, int64_t j) {
  switch (m.kind) {
    case MaskKind::Bool: return row[j] ? 0.0f : -std::numeric_limits<float>::infinity();
    case MaskKind::F32: return reinterpret_cast<const float*>(row)[j];
    case MaskKind::BF16: return bf16_to_f32(reinterpret_cast<const uint16_t*>(row)[j]);
    default: return 0.0f;
  }
}

// ---- portable path ------------------------------------------------------------------------------------------

template <class In, class Out>
bool task_scalar(const Task<In, Out>& t, const Mask& m, int64_t b, int64_t h, std::vector<float>& s) {
  s.resize(static_cast<size_t>(t.Lk));
  bool ok = true;
  std::vector<float> acc(static_cast<size_t>(t.hd));
  for (int64_t l = 0; l < t.L; ++l) {
    const In* q = t.q + l * t.qs;
    const char* mrow = m.kind == MaskKind::None ? nullptr : m.row(b, h, l);
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < t.Lk; ++j) {
      const In* k = t.k + j * t.ks;
      float dot = 0.0f;
      for (int64_t d = 0; d < t.hd; ++d) dot += load_elem(q + d) * load_elem(k + d);
      s[j] = dot * t.scale + (mrow ? mask_value(m, mrow, j) : 0.0f);
      mx = std::max(mx, s[j]);
    }
    Out* o = t.o + l * t.os;
    if (mx == -std::numeric_limits<float>::infinity()) {
      ok = false;
      for (int64_t d = 0; d < t.hd; ++d) store_elem(o + d, 0.0f);
      continue;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < t.Lk; ++j) {
      s[j] = std::exp(s[j] - mx);
      sum += s[j];
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j = 0; j < t.Lk; ++j) {
      const In* v = t.v + j * t.vs;
      for (int64_t d = 0; d < t.hd; ++d) acc[d] += s[j] * load_elem(v + d);
    }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < t.hd; ++d) store_elem(o + d, acc[d] * inv);
  }
  return ok;
}

// ---- AVX-512 path -------------------------------------------------------------------------------------------
#if defined(__x86_64__) && defined(__GNUC__)

// The register-tiled outer product both products use: c[i, 16 v + lane] = sum_t a[i, t] . b[t, 16 v + lane] for NQ
// rows of a (row stride lda) and NV vectors of b (row stride ldb), t < T; a broadcast, b loaded, no horizontal sums.
//   scores: a = q ([NQ, hd]), b = K^T [hd, Lkp] from key j0, T = hd;
//   output: a = p ([NQ, Lkp]), b = V [Lk, hp], T = Lk.
// F32: fp32 elements, FMA. Bf16 (AVX512-BF16): each element a pair of bf16 along t (the products' reduction dim),
// vdpbf16ps (two products per lane, fp32 accumulation), so T counts pairs.
#define FF_OUTER_BLOCK_BODY(LOAD_B, BCAST_A, MADD)                                          \
  __m512 acc[NQ][NV];                                                                       \
  _Pragma("GCC unroll 8") for (int i = 0; i < NQ; ++i)                                      \
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();   \
  for (int64_t t = 0; t < T; ++t) {                                                         \
    decltype(LOAD_B(b)) bv[NV];                                                             \
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) bv[v] = LOAD_B(b + t * ldb + 16 * v); \
    _Pragma("GCC unroll 8") for (int i = 0; i < NQ; ++i) {                                  \
      const auto av = BCAST_A(a[i * lda + t]);                                              \
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) acc[i][v] = MADD(acc[i][v], av, bv[v]); \
    }                                                                                       \
  }                                                                                         \
  _Pragma("GCC unroll 8") for (int i = 0; i < NQ; ++i)                                      \
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + i * ldc + 16 * v, acc[i][v]);

FF_AVX512 inline __m512 f32_load(const float* p) { return _mm512_loadu_ps(p); }
FF_AVX512 inline __m512 f32_bcast(float x) { return _mm512_set1_ps(x); }
FF_AVX512 inline __m512 f32_madd(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
FF_AVX512_BF16 inline __m512bh bf16_load(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
FF_AVX512_BF16 inline __m512bh bf16_bcast(uint32_t x) { return (__m512bh)_mm512_set1_epi32(static_cast<int>(x)); }
FF_AVX512_BF16 inline __m512 bf16_madd(__m512 acc, __m512bh a, __m512bh b) { return _mm512_dpbf16_ps(acc, a, b); }

struct F32Ops {
  using E = float;
  template <int NQ, int NV>
  static FF_AVX512 void block(const E* a, int64_t lda, const E* b, int64_t ldb, int64_t T, float* c, int64_t ldc) {
    FF_OUTER_BLOCK_BODY(f32_load, f32_bcast, f32_madd)
  }
};

struct Bf16Ops {
  using E = uint32_t;  // a pair of bf16: element 2t in the low half, 2t + 1 in the high half
  template <int NQ, int NV>
  static FF_AVX512_BF16 void block(const E* a, int64_t lda, const E* b, int64_t ldb, int64_t T, float* c,
                                   int64_t ldc) {
    FF_OUTER_BLOCK_BODY(bf16_load, bf16_bcast, bf16_madd)
  }
};

// Scores of rows [0, nq) of q against keys [j0, j0 + 16 nj): blocks of 4 rows, then single rows (T = hd, or hd
// pairs for Bf16Ops).
template <class Ops, int NJ>
void score_rows(int64_t nq, const typename Ops::E* qp, int64_t T, const typename Ops::E* kt, int64_t Lkp,
                int64_t j0, float* s) {
  int64_t i = 0;
  for (; i + 4 <= nq; i += 4) Ops::template block<4, NJ>(qp + i * T, T, kt + j0, Lkp, T, s + i * Lkp + j0, Lkp);
  for (; i < nq; ++i) Ops::template block<1, NJ>(qp + i * T, T, kt + j0, Lkp, T, s + i * Lkp + j0, Lkp);
}

template <class Ops>
void score_dispatch(int nj, int64_t nq, const typename Ops::E* qp, int64_t T, const typename Ops::E* kt, int64_t Lkp,
                    int64_t j0, float* s) {
  switch (nj) {
    case 4: return score_rows<Ops, 4>(nq, qp, T, kt, Lkp, j0, s);
    case 3: return score_rows<Ops, 3>(nq, qp, T, kt, Lkp, j0, s);
    case 2: return score_rows<Ops, 2>(nq, qp, T, kt, Lkp, j0, s);
    default: return score_rows<Ops, 1>(nq, qp, T, kt, Lkp, j0, s);
  }
}

// Rows [0, nq) of p (row stride ldp) through V (T rows, or row pairs): as many NQ-row blocks as fit (NQ * NV <= 16
// accumulators), then single rows.
template <class Ops, int NQ, int NV>
void pv_rows(int64_t nq, const typename Ops::E* p, int64_t ldp, const typename Ops::E* vv, int64_t hp, int64_t T,
             float* ob) {
  int64_t i = 0;
  for (; i + NQ <= nq; i += NQ) Ops::template block<NQ, NV>(p + i * ldp, ldp, vv, hp, T, ob + i * hp, hp);
  for (; i < nq; ++i) Ops::template block<1, NV>(p + i * ldp, ldp, vv, hp, T, ob + i * hp, hp);
}

template <class Ops>
void pv_dispatch(int64_t nq, const typename Ops::E* p, int64_t ldp, const typename Ops::E* vv, int64_t hp, int64_t T,
                 float* ob) {
  switch (hp / 16) {
    case 1: return pv_rows<Ops, 8, 1>(nq, p, ldp, vv, hp, T, ob);
    case 2: return pv_rows<Ops, 8, 2>(nq, p, ldp, vv, hp, T, ob);
    case 3: return pv_rows<Ops, 4, 3>(nq, p, ldp, vv, hp, T, ob);
    case 4: return pv_rows<Ops, 4, 4>(nq, p, ldp, vv, hp, T, ob);
    case 5: return pv_rows<Ops, 2, 5>(nq, p, ldp, vv, hp, T, ob);
    case 6: return pv_rows<Ops, 2, 6>(nq, p, ldp, vv, hp, T, ob);
    case 7: return pv_rows<Ops, 2, 7>(nq, p, ldp, vv, hp, T, ob);
    default: return pv_rows<Ops, 2, 8>(nq, p, ldp, vv, hp, T, ob);
  }
}

// s[j] * scale + mask over one score row, -inf beyond Lk; returns the row max.
FF_AVX512 float scale_mask_max(float* s, int64_t Lk, int64_t Lkp, float scale, const Mask& m, const char* mrow) {
  const __m512 vs = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = ninf;
  for (int64_t j0 = 0; j0 < Lkp; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, Lk - j0);
    const __mmask16 lanes = n >= 16 ? __mmask16(0xFFFF) : n > 0 ? __mmask16((1u << n) - 1) : __mmask16(0);
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j0), vs);
    switch (m.kind) {
      case MaskKind::F32:
        x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(lanes, reinterpret_cast<const float*>(mrow) + j0));
        break;
      case MaskKind::BF16:
        x = _mm512_add_ps(x, load_bf16x16(reinterpret_cast<const uint16_t*>(mrow) + j0, lanes));
        break;
      case MaskKind::Bool: {
        const __m128i bits = _mm_maskz_loadu_epi8(lanes, mrow + j0);
        x = _mm512_mask_mov_ps(ninf, _mm_test_epi8_mask(bits, bits), x);
        break;
      }
      default: break;
    }
    x = _mm512_mask_mov_ps(ninf, lanes, x);
    _mm512_storeu_ps(s + j0, x);
    vmax = _mm512_max_ps(vmax, x);
  }
  return _mm512_reduce_max_ps(vmax);
}

// s = exp(s - mx) over [0, Lkp) (0 beyond Lk, where s = -inf); returns the sum.
FF_AVX512 float exp_sum(float* s, int64_t Lkp, float mx) {
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < Lkp; j0 += 16) {
    const __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j0), vm));
    _mm512_storeu_ps(s + j0, p);
    acc = _mm512_add_ps(acc, p);
  }
  return _mm512_reduce_add_ps(acc);
}

struct Scratch {
  std::vector<float> kt, vv, s, qf, ob;  // fp32 path (and s, ob for both)
  std::vector<uint32_t> kt2, vv2, qp, pp;  // bf16 pairs
};

// Scores in s [nq, Lkp] -> probabilities (unnormalised) in place; inv[i] = 1 / row sum (0 for a row with no key).
FF_AVX512 bool softmax_rows(float* s, int64_t nq, int64_t Lk, int64_t Lkp, float scale, const Mask& m, int64_t b,
                            int64_t h, int64_t i0, float* inv) {
  bool ok = true;
  for (int64_t i = 0; i < nq; ++i) {
    float* row = s + i * Lkp;
    const float mx = scale_mask_max(row, Lk, Lkp, scale, m, m.kind == MaskKind::None ? nullptr : m.row(b, h, i0 + i));
    if (mx == -std::numeric_limits<float>::infinity()) {  // no key allowed: an error, the row reads as 0
      ok = false;
      std::fill(row, row + Lkp, 0.0f);
      inv[i] = 0.0f;
      continue;
    }
    inv[i] = 1.0f / exp_sum(row, Lkp, mx);
  }
  return ok;
}

template <class Out>
void write_rows(Out* o, int64_t os, int64_t nq, int64_t hd, const float* ob, int64_t hp, const float* inv) {
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t d = 0; d < hd; ++d) store_elem(o + i * os + d, ob[i * hp + d] * inv[i]);
}

template <class In, class Out>
FF_AVX512 bool task_avx512(const Task<In, Out>& t, const Mask& m, int64_t b, int64_t h, Scratch& w) {
  const int64_t Lk = t.Lk, hd = t.hd, Lkp = (Lk + 15) / 16 * 16, hp = (hd + 15) / 16 * 16;
  w.kt.assign(static_cast<size_t>(hd * Lkp), 0.0f);
  w.vv.assign(static_cast<size_t>(Lk * hp), 0.0f);
  w.s.resize(static_cast<size_t>(kQT * Lkp));
  w.qf.resize(static_cast<size_t>(kQT * hd));
  w.ob.resize(static_cast<size_t>(kQT * hp));
  float *kt = w.kt.data(), *vv = w.vv.data(), *s = w.s.data(), *qf = w.qf.data(), *ob = w.ob.data();
  for (int64_t j = 0; j < Lk; ++j) {
    const In* k = t.k + j * t.ks;
    const In* v = t.v + j * t.vs;
    for (int64_t d = 0; d < hd; ++d) {
      kt[d * Lkp + j] = load_elem(k + d);
      vv[j * hp + d] = load_elem(v + d);
    }
  }
  bool ok = true;
  float inv[kQT];
  for (int64_t i0 = 0; i0 < t.L; i0 += kQT) {
    const int64_t nq = std::min(kQT, t.L - i0);
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t d = 0; d < hd; ++d) qf[i * hd + d] = load_elem(t.q + (i0 + i) * t.qs + d);
    for (int64_t j0 = 0; j0 < Lkp; j0 += 64)
      score_dispatch<F32Ops>(static_cast<int>(std::min<int64_t>(4, (Lkp - j0) / 16)), nq, qf, hd, kt, Lkp, j0, s);
    ok = softmax_rows(s, nq, Lk, Lkp, t.scale, m, b, h, i0, inv) && ok;
    pv_dispatch<F32Ops>(nq, s, Lkp, vv, hp, Lk, ob);
    write_rows(t.o + i0 * t.os, t.os, nq, hd, ob, hp, inv);
  }
  return ok;
}

inline uint32_t pair(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }

// p rows [nq, Lkp] fp32 -> bf16 pairs along keys [nq, Lkp / 2] (round to nearest even; Lkp is a multiple of 32 here)
FF_AVX512_BF16 void probabilities_to_pairs(const float* s, int64_t nq, int64_t Lkp, uint32_t* pp) {
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t j0 = 0; j0 < Lkp; j0 += 32) {
      const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + i * Lkp + j0 + 16), _mm512_loadu_ps(s + i * Lkp + j0));
      _mm512_storeu_si512(pp + i * (Lkp / 2) + j0 / 2, (__m512i)h);
    }
}

// bf16 inputs on AVX512-BF16: both products as vdpbf16ps over pairs (of head dims for the scores, of keys for the
// output); the probabilities rounded to bf16 for p V, the softmax itself in fp32.
FF_AVX512_BF16 bool task_avx512_bf16(const Task<uint16_t, uint16_t>& t, const Mask& m, int64_t b, int64_t h,
                                     Scratch& w) {
  const int64_t Lk = t.Lk, hd = t.hd, Lkp = (Lk + 31) / 32 * 32, hp = (hd + 15) / 16 * 16;
  const int64_t hd2 = (hd + 1) / 2, Lk2 = (Lk + 1) / 2;
  w.kt2.assign(static_cast<size_t>(hd2 * Lkp), 0u);
  w.vv2.assign(static_cast<size_t>(Lk2 * hp), 0u);
  w.s.resize(static_cast<size_t>(kQT * Lkp));
  w.qp.assign(static_cast<size_t>(kQT * hd2), 0u);
  w.pp.resize(static_cast<size_t>(kQT * Lkp / 2));
  w.ob.resize(static_cast<size_t>(kQT * hp));
  uint32_t *kt = w.kt2.data(), *vv = w.vv2.data(), *qp = w.qp.data(), *pp = w.pp.data();
  float *s = w.s.data(), *ob = w.ob.data();
  for (int64_t j = 0; j < Lk; ++j) {  // K^T in head-dim pairs: kt[dp, j] = (k[j, 2dp], k[j, 2dp + 1])
    const uint16_t* k = t.k + j * t.ks;
    for (int64_t dp = 0; dp < hd2; ++dp) kt[dp * Lkp + j] = pair(k[2 * dp], 2 * dp + 1 < hd ? k[2 * dp + 1] : 0);
  }
  for (int64_t jp = 0; jp < Lk2; ++jp) {  // V in key pairs: vv[jp, d] = (v[2jp, d], v[2jp + 1, d])
    const uint16_t* v0 = t.v + 2 * jp * t.vs;
    const uint16_t* v1 = 2 * jp + 1 < Lk ? v0 + t.vs : nullptr;
    for (int64_t d = 0; d < hd; ++d) vv[jp * hp + d] = pair(v0[d], v1 ? v1[d] : 0);
  }
  bool ok = true;
  float inv[kQT];
  for (int64_t i0 = 0; i0 < t.L; i0 += kQT) {
    const int64_t nq = std::min(kQT, t.L - i0);
    for (int64_t i = 0; i < nq; ++i) {
      const uint16_t* q = t.q + (i0 + i) * t.qs;
      for (int64_t dp = 0; dp < hd2; ++dp) qp[i * hd2 + dp] = pair(q[2 * dp], 2 * dp + 1 < hd ? q[2 * dp + 1] : 0);
    }
    for (int64_t j0 = 0; j0 < Lkp; j0 += 64)
      score_dispatch<Bf16Ops>(static_cast<int>(std::min<int64_t>(4, (Lkp - j0) / 16)), nq, qp, hd2, kt, Lkp, j0, s);
    ok = softmax_rows(s, nq, Lk, Lkp, t.scale, m, b, h, i0, inv) && ok;
    probabilities_to_pairs(s, nq, Lkp, pp);
    pv_dispatch<Bf16Ops>(nq, pp, Lkp / 2, vv, hp, Lk2, ob);
    write_rows(t.o + i0 * t.os, t.os, nq, hd, ob, hp, inv);
  }
  return ok;
}
#endif

template <class In, class Out>
void run(const Task<In, Out>& base, const Arg& q, const Arg& k, const Arg& v, const Mask& m, int64_t B, int64_t nh,
         bool simd) {
  const auto es = [](const Arg& a, int d) { return static_cast<int64_t>(a.info.strides[d] / a.info.itemsize); };
  std::atomic<bool> ok{true};
#pragma omp parallel
  {
#if defined(__x86_64__) && defined(__GNUC__)
    Scratch w;
#endif
    std::vector<float> s;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * nh; ++task) {
      const int64_t b = task / nh, h = task % nh;
      Task<In, Out> t = base;
      t.q = base.q + b * es(q, 0) + h * es(q, 1);
      t.k = base.k + b * es(k, 0) + h * es(k, 1);
      t.v = base.v + b * es(v, 0) + h * es(v, 1);
      t.o = base.o + b * base.L * nh * base.hd + h * base.hd;
      bool row_ok;
#if defined(__x86_64__) && defined(__GNUC__)
      if constexpr (std::is_same_v<In, uint16_t>) {
        if (simd && cpu_features().avx512_bf16 && g_bf16_dot) row_ok = task_avx512_bf16(t, m, b, h, w);
        else if (simd) row_ok = task_avx512(t, m, b, h, w);
        else row_ok = task_scalar(t, m, b, h, s);
      } else {
        row_ok = simd ? task_avx512(t, m, b, h, w) : task_scalar(t, m, b, h, s);
      }
#else
      row_ok = task_scalar(t, m, b, h, s);
#endif
      if (!row_ok) ok = false;
    }
  }
  if (!ok) value_error("mask allows no key for some query row: its softmax is undefined");
}

}  // namespace

void attention_set_simd(bool enabled) { g_simd = enabled; }
void attention_set_bf16_dot(bool enabled) { g_bf16_dot = enabled; }

void attention(const py::object& q_obj, const py::object& k_obj, const py::object& v_obj, const py::object& mask_obj,
               const py::object& out_obj, double scale) {
  Arg q = require_rows(q_obj, "q", 4, {DType::F32, DType::BF16});
  Arg k = require_rows(k_obj, "k", 4, {DType::F32, DType::BF16});
  Arg v = require_rows(v_obj, "v", 4, {DType::F32, DType::BF16});
  require_same_dtype(k, q);
  require_same_dtype(v, q);
  const int64_t B = q.dim(0), nh = q.dim(1), L = q.dim(2), hd = q.dim(3), Lk = k.dim(2);
  require_shape(k, {B, nh, -1, hd});
  require_shape(v, {B, nh, Lk, hd});
  if (hd < 1) value_error("q must have a head dim of at least 1, got shape " + shape_str(q.info.shape));
  if (Lk < 1 && L > 0) value_error("k must hold at least one key, got shape " + shape_str(k.info.shape));
  if (!std::isfinite(scale) || scale <= 0) value_error("scale must be finite and > 0, got " + std::to_string(scale));
  Arg out = require(out_obj, "out", 4, {DType::F32, DType::BF16}, /*writable=*/true);
  require_same_dtype(out, q);
  require_shape(out, {B, L, nh, hd});
  Mask m;
  if (!mask_obj.is_none()) {
    Arg mk = require(mask_obj, "mask", 4, {DType::U8, DType::F32, DType::BF16});
    if ((mk.dim(0) != 1 && mk.dim(0) != B) || (mk.dim(1) != 1 && mk.dim(1) != nh) || mk.dim(2) != L ||
        mk.dim(3) != Lk) {
      value_error("mask must have shape (" + std::to_string(B) + " or 1, " + std::to_string(nh) + " or 1, " +
                  std::to_string(L) + ", " + std::to_string(Lk) + "), got " + shape_str(mk.info.shape));
    }
    if (mk.dtype == DType::BF16 && q.dtype != DType::BF16)
      type_error("mask of dtype bfloat16 needs bfloat16 q, k, v (an additive mask is bool, float32 or q's dtype)");
    m.kind = mk.dtype == DType::U8 ? MaskKind::Bool : mk.dtype == DType::F32 ? MaskKind::F32 : MaskKind::BF16;
    m.base = static_cast<const char*>(mk.info.ptr);
    m.sb = mk.dim(0) == 1 ? 0 : mk.info.strides[0];
    m.sh = mk.dim(1) == 1 ? 0 : mk.info.strides[1];
    m.sl = mk.info.strides[2];
  }
  if (B == 0 || nh == 0 || L == 0) return;
  const bool simd = g_simd && cpu_features().avx512 && hd <= kMaxHd;
  const auto es = [](const Arg& a, int d) { return static_cast<int64_t>(a.info.strides[d] / a.info.itemsize); };
  py::gil_scoped_release nogil;
  if (q.dtype == DType::F32) {
    Task<float, float> t{q.data<float>(), k.data<float>(), v.data<float>(), es(q, 2), es(k, 2), es(v, 2),
                         out.mutable_data<float>(), nh * hd, L, Lk, hd, static_cast<float>(scale)};
    run(t, q, k, v, m, B, nh, simd);
  } else {
    Task<uint16_t, uint16_t> t{q.data<uint16_t>(), k.data<uint16_t>(), v.data<uint16_t>(), es(q, 2), es(k, 2),
                               es(v, 2), out.mutable_data<uint16_t>(), nh * hd, L, Lk, hd,
                               static_cast<float>(scale)};
    run(t, q, k, v, m, B, nh, simd);
  }
}

}  // namespace fastface
