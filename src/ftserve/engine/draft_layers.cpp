// A speculative draft's decode pass in one call: every layer of an INT8 copy of the model, for one token row
// per sequence, over the target's paged KV cache (CPU; activations in float32).
//
// The draft model proposes tokens one batched pass at a time, and a pass of SmolLM2-135M's 30 layers in
// Python issues some 25 small torch operations per layer (norms, rope, cache writes, residual adds) besides
// the projections: about 5 ms a pass here whatever the weights weigh, a quarter of the target's whole decode
// step. Drafting pays only while a pass costs a small part of the target's step, so the draft's layers run
// here: norms, rope, the KV write, attention (paged_attention.cpp's, reading the cache in place), the SiLU MLP
// and the projections, with no Python between them.
//
// The projections are weight-only INT8 (per output channel scales, the optimize stage's layout): each weight
// row is widened to float32 in registers and multiplied with every token row, so the weights are read once
// per pass at half the bytes of bfloat16. Drafts need not match anything bit for bit (the target verifies
// every token), so nothing here is row-invariant. Loaded by engine/kernels.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FTSERVE_AVX512 1
#endif

// engine/paged_attention.cpp, built into the same extension.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& tables, const at::Tensor& rows, const at::Tensor& lens,
                           int64_t block_size, double scale);

namespace {

constexpr int kWeightTile = 4;  // weight rows widened once and used for every token row of a tile
constexpr int kRowTile = 4;     // token rows per tile: 16 accumulators
constexpr int kPerLayer = 10;   // tensors per layer in the weight list (see draft_layers)

void check(bool ok, const char* what) { TORCH_CHECK(ok, "ftserve::draft_layers: ", what); }

#ifdef FTSERVE_AVX512
// acc[i][j] += w[i][k:k+16] * x[j][k:k+16] (the masked lanes of a K tail read as zeros).
template <int NW, int NM>
__attribute__((always_inline)) inline void step_i8(__m512 (&acc)[NW][NM], const float* x, const int8_t* w, int64_t K,
                                                   int64_t k, __mmask16 mask) {
  __m512 xs[NM];
#pragma GCC unroll 4
  for (int j = 0; j < NM; ++j) xs[j] = _mm512_maskz_loadu_ps(mask, x + j * K + k);
#pragma GCC unroll 4
  for (int i = 0; i < NW; ++i) {
    const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + i * K + k)));
#pragma GCC unroll 4
    for (int j = 0; j < NM; ++j) acc[i][j] = _mm512_fmadd_ps(wf, xs[j], acc[i][j]);
  }
}

// out[m][n] = dot(x[m], w[n]) * scale[n] for a tile of NW weight rows and NM token rows, whose accumulators
// stay in registers (the counts are compile-time so nothing spills). Each weight row's cache line is
// prefetched once, four tiles ahead: decoding streams the weights from memory.
template <int NW, int NM>
void tile_i8(const float* x, const int8_t* w, const float* scale, int64_t K, float* out, int64_t ldo) {
  __m512 acc[NW][NM];
#pragma GCC unroll 4
  for (int i = 0; i < NW; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NM; ++j) acc[i][j] = _mm512_setzero_ps();
  constexpr __mmask16 all = 0xFFFF;
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
#pragma GCC unroll 4
    for (int i = 0; i < NW; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + (i + 4 * NW) * K + k), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int u = 0; u < 64; u += 16) step_i8<NW, NM>(acc, x, w, K, k + u, all);
  }
  for (; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? all : static_cast<__mmask16>((1u << (K - k)) - 1);
    step_i8<NW, NM>(acc, x, w, K, k, mask);
  }
