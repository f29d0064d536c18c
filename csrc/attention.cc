// Variable-length attention on capacity-padded batches: flash-style forward and
// FlashAttention-2 style backward, one XLA FFI custom call per batch.
//
// Layout (row-major, every buffer as XLA hands it over):
//   q [B, Cq, H, D], k [B, Ck, Hkv, D], v [B, Ck, Hkv, Dv], lq/lk int32 [B],
//   o [B, Cq, H, Dv], lse [B, H, Cq] (same float type as q). o, dq, dk and dv may come
//   with their last two dimensions merged ([B, Cq, H * Dv]): see _merged in
//   vsla_jax/attention/cpu.py for why the Python side declares them so. The forward
//   and the backward also read q/k/v from larger buffers [B, C, Hc >= H, Dc >= D]
//   (attributes heads, head_dim, kv_heads, v_head_dim; 0: the buffer's own size): the
//   head axes of a rank-3 batch from vs.stack, cropped by strides instead of a copy;
//   dq/dk/dv then have those buffers' shapes, zero in the head padding.
// Query i of item b attends keys j < lk[b] (and j <= i when causal). Rows i >= lq[b]
// and items without keys produce zeros (lse = -inf); padding is never read for
// compute: every tile is clipped to the item's lengths.
//
// Work is split into units (forward: item x head x query tile; backward: item x K/V
// head, so that dk/dv of a group are owned by one unit), sorted longest first and
// pulled from an atomic counter by the caller and the workers of XLA's intra-op
// thread pool (ffi::ThreadPool).
// Tiles are held transposed (one column per query), so the softmax runs in whole
// vectors across queries and K, V, Q and dO are read in place, never packed. All
// products go through one register-blocked GEMM with strided A, built for AVX-512
// (6 x 4 zmm accumulators), AVX2+FMA and baseline x86-64 and picked at run time; the
// vector helpers are compiled for the same three (target_clones).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common.h"

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define VSLA_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define VSLA_CLONES
#endif

namespace vsla {
namespace attn {

constexpr int kTQ = 64;  // queries per tile
constexpr int kTK = 64;  // keys per tile

// One 64-byte SIMD vector of T (GCC vector extension: a zmm, two ymm or four xmm).
template <class T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int kLanes = 64 / sizeof(T);
};

template <class T>
using VecT = typename Vec<T>::type;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

#define VSLA_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------- GEMM ---------------
// C[m, n] (= or +=) A[m, k] . B[k, n]. A is read through strides (element (i, p) at
// a[i * rsa + p * csa]), so a row-major matrix and a transposed one cost the same; B and
// C are row-major with row strides ldb and ldc. Any n: a last partial vector goes through
// a zero-padded copy, so nothing past n is read or written. K and V tiles are used where
// XLA put them (never packed or transposed). Register blocks are R rows by NV vectors,
// picked per instruction set in gemm() below.

template <class T>
VSLA_INLINE VecT<T> load_vec(const T* p, int cnt) {
  VecT<T> v = VecT<T>{};
  std::memcpy(&v, p, cnt * sizeof(T));
  return v;
}

template <class T>
VSLA_INLINE void store_vec(T* p, const VecT<T>& v, int cnt) {
  std::memcpy(p, &v, cnt * sizeof(T));
}

// One R x NV-vector block of C over the whole k; kPart: one vector holding `cnt` columns.
template <class T, int R, int NV, bool kAcc, bool kPart>
VSLA_INLINE void gemm_block(int64_t kdim, const T* __restrict a, int64_t rsa, int64_t csa,
                            const T* __restrict b, int64_t ldb, T* __restrict c, int64_t ldc,
                            int cnt) {
  using V = VecT<T>;
  constexpr int W = Vec<T>::kLanes;
  const int width = kPart ? cnt : W;
  V acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = kAcc ? load_vec(c + r * ldc + v * W, width) : V{};
  for (int64_t p = 0; p < kdim; ++p) {
    V bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) bv[v] = load_vec(b + p * ldb + v * W, width);
    const T* ap = a + p * csa;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T x = ap[r * rsa];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] += x * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) store_vec(c + r * ldc + v * W, acc[r][v], width);
}

// The last rest < R rows of a column block, as one block of exactly `rest` rows.
template <class T, int R, int NV, bool kAcc, bool kPart>
VSLA_INLINE void gemm_rest(int64_t rest, int64_t kdim, const T* a, int64_t rsa, int64_t csa,
                           const T* b, int64_t ldb, T* c, int64_t ldc, int cnt) {
  if constexpr (R > 1) {
    if (rest == R - 1)
      gemm_block<T, R - 1, NV, kAcc, kPart>(kdim, a, rsa, csa, b, ldb, c, ldc, cnt);
    else
      gemm_rest<T, R - 1, NV, kAcc, kPart>(rest, kdim, a, rsa, csa, b, ldb, c, ldc, cnt);
  }
}

// All m rows of one column block: blocks of R rows, then one block of the rest.
template <class T, int R, int NV, bool kAcc, bool kPart>
VSLA_INLINE void gemm_rows(int64_t m, int64_t kdim, const T* a, int64_t rsa, int64_t csa,
                           const T* b, int64_t ldb, T* c, int64_t ldc, int cnt) {
  int64_t i = 0;
  for (; i + R <= m; i += R)
    gemm_block<T, R, NV, kAcc, kPart>(kdim, a + i * rsa, rsa, csa, b, ldb, c + i * ldc, ldc,
                                      cnt);
  if (i < m)
    gemm_rest<T, R, NV, kAcc, kPart>(m - i, kdim, a + i * rsa, rsa, csa, b, ldb, c + i * ldc,
                                     ldc, cnt);
}

// Column blocks of NV vectors (R rows), then of 2 and 1 vectors (R1 rows: narrower blocks
// get more rows, to keep enough accumulators in flight), then a partial vector.
template <class T, int R, int NV, int R1, bool kAcc>
VSLA_INLINE void gemm_impl(int64_t m, int64_t n, int64_t kdim, const T* a, int64_t rsa,
                           int64_t csa, const T* b, int64_t ldb, T* c, int64_t ldc) {
  constexpr int W = Vec<T>::kLanes;
  int64_t j = 0;
  for (; j + NV * W <= n; j += NV * W)
    gemm_rows<T, R, NV, kAcc, false>(m, kdim, a, rsa, csa, b + j, ldb, c + j, ldc, W);
  if constexpr (NV > 2) {
    for (; j + 2 * W <= n; j += 2 * W)
      gemm_rows<T, R1, 2, kAcc, false>(m, kdim, a, rsa, csa, b + j, ldb, c + j, ldc, W);
  }
  for (; j + W <= n; j += W)
    gemm_rows<T, R1, 1, kAcc, false>(m, kdim, a, rsa, csa, b + j, ldb, c + j, ldc, W);
  if (j < n)
    gemm_rows<T, R1, 1, kAcc, true>(m, kdim, a, rsa, csa, b + j, ldb, c + j, ldc,
                                    static_cast<int>(n - j));
}

