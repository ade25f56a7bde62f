// Grouped token-level mixture of experts, forward, on the CPU.
//
// Legend: T tokens, H hidden, G expert groups, E routed experts per group, S shared experts per group,
// F routed expert ffn width, Fs shared expert ffn width, K top-k, P = T*(K+S) (token, slot) pairs,
// M rows of one expert's matmul (its pairs), MB rows per chunk.
//
// Algorithm (reference: fastface/ops/moe.py, grouped_moe_reference):
//   1. route: per token, logits = x_t . router[g_t]^T (fp32), softmax, top-k (ties -> lower expert
//      index), optional renormalisation;
//   2. counting sort of the (token, slot) pairs by key (g, e) -- routed experts -- and (g, s) -- shared
//      experts, weight 1 -- with a histogram and a prefix sum, stable in token order (no full sort);
//   3. per expert, per chunk of MB rows: gather the rows, GEMM with gate_up, act(gate) * up fused into
//      the GEMM's epilogue, GEMM with down, scale by the routing weight, write the pair's row;
//   4. combine: y_t = sum over the token's slots in a fixed order (routed by rank, then shared).
// Deterministic: every output element is computed by one thread with a reduction order that depends
// on K only, never on which or how many other rows share the expert (no atomics), so a token's output
// is bitwise the same alone or in any batch (on one machine and matmul path).
//
// Matmul core: csrc/gemm.h (C = A . W^T on the weights in place, batch-invariant, AMX for bf16 where the
// CPU has it); the measured figures behind its paths are in csrc/gemm.cpp.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace fastface {
namespace {

// ----------------------------------------------------------------------------------------------
// the expert pipeline, shared by grouped_moe (routes itself) and moe_experts (routing given)
// ----------------------------------------------------------------------------------------------

// One expert's work: its weights and its range in the sorted pair arrays.
struct Job {
  const void* gate_up;  // [2F, H]
  const void* down;     // [H, F]
  int64_t F;
  int64_t begin, end;   // pairs [begin, end) of the sorted order
};

// Sorted (token, slot) pairs: token id, destination row in the [P, H] pair buffer, routing weight.
struct Pairs {
  std::vector<int32_t> token;
  std::vector<int64_t> row;
  std::vector<float> weight;
};

constexpr int64_t kChunkRows = 128;  // MB: rows per chunk (A chunk 512 KB fp32 at H = 1024: stays in L2)
constexpr int64_t kWaveRows = 512;   // rows whose act(gate) * up is kept at once (all experts of one wave)
constexpr int64_t kFBlock = 16;      // f columns per task of the first GEMM (32 weight rows)
constexpr int64_t kHBlock = 32;      // output columns per task of the second GEMM

struct Chunk {
  int64_t job, c0, mb, hrow0;  // pairs [c0, c0 + mb) of job; their rows start at hrow0 of the wave's buffer
};
struct Task {
  int64_t chunk, n0, nb;  // output columns [n0, n0 + nb) of one chunk
};

// All experts' chunks are cut into tasks; every thread takes tasks from one shared list per phase, so a
// wave costs two barriers whatever the number of experts (T = 1: 2 experts, 2 barriers in all).
// Barriers matter here: on a loaded 2-core machine a barrier that waits for a descheduled thread costs
// a scheduler slice (ms), so 3 barriers per (expert, chunk) measured 2-10x slower at T = 1 there.
template <class In>
void run_jobs(const Kernels& kern, const In* x, int64_t H, const std::vector<Job>& jobs, const Pairs& pairs,
              Act act, float* ypair /* [P, H] */) {
  int64_t Fmax = 0;
  for (const Job& j : jobs) Fmax = std::max(Fmax, j.F);
  // waves of chunks, each holding at most kWaveRows rows (or one chunk)
  std::vector<std::vector<Chunk>> waves(1);
  int64_t rows = 0;
  for (int64_t j = 0; j < static_cast<int64_t>(jobs.size()); ++j)
    for (int64_t c0 = jobs[j].begin; c0 < jobs[j].end; c0 += kChunkRows) {
      const int64_t mb = std::min(kChunkRows, jobs[j].end - c0);
      if (rows + mb > kWaveRows && !waves.back().empty()) {
        waves.emplace_back();
        rows = 0;
      }
      waves.back().push_back({j, c0, mb, rows});
      rows += mb;
    }
  std::vector<std::vector<Task>> tasks1(waves.size()), tasks2(waves.size());
  for (size_t w = 0; w < waves.size(); ++w)
    for (int64_t c = 0; c < static_cast<int64_t>(waves[w].size()); ++c) {
      const int64_t F = jobs[waves[w][c].job].F;
      for (int64_t f0 = 0; f0 < F; f0 += kFBlock) tasks1[w].push_back({c, f0, std::min(kFBlock, F - f0)});
      for (int64_t h0 = 0; h0 < H; h0 += kHBlock) tasks2[w].push_back({c, h0, std::min(kHBlock, H - h0)});
    }
  const int64_t P = static_cast<int64_t>(pairs.token.size());
  std::vector<const In*> xrows(P);  // A operand of the first GEMM: the pair's token row, read in place
  for (int64_t p = 0; p < P; ++p) xrows[p] = x + static_cast<int64_t>(pairs.token[p]) * H;
  std::vector<In> hbuf(static_cast<size_t>(kWaveRows * Fmax));  // act(gate) * up of one wave [rows, F]
  std::vector<const In*> hrows(kWaveRows);
  for (int64_t i = 0; i < kWaveRows; ++i) hrows[i] = hbuf.data() + i * Fmax;

#pragma omp parallel
  {
    std::vector<float> c1(static_cast<size_t>(kChunkRows * 2 * kFBlock));  // [MB, 2 * FB] gate | up
    std::vector<float> c2(static_cast<size_t>(kChunkRows * kHBlock));      // [MB, HB]
    for (size_t w = 0; w < waves.size(); ++w) {
      const std::vector<Chunk>& wave = waves[w];
      // hbuf[rows, f0:f1] = act(x W_gate[f0:f1]^T) * (x W_up[f0:f1]^T)
      const int64_t n1 = static_cast<int64_t>(tasks1[w].size());
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n1; ++i) {
        const Task& t = tasks1[w][i];
        const Chunk& ch = wave[t.chunk];
        const Job& job = jobs[ch.job];
        const In* gu = static_cast<const In*>(job.gate_up);
        kern.gemm(ch.mb, t.nb, H, &xrows[ch.c0], gu + t.n0 * H, H, c1.data(), 2 * kFBlock);
        kern.gemm(ch.mb, t.nb, H, &xrows[ch.c0], gu + (job.F + t.n0) * H, H, c1.data() + kFBlock, 2 * kFBlock);
        for (int64_t r = 0; r < ch.mb; ++r)
          kern.act_mul(&c1[r * 2 * kFBlock], &c1[r * 2 * kFBlock + kFBlock], t.nb, act,
                       &hbuf[(ch.hrow0 + r) * Fmax + t.n0]);
      }
      // ypair[row] = w * (h W_down[h0:h1]^T)
      const int64_t n2 = static_cast<int64_t>(tasks2[w].size());
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n2; ++i) {
        const Task& t = tasks2[w][i];
        const Chunk& ch = wave[t.chunk];
        const Job& job = jobs[ch.job];
        const In* dn = static_cast<const In*>(job.down);
        kern.gemm(ch.mb, t.nb, job.F, &hrows[ch.hrow0], dn + t.n0 * job.F, job.F, c2.data(), kHBlock);
        for (int64_t r = 0; r < ch.mb; ++r) {
          const float wt = pairs.weight[ch.c0 + r];
          float* dst = ypair + pairs.row[ch.c0 + r] * H + t.n0;
          const float* src = &c2[r * kHBlock];
          for (int64_t h = 0; h < t.nb; ++h) dst[h] = wt * src[h];
        }
      }
    }
  }
}