#pragma GCC unroll 4
  for (int i = 0; i < NW; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NM; ++j) out[j * ldo + i] = _mm512_reduce_add_ps(acc[i][j]) * scale[i];
}
#else
template <int NW, int NM>
void tile_i8(const float* x, const int8_t* w, const float* scale, int64_t K, float* out, int64_t ldo) {
  for (int i = 0; i < NW; ++i)
    for (int j = 0; j < NM; ++j) {
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < K; ++k) sum += x[j * K + k] * static_cast<float>(w[i * K + k]);
      out[j * ldo + i] = sum * scale[i];
    }
}
#endif

template <int NW>
void rows_tile(const float* x, int64_t M, const int8_t* w, const float* scale, int64_t K, float* y, int64_t N) {
  int64_t m0 = 0;
  for (; m0 + kRowTile <= M; m0 += kRowTile) tile_i8<NW, kRowTile>(x + m0 * K, w, scale, K, y + m0 * N, N);
  switch (M - m0) {
    case 3: tile_i8<NW, 3>(x + m0 * K, w, scale, K, y + m0 * N, N); break;
    case 2: tile_i8<NW, 2>(x + m0 * K, w, scale, K, y + m0 * N, N); break;
    case 1: tile_i8<NW, 1>(x + m0 * K, w, scale, K, y + m0 * N, N); break;
    default: break;
  }
}

// y [M, N] = x [M, K] @ (w [N, K] int8 * scale [N]).T, all float32 but w.
void int8_matmul(const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t N, float* y) {
  const int64_t blocks = (N + kWeightTile - 1) / kWeightTile;
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kWeightTile;
      if (N - n0 >= kWeightTile) {
        rows_tile<kWeightTile>(x, M, w + n0 * K, scale + n0, K, y + n0, N);
        continue;
      }
      for (int64_t n = n0; n < N; ++n) rows_tile<1>(x, M, w + n * K, scale + n, K, y + n, N);
    }
  });
}

void check_int8(const at::Tensor& w, const at::Tensor& scale, int64_t K) {
  check(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) == K,
        "a projection weight must be contiguous int8 [N, K] matching its input");
  check(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.size(0) == w.size(0),
        "a projection's scales must be contiguous float32 [N]");
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  int8_matmul(x.data_ptr<float>(), x.size(0), x.size(1), w.data_ptr<int8_t>(), scale.data_ptr<float>(), w.size(0),
              y.data_ptr<float>());
  return y;
}

// out[m] = x[m] / rms(x[m]) * weight, in float32 (the reference's order: normalize, then scale).
void rms_norm(const float* x, const float* weight, int64_t M, int64_t H, double eps, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    double sum = 0.0;
    for (int64_t i = 0; i < H; ++i) sum += static_cast<double>(x[m * H + i]) * x[m * H + i];
    const float inv = static_cast<float>(1.0 / std::sqrt(sum / H + eps));
    for (int64_t i = 0; i < H; ++i) out[m * H + i] = x[m * H + i] * inv * weight[i];
  }
}

// x * cos + roll(x, D/2) * signed_sin, per head, in place (engine/model.py's apply_rope).
void rope(float* x, int64_t heads, int64_t D, const float* cos, const float* sin) {
  std::vector<float> tmp(D);
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * D;
    for (int64_t d = 0; d < D; ++d) tmp[d] = v[d] * cos[d] + v[(d + half) % D] * sin[d];
    std::copy(tmp.begin(), tmp.end(), v);
  }
}

// Keys and values of row `row` of qkv (after rope) into one layer's cache at `slot`.
template <typename T>
void write_kv(at::Tensor& k_cache, at::Tensor& v_cache, const float* row, int64_t q_size, int64_t kv_size,
              int64_t D, int64_t slot) {
  T* k = k_cache.data_ptr<T>();
  T* v = v_cache.data_ptr<T>();
  const int64_t slots = k_cache.size(1);
  for (int64_t i = 0; i < kv_size; ++i) {
    const int64_t at = ((i / D) * slots + slot) * D + i % D;  // [kv_head, slot, d]
    k[at] = static_cast<T>(row[q_size + i]);
    v[at] = static_cast<T>(row[q_size + kv_size + i]);
  }
}