#define VSLA_GEMM_ARGS                                                                  \
  int64_t m, int64_t n, int64_t kdim, const T *a, int64_t rsa, int64_t csa, const T *b, \
      int64_t ldb, T *c, int64_t ldc
#define VSLA_GEMM_PASS m, n, kdim, a, rsa, csa, b, ldb, c, ldc

// AVX-512: 6 rows x 4 zmm = 24 accumulators of 32 registers (12 rows x 2 or x 1 zmm for
// narrow blocks); AVX2: 6 x 2 ymm; else 2 x 4 xmm.
#if defined(__x86_64__)
template <class T, bool kAcc>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"))) void gemm_avx512(
    VSLA_GEMM_ARGS) {
  gemm_impl<T, 6, 4, 12, kAcc>(VSLA_GEMM_PASS);
}

template <class T, bool kAcc>
__attribute__((target("avx2,fma"))) void gemm_avx2(VSLA_GEMM_ARGS) {
  gemm_impl<T, 6, 1, 6, kAcc>(VSLA_GEMM_PASS);
}
#endif

template <class T, bool kAcc>
void gemm_base(VSLA_GEMM_ARGS) {
  gemm_impl<T, 2, 1, 2, kAcc>(VSLA_GEMM_PASS);
}

enum class Isa { kBase, kAvx2, kAvx512 };

// The widest instruction set of this CPU that the GEMM, the transposes and the streaming
// stores have a build for, read once. The environment variable VSLA_CPU_ISA=avx2 or
// =base caps it (for testing every path on one machine; never raises it).
inline Isa host_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBase;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
      best = Isa::kAvx512;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      best = Isa::kAvx2;
#endif
    const char* cap = std::getenv("VSLA_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "base") == 0) return Isa::kBase;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == Isa::kAvx512)
      return Isa::kAvx2;
    return best;
  }();
  return isa;
}

template <class T, bool kAcc>
void gemm(VSLA_GEMM_ARGS) {
#if defined(__x86_64__)
  switch (host_isa()) {
    case Isa::kAvx512: return gemm_avx512<T, kAcc>(VSLA_GEMM_PASS);
    case Isa::kAvx2: return gemm_avx2<T, kAcc>(VSLA_GEMM_PASS);
    default: break;
  }
#endif
  gemm_base<T, kAcc>(VSLA_GEMM_PASS);
}

// ---------------------------------------------------------------- vector helpers -----
// exp over one vector, for arguments <= ~0 (scores minus a running maximum or a
// log-sum-exp); exactly 0 below -87 (and for -inf), NaN stays NaN. Round-to-nearest range
// reduction and Cephes' degree-6 polynomial (~2 ulp), all in vector registers.
VSLA_INLINE VecT<float> exp_vec(VecT<float> v) {
  using V = VecT<float>;
  typedef int32_t IV __attribute__((vector_size(64)));
  const V lo = V{} - 87.0f, hi = V{} + 88.0f;
  V vc = v < lo ? lo : v;
  vc = vc > hi ? hi : vc;
  const V magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V fn = (vc * 1.44269504088896341f + magic) - magic;
  const V r = vc - fn * 0.693359375f + fn * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const IV bits = (__builtin_convertvector(fn, IV) + 127) << 23;
  V y = p * reinterpret_cast<const V&>(bits);
  return v < lo ? V{} : y;
}

VSLA_INLINE VecT<double> exp_vec(VecT<double> v) {
  for (int l = 0; l < Vec<double>::kLanes; ++l) v[l] = std::exp(v[l]);
  return v;
}

// The row helpers below work on `rows` rows of stride ld over columns [0, n), n a
// multiple of the vector width; per-column operands are arrays of n.

// m[c] = max(m[c], max_r s[r, c]) (NaN never wins: it reaches the output through exp).
template <class T>
VSLA_CLONES void colmax_rows(const T* s, int64_t rows, int64_t ld, T* m, int64_t n) {
  constexpr int W = Vec<T>::kLanes;
  for (int64_t c = 0; c < n; c += W) {
    VecT<T> mv = load_vec(m + c, W);
    for (int64_t r = 0; r < rows; ++r) {
      const VecT<T> v = load_vec(s + r * ld + c, W);
      mv = v > mv ? v : mv;
    }
    store_vec(m + c, mv, W);
  }
}

// s[r, c] = exp(s[r, c] - m[c]).
template <class T>
VSLA_CLONES void exp_sub_rows(T* s, int64_t rows, int64_t ld, const T* m, int64_t n) {
  constexpr int W = Vec<T>::kLanes;
  for (int64_t c = 0; c < n; c += W) {
    const VecT<T> mv = load_vec(m + c, W);
    for (int64_t r = 0; r < rows; ++r)
      store_vec(s + r * ld + c, exp_vec(load_vec(s + r * ld + c, W) - mv), W);
  }
}

// Online-softmax bookkeeping of one key tile: corr[c] = exp(old[c] - m[c]) and
// sum[c] = sum[c] * corr[c] + sum_r p[r, c].
template <class T>
VSLA_CLONES void rescale_sums(const T* p, int64_t rows, int64_t ld, const T* old, const T* m,
                              T* corr, T* sum, int64_t n) {
  constexpr int W = Vec<T>::kLanes;
  for (int64_t c = 0; c < n; c += W) {
    const VecT<T> cv = exp_vec(load_vec(old + c, W) - load_vec(m + c, W));
    VecT<T> sv = load_vec(sum + c, W) * cv;
    for (int64_t r = 0; r < rows; ++r) sv += load_vec(p + r * ld + c, W);
    store_vec(corr + c, cv, W);
    store_vec(sum + c, sv, W);
  }
}

// dp[r, c] = p[r, c] * (dp[r, c] - di[c]): dS from P and dP (FlashAttention-2).
template <class T>
VSLA_CLONES void ds_rows(T* dp, const T* p, int64_t rows, int64_t ld, const T* di, int64_t n) {
  constexpr int W = Vec<T>::kLanes;
  for (int64_t c = 0; c < n; c += W) {
    const VecT<T> dv = load_vec(di + c, W);
    for (int64_t r = 0; r < rows; ++r) {
      T* x = dp + r * ld + c;
      store_vec(x, load_vec(p + r * ld + c, W) * (load_vec(x, W) - dv), W);
    }
  }
}

// y[r, :m] = x[r, :m] * f[r] for r < n (f == nullptr: by c), and y[r, m:m + pad] = 0.
// In place when y == x.
template <class T>
VSLA_CLONES void scale_rows(const T* x, int64_t ldx, int64_t n, int64_t m, const T* f, T c,
                            T* y, int64_t ldy, int64_t pad = 0) {
  constexpr int W = Vec<T>::kLanes;
  const int64_t full = m / W * W;
  for (int64_t r = 0; r < n; ++r) {
    const T fr = f ? f[r] : c;
    for (int64_t d = 0; d < full; d += W)
      store_vec(y + r * ldy + d, load_vec(x + r * ldx + d, W) * fr, W);
    for (int64_t d = full; d < m; ++d) y[r * ldy + d] = x[r * ldx + d] * fr;
    std::fill(y + r * ldy + m, y + r * ldy + m + pad, T(0));
  }
}

