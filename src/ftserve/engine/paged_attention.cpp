// Attention of single queries over a paged KV cache, reading keys and values where they lie (CPU; a float32
// or bfloat16 cache, computed in float32).
//
// The torch path gathers every row's blocks into a fresh [rows, length, dim] tensor per KV head and layer,
// then reads that copy again in two matmuls. At 16 decode rows of ~500 tokens that is 377 MB (float32)
// written and read twice per forward of SmolLM2-135M, a third of the step. Here each (query, KV head) pair
// walks its block table, so the cache is read once and nothing is copied. Loaded by engine/kernels.py.
//
// Each query token t attends to the first lens[t] positions of block-table row rows[t]: a decode row sees its
// whole context, query j of a speculative verify of n tokens over ctx sees ctx - n + j + 1 of them. The
// softmax runs here too, per query over exactly those positions (see attend_one).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FTSERVE_AVX512 1
#endif

namespace {

void check(bool ok, const char* what) { TORCH_CHECK(ok, "ftserve::paged_attention: ", what); }

// bfloat16 is the top half of a float32: a shift the compiler vectorizes (c10's conversion operator it did not).
inline float as_float(float x) { return x; }
inline float as_float(at::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

}  // namespace

// exp(x) for x <= 0 (a score minus its row's maximum), as Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2
// (ln2 split in two for precision), exp(r) by a degree-7 polynomial, times 2^n built in the exponent bits.
// About 1 ulp; plain arithmetic, so `omp simd` vectorizes it (glibc's vector expf needs -ffast-math).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // exp(-87) = 1.6e-38, the smallest normal float's neighbourhood; below counts as 0
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#ifdef FTSERVE_AVX512
// Scores with AVX-512, 16 keys at a time: one reduction across 16 dot products instead of one per product.
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 mask) {  // bfloat16 is the top half of a float32
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 vectors of 16 partial sums → one vector of their 16 totals, lane j = v[j]'s. Every vector goes through
// the same tree (quarters q0 + q2 and q1 + q3, then their sum, then lanes 0 + 2 and 1 + 3, then their sum)
// whichever slot it has, so a total never depends on its neighbours.
inline __m512 add_across(__m512* v) {
#pragma GCC unroll 8
  for (int p = 0; p < 8; ++p)
    v[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p)  // quarter r of v[p]: vector 4p + r
    v[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
#pragma GCC unroll 2
  for (int p = 0; p < 2; ++p)  // quarter r of v[p]: lanes 0-1 vector 8p + r, lanes 2-3 vector 8p + 4 + r
    v[p] = _mm512_add_ps(_mm512_shuffle_ps(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // z's lane 4r + c holds vector 4c + r's total.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, z);
}

// Scores of one query head against n <= 16 consecutive keys: each dot sums its 16-lane products over the
// head dimension in order, then add_across; keys past n are zeros, which no other key's total sees.
template <typename T>
inline void dot16(const float* qg, const T* keys, int64_t n, int64_t dim, float scale, float* out) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 mask = dim - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (dim - d)) - 1);
    const __m512 qv = _mm512_maskz_loadu_ps(mask, qg + d);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {  // keys past n: an empty mask reads nothing and adds zeros
      acc[j] = _mm512_fmadd_ps(qv, load16(keys + j * dim + d, j < n ? mask : __mmask16(0)), acc[j]);
    }
  }
  const __m512 totals = _mm512_mul_ps(add_across(acc), _mm512_set1_ps(scale));
  _mm512_mask_storeu_ps(out, __mmask16((1u << n) - 1), totals);
}
#endif

// One (query, KV head) pair: scores of its query heads for every position the query sees, their softmax, the
// weighted sum of values. Everything a query computes depends on that query alone (never on which other
// queries share the call, nor on their lengths), so a token's attention is the same in a decode step and in
// a speculative verify: greedy speculation stays exact wherever the rest of the forward is row-invariant.
template <typename T>
void attend_one(const float* q, const T* k, const T* v, const int64_t* blocks, int64_t len, int64_t block_size,
                int64_t group, int64_t dim, float scale, float* scores, float* totals, float* out) {
  for (int64_t first = 0; first < len; first += block_size) {  // block by block: no division per position
    const T* keys = k + blocks[first / block_size] * block_size * dim;
    const int64_t n = std::min(block_size, len - first);
#ifdef FTSERVE_AVX512
    for (int64_t g = 0; g < group; ++g) {
      for (int64_t i = 0; i < n; i += 16)
        dot16<T>(q + g * dim, keys + i * dim, std::min<int64_t>(16, n - i), dim, scale, scores + g * len + first + i);
    }
#else
    for (int64_t i = 0; i < n; ++i) {
      const T* key = keys + i * dim;
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = q + g * dim;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; ++d) dot += qg[d] * as_float(key[d]);
        scores[g * len + first + i] = dot * scale;
      }
    }