// What one call runs on: the rows, where they write and what they read, and the model's head layout.
struct Pass {
  int64_t M, H, D, heads, kv_heads, block_size;
  double eps;
  const int64_t* slot;
  const int64_t* pos;
  const float* cos;
  const float* sin;
  at::Tensor rows, lens, tables;  // for paged_attention: row m reads table row m over pos[m] + 1 positions
};

void check_layer(const at::Tensor* w, const Pass& p) {
  const int64_t q_size = p.heads * p.D, kv_size = p.kv_heads * p.D;
  check(w[0].scalar_type() == at::kFloat && w[0].numel() == p.H && w[5].scalar_type() == at::kFloat &&
            w[5].numel() == p.H,
        "norm weights must be float32 [H]");
  check_int8(w[1], w[2], p.H);
  check(w[1].size(0) == q_size + 2 * kv_size, "qkv rows must be (heads + 2 kv_heads) * D");
  check_int8(w[3], w[4], q_size);
  check(w[3].size(0) == p.H, "o rows must be H");
  check_int8(w[6], w[7], p.H);
  check(w[6].size(0) % 2 == 0, "gate_up rows must be even");
  check_int8(w[8], w[9], w[6].size(0) / 2);
  check(w[8].size(0) == p.H, "down rows must be H");
}

// h += o(attention(rope(qkv(norm(h))))), writing each row's keys and values into layer l's cache.
void attention_block(at::Tensor& h, at::Tensor& x, const at::Tensor* w, at::Tensor k_cache, at::Tensor v_cache,
                     const Pass& p) {
  const int64_t q_size = p.heads * p.D, kv_size = p.kv_heads * p.D;
  rms_norm(h.data_ptr<float>(), w[0].data_ptr<float>(), p.M, p.H, p.eps, x.data_ptr<float>());
  at::Tensor qkv = linear(x, w[1], w[2]);
  float* qp = qkv.data_ptr<float>();
  const int64_t width = qkv.size(1);
  const bool bf16 = k_cache.scalar_type() == at::kBFloat16;
  for (int64_t m = 0; m < p.M; ++m) {
    float* row = qp + m * width;
    rope(row, p.heads + p.kv_heads, p.D, p.cos + p.pos[m] * p.D, p.sin + p.pos[m] * p.D);  // q and k, adjacent
    if (bf16) {
      write_kv<at::BFloat16>(k_cache, v_cache, row, q_size, kv_size, p.D, p.slot[m]);
    } else {
      write_kv<float>(k_cache, v_cache, row, q_size, kv_size, p.D, p.slot[m]);
    }
  }
  at::Tensor q = qkv.narrow(1, 0, q_size).reshape({p.M, p.heads, p.D}).to(k_cache.scalar_type()).contiguous();
  const double scale = 1.0 / std::sqrt(static_cast<double>(p.D));
  at::Tensor attn = paged_attention(q, k_cache, v_cache, p.tables, p.rows, p.lens, p.block_size, scale);
  h.add_(linear(attn.to(at::kFloat).reshape({p.M, q_size}).contiguous(), w[3], w[4]));
}

// h += down(silu(gate) * up), gate and up from norm(h).
void mlp_block(at::Tensor& h, at::Tensor& x, const at::Tensor* w, const Pass& p) {
  rms_norm(h.data_ptr<float>(), w[5].data_ptr<float>(), p.M, p.H, p.eps, x.data_ptr<float>());
  at::Tensor gate_up = linear(x, w[6], w[7]);
  const int64_t inter = gate_up.size(1) / 2;
  at::Tensor act = at::empty({p.M, inter}, h.options());
  const float* gp = gate_up.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t i = 0; i < inter; ++i) {
      const float g = gp[m * 2 * inter + i];
      ap[m * inter + i] = g / (1.0f + std::exp(-g)) * gp[m * 2 * inter + inter + i];
    }
  h.add_(linear(act, w[8], w[9]));
}

}  // namespace