// scale_rows into a kernel output that nothing reads before the call returns, with
// streaming (non-temporal) stores where y, ldy and m allow whole aligned vectors: the
// rows go to memory without first reading each destination line in (a read for
// ownership per line of a freshly mapped page made these stores the hot spot of writing
// o, dq, dk and dv). `pad` zeros follow the m values of each row (the head gaps of a
// strided gradient, written beside the values so that each line is written once). An
// sfence orders the stores before the unit reports done.
#if defined(__x86_64__)
template <class T>
__attribute__((target("avx512f"))) void stream_rows_avx512(const T* x, int64_t ldx,
                                                            int64_t n, int64_t m,
                                                            const T* f, T c, T* y,
                                                            int64_t ldy, int64_t pad) {
  constexpr int W = Vec<T>::kLanes;
  for (int64_t r = 0; r < n; ++r) {
    const T fr = f ? f[r] : c;
    for (int64_t d = 0; d < m + pad; d += W) {
      const VecT<T> v = d < m ? load_vec(x + r * ldx + d, W) * fr : VecT<T>{};
      if constexpr (sizeof(T) == 4)
        _mm512_stream_ps(reinterpret_cast<float*>(y + r * ldy + d), (__m512)v);
      else
        _mm512_stream_pd(reinterpret_cast<double*>(y + r * ldy + d), (__m512d)v);
    }
  }
  _mm_sfence();
}

template <class T>
__attribute__((target("avx2"))) void stream_rows_avx2(const T* x, int64_t ldx, int64_t n,
                                                       int64_t m, const T* f, T c, T* y,
                                                       int64_t ldy, int64_t pad) {
  constexpr int W = 32 / sizeof(T);
  for (int64_t r = 0; r < n; ++r) {
    const T fr = f ? f[r] : c;
    for (int64_t d = 0; d < m; d += W) {
      if constexpr (sizeof(T) == 4)
        _mm256_stream_ps(reinterpret_cast<float*>(y + r * ldy + d),
                         _mm256_mul_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(
                                           x + r * ldx + d)),
                                       _mm256_set1_ps(static_cast<float>(fr))));
      else
        _mm256_stream_pd(reinterpret_cast<double*>(y + r * ldy + d),
                         _mm256_mul_pd(_mm256_loadu_pd(reinterpret_cast<const double*>(
                                           x + r * ldx + d)),
                                       _mm256_set1_pd(static_cast<double>(fr))));
    }
    for (int64_t d = m; d < m + pad; d += W) {
      if constexpr (sizeof(T) == 4)
        _mm256_stream_ps(reinterpret_cast<float*>(y + r * ldy + d), _mm256_setzero_ps());
      else
        _mm256_stream_pd(reinterpret_cast<double*>(y + r * ldy + d), _mm256_setzero_pd());
    }
  }
  _mm_sfence();
}
#endif

template <class T>
void store_rows(const T* x, int64_t ldx, int64_t n, int64_t m, const T* f, T c, T* y,
                int64_t ldy, int64_t pad = 0) {
#if defined(__x86_64__)
  const Isa isa = host_isa();
  const int64_t bytes = isa == Isa::kAvx512 ? 64 : 32, w = bytes / sizeof(T);
  const bool whole = reinterpret_cast<uintptr_t>(y) % bytes == 0 && ldy % w == 0 &&
                     m % w == 0 && pad % w == 0;
  if (whole && isa == Isa::kAvx512) return stream_rows_avx512(x, ldx, n, m, f, c, y, ldy, pad);
  if (whole && isa == Isa::kAvx2) return stream_rows_avx2(x, ldx, n, m, f, c, y, ldy, pad);
#endif
  scale_rows(x, ldx, n, m, f, c, y, ldy, pad);
}

// out[r] = sum_d x[r, d] * y[r, d] over d < m, for r < n.
template <class T>
VSLA_CLONES void dot_rows(const T* x, int64_t ldx, const T* y, int64_t ldy, int64_t n,
                          int64_t m, T* out) {
  constexpr int W = Vec<T>::kLanes;
  const int64_t full = m / W * W;
  for (int64_t r = 0; r < n; ++r) {
    VecT<T> acc{};
    for (int64_t d = 0; d < full; d += W)
      acc += load_vec(x + r * ldx + d, W) * load_vec(y + r * ldy + d, W);
    T sum = 0;
    for (int l = 0; l < W; ++l) sum += acc[l];
    for (int64_t d = full; d < m; ++d) sum += x[r * ldx + d] * y[r * ldy + d];
    out[r] = sum;
  }
}

// Causal: s[j, q] = fill for the queries q < j0 + j - i0 that key j0 + j comes after.
template <class T>
void mask_future(T* s, int64_t rows, int64_t ld, int64_t i0, int64_t j0, int64_t n, T fill) {
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t upto = std::min<int64_t>(n, j0 + j - i0);
    if (upto > 0) std::fill(s + j * ld, s + j * ld + upto, fill);
  }
}

// dst[c * ldd + r] = src[r * lds + c] * f for r < rows, c < cols (both <= W), and 0 for
// rows <= r < W (whole vectors are stored: dst needs room for W per column): one
// W x W tile transposed in registers, log2(W) rounds of two-vector shuffles (round s
// swaps bit s of the row index with bit s of the column index).
template <class T>
VSLA_CLONES void transpose_tile(const T* src, int64_t lds, int rows, int cols, T* dst,
                                int64_t ldd, T f) {
  using V = VecT<T>;
  constexpr int W = Vec<T>::kLanes;
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I IV __attribute__((vector_size(64)));
  V m[W];
#pragma GCC unroll 16
  for (int r = 0; r < W; ++r) {
    if (r >= rows) m[r] = V{};
    else if (cols == W) m[r] = load_vec(src + r * lds, W) * f;
    else m[r] = load_vec(src + r * lds, cols) * f;
  }
#pragma GCC unroll 4
  for (int sh = W / 2; sh >= 1; sh /= 2) {
    IV ma, mb;
#pragma GCC unroll 16
    for (int l = 0; l < W; ++l) {
      ma[l] = (l & sh) ? W + (l ^ sh) : l;
      mb[l] = (l & sh) ? W + l : (l ^ sh);
    }
#pragma GCC unroll 16
    for (int r = 0; r < W; ++r) {
      if (r & sh) continue;
      const V a = m[r], b = m[r + sh];
      m[r] = __builtin_shuffle(a, b, ma);
      m[r + sh] = __builtin_shuffle(a, b, mb);
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < W; ++c) {
    if (c >= cols) break;
    store_vec(dst + c * ldd, m[c], W);
  }
}

#if defined(__x86_64__)
// transpose_tile for float on AVX-512, all in registers (the generic one spills its
// 16 vectors): unpack pairs of rows by 32 then 64 bits, then 128-bit lanes twice.
__attribute__((target("avx512f"))) inline void transpose_tile_avx512(const float* src,
                                                                     int64_t lds, int rows,
                                                                     int cols, float* dst,
                                                                     int64_t ldd, float f) {
  const __mmask16 cm = static_cast<__mmask16>((1u << cols) - 1);
  const __m512 fv = _mm512_set1_ps(f);
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i)
    r[i] = i < rows ? _mm512_mul_ps(_mm512_maskz_loadu_ps(cm, src + i * lds), fv)
                    : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);      // lanes 0, 2 of both
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);  // lanes 1, 3 of both
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
  }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
  // r[c] is column c of the tile (checked against a lane-by-lane model of the shuffles)
