// Parallel masked-token decoding step (MaskGIT / Show-o) on the CPU.
//
// Legend: B sequences, R logits rows (B, or 2B with guidance), N image tokens per sequence, V codebook
// size, P still-masked positions of the batch, L = 8 positions decoded together (one "lane" each).
//
// Contract and algorithm: fastface/ops/masked_decode.py, masked_decode_step_reference. This kernel returns
// exactly the reference's tokens and mask given the same logits and u, so every float it computes is the
// float the reference computes, op for op:
//   z      = ((1 + w) * cond - w * uncond) / tau        float32 mul, mul, sub, div (never contracted into
//                                                       an FMA: see `opaque`), or cond / tau when w = 0
//   e      = exp(z - max z)                             torch.exp: on x86 torch builds that is MKL VML
//                                                       vmsExp (HA, FTZ/DAZ off) -- bit-identical only
//                                                       when called itself, see "exp and log" below
//   c[j]   = float(sum_{k<=j} double(e[k]))             torch.cumsum on CPU accumulates float32 in double,
//                                                       sequentially, rounding each partial sum to float
//   sample = #{j : c[j] <= float(u1 * c[V-1])}, <= V-1  c is non-decreasing, so a binary search finds it
//   log p  = (z[j] - max z) - log(c[V-1])
//   conf   = log p + float(tau_conf * (1 - ratio)) * (-log(-log u2)),   +inf at known positions
// then per sequence the mask_len smallest (conf, position) keys stay masked (a stable ascending sort's
// first mask_len, found with nth_element).
//
// exp and log. Elementwise torch.exp/torch.log on CPU tensors call MKL VML (vmsExp / vmsLn, HA mode)
// when torch is built with MKL, and those differ from a correctly rounded exp in ~1% of elements by one
// ulp. One ulp in an e[k] can move the float total by one ulp, hence log p, hence the order of two
// near-tied confidences at the mask boundary, or (rarer still) the sampled index: rare, but not "exactly the
// reference". So the Python wrapper looks up the very functions torch uses (fastface/_cpp.py, after checking
// them bit for bit against torch.exp / torch.log on a probe) and hands their addresses to
// `set_reference_math`; without them (a torch built without MKL) the kernel uses exp/log evaluated in double
// and rounded. Measured with those: 0 differing tokens in 36,864 samples and 0 differing masks in 144
// sequence-steps (B=8, N=256, V=2048, guidance 2) -- the tests allow 1e-3 there, and require 0 with VML's.
//
// Memory traffic. Only the P still-masked positions' logits rows are read, each exactly once: pass 1
// streams the L positions' cond (and uncond) rows, combines them and writes z transposed into a per-thread
// scratch zt[V][L] (V*L*4 = 256 KiB at V = 8192: L2-resident); every later pass (exp, cumsum, search)
// runs on that scratch. The transposed layout lets the sequential double cumsum advance L independent
// chains with one vector add per column (a single chain is latency-bound at 4 cycles per element).
//
// Measured (Xeon, Sapphire Rapids class, 1 thread, B=1 N=16 V=8192 with guidance, logits in L2, whole call
// including validation): 0.63 ns per z element with VML's exp (vmsExp itself: 0.15 ns per element), 3.7 ns
// with the built-in double-evaluated exp. Full size (bench/bench_decode_cpu.py: B=8 guided, N=1024, V=8192, all
// masked, 2 cores shared with other jobs): fp32 105 ms vs 3.43 s for the reference step (33x), 0.7x the time
// to read the logits once at the memcpy rate measured beside it; bf16 65 ms vs 3.68 s (57x), 1.35x.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTFACE_X86 1
#endif

#include "common.h"