#ifdef FASTFACE_X86
// ----------------------------------------------------------------------------------------------
// AMX (bf16): the expert weights are the tiles' "A" operand, read in place, and the few activation rows
// are packed into the VNNI "B" operand once per chunk (layouts: gemm.h). The products come out transposed
// (C^T[n, m]), which is what the epilogues want: act(gate) * up goes straight into the VNNI layout of the
// second GEMM's B operand, and the down projection's C^T is scattered to the pairs' rows with the routing
// weight.
// ----------------------------------------------------------------------------------------------

void run_jobs_amx(const bf16* x, int64_t H, const std::vector<Job>& jobs, const Pairs& pairs, Act act,
                  float* ypair) {
  constexpr int64_t kF = 16;  // f per first-GEMM task (a gate tile and an up tile)
  constexpr int64_t kH = 32;  // outputs per second-GEMM task (two tiles)
  int64_t Fmax = 0;
  for (const Job& j : jobs) Fmax = std::max(Fmax, j.F);
  const int64_t nkb = (H + 31) / 32, Hp = nkb * 32;
  const int64_t nfkb_max = (Fmax + 31) / 32;
  std::vector<std::vector<Chunk>> waves(1);
  int64_t rows = 0;
  for (int64_t j = 0; j < static_cast<int64_t>(jobs.size()); ++j)
    for (int64_t c0 = jobs[j].begin; c0 < jobs[j].end; c0 += kChunkRows) {
      const int64_t mb = std::min(kChunkRows, jobs[j].end - c0);
      const int64_t padded = (mb + 15) / 16 * 16;  // chunks start on 16-row groups of the packed operands
      if (rows + padded > kWaveRows && !waves.back().empty()) {
        waves.emplace_back();
        rows = 0;
      }
      waves.back().push_back({j, c0, mb, rows});
      rows += padded;
    }
  std::vector<std::vector<Task>> tasks1(waves.size()), tasks2(waves.size());
  std::vector<std::vector<std::pair<int64_t, int64_t>>> wave_groups(waves.size());
  for (size_t w = 0; w < waves.size(); ++w)
    for (int64_t c = 0; c < static_cast<int64_t>(waves[w].size()); ++c) {
      for (int64_t m0 = 0; m0 < waves[w][c].mb; m0 += 16) wave_groups[w].push_back({c, m0});
      const int64_t F = jobs[waves[w][c].job].F;
      for (int64_t f0 = 0; f0 < F; f0 += kF) tasks1[w].push_back({c, f0, std::min(kF, F - f0)});
      for (int64_t h0 = 0; h0 < H; h0 += kH) tasks2[w].push_back({c, h0, std::min(kH, H - h0)});
    }
  // packed B operands of one wave, per 16-row group: x [nkb][16][16] u32 and h [nfkb][16][16] u32
  const int64_t groups = kWaveRows / 16;
  std::vector<uint32_t> xpack(static_cast<size_t>(groups * nkb * 256));
  std::vector<uint32_t> hpack(static_cast<size_t>(groups * nfkb_max * 256));

#pragma omp parallel
  {
    amx_configure();
    alignas(64) float c[4 * 256];
    std::vector<bf16> pad0(16 * std::max(Hp, nfkb_max * 32)), pad1(pad0.size());
    for (size_t w = 0; w < waves.size(); ++w) {
      const std::vector<Chunk>& wave = waves[w];
      const std::vector<std::pair<int64_t, int64_t>>& grp = wave_groups[w];  // (chunk, first row) per group
      // phase 0: pack x rows; clear h
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < static_cast<int64_t>(grp.size()); ++i) {
        const Chunk& ch = wave[grp[i].first];
        const int64_t m0 = grp[i].second, g = ch.hrow0 / 16 + m0 / 16;
        uint32_t* dst = &xpack[g * nkb * 256];
        std::memset(dst, 0, nkb * 256 * sizeof(uint32_t));
        std::memset(&hpack[g * nfkb_max * 256], 0, nfkb_max * 256 * sizeof(uint32_t));
        for (int64_t m = 0; m < 16 && m0 + m < ch.mb; ++m) {
          amx_pack_row(x + static_cast<int64_t>(pairs.token[ch.c0 + m0 + m]) * H, H, m, dst);
        }
      }
      // phase 1: h = act(gate) * up, written into its packed B layout
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < static_cast<int64_t>(tasks1[w].size()); ++i) {
        const Task& t = tasks1[w][i];
        const Chunk& ch = wave[t.chunk];
        const Job& job = jobs[ch.job];
        const bf16* gu = static_cast<const bf16*>(job.gate_up);
        const int64_t F = job.F;
        // gate rows [f0, f0 + 16) of the gate half [0, F), up rows [f0, f0 + 16) of the up half [F, 2F)
        const bf16 *wg, *wu;
        const int64_t ld0 = amx_rows2(gu, t.n0, gu + F * H, t.n0, F, H, Hp, pad0.data(), pad1.data(), &wg, &wu);
        const int64_t ng = (ch.mb + 15) / 16;
        for (int64_t gi = 0; gi < ng; gi += 2) {
          const int64_t g0 = ch.hrow0 / 16 + gi;
          const bool two = gi + 1 < ng;
          amx_block(wg, wu, ld0 * 2, &xpack[g0 * nkb * 256], two ? &xpack[(g0 + 1) * nkb * 256] : nullptr, nkb, c);
          for (int64_t s = 0; s < (two ? 2 : 1); ++s) {
            const float* cg = c + s * 512;  // gate^T [16 f, 16 m]
            const float* cu = cg + 256;     // up^T
            const int64_t mvalid = std::min<int64_t>(16, ch.mb - (gi + s) * 16);
            amx_pack_act_mul(cg, cu, t.n0, t.nb, mvalid, act, &hpack[(g0 + s) * nfkb_max * 256]);
          }
        }
      }
      // phase 2: ypair[row] = w * (h W_down^T)
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < static_cast<int64_t>(tasks2[w].size()); ++i) {
        const Task& t = tasks2[w][i];
        const Chunk& ch = wave[t.chunk];
        const Job& job = jobs[ch.job];
        const bf16* dn = static_cast<const bf16*>(job.down);
        const int64_t F = job.F, nfkb = (F + 31) / 32, Fp = nfkb * 32;
        const bf16 *w0, *w1;
        const int64_t ld0 = amx_rows2(dn, t.n0, dn, t.n0 + 16, H, F, Fp, pad0.data(), pad1.data(), &w0, &w1);
        const int64_t ng = (ch.mb + 15) / 16;
        for (int64_t gi = 0; gi < ng; gi += 2) {
          const int64_t g0 = ch.hrow0 / 16 + gi;
          const bool two = gi + 1 < ng;
          // the down projection's k runs over F: the packed h of this row group, stride nfkb_max blocks
          amx_block(w0, w1, ld0 * 2, &hpack[g0 * nfkb_max * 256], two ? &hpack[(g0 + 1) * nfkb_max * 256] : nullptr,
                    nfkb, c);
          for (int64_t s = 0; s < (two ? 2 : 1); ++s) {
            const int64_t mvalid = std::min<int64_t>(16, ch.mb - (gi + s) * 16);
            for (int64_t m = 0; m < mvalid; ++m) {
              const int64_t p = ch.c0 + (gi + s) * 16 + m;
              const float wt = pairs.weight[p];
              float* dst = ypair + pairs.row[p] * H + t.n0;
              for (int64_t h = 0; h < t.nb; ++h) dst[h] = wt * c[s * 512 + (h / 16) * 256 + (h % 16) * 16 + m];
            }
          }
        }
      }
    }
    amx_release();
  }
}