#pragma GCC unroll 16
  for (int c = 0; c < 16; ++c)
    if (c < cols) _mm512_storeu_ps(dst + c * ldd, r[c]);
}
#endif

// The same over any rows x cols, tile by tile: columns [0, round_up(rows, W)) of dst are
// written, zero past rows.
template <class T>
void transpose_scaled(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst,
                      int64_t ldd, T f) {
  constexpr int64_t W = Vec<T>::kLanes;
  for (int64_t r0 = 0; r0 < rows; r0 += W)
    for (int64_t c0 = 0; c0 < cols; c0 += W) {
      const int nr = static_cast<int>(std::min(W, rows - r0));
      const int nc = static_cast<int>(std::min(W, cols - c0));
#if defined(__x86_64__)
      if constexpr (std::is_same_v<T, float>) {
        if (host_isa() == Isa::kAvx512) {
          transpose_tile_avx512(src + r0 * lds + c0, lds, nr, nc, dst + c0 * ldd + r0, ldd, f);
          continue;
        }
      }
#endif
      transpose_tile(src + r0 * lds + c0, lds, nr, nc, dst + c0 * ldd + r0, ldd, f);
    }
}

// Prefetches rows [0, rows) of `cols` elements at stride ld into the cache. A unit reads
// one head's slice of every row, 2 KiB or more apart, which the hardware prefetchers
// do not follow; asking for all of them at once overlaps the misses.
template <class T>
void prefetch_rows(const T* p, int64_t rows, int64_t ld, int64_t cols) {
  const int64_t bytes = cols * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = reinterpret_cast<const char*>(p + r * ld);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
  }
}

// Scratch buffers of one worker, reused across its units.
template <class T>
struct Scratch {
  std::vector<T> a, b, c, d, e, f;
};