namespace fastface {

namespace {

constexpr int L = 8;  // positions per group: one AVX2 float lane each

// exp / log over arrays: MKL VML's when installed (the reference's own), else double-evaluated and rounded.
using VmlFn = void (*)(int n, const float* a, float* r, long long mode);
constexpr long long kVmlMode = 0x2 | 0x140000 | 0x100;  // VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE (torch's)
VmlFn g_exp = nullptr;
VmlFn g_log = nullptr;

void array_exp(const float* in, float* out, int64_t n) {
  if (g_exp) {
    for (int64_t i = 0; i < n; i += (1 << 30)) g_exp(static_cast<int>(std::min<int64_t>(n - i, 1 << 30)), in + i,
                                                     out + i, kVmlMode);
    return;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(std::exp(static_cast<double>(in[i])));
}

void array_log(const float* in, float* out, int64_t n) {
  if (g_log) {
    for (int64_t i = 0; i < n; i += (1 << 30)) g_log(static_cast<int>(std::min<int64_t>(n - i, 1 << 30)), in + i,
                                                     out + i, kVmlMode);
    return;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(std::log(static_cast<double>(in[i])));
}

// Keeps the compiler from fusing a product into a following add/sub (the reference rounds each op).
inline float opaque(float v) {
#if defined(FASTFACE_X86)
  __asm__("" : "+x"(v));
#else
  volatile float t = v;
  v = t;
#endif
  return v;
}

template <bool BF16>
inline float load1(const void* p, int64_t k) {
  if constexpr (BF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[k]);
  else return static_cast<const float*>(p)[k];
}

struct Scalars {
  float a;        // float(1 + w)
  float b;        // float(w)
  float tau;      // float(sample_temperature)
  bool guided;    // w != 0
  bool divide;    // tau != 1 (x / 1 == x bitwise, so the division is skipped then)
};

template <bool BF16>
inline float z_at(const void* cond, const void* uncond, int64_t k, const Scalars& s) {
  float z;
  if (s.guided) {
    const float p = opaque(s.a * load1<BF16>(cond, k));
    const float q = opaque(s.b * load1<BF16>(uncond, k));
    z = p - q;
  } else {
    z = load1<BF16>(cond, k);
  }
  return s.divide ? z / s.tau : z;
}

// Pass 1, portable: zt[k*L + r] = z of lane r at column k; returns nothing, writes maxes.
template <bool BF16>
void combine_scalar(const void* const* cond, const void* const* uncond, int64_t V, const Scalars& s, float* zt,
                    float* zmax) {
  for (int r = 0; r < L; ++r) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t k = 0; k < V; ++k) {
      const float z = z_at<BF16>(cond[r], uncond[r], k, s);
      zt[k * L + r] = z;
      m = std::max(m, z);
    }
    zmax[r] = m;
  }
}

#if defined(FASTFACE_X86)
template <bool BF16>
__attribute__((target("avx2"))) inline __m256 load8(const void* p, int64_t k) {
  if constexpr (BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(p) + k);
  }
}

// Pass 1, AVX2: 8 lanes x 8 columns per iteration, combined, then transposed in registers so each store
// writes one column of all 8 lanes; the running max is then a single vector (lane r = position r).
template <bool BF16>
__attribute__((target("avx2"))) void combine_avx2(const void* const* cond, const void* const* uncond, int64_t V,
                                                  const Scalars& s, float* zt, float* zmax) {
  const __m256 va = _mm256_set1_ps(s.a), vb = _mm256_set1_ps(s.b), vt = _mm256_set1_ps(s.tau);
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t V8 = V & ~int64_t(7);
  for (int64_t k = 0; k < V8; k += 8) {
    __m256 z[L];
    for (int r = 0; r < L; ++r) {
      __m256 v = load8<BF16>(cond[r], k);
      if (s.guided) {
        __m256 p = _mm256_mul_ps(va, v);
        __m256 q = _mm256_mul_ps(vb, load8<BF16>(uncond[r], k));
        __asm__("" : "+x"(p), "+x"(q));  // no FMA contraction: the reference rounds the products
        v = _mm256_sub_ps(p, q);
      }
      z[r] = s.divide ? _mm256_div_ps(v, vt) : v;
    }
    // 8x8 transpose: z[r][i] -> t[i][r]
    const __m256 t0 = _mm256_unpacklo_ps(z[0], z[1]), t1 = _mm256_unpackhi_ps(z[0], z[1]);
    const __m256 t2 = _mm256_unpacklo_ps(z[2], z[3]), t3 = _mm256_unpackhi_ps(z[2], z[3]);
    const __m256 t4 = _mm256_unpacklo_ps(z[4], z[5]), t5 = _mm256_unpackhi_ps(z[4], z[5]);
    const __m256 t6 = _mm256_unpacklo_ps(z[6], z[7]), t7 = _mm256_unpackhi_ps(z[6], z[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    const __m256 c[8] = {
        _mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
        _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
        _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
        _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31),
    };
    for (int i = 0; i < 8; ++i) {
      _mm256_storeu_ps(zt + (k + i) * L, c[i]);
      vmax = _mm256_max_ps(vmax, c[i]);
    }
  }
  _mm256_storeu_ps(zmax, vmax);
  for (int r = 0; r < L; ++r) {
    for (int64_t k = V8; k < V; ++k) {
      const float z = z_at<BF16>(cond[r], uncond[r], k, s);
      zt[k * L + r] = z;
      zmax[r] = std::max(zmax[r], z);
    }
  }
}

// c[k][r] = float(double running sum) in place, 8 chains at once (two 4-wide double adds per column).
// One chain per row would be add-latency bound at 4 cycles per element; 8 chains make it 0.5 cycle.
__attribute__((target("avx2"))) void cumsum_avx2(float* zt, int64_t V) {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  for (int64_t k = 0; k < V; ++k) {
    float* p = zt + k * L;
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm_loadu_ps(p)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm_loadu_ps(p + 4)));
    _mm_storeu_ps(p, _mm256_cvtpd_ps(lo));
    _mm_storeu_ps(p + 4, _mm256_cvtpd_ps(hi));
  }
}
#endif