#endif  // FASTFACE_X86

// y[t] = sum_{s < nslots} ypair[t * nslots + s], in slot order; written in the output dtype.
template <class Out>
void combine(const float* ypair, int64_t T, int64_t nslots, int64_t H, Out* y) {
  // small batches (decode) stay on the calling thread: a fork/join costs more than the sums, and on a
  // loaded machine a join can wait a whole scheduler slice for a descheduled worker
#pragma omp parallel for schedule(static) if (T * nslots * H >= (1 << 16))
  for (int64_t t = 0; t < T; ++t) {
    const float* src = ypair + t * nslots * H;
    Out* dst = y + t * H;
    for (int64_t h = 0; h < H; ++h) {
      float acc = src[h];
      for (int64_t s = 1; s < nslots; ++s) acc += src[s * H + h];
      if constexpr (std::is_same_v<Out, float>) dst[h] = acc; else dst[h] = f32_to_bf16(acc);
    }
  }
}

// Counting sort of the pairs by key. Routed pair (t, k) has key g*E + experts[t, k]; shared pair (t, s)
// has key G*E + g*S + s. Stable in token order.
struct Routing {
  int64_t T, K, G, E, S;
  const int64_t* group;    // [T] or nullptr (all zero)
  const int32_t* experts;  // [T, K] expert within the group
  const float* weights;    // [T, K]
};