template <class T>
T* sized(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// Calls with less work than this run on the caller alone (no pool wake-up): the units'
// query-key pairs, per 128 of head size D + Dv (the backward counts each pair twice), and
// the prep passes' output bytes. The forward's bar is higher: a pool wake-up cost a
// 4-item batch of 4-6 tokens (H = 8, D = 80) ~47 us against ~30 us on the caller alone,
// while 8 x 30 tokens still gain from a second thread (215 us against 260 us).
constexpr double kSerialPairs = 8192;
constexpr double kSerialPairsForward = 32768;
constexpr double kSerialBytes = 1 << 20;

// Shapes of one call, checked. H, Hkv, D, Dv are the logical sizes; q, k and v may hold
// more (the forward reads [.., :H, :D] of a [B, C, Hc, Dc] buffer: rank-3 batches from
// vs.stack, whose capacity ladder pads the head axes), so each has its own row stride
// (qr, kr, vr) and head stride (qh, kh, vh) in elements.
struct Dims {
  int64_t B, Cq, Ck, H, Hkv, D, Dv, G;
  int64_t qr, qh, kr, kh, vr, vh;
};

// ---------------------------------------------------------------- threading ----------
// Runs fn(unit) for every unit in `order`; the caller takes part, so a pool thread that
// calls in cannot deadlock waiting for busy workers.
struct Job {
  std::vector<int64_t> order;
  std::function<void(int64_t)> fn;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void drain() {
    const int64_t n = static_cast<int64_t>(order.size());
    for (int64_t u; (u = next.fetch_add(1)) < n;) {
      fn(order[u]);
      if (done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

// Units sorted by decreasing cost (longest processing time first).
inline std::vector<int64_t> by_cost(const std::vector<double>& cost) {
  std::vector<int64_t> order(cost.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
  return order;
}

// fn(unit) over units; returns after every unit ran. Below `serial_below` total cost the
// caller runs them all: waking a pool worker costs more than a small call's work.
template <class Fn>
void parallel_units(ffi::ThreadPool& pool, const std::vector<double>& cost, int64_t workers,
                    Fn&& fn, double serial_below = 0) {
  if (cost.empty()) return;
  double total = 0;
  for (double c : cost) total += c;
  if (total < serial_below || workers <= 1) {
    for (size_t u = 0; u < cost.size(); ++u) fn(static_cast<int64_t>(u));
    return;
  }
  auto job = std::make_shared<Job>();
  job->order = by_cost(cost);
  job->fn = std::forward<Fn>(fn);
  const int64_t n = static_cast<int64_t>(job->order.size());
  const int64_t extra = std::min(workers, n) - 1;
  // Late-starting tasks find the counter exhausted and touch nothing but the job.
  for (int64_t w = 0; w < extra; ++w) pool.Schedule([job] { job->drain(); });
  job->drain();
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == n; });
}

inline int64_t worker_count(ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads());
}

// Scratch of the calling thread: grows to the largest unit it ran and is reused by later
// units and calls (a thread runs one unit at a time; handlers keep no other state).
template <class T>
Scratch<T>& thread_scratch() {
  thread_local Scratch<T> s;
  return s;
}

// ---------------------------------------------------------------- forward ------------
template <class T>
struct FwdArgs {
  const T *q, *k, *v;
  const int32_t *lq, *lk;
  T *o, *lse;
  bool causal;
  T scale;
};

// Queries [i0, i0 + n) of head h of item b (n <= kTQ), lk > 0. Scores are held
// transposed (one column per query), so the online softmax runs down columns in whole
// vectors: S^T = K Q^T, then O += (P^T)^T V, with K and V read in place.
template <class T>
void fwd_unit(const FwdArgs<T>& a, const Dims& s, int64_t b, int64_t h, int64_t i0,
              int64_t n, Scratch<T>& w) {
  constexpr int W = Vec<T>::kLanes;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t lk = a.lk[b], hk = h / s.G, np = round_up(n, W);
  const int64_t kend = a.causal ? std::min<int64_t>(lk, i0 + n) : lk;
  const int64_t ldk = s.kr, ldv = s.vr, ldo = s.H * s.Dv;
  const T* kb = a.k + b * s.Ck * ldk + hk * s.kh;   // key j at kb + j * ldk
  const T* vb = a.v + b * s.Ck * ldv + hk * s.vh;
  T* qt = sized(w.a, s.D * kTQ);    // scaled queries, transposed [D, kTQ]
  T* st = sized(w.b, kTK * kTQ);    // scores, then probabilities, transposed [kTK, kTQ]
  T* acc = sized(w.c, kTQ * s.Dv);  // output [kTQ, Dv]
  T* mx = sized(w.d, 4 * kTQ);      // running maximum, sum, previous maximum, correction
  T* sum = mx + kTQ;
  T* old = sum + kTQ;
  T* corr = old + kTQ;
  prefetch_rows(kb, std::min<int64_t>(kend, kTK), ldk, s.D);
  prefetch_rows(vb, std::min<int64_t>(kend, kTK), ldv, s.Dv);
  transpose_scaled(a.q + (b * s.Cq + i0) * s.qr + h * s.qh, s.qr, n, s.D, qt, kTQ, a.scale);
  std::fill(acc, acc + n * s.Dv, T(0));
  std::fill(mx, mx + kTQ, ninf);
  std::fill(sum, sum + kTQ, T(0));
  for (int64_t j0 = 0; j0 < kend; j0 += kTK) {
    const int64_t nk = std::min<int64_t>(kTK, kend - j0);
    if (j0 + kTK < kend) {  // the next tile
      prefetch_rows(kb + (j0 + kTK) * ldk, std::min<int64_t>(kTK, kend - j0 - kTK), ldk, s.D);
      prefetch_rows(vb + (j0 + kTK) * ldv, std::min<int64_t>(kTK, kend - j0 - kTK), ldv, s.Dv);
    }
    gemm<T, false>(nk, np, s.D, kb + j0 * ldk, ldk, 1, qt, kTQ, st, kTQ);
    if (a.causal && j0 + nk - 1 > i0) mask_future(st, nk, kTQ, i0, j0, np, ninf);
    std::copy(mx, mx + np, old);
    colmax_rows(st, nk, kTQ, mx, np);  // key j0 <= every query: the maximum is finite
    exp_sub_rows(st, nk, kTQ, mx, np);
    rescale_sums(st, nk, kTQ, old, mx, corr, sum, np);  // corr = 0 on the first tile
    if (j0 > 0) scale_rows(acc, s.Dv, n, s.Dv, corr, T(1), acc, s.Dv);
    gemm<T, true>(n, s.Dv, nk, st, 1, kTQ, vb + j0 * ldv, ldv, acc, s.Dv);
  }
  T* out = a.o + (b * s.Cq + i0) * ldo + h * s.Dv;
  for (int64_t r = 0; r < n; ++r) {
    a.lse[(b * s.H + h) * s.Cq + i0 + r] = mx[r] + std::log(sum[r]);
    sum[r] = T(1) / sum[r];  // sum >= 1: the column maximum contributes exp(0)
  }
  store_rows(acc, s.Dv, n, s.Dv, sum, T(1), out, ldo);
}

// An output of `B` items of `per_item` elements, of which the units write the first
// `written_rows[b]` rows of `row` elements of item b: true when the whole buffer is zero
// now. That is the case for a buffer XLA has just mmapped (malloc does so for every
// buffer of 32 MiB or more): zero_if_absent hands its pages back, and the per-item
// populate (prefault) maps them in as zero pages. Where the written rows cover more
// than 1/8 of the buffer, huge pages are asked for over all of it: the per-item ranges
// are usually below 2 MiB, so the populate alone never gets any, and a fault per 4 KiB
// page dominated the backward of padded rank-3 batches (BENCHMARKS.md,
// experiments/time_stack_rank_backward.py). False for reused (resident) memory: the
// per-item clearing then writes the zeros.
template <class T>
bool fresh_output(T* g, int64_t B, int64_t per_item, const int32_t* written_rows,
                  int64_t row) {
  const size_t bytes = static_cast<size_t>(B * per_item) * sizeof(T);
  if (!zero_if_absent(g, bytes, false)) return false;
  double written = 0;
  for (int64_t b = 0; b < B; ++b) written += static_cast<double>(written_rows[b] * row);
  if (8 * written * sizeof(T) > static_cast<double>(bytes)) advise_huge(g, bytes);
  return true;
}

template <class T>
void forward(const FwdArgs<T>& a, const Dims& s, ffi::ThreadPool& pool) {
  const T ninf = -std::numeric_limits<T>::infinity();
  // Per item, on every worker: zeros (unless the whole output is zero already:
  // fresh_output) and lse = -inf for the padding and items without keys; the rows the
  // units will write mapped in ahead.
  const int64_t workers = worker_count(pool);
  const std::vector<double> rows(s.B, static_cast<double>(s.Cq * s.H * s.Dv * sizeof(T)));
  const bool zeroed = fresh_output(a.o, s.B, s.Cq * s.H * s.Dv, a.lq, s.H * s.Dv);
  parallel_units(pool, rows, workers, [&a, &s, ninf, zeroed](int64_t b) {
    const int64_t from = a.lk[b] > 0 ? a.lq[b] : 0;
    if (!zeroed)
      zero_fill(a.o + (b * s.Cq + from) * s.H * s.Dv, a.o + (b + 1) * s.Cq * s.H * s.Dv);
    prefault(a.o + b * s.Cq * s.H * s.Dv, a.o + (b * s.Cq + from) * s.H * s.Dv);
    for (int64_t h = 0; h < s.H; ++h)
      std::fill(a.lse + (b * s.H + h) * s.Cq + from, a.lse + (b * s.H + h + 1) * s.Cq, ninf);
  }, kSerialBytes);
  struct Unit { int64_t b, h, i0, n; };
  std::vector<Unit> units;
  std::vector<double> cost;
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t lq = a.lq[b], lk = a.lk[b];
    if (lk == 0) continue;
    for (int64_t i0 = 0; i0 < lq; i0 += kTQ) {
      const int64_t n = std::min<int64_t>(kTQ, lq - i0);
      const int64_t kend = a.causal ? std::min<int64_t>(lk, i0 + n) : lk;
      for (int64_t h = 0; h < s.H; ++h) {
        units.push_back({b, h, i0, n});
        cost.push_back(static_cast<double>(round_up(n, 16)) * kend + 256.0);
      }
    }
  }
  parallel_units(pool, cost, workers, [&a, &s, &units](int64_t u) {
    const Unit& x = units[u];
    fwd_unit(a, s, x.b, x.h, x.i0, x.n, thread_scratch<T>());
  }, kSerialPairsForward * 128.0 / static_cast<double>(s.D + s.Dv));
}

// ---------------------------------------------------------------- backward -----------
template <class T>
struct BwdArgs {
  const T *q, *k, *v, *o, *lse, *dout;
  const int32_t *lq, *lk;
  T *dq, *dk, *dv;
  bool causal;
  T scale;
};

// Which gradients' head gaps the units write beside their values (store_rows' pad),
// rather than the per-item clearing: a strided gradient that is not zero already.
struct Gaps {
  bool q, k, v;
};

// The zeros after head h's `width` values in each row of a gradient whose rows hold
// `heads` heads at stride `hstride` in `ld` elements: up to the next head, and for the
// last head to the end of the row (the capacity's padded heads). 0 unless `own`.
inline int64_t gap_after(bool own, int64_t h, int64_t heads, int64_t hstride, int64_t width,
                         int64_t ld) {
  if (!own) return 0;
  return h + 1 == heads ? ld - h * hstride - width : hstride - width;
}

// Item b, K/V head hk: dq of its G query heads, dk and dv of hk; lq, lk > 0. Per key
// tile and query tile (FlashAttention-2, transposed like the forward): P^T = exp(K Q^T -
// lse), dS^T = P^T (V dO^T - rowsum(dO O)), then dV += P^T dO, dK += dS^T Q and
// dQ += dS K, with K, V, Q and dO rows read in place.
template <class T>
void bwd_unit(const BwdArgs<T>& a, const Dims& s, const Gaps& gaps, int64_t b, int64_t hk,
              Scratch<T>& w) {
  constexpr int W = Vec<T>::kLanes;
  const int64_t lq = a.lq[b], lk = a.lk[b], G = s.G;
  const int64_t Mq = round_up(lq, kTQ);
  // q, k, v and dq, dk, dv share their strides (the gradients have the operands' shapes)
  const int64_t ldq = s.qr, ldo = s.H * s.Dv, ldk = s.kr, ldv = s.vr;
  const T* kb = a.k + b * s.Ck * ldk + hk * s.kh;
  const T* vb = a.v + b * s.Ck * ldv + hk * s.vh;
  T* qt = sized(w.a, G * s.D * Mq);    // scaled queries, transposed, per head [D, Mq]
  T* dot = sized(w.b, G * s.Dv * Mq);  // output cotangents, transposed, per head [Dv, Mq]
  T* dqa = sized(w.c, G * Mq * s.D);   // dq accumulators, per head [Mq, D]
  T* di = sized(w.d, 2 * G * Mq);      // rowsum(dO * O), then the saved lse, per head
  T* lse = di + G * Mq;
  T* pt = sized(w.e, 2 * kTK * kTQ);   // P^T and dP^T, then dS^T [kTK, kTQ]
  T* dst = pt + kTK * kTQ;
  T* dka = sized(w.f, kTK * (s.D + s.Dv));  // dk [kTK, D] and dv [kTK, Dv] of one key tile
  T* dva = dka + kTK * s.D;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    prefetch_rows(a.q + b * s.Cq * ldq + h * s.qh, lq, ldq, s.D);
    prefetch_rows(a.o + b * s.Cq * ldo + h * s.Dv, lq, ldo, s.Dv);
    prefetch_rows(a.dout + b * s.Cq * ldo + h * s.Dv, lq, ldo, s.Dv);
  }
  prefetch_rows(kb, std::min<int64_t>(lk, 2 * kTK), ldk, s.D);
  prefetch_rows(vb, std::min<int64_t>(lk, 2 * kTK), ldv, s.Dv);
  // qt and dot need no zeros: the transposes write whole vectors, zero past lq
  for (int64_t g = 0; g < G; ++g) std::fill(dqa + g * Mq * s.D, dqa + (g * Mq + lq) * s.D, T(0));
  std::fill(di, di + G * Mq, T(0));
  // queries past lq: lse = +inf makes their probabilities exactly 0
  std::fill(lse, lse + G * Mq, std::numeric_limits<T>::infinity());
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    T* qg = qt + g * s.D * Mq;
    T* dog = dot + g * s.Dv * Mq;
    transpose_scaled(a.q + b * s.Cq * ldq + h * s.qh, ldq, lq, s.D, qg, Mq, a.scale);
    transpose_scaled(a.dout + b * s.Cq * ldo + h * s.Dv, ldo, lq, s.Dv, dog, Mq, T(1));
    dot_rows(a.dout + b * s.Cq * ldo + h * s.Dv, ldo, a.o + b * s.Cq * ldo + h * s.Dv, ldo,
             lq, s.Dv, di + g * Mq);
    std::copy(a.lse + (b * s.H + h) * s.Cq, a.lse + (b * s.H + h) * s.Cq + lq, lse + g * Mq);
  }
  for (int64_t j0 = 0; j0 < lk; j0 += kTK) {
    const int64_t nk = std::min<int64_t>(kTK, lk - j0);
    std::fill(dka, dka + nk * s.D, T(0));
    std::fill(dva, dva + nk * s.Dv, T(0));
    const int64_t istart = a.causal ? j0 / kTQ * kTQ : 0;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g;
      const T* qrows = a.q + b * s.Cq * ldq + h * s.qh;
      const T* dorows = a.dout + b * s.Cq * ldo + h * s.Dv;
      for (int64_t i0 = istart; i0 < lq; i0 += kTQ) {
        const int64_t n = std::min<int64_t>(kTQ, lq - i0), np = round_up(n, W);
        gemm<T, false>(nk, np, s.D, kb + j0 * ldk, ldk, 1, qt + g * s.D * Mq + i0, Mq, pt,
                       kTQ);                                                    // S^T
        gemm<T, false>(nk, np, s.Dv, vb + j0 * ldv, ldv, 1, dot + g * s.Dv * Mq + i0, Mq,
                       dst, kTQ);                                               // dP^T
        exp_sub_rows(pt, nk, kTQ, lse + g * Mq + i0, np);                      // P^T
        if (a.causal && j0 + nk - 1 > i0) mask_future(pt, nk, kTQ, i0, j0, np, T(0));
        ds_rows(dst, pt, nk, kTQ, di + g * Mq + i0, np);                       // dS^T
        gemm<T, true>(nk, s.Dv, n, pt, kTQ, 1, dorows + i0 * ldo, ldo, dva, s.Dv);  // dV
        gemm<T, true>(nk, s.D, n, dst, kTQ, 1, qrows + i0 * ldq, ldq, dka, s.D);    // dK
        gemm<T, true>(n, s.D, nk, dst, 1, kTQ, kb + j0 * ldk, ldk,                // dQ
                      dqa + (g * Mq + i0) * s.D, s.D);
      }
    }
    store_rows(dka, s.D, nk, s.D, static_cast<const T*>(nullptr), a.scale,
               a.dk + (b * s.Ck + j0) * ldk + hk * s.kh, ldk,
               gap_after(gaps.k, hk, s.Hkv, s.kh, s.D, ldk));
    store_rows(dva, s.Dv, nk, s.Dv, static_cast<const T*>(nullptr), T(1),
               a.dv + (b * s.Ck + j0) * ldv + hk * s.vh, ldv,
               gap_after(gaps.v, hk, s.Hkv, s.vh, s.Dv, ldv));
  }
  for (int64_t g = 0; g < G; ++g)
    store_rows(dqa + g * Mq * s.D, s.D, lq, s.D, static_cast<const T*>(nullptr), a.scale,
               a.dq + b * s.Cq * ldq + (hk * G + g) * s.qh, ldq,
               gap_after(gaps.q, hk * G + g, s.H, s.qh, s.D, ldq));
}

