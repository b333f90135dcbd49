// y = x @ w.T where every output element is reduced in one fixed order, whatever the row count (CPU; float32
// or bfloat16, accumulated in float32).
//
// oneDNN's and MKL's GEMMs pick their blocking, and so the order in which a dot product is summed, from the
// shape of the call: a token's projection in a 1-row decode and in a 5-row speculative verify then differs in
// the last bit (measured here, bf16 at K = 1536), bf16's rounding of the output turns that into a whole ulp,
// and 30 layers later greedy decoding picks another token. Here output (m, n) is always the same dot of
// x[m] and w[n], summed in vector lanes over K in order (AVX512-BF16: pairs of bfloat16 products per lane),
// the lanes then added in one fixed tree. Nothing depends on M, on where the row sits in the call or on the thread that computes
// it, so a row's result is the same alone, in a verify or in a mixed prefill batch. Loaded by
// engine/kernels.py.
//
// Speed: decoding is bound by reading the weights, which this reads once per call for all rows (tiles of 4
// weight rows by up to 6 token rows kept in registers), prefetching the next tile's while one computes, so
// a 5-row verify costs little more than a 1-row decode. With AVX512-BF16 the bfloat16 dots are vdpbf16ps,
// what oneDNN uses. Measured in one run on an AVX512-BF16 EPYC (2 threads, SmolLM2-135M's 30 layers' shapes
// and its head, bfloat16, random weights): 1 row 11.7 ms against F.linear's 22.3, 5 rows 14.0 against 24.7,
// 16 rows 18.5 against 31.8, 64 rows 61.2 against 69.3, 256 rows 245.5 against 187.2 (prefill: oneDNN's
// blocking wins there, at the price of a row-dependent order).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FTSERVE_DPBF16 1
#endif

namespace {

// Token rows per tile: its 4 x kRowTile accumulators and their operands fit the registers (32 with AVX-512,
// 16 with AVX2). Lanes: float32 lanes of a GCC vector, as wide as the registers (GCC splits a wider one badly).
constexpr int kWeightTile = 4;  // weight rows per tile
#ifdef __AVX512F__
constexpr int kRowTile = 6;
constexpr int kLanes = 16;
#else
constexpr int kRowTile = 2;
constexpr int kLanes = 8;
#endif
constexpr int64_t kRowPanel = 512;  // token rows per panel

typedef float fvec __attribute__((vector_size(kLanes * 4)));
typedef uint16_t u16vec __attribute__((vector_size(kLanes * 2)));
typedef uint32_t u32vec __attribute__((vector_size(kLanes * 4)));

__attribute__((always_inline)) inline fvec load(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline fvec load(const at::BFloat16* p) {  // bfloat16: a float32's top half
  u16vec h;
  std::memcpy(&h, p, sizeof(h));
  const u32vec bits = __builtin_convertvector(h, u32vec) << 16;
  fvec v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
template <typename T>
__attribute__((always_inline)) inline fvec load_tail(const T* p, int64_t n) {  // n < kLanes elements, then 0
  T buf[kLanes] = {};
  std::memcpy(buf, p, n * sizeof(T));
  return load(buf);
}

// The fixed tree that adds the lanes: halves, then quarters... (the same for every output).
__attribute__((always_inline)) inline float add_lanes(fvec v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof(lanes));
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
}

// Portable tile: MB token rows by NB weight rows, kLanes float32 lanes each (lane j sums k = j, j + kLanes, ...
// in order; the tail is zero-filled, so it adds in the same way).
template <typename T, int MB, int NB>
void tile_portable(const T* x, const T* w, int64_t K, float* out, int64_t ldo) {
  fvec acc[MB][NB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) acc[m][n] = fvec{};
  for (int64_t k = 0; k < K; k += kLanes) {
    const int64_t left = std::min<int64_t>(kLanes, K - k);
    fvec wv[NB];
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      wv[n] = left == kLanes ? load(w + n * K + k) : load_tail(w + n * K + k, left);
      __builtin_prefetch(w + (NB + n) * K + k);  // the next tile's weights, while this one computes
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const fvec xv = left == kLanes ? load(x + m * K + k) : load_tail(x + m * K + k, left);
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) acc[m][n] += xv * wv[n];
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) out[m * ldo + n] = add_lanes(acc[m][n]);
}

#ifdef FTSERVE_DPBF16
// AVX512-BF16 tile: each accumulator's lane j sums the pairs (2j, 2j + 1) of every 32 elements of K, in order;
// the tail is a masked (zero-filled) load, so it adds in the same way.
template <int MB, int NB>
void tile_dpbf16(const at::BFloat16* x, const at::BFloat16* w, int64_t K, float* out, int64_t ldo) {
  __m512 acc[MB][NB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const int64_t left = std::min<int64_t>(32, K - k);
    const __mmask32 mask = left == 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
    __m512bh wv[NB];
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      wv[n] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + n * K + k);
      __builtin_prefetch(w + (NB + n) * K + k);  // the next tile's weights, while this one computes
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], xv, wv[n]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) out[m * ldo + n] = _mm512_reduce_add_ps(acc[m][n]);  // a fixed shuffle tree
}
#endif