#endif
  }
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * len;
    float top = sg[0];
#pragma omp simd reduction(max : top)
    for (int64_t i = 0; i < len; ++i) top = std::max(top, sg[i]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < len; ++i) {
      sg[i] = exp_nonpositive(sg[i] - top);
      sum += sg[i];
    }
    totals[g] = sum;
  }
  std::fill(out, out + group * dim, 0.f);
  for (int64_t first = 0; first < len; first += block_size) {
    const T* values = v + blocks[first / block_size] * block_size * dim;
    const int64_t n = std::min(block_size, len - first);
    for (int64_t i = 0; i < n; ++i) {
      const T* value = values + i * dim;
      for (int64_t g = 0; g < group; ++g) {
        const float p = scores[g * len + first + i];
        float* og = out + g * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) og[d] += p * as_float(value[d]);
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inverse = 1.0f / totals[g];
    for (int64_t d = 0; d < dim; ++d) out[g * dim + d] *= inverse;
  }
}

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* table,
            int64_t nblocks, const int64_t* row_of, const int64_t* len_of, int64_t longest, int64_t block_size,
            float scale, at::Tensor& acc) {
  const int64_t num_tokens = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(0), slots = k_cache.size(1), group = heads / kv_heads;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  float* ap = acc.data_ptr<float>();
  at::parallel_for(0, num_tokens * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), scores(group * longest), totals(group);  // per thread, reused by its items
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / kv_heads, h = item % kv_heads;
      const T* qh = qp + (t * heads + h * group) * dim;
      for (int64_t i = 0; i < group * dim; ++i) qf[i] = as_float(qh[i]);
      attend_one<T>(qf.data(), kp + h * slots * dim, vp + h * slots * dim, table + row_of[t] * nblocks, len_of[t],
                    block_size, group, dim, scale, scores.data(), totals.data(), ap + (t * heads + h * group) * dim);
    }
  });
}

// q [T, H, D]; k_cache, v_cache [KVH, slots, D] (one layer), all of one dtype; tables [R, nblocks]; rows,
// lens [T]. Returns [T, H, D] in q's dtype.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& tables, const at::Tensor& rows, const at::Tensor& lens,
                           int64_t block_size, double scale) {
  check(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "bad q / cache shapes");
  const auto dtype = q.scalar_type();
  check((dtype == at::kFloat || dtype == at::kBFloat16) && k_cache.scalar_type() == dtype &&
            v_cache.scalar_type() == dtype,
        "q and the cache must be float32 or bfloat16, the same");
  check(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() && tables.is_contiguous() &&
            rows.is_contiguous() && lens.is_contiguous(),
        "inputs must be contiguous");
  check(tables.scalar_type() == at::kLong && rows.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
        "tables, rows and lens must be int64");
  const int64_t num_tokens = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(0), slots = k_cache.size(1), nblocks = tables.size(1);
  check(k_cache.size(2) == dim && heads % kv_heads == 0, "head layout differs from the cache's");
  check(rows.numel() == num_tokens && lens.numel() == num_tokens, "rows and lens need one entry per query");
  const int64_t* row_of = rows.data_ptr<int64_t>();
  const int64_t* len_of = lens.data_ptr<int64_t>();
  int64_t longest = 1;
  for (int64_t t = 0; t < num_tokens; ++t) {
    check(row_of[t] >= 0 && row_of[t] < tables.size(0), "row out of range");
    check(len_of[t] >= 1 && len_of[t] <= nblocks * block_size, "length out of range");
    longest = std::max(longest, len_of[t]);
  }
  const int64_t* table = tables.data_ptr<int64_t>();
  for (int64_t i = 0; i < tables.numel(); ++i) check(table[i] >= 0 && table[i] * block_size < slots, "block id out of range");

  at::Tensor acc = at::empty({num_tokens, heads, dim}, q.options().dtype(at::kFloat));
  const float s = static_cast<float>(scale);
  if (dtype == at::kFloat) {
    attend<float>(q, k_cache, v_cache, table, nblocks, row_of, len_of, longest, block_size, s, acc);
    return acc;
  }
  attend<at::BFloat16>(q, k_cache, v_cache, table, nblocks, row_of, len_of, longest, block_size, s, acc);
  return acc.to(dtype);
}

TORCH_LIBRARY(ftserve, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor rows, Tensor lens, "
        "int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ftserve, CPU, m) { m.impl("paged_attention", paged_attention); }