// One item of a gradient output, [cap, ld] with `heads` heads of `width` values at
// stride `hstride` in each row, before the units write rows [0, rows) of those heads:
// the rows the units write are mapped in and, unless the whole buffer is known to be
// zero (`zeroed`: fresh_output), rows past `rows` are zeroed and, where the head axes
// are padded (strided rank-3 buffers: hstride > width or heads * hstride < ld) and the
// units do not write them (`units_pad`: Gaps), so are the gaps between the heads of
// those rows. (Zeroing the whole item there instead handed every page of a resident
// buffer back, and the units' writes then faulted each one in again.)
template <class T>
void clear_gradient_item(T* item, int64_t rows, int64_t ld, int64_t cap, int64_t heads,
                         int64_t hstride, int64_t width, bool zeroed, bool units_pad) {
  prefault(item, item + rows * ld);
  if (zeroed) return;
  zero_fill(item + rows * ld, item + cap * ld);
  if (units_pad || (heads * hstride == ld && hstride == width)) return;
  for (int64_t r = 0; r < rows; ++r) {
    T* row = item + r * ld;
    if (hstride != width)
      for (int64_t h = 0; h < heads; ++h)
        std::fill(row + h * hstride + width, row + (h + 1) * hstride, T(0));
    std::fill(row + heads * hstride, row + ld, T(0));
  }
}