template <typename T, int MB, int NB>
void tile(const T* x, const T* w, int64_t K, float* out, int64_t ldo) {
#ifdef FTSERVE_DPBF16
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    tile_dpbf16<MB, NB>(x, w, K, out, ldo);
    return;
  }
#endif
  tile_portable<T, MB, NB>(x, w, K, out, ldo);
}

// The last rows < kRowTile token rows: the same per-element arithmetic in a tile of MB rows.
template <typename T, int NB, int MB = 1>
void last_rows(int64_t rows, const T* x, const T* w, int64_t K, float* out, int64_t ldo) {
  if constexpr (MB < kRowTile) {
    if (rows == MB) return tile<T, MB, NB>(x, w, K, out, ldo);
    last_rows<T, NB, MB + 1>(rows, x, w, K, out, ldo);
  }
}

// Weight rows [n0, n0 + NB) against token rows [0, M), tile by tile (the weight rows stay in L1).
template <typename T, int NB>
void weight_block(const T* x, const T* w, int64_t M, int64_t K, int64_t n0, float* out, int64_t N) {
  int64_t m = 0;
  for (; m + kRowTile <= M; m += kRowTile) tile<T, kRowTile, NB>(x + m * K, w + n0 * K, K, out + m * N + n0, N);
  last_rows<T, NB>(M - m, x + m * K, w + n0 * K, K, out + m * N + n0, N);
}

// Weight rows [n0, n0 + width), width <= kWeightTile.
template <typename T, int NB = kWeightTile>
void weight_rows(int64_t width, const T* x, const T* w, int64_t M, int64_t K, int64_t n0, float* out, int64_t N) {
  if constexpr (NB >= 1) {
    if (width == NB) return weight_block<T, NB>(x, w, M, K, n0, out, N);
    weight_rows<T, NB - 1>(width, x, w, M, K, n0, out, N);
  }
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = (N + kWeightTile - 1) / kWeightTile;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    // A thread's weight rows meet the token rows a panel at a time, so the panel stays in L2 while they pass.
    for (int64_t m0 = 0; m0 < M; m0 += kRowPanel) {
      const int64_t rows = std::min(kRowPanel, M - m0);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n0 = b * kWeightTile;
        weight_rows<T>(std::min<int64_t>(kWeightTile, N - n0), xp + m0 * K, wp, rows, K, n0, op + m0 * N, N);
      }
    }
  });
}

}  // namespace

// x [M, K], w [N, K], both float32 or both bfloat16, contiguous. Returns [M, N] in x's dtype.
at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "ftserve::rows_linear: x [M, K], w [N, K]");
  const auto dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && w.scalar_type() == dtype,
              "ftserve::rows_linear: x and w must be float32 or bfloat16, the same");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "ftserve::rows_linear: inputs must be contiguous");
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0 || w.size(0) == 0) return out.to(dtype);
  if (dtype == at::kFloat) {
    run<float>(x, w, out);
    return out;
  }
  run<at::BFloat16>(x, w, out);
  return out.to(dtype);
}

TORCH_LIBRARY_FRAGMENT(ftserve, m) { m.def("rows_linear(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(ftserve, CPU, m) { m.impl("rows_linear", rows_linear); }