Pairs sort_pairs(const Routing& r, std::vector<int64_t>& offsets) {
  const int64_t nkeys = r.G * r.E + r.G * r.S, nslots = r.K + r.S;
  std::vector<int64_t> count(nkeys + 1, 0);
  auto gid = [&](int64_t t) { return r.group ? r.group[t] : 0; };
  for (int64_t t = 0; t < r.T; ++t) {
    const int64_t g = gid(t);
    for (int64_t k = 0; k < r.K; ++k) ++count[g * r.E + r.experts[t * r.K + k] + 1];
    for (int64_t s = 0; s < r.S; ++s) ++count[r.G * r.E + g * r.S + s + 1];
  }
  for (int64_t i = 0; i < nkeys; ++i) count[i + 1] += count[i];  // prefix sum -> start of each key
  offsets = count;
  Pairs p;
  const int64_t P = r.T * nslots;
  p.token.resize(P);
  p.row.resize(P);
  p.weight.resize(P);
  std::vector<int64_t> next(count.begin(), count.end() - 1);
  for (int64_t t = 0; t < r.T; ++t) {
    const int64_t g = gid(t);
    for (int64_t k = 0; k < r.K; ++k) {
      const int64_t d = next[g * r.E + r.experts[t * r.K + k]]++;
      p.token[d] = static_cast<int32_t>(t);
      p.row[d] = t * nslots + k;
      p.weight[d] = r.weights[t * r.K + k];
    }
    for (int64_t s = 0; s < r.S; ++s) {
      const int64_t d = next[r.G * r.E + g * r.S + s]++;
      p.token[d] = static_cast<int32_t>(t);
      p.row[d] = t * nslots + r.K + s;
      p.weight[d] = 1.0f;
    }
  }
  return p;
}