template <class T>
void backward(const BwdArgs<T>& a, const Dims& s, ffi::ThreadPool& pool) {
  // Per item, on every worker: zero what the units do not write (rows past the lengths,
  // items without keys) and map in the rows they will.
  const int64_t workers = worker_count(pool);
  const bool zq = fresh_output(a.dq, s.B, s.Cq * s.qr, a.lq, s.qr);
  const bool zk = fresh_output(a.dk, s.B, s.Ck * s.kr, a.lk, s.kr);
  const bool zv = fresh_output(a.dv, s.B, s.Ck * s.vr, a.lk, s.vr);
  // Every head of a live item has a unit (H = G * Hkv), which writes all its rows: the
  // gaps of a gradient that is not zero already are written beside the values.
  const bool any_units = s.H > 0 && s.Hkv > 0;
  const Gaps gaps{any_units && !zq, any_units && !zk, any_units && !zv};
  const std::vector<double> rows(
      s.B, static_cast<double>((s.Cq * s.qr + s.Ck * (s.kr + s.vr)) * sizeof(T)));
  parallel_units(pool, rows, workers, [&a, &s, zq, zk, zv, &gaps](int64_t b) {
    const bool live = a.lq[b] > 0 && a.lk[b] > 0;
    const int64_t fq = live ? a.lq[b] : 0, fk = live ? a.lk[b] : 0;
    clear_gradient_item(a.dq + b * s.Cq * s.qr, fq, s.qr, s.Cq, s.H, s.qh, s.D, zq, gaps.q);
    clear_gradient_item(a.dk + b * s.Ck * s.kr, fk, s.kr, s.Ck, s.Hkv, s.kh, s.D, zk, gaps.k);
    clear_gradient_item(a.dv + b * s.Ck * s.vr, fk, s.vr, s.Ck, s.Hkv, s.vh, s.Dv, zv,
                        gaps.v);
    const int64_t lo = a.lk[b] > 0 ? a.lq[b] : 0;  // o is zero from row lo on
    release_zero_pages(a.o + (b * s.Cq + lo) * s.H * s.Dv,
                       (s.Cq - lo) * s.H * s.Dv * sizeof(T));
  }, kSerialBytes);
  std::vector<std::pair<int64_t, int64_t>> units;
  std::vector<double> cost;
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t lq = a.lq[b], lk = a.lk[b];
    if (lq == 0 || lk == 0) continue;
    const double work = static_cast<double>(round_up(lq, 16)) * lk * s.G + 256.0;
    for (int64_t hk = 0; hk < s.Hkv; ++hk) {
      units.emplace_back(b, hk);
      cost.push_back(a.causal ? work / 2 : work);
    }
  }
  parallel_units(pool, cost, workers, [&a, &s, &gaps, &units](int64_t u) {
    bwd_unit(a, s, gaps, units[u].first, units[u].second, thread_scratch<T>());
  }, kSerialPairs * 64.0 / static_cast<double>(s.D + s.Dv));
}

// ---------------------------------------------------------------- validation ---------
inline std::string dims_str(ffi::AnyBuffer::Dimensions d) {
  std::string out = "[";
  for (size_t i = 0; i < d.size(); ++i) out += (i ? ", " : "") + std::to_string(d[i]);
  return out + "]";
}

inline ffi::Error bad(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vsla attention kernel: " + what);
}

inline bool same_dims(ffi::AnyBuffer::Dimensions d, std::initializer_list<int64_t> want) {
  if (d.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want)
    if (d[i++] != w) return false;
  return true;
}

// The sequence lengths: column 0 of int32 lengths [B] or [B, R] (a VarTensor's [B, rank]
// lengths, read in place so that no XLA slice runs beside the kernel), copied into a
// contiguous [B].
struct Lengths {
  std::vector<int32_t> q, k;
};

inline bool lengths_shape_ok(ffi::Buffer<ffi::S32> x, int64_t B) {
  auto d = x.dimensions();
  return (d.size() == 1 && d[0] == B) || (d.size() == 2 && d[0] == B && d[1] >= 1);
}

inline void column0(ffi::Buffer<ffi::S32> x, std::vector<int32_t>* out) {
  auto d = x.dimensions();
  const int64_t B = d[0], stride = d.size() == 2 ? d[1] : 1;
  out->resize(B);
  for (int64_t b = 0; b < B; ++b) (*out)[b] = x.typed_data()[b * stride];
}

// Checks q/k/v ranks and sizes, dtypes and lengths; fills dims and the lengths.
// `logical` (H, D, Hkv, Dv; 0: the buffer's size) are the sizes read from each
// [B, C, Hc, Dc] buffer.
inline ffi::Error check_qkv(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                            ffi::Buffer<ffi::S32> lq, ffi::Buffer<ffi::S32> lk, Dims* s,
                            Lengths* len, const int64_t (&logical)[4] = {0, 0, 0, 0}) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return bad("q, k, v must have rank 4 ([B, C, H, D]); got q " + dims_str(qd) + ", k " +
               dims_str(kd) + ", v " + dims_str(vd));
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type())
    return bad("q, k, v must share one dtype");
  if (q.element_type() != ffi::F32 && q.element_type() != ffi::F64)
    return bad("q, k, v must be float32 or float64");
  const int64_t H = logical[0] ? logical[0] : qd[2], D = logical[1] ? logical[1] : qd[3];
  const int64_t Hkv = logical[2] ? logical[2] : kd[2], Dv = logical[3] ? logical[3] : vd[3];
  if (H < 0 || H > qd[2] || D < 0 || D > qd[3] || D > kd[3] || Hkv < 0 || Hkv > kd[2] ||
      Hkv > vd[2] || Dv < 0 || Dv > vd[3])
    return bad("logical sizes H " + std::to_string(H) + ", D " + std::to_string(D) +
               ", Hkv " + std::to_string(Hkv) + ", Dv " + std::to_string(Dv) +
               " exceed the buffers q " + dims_str(qd) + ", k " + dims_str(kd) + ", v " +
               dims_str(vd));
  const bool strided = logical[0] || logical[1] || logical[2] || logical[3];
  *s = Dims{qd[0], qd[1], kd[1], H, Hkv, D, Dv, 1,
            qd[2] * qd[3], qd[3], kd[2] * kd[3], kd[3], vd[2] * vd[3], vd[3]};
  if (kd[0] != s->B || vd[0] != s->B)
    return bad("batch sizes differ: q " + dims_str(qd) + ", k " + dims_str(kd) + ", v " +
               dims_str(vd));
  if (vd[1] != s->Ck || (!strided && vd[2] != s->Hkv))
    return bad("k and v capacities or head counts differ: k " + dims_str(kd) + ", v " +
               dims_str(vd));
  if (!strided && kd[3] != s->D)
    return bad("q and k head sizes differ: " + dims_str(qd) + " vs " + dims_str(kd));
  if (s->Hkv <= 0 || s->H % s->Hkv != 0)
    return bad(std::to_string(s->H) + " query heads are not a multiple of " +
               std::to_string(s->Hkv) + " K/V heads");
  s->G = s->H / s->Hkv;
  if (!lengths_shape_ok(lq, s->B) || !lengths_shape_ok(lk, s->B))
    return bad("lengths must be int32 [B] or [B, R] (column 0 is read) with B = " +
               std::to_string(s->B) + "; got " + dims_str(lq.dimensions()) + " and " +
               dims_str(lk.dimensions()));
  column0(lq, &len->q);
  column0(lk, &len->k);
  for (int64_t b = 0; b < s->B; ++b) {
    const int64_t a = len->q[b], c = len->k[b];
    if (a < 0 || a > s->Cq)
      return bad("query length " + std::to_string(a) + " of item " + std::to_string(b) +
                 " is outside [0, " + std::to_string(s->Cq) + "]");
    if (c < 0 || c > s->Ck)
      return bad("key length " + std::to_string(c) + " of item " + std::to_string(b) +
                 " is outside [0, " + std::to_string(s->Ck) + "]");
  }
  return ffi::Error::Success();
}