void cumsum_scalar(float* zt, int64_t V) {
  double acc[L] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = 0; k < V; ++k) {
    for (int r = 0; r < L; ++r) {
      acc[r] += static_cast<double>(zt[k * L + r]);
      zt[k * L + r] = static_cast<float>(acc[r]);
    }
  }
}

bool g_simd = true;  // false: the portable paths only (tests)

bool use_avx2() {
  return g_simd && cpu_features().avx2_fma;
}

// Per masked position: the sample, z[j] - max z and the float total.
struct Draw {
  int64_t token;
  float zs;
  float total;
};

template <bool BF16>
void draw_group(const void* logits, int64_t N, int64_t V, int64_t B, const Scalars& s, const int64_t* pos, int n,
                const float* u1, float* zt, Draw* out) {
  const size_t esz = BF16 ? 2 : 4;
  const char* base = static_cast<const char*>(logits);
  const void* cond[L];
  const void* uncond[L];
  for (int r = 0; r < L; ++r) {
    const int64_t p = pos[r < n ? r : 0];  // idle lanes repeat lane 0 (their results are dropped)
    cond[r] = base + static_cast<size_t>(p) * V * esz;
    uncond[r] = s.guided ? base + static_cast<size_t>(p + B * N) * V * esz : cond[r];
  }
  float zmax[L];
#if defined(FASTFACE_X86)
  if (use_avx2()) combine_avx2<BF16>(cond, uncond, V, s, zt, zmax);
  else combine_scalar<BF16>(cond, uncond, V, s, zt, zmax);
#else
  combine_scalar<BF16>(cond, uncond, V, s, zt, zmax);
#endif
  for (int64_t k = 0; k < V; ++k) {
    for (int r = 0; r < L; ++r) zt[k * L + r] -= zmax[r];
  }
  array_exp(zt, zt, V * L);
#if defined(FASTFACE_X86)
  if (use_avx2()) cumsum_avx2(zt, V);
  else cumsum_scalar(zt, V);
#else
  cumsum_scalar(zt, V);
#endif
  for (int r = 0; r < n; ++r) {
    const float total = zt[(V - 1) * L + r];
    const float thr = u1[pos[r]] * total;
    int64_t lo = 0, hi = V;  // first k with c[k] > thr (V if none)
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (zt[mid * L + r] <= thr) lo = mid + 1;
      else hi = mid;
    }
    const int64_t j = std::min(lo, V - 1);
    out[r].token = j;
    out[r].zs = z_at<BF16>(cond[r], uncond[r], j, s) - zmax[r];
    out[r].total = total;
  }
}