// Run everything after routing. Weights: routed [G, E, 2F, H] / [G, E, H, F], shared [G, S, 2Fs, H] /
// [G, S, H, Fs] (or null).
template <class In>
void experts_forward(const Kernels& kern, const In* x, int64_t H, const Routing& r, const In* gate_up,
                     const In* down, int64_t F, const In* sgate_up, const In* sdown, int64_t Fs, Act act, In* y) {
  std::vector<int64_t> offsets;
  const Pairs pairs = sort_pairs(r, offsets);
  std::vector<Job> jobs;
  for (int64_t g = 0; g < r.G; ++g)
    for (int64_t e = 0; e < r.E; ++e) {
      const int64_t key = g * r.E + e;
      if (offsets[key + 1] > offsets[key])
        jobs.push_back({gate_up + key * 2 * F * H, down + key * H * F, F, offsets[key], offsets[key + 1]});
    }
  for (int64_t g = 0; g < r.G; ++g)
    for (int64_t s = 0; s < r.S; ++s) {
      const int64_t key = r.G * r.E + g * r.S + s, w = g * r.S + s;
      if (offsets[key + 1] > offsets[key])
        jobs.push_back({sgate_up + w * 2 * Fs * H, sdown + w * H * Fs, Fs, offsets[key], offsets[key + 1]});
    }
  const int64_t nslots = r.K + r.S;
  std::vector<float> ypair(static_cast<size_t>(r.T * nslots * H));
#ifdef FASTFACE_X86
  if constexpr (std::is_same_v<In, bf16>) {
    if (kern.path == Path::Amx) {
      run_jobs_amx(x, H, jobs, pairs, act, ypair.data());
      return combine(ypair.data(), r.T, nslots, H, y);
    }
  }
#endif
  run_jobs(kern, x, H, jobs, pairs, act, ypair.data());
  combine(ypair.data(), r.T, nslots, H, y);
}

// Router: logits[t] = x_t . router[g_t]^T, softmax, top-k with ties to the lower index, renormalise.
template <class In>
void route(const Kernels& kern, const In* x, const int64_t* group, const In* router, int64_t T, int64_t H,
           int64_t E, int64_t K, bool normalize, float* logits, int32_t* experts, float* weights) {
#pragma omp parallel if (T * E * H >= (1 << 20))  // decode: on the calling thread (see combine)
  {
    std::vector<float> p(E);
    std::vector<char> taken(E);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      float* l = logits + t * E;
      const In* xt = x + t * H;
      kern.gemm(1, E, H, &xt, router + group[t] * E * H, H, l, E);
      float mx = l[0];
      for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
      float sum = 0.0f;
      for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - mx));
      for (int64_t e = 0; e < E; ++e) p[e] /= sum;
      std::fill(taken.begin(), taken.end(), 0);
      float wsum = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;  // strict '>': ties keep the lower index
        taken[best] = 1;
        experts[t * K + k] = static_cast<int32_t>(best);
        weights[t * K + k] = p[best];
        wsum += p[best];
      }
      if (normalize)
        for (int64_t k = 0; k < K; ++k) weights[t * K + k] /= wsum;
    }
  }
}