inline ffi::Error check_out(const char* name, ffi::AnyBuffer x, ffi::DataType dtype,
                            std::initializer_list<int64_t> want) {
  // [.., H, D] may come merged as [.., H * D]
  bool merged = false;
  if (want.size() == 4 && x.dimensions().size() == 3) {
    auto w = want.begin();
    merged = same_dims(x.dimensions(), {w[0], w[1], w[2] * w[3]});
  }
  if (x.element_type() != dtype || !(merged || same_dims(x.dimensions(), want)))
    return bad(std::string(name) + " has the wrong dtype or shape " +
               dims_str(x.dimensions()));
  return ffi::Error::Success();
}

#define VSLA_TRY(expr)               \
  do {                               \
    ffi::Error _e = (expr);          \
    if (_e.failure()) return _e;     \
  } while (0)

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Buffer<ffi::S32> lq, ffi::Buffer<ffi::S32> lk,
                   ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse,
                   ffi::Result<ffi::Buffer<ffi::S32>> out_lengths, bool causal, double scale,
                   int64_t heads, int64_t head_dim, int64_t kv_heads, int64_t v_head_dim) {
  Dims s;
  Lengths len;
  VSLA_TRY(check_qkv(q, k, v, lq, lk, &s, &len, {heads, head_dim, kv_heads, v_head_dim}));
  const auto t = q.element_type();
  VSLA_TRY(check_out("o", *o, t, {s.B, s.Cq, s.H, s.Dv}));
  VSLA_TRY(check_out("lse", *lse, t, {s.B, s.H, s.Cq}));
  if (out_lengths->element_count() != static_cast<size_t>(s.B))
    return bad("out_lengths must have B = " + std::to_string(s.B) + " elements, got " +
               dims_str(out_lengths->dimensions()));
  std::copy(len.q.begin(), len.q.end(), out_lengths->typed_data());
  if (t == ffi::F32) {
    FwdArgs<float> a{q.typed_data<float>(), k.typed_data<float>(), v.typed_data<float>(),
                     len.q.data(), len.k.data(), o->typed_data<float>(),
                     lse->typed_data<float>(), causal, static_cast<float>(scale)};
    forward(a, s, pool);
  } else {
    FwdArgs<double> a{q.typed_data<double>(), k.typed_data<double>(), v.typed_data<double>(),
                      len.q.data(), len.k.data(), o->typed_data<double>(),
                      lse->typed_data<double>(), causal, scale};
    forward(a, s, pool);
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::Buffer<ffi::S32> lq, ffi::Buffer<ffi::S32> lk, ffi::AnyBuffer o,
                    ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq,
                    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                    bool causal, double scale, int64_t heads, int64_t head_dim,
                    int64_t kv_heads, int64_t v_head_dim) {
  Dims s;
  Lengths len;
  VSLA_TRY(check_qkv(q, k, v, lq, lk, &s, &len, {heads, head_dim, kv_heads, v_head_dim}));
  const auto t = q.element_type();
  VSLA_TRY(check_out("o", o, t, {s.B, s.Cq, s.H, s.Dv}));
  VSLA_TRY(check_out("dout", dout, t, {s.B, s.Cq, s.H, s.Dv}));
  VSLA_TRY(check_out("lse", lse, t, {s.B, s.H, s.Cq}));
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  VSLA_TRY(check_out("dq", *dq, t, {qd[0], qd[1], qd[2], qd[3]}));
  VSLA_TRY(check_out("dk", *dk, t, {kd[0], kd[1], kd[2], kd[3]}));
  VSLA_TRY(check_out("dv", *dv, t, {vd[0], vd[1], vd[2], vd[3]}));
  if (t == ffi::F32) {
    BwdArgs<float> a{q.typed_data<float>(), k.typed_data<float>(), v.typed_data<float>(),
                     o.typed_data<float>(), lse.typed_data<float>(), dout.typed_data<float>(),
                     len.q.data(), len.k.data(), dq->typed_data<float>(),
                     dk->typed_data<float>(), dv->typed_data<float>(), causal,
                     static_cast<float>(scale)};
    backward(a, s, pool);
  } else {
    BwdArgs<double> a{q.typed_data<double>(), k.typed_data<double>(), v.typed_data<double>(),
                      o.typed_data<double>(), lse.typed_data<double>(),
                      dout.typed_data<double>(), len.q.data(), len.k.data(),
                      dq->typed_data<double>(), dk->typed_data<double>(),
                      dv->typed_data<double>(), causal, scale};
    backward(a, s, pool);
  }
  return ffi::Error::Success();
}

}  // namespace attn
}  // namespace vsla

XLA_FFI_DEFINE_HANDLER_SYMBOL(vsla_attention_fwd, vsla::attn::Forward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Attr<bool>("causal")
                                  .Attr<double>("scale")
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("head_dim")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<int64_t>("v_head_dim"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(vsla_attention_bwd, vsla::attn::Backward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<bool>("causal")
                                  .Attr<double>("scale")
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("head_dim")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<int64_t>("v_head_dim"));

// The instruction set the attention kernels run with here (0 baseline, 1 AVX2+FMA,
// 2 AVX-512), for the tests that cap it with VSLA_CPU_ISA.
extern "C" VSLA_EXPORT int vsla_selftest_attention_isa() {
  return static_cast<int>(vsla::attn::host_isa());
}

// vsla::attn::clear_gradient_item (float) on caller memory, for its tests.
extern "C" VSLA_EXPORT void vsla_selftest_clear_gradient_item(float* item, int64_t rows,
                                                              int64_t ld, int64_t cap,
                                                              int64_t heads, int64_t hstride,
                                                              int64_t width) {
  vsla::attn::clear_gradient_item(item, rows, ld, cap, heads, hstride, width, false, false);
}