// h [M, H] float32: the embedded token of each row (one row per sequence). weights: per layer, in order,
// input norm [H], qkv int8 [(heads + 2 kv_heads) D, H] and its scales, o int8 [H, heads D] and scales,
// post norm [H], gate_up int8 [2 I, H] and scales, down int8 [H, I] and scales (norms and scales float32).
// k_cache, v_cache [layers, kv_heads, slots, D] (float32 or bfloat16, at least as many layers); slots,
// positions [M]; tables [M, nblocks] (row m's block table); cos, sin [positions, D] float32 (sin signed as in
// model.rope_tables). Writes each row's keys and values at its slot; returns the last layer's h [M, H].
at::Tensor draft_layers(const at::Tensor& h_in, at::TensorList weights, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& positions,
                        const at::Tensor& tables, const at::Tensor& cos, const at::Tensor& sin, int64_t heads,
                        int64_t kv_heads, int64_t block_size, double eps) {
  check(h_in.dim() == 2 && h_in.scalar_type() == at::kFloat, "h must be float32 [M, H]");
  check(weights.size() % kPerLayer == 0 && !weights.empty(), "weights: 10 tensors per layer");
  const int64_t layers = static_cast<int64_t>(weights.size()) / kPerLayer;
  check(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) >= layers &&
            k_cache.size(1) == kv_heads && k_cache.is_contiguous() && v_cache.is_contiguous(),
        "caches must be contiguous [layers, kv_heads, slots, D] covering the draft's layers");
  const auto kv_dtype = k_cache.scalar_type();
  check((kv_dtype == at::kFloat || kv_dtype == at::kBFloat16) && v_cache.scalar_type() == kv_dtype,
        "the cache must be float32 or bfloat16");
  const int64_t M = h_in.size(0), D = k_cache.size(3);
  check(heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  check(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && slots.numel() == M &&
            positions.numel() == M && slots.is_contiguous() && positions.is_contiguous(),
        "slots and positions: int64 [M]");
  check(tables.dim() == 2 && tables.size(0) == M && tables.scalar_type() == at::kLong, "tables: int64 [M, nblocks]");
  check(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
            sin.is_contiguous() && cos.size(1) == D && sin.sizes() == cos.sizes(),
        "cos and sin: float32 [positions, D]");
  Pass p{M, h_in.size(1), D, heads, kv_heads, block_size, eps, slots.data_ptr<int64_t>(), positions.data_ptr<int64_t>(),
         cos.data_ptr<float>(), sin.data_ptr<float>(), at::arange(M, slots.options()), positions + 1,
         tables.contiguous()};
  for (int64_t m = 0; m < M; ++m) {
    check(p.slot[m] >= 0 && p.slot[m] < k_cache.size(2), "slot out of range");
    check(p.pos[m] >= 0 && p.pos[m] < cos.size(0), "position out of range");
  }
  for (int64_t l = 0; l < layers; ++l) check_layer(weights.data() + l * kPerLayer, p);

  at::Tensor h = h_in.contiguous().clone();
  at::Tensor x = at::empty_like(h);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = weights.data() + l * kPerLayer;
    attention_block(h, x, w, k_cache.select(0, l), v_cache.select(0, l), p);
    mlp_block(h, x, w, p);
  }
  return h;
}

// x [M, K] float32 @ (w [N, K] int8 * scales [N]).T → [M, N] float32 (a draft's INT8 head).
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  check(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 [M, K]");
  check_int8(w, scales, x.size(1));
  return linear(x, w, scales);
}

TORCH_LIBRARY_FRAGMENT(ftserve, m) {
  m.def("draft_layers(Tensor h, Tensor[] weights, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor positions, "
        "Tensor tables, Tensor cos, Tensor sin, int heads, int kv_heads, int block_size, float eps) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor w, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(ftserve, CPU, m) {
  m.impl("draft_layers", draft_layers);
  m.impl("int8_linear", int8_linear);
}