Act parse_act(const std::string& a) {
  if (a == "silu") return Act::Silu;
  if (a == "gelu") return Act::Gelu;
  value_error("activation must be 'silu' or 'gelu', got '" + a + "'");
}

py::array new_array(DType dt, std::vector<py::ssize_t> shape) {
  if (dt == DType::BF16) return py::array_t<int16_t>(shape);
  return py::array_t<float>(shape);
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// bindings
// ----------------------------------------------------------------------------------------------

py::tuple grouped_moe(const py::object& x_, const py::object& group_ids_, const py::object& router_weight_,
                      const py::object& gate_up_proj_, const py::object& down_proj_, int64_t top_k,
                      const py::object& shared_gate_up_proj_, const py::object& shared_down_proj_,
                      bool normalize_topk, const std::string& activation, bool return_router_logits) {
  const auto floats = {DType::F32, DType::BF16};
  Arg x = require(x_, "x", 2, floats);
  Arg gid = require(group_ids_, "group_ids", 1, {DType::I64});
  Arg rw = require(router_weight_, "router_weight", 3, floats);
  Arg gu = require(gate_up_proj_, "gate_up_proj", 4, floats);
  Arg dn = require(down_proj_, "down_proj", 4, floats);
  require_same_dtype(rw, x);
  require_same_dtype(gu, x);
  require_same_dtype(dn, x);
  const int64_t T = x.dim(0), H = x.dim(1), G = rw.dim(0), E = rw.dim(1);
  if (H < 1) value_error("x must have at least one hidden column");
  if (G < 1 || E < 1) value_error("router_weight must have at least one group and one expert, got shape " +
                                  shape_str(rw.info.shape));
  require_shape(gid, {T});
  require_shape(rw, {G, E, H});
  if (gu.dim(0) != G || gu.dim(1) != E || gu.dim(3) != H || gu.dim(2) % 2 || gu.dim(2) == 0)
    value_error("gate_up_proj must have shape (" + std::to_string(G) + ", " + std::to_string(E) + ", 2F, " +
                std::to_string(H) + ") with F >= 1, got " + shape_str(gu.info.shape));
  const int64_t F = gu.dim(2) / 2;
  require_shape(dn, {G, E, H, F});
  require_int("top_k", top_k, 1, E);
  const bool has_shared = !shared_gate_up_proj_.is_none();
  if (has_shared != !shared_down_proj_.is_none())
    value_error("shared_gate_up_proj and shared_down_proj must be given together");
  int64_t S = 0, Fs = 0;
  const void* sgu_ptr = nullptr;
  const void* sdn_ptr = nullptr;
  std::vector<Arg> keep;
  if (has_shared) {
    Arg sgu = require(shared_gate_up_proj_, "shared_gate_up_proj", 4, floats);
    Arg sdn = require(shared_down_proj_, "shared_down_proj", 4, floats);
    require_same_dtype(sgu, x);
    require_same_dtype(sdn, x);
    S = sgu.dim(1);
    if (sgu.dim(0) != G || sgu.dim(3) != H || sgu.dim(2) % 2 || (S > 0 && sgu.dim(2) == 0))
      value_error("shared_gate_up_proj must have shape (" + std::to_string(G) + ", S, 2Fs, " + std::to_string(H) +
                  ") with Fs >= 1, got " + shape_str(sgu.info.shape));
    Fs = sgu.dim(2) / 2;
    require_shape(sdn, {G, S, H, Fs});
    sgu_ptr = sgu.info.ptr;
    sdn_ptr = sdn.info.ptr;
    keep.push_back(std::move(sgu));
    keep.push_back(std::move(sdn));
  }
  const Act act = parse_act(activation);
  require_range_i64(gid, 0, G);

  const bool is_bf16 = x.dtype == DType::BF16;
  py::array y = new_array(x.dtype, {T, H});
  py::array_t<float> logits({T, E});
  void* y_ptr = y.mutable_data();
  float* logits_ptr = logits.mutable_data();
  {
    py::gil_scoped_release nogil;
    const Kernels kern = kernels_for(is_bf16);
    std::vector<int32_t> experts(static_cast<size_t>(T * top_k));
    std::vector<float> weights(static_cast<size_t>(T * top_k));
    const Routing r{T, top_k, G, E, S, gid.data<int64_t>(), experts.data(), weights.data()};
    if (is_bf16) {
      route(kern, x.data<bf16>(), gid.data<int64_t>(), rw.data<bf16>(), T, H, E, top_k, normalize_topk, logits_ptr,
            experts.data(), weights.data());
      experts_forward(kern, x.data<bf16>(), H, r, gu.data<bf16>(), dn.data<bf16>(), F,
                      static_cast<const bf16*>(sgu_ptr), static_cast<const bf16*>(sdn_ptr), Fs, act,
                      static_cast<bf16*>(y_ptr));
    } else {
      route(kern, x.data<float>(), gid.data<int64_t>(), rw.data<float>(), T, H, E, top_k, normalize_topk,
            logits_ptr, experts.data(), weights.data());
      experts_forward(kern, x.data<float>(), H, r, gu.data<float>(), dn.data<float>(), F,
                      static_cast<const float*>(sgu_ptr), static_cast<const float*>(sdn_ptr), Fs, act,
                      static_cast<float*>(y_ptr));
    }
  }
  return py::make_tuple(y, return_router_logits ? py::object(logits) : py::object(py::none()));
}

py::object moe_experts(const py::object& x_, const py::object& top_k_index_, const py::object& top_k_weights_,
                       const py::object& gate_up_proj_, const py::object& down_proj_, const std::string& activation) {
  const auto floats = {DType::F32, DType::BF16};
  Arg x = require(x_, "x", 2, floats);
  Arg idx = require(top_k_index_, "top_k_index", 2, {DType::I64});
  Arg tw = require(top_k_weights_, "top_k_weights", 2, {DType::F32});
  Arg gu = require(gate_up_proj_, "gate_up_proj", 3, floats);
  Arg dn = require(down_proj_, "down_proj", 3, floats);
  require_same_dtype(gu, x);
  require_same_dtype(dn, x);
  const int64_t T = x.dim(0), H = x.dim(1), K = idx.dim(1), E = gu.dim(0);
  if (H < 1) value_error("x must have at least one hidden column");
  if (E < 1) value_error("gate_up_proj must hold at least one expert");
  require_shape(idx, {T, K});
  require_shape(tw, {T, K});
  if (gu.dim(2) != H || gu.dim(1) % 2 || gu.dim(1) == 0)
    value_error("gate_up_proj must have shape (E, 2F, " + std::to_string(H) + ") with F >= 1, got " +
                shape_str(gu.info.shape));
  const int64_t F = gu.dim(1) / 2;
  require_shape(dn, {E, H, F});
  const Act act = parse_act(activation);
  require_range_i64(idx, 0, E);

  const bool is_bf16 = x.dtype == DType::BF16;
  py::array y = new_array(x.dtype, {T, H});
  void* y_ptr = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    const Kernels kern = kernels_for(is_bf16);
    std::vector<int32_t> experts(static_cast<size_t>(T * K));
    const int64_t* ip = idx.data<int64_t>();
    for (int64_t i = 0; i < T * K; ++i) experts[i] = static_cast<int32_t>(ip[i]);
    const Routing r{T, K, 1, E, 0, nullptr, experts.data(), tw.data<float>()};
    if (is_bf16)
      experts_forward<bf16>(kern, x.data<bf16>(), H, r, gu.data<bf16>(), dn.data<bf16>(), F, nullptr, nullptr, 0, act,
                            static_cast<bf16*>(y_ptr));
    else
      experts_forward<float>(kern, x.data<float>(), H, r, gu.data<float>(), dn.data<float>(), F, nullptr, nullptr, 0,
                             act, static_cast<float*>(y_ptr));
  }
  return std::move(y);
}

}  // namespace fastface