// (conf, position) ascending, NaN after everything (torch.sort's order), ties by position.
struct KeyLess {
  const float* conf;
  bool operator()(int64_t a, int64_t b) const {
    const float x = conf[a], y = conf[b];
    const bool nx = std::isnan(x), ny = std::isnan(y);
    if (nx != ny) return ny;
    if (!nx && x != y) return x < y;
    return a < b;
  }
};

}  // namespace

void masked_decode_set_simd(bool enabled) {
  g_simd = enabled;
}

void set_reference_math(uintptr_t exp_addr, uintptr_t log_addr) {
  g_exp = reinterpret_cast<VmlFn>(exp_addr);
  g_log = reinterpret_cast<VmlFn>(log_addr);
}

std::string reference_math() {
  return g_exp && g_log ? "vml" : (g_exp || g_log ? "mixed" : "builtin");
}

py::tuple masked_decode_step(const py::object& logits_obj, const py::object& tokens_obj, const py::object& masked_obj,
                             const py::object& u_obj, int64_t step, int64_t steps, double guidance,
                             double sample_temperature, double confidence_temperature, const std::string& schedule) {
  const Arg logits = require(logits_obj, "logits", 3, {DType::F32, DType::BF16});
  const Arg tokens = require(tokens_obj, "tokens", 2, {DType::I64});
  const Arg masked = require(masked_obj, "masked", 2, {DType::U8});
  const Arg u = require(u_obj, "u", 3, {DType::F32});
  const int64_t B = tokens.dim(0), N = tokens.dim(1), V = logits.dim(2);
  if (!std::isfinite(guidance)) value_error("guidance must be finite, got " + std::to_string(guidance));
  const bool guided = guidance != 0.0;
  require_shape(logits, {guided ? 2 * B : B, N, -1});
  require_shape(masked, {B, N});
  require_shape(u, {2, B, N});
  if (V < 1) value_error("logits must have at least one codebook column (V >= 1)");
  if (steps < 1) value_error("steps must be >= 1, got " + std::to_string(steps));
  require_int("step", step, 0, steps - 1);
  if (!(sample_temperature > 0) || !std::isfinite(sample_temperature)) {
    value_error("sample_temperature must be a finite positive number, got " + std::to_string(sample_temperature));
  }
  if (!(confidence_temperature >= 0) || !std::isfinite(confidence_temperature)) {
    value_error("confidence_temperature must be finite and >= 0, got " + std::to_string(confidence_temperature));
  }
  if (schedule != "cosine" && schedule != "linear") {
    value_error("schedule must be 'cosine' or 'linear', got '" + schedule + "'");
  }
  const float* up = u.data<float>();
  for (int64_t i = 0; i < u.numel(); ++i) {
    if (!(up[i] > 0.0f && up[i] < 1.0f)) {
      value_error("u must lie strictly inside (0, 1), got " + std::to_string(up[i]) + " at flat index " +
                  std::to_string(i));
    }
  }
  const int64_t* tok = tokens.data<int64_t>();
  const uint8_t* msk = masked.data<uint8_t>();
  for (int64_t i = 0; i < B * N; ++i) {
    if (!msk[i] && (tok[i] < 0 || tok[i] >= V)) {
      value_error("tokens at known positions must lie in [0, " + std::to_string(V) + "), got " +
                  std::to_string(tok[i]) + " at flat index " + std::to_string(i));
    }
  }

  py::array_t<int64_t> new_tokens({B, N});
  py::array_t<bool> new_masked({B, N});
  int64_t* out_tok = new_tokens.mutable_data();
  bool* out_msk = new_masked.mutable_data();
  const bool bf16 = logits.dtype == DType::BF16;
  const void* lp = logits.info.ptr;

  {
    py::gil_scoped_release release;
    // mask_len per sequence: scheduled_mask_len (Python doubles and libm cos, the same expression)
    int64_t target = 0;
    const bool last = step == steps - 1;
    if (!last) {
      const double ratio = static_cast<double>(step + 1) / static_cast<double>(steps);
      const double frac = schedule == "cosine" ? std::cos(M_PI / 2 * ratio) : 1.0 - ratio;
      target = std::max<int64_t>(1, static_cast<int64_t>(std::floor(static_cast<double>(N) * frac)));
    }
    const double ratio = static_cast<double>(step + 1) / static_cast<double>(steps);
    const float conf_scale = static_cast<float>(confidence_temperature * (1.0 - ratio));

    std::vector<int64_t> pos;  // flat b*N + i of the masked positions, in order
    pos.reserve(static_cast<size_t>(B * N));
    for (int64_t i = 0; i < B * N; ++i) {
      if (msk[i]) pos.push_back(i);
    }
    const int64_t P = static_cast<int64_t>(pos.size());
    std::vector<Draw> draws(static_cast<size_t>(P));
    const Scalars sc{static_cast<float>(1.0 + guidance), static_cast<float>(guidance),
                     static_cast<float>(sample_temperature), guided, static_cast<float>(sample_temperature) != 1.0f};
    const int64_t groups = (P + L - 1) / L;
#pragma omp parallel if (groups > 1)
    {
      std::vector<float> zt(static_cast<size_t>(V) * L);
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < groups; ++g) {
        const int n = static_cast<int>(std::min<int64_t>(L, P - g * L));
        if (bf16) draw_group<true>(lp, N, V, B, sc, pos.data() + g * L, n, up, zt.data(), draws.data() + g * L);
        else draw_group<false>(lp, N, V, B, sc, pos.data() + g * L, n, up, zt.data(), draws.data() + g * L);
      }
    }

    // confidence of every masked position: (z_j - max z) - log(total) + conf_scale * (-log(-log u2))
    std::vector<float> a(static_cast<size_t>(P)), la(static_cast<size_t>(P)), lg(static_cast<size_t>(P));
    for (int64_t p = 0; p < P; ++p) a[p] = draws[p].total;
    array_log(a.data(), la.data(), P);  // log(total)
    for (int64_t p = 0; p < P; ++p) a[p] = up[B * N + pos[p]];
    array_log(a.data(), lg.data(), P);  // log u2
    for (int64_t p = 0; p < P; ++p) a[p] = -lg[p];
    array_log(a.data(), lg.data(), P);  // log(-log u2)
    std::vector<float> conf(static_cast<size_t>(B * N), std::numeric_limits<float>::infinity());
    for (int64_t p = 0; p < P; ++p) {
      const float log_p = draws[p].zs - la[p];
      const float gumbel = -lg[p];
      conf[pos[p]] = log_p + opaque(conf_scale * gumbel);
    }

    for (int64_t i = 0; i < B * N; ++i) out_tok[i] = tok[i];
    for (int64_t p = 0; p < P; ++p) out_tok[pos[p]] = draws[p].token;
    std::fill(out_msk, out_msk + B * N, false);
    std::vector<int64_t> idx(static_cast<size_t>(N));
    for (int64_t b = 0; b < B; ++b) {
      int64_t n_unknown = 0;
      for (int64_t i = 0; i < N; ++i) n_unknown += msk[b * N + i] ? 1 : 0;
      const int64_t mask_len = last ? 0 : std::max<int64_t>(0, std::min(n_unknown - 1, target));
      if (mask_len == 0) continue;
      for (int64_t i = 0; i < N; ++i) idx[i] = i;
      KeyLess less{conf.data() + b * N};
      std::nth_element(idx.begin(), idx.begin() + (mask_len - 1), idx.end(), less);
      for (int64_t k = 0; k < mask_len; ++k) out_msk[b * N + idx[k]] = true;
    }
  }
  return py::make_tuple(new_tokens, new_masked);
}

}  // namespace fastface
