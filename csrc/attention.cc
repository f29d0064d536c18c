// Variable-length attention on capacity-padded batches: flash-style forward and
// FlashAttention-2 style backward, one XLA FFI custom call per batch.
//
// Layout (row-major, every buffer as XLA hands it over):
//   q [B, Cq, H, D], k [B, Ck, Hkv, D], v [B, Ck, Hkv, Dv], lq/lk int32 [B],
//   o [B, Cq, H, Dv], lse [B, H, Cq] (same float type as q).
// Query i of item b attends keys j < lk[b] (and j <= i when causal). Rows i >= lq[b]
// and items without keys produce zeros (lse = -inf); padding is never read for
// compute: every tile is clipped to the item's lengths.
//
// Work is split into units (forward: item x head x query tile; backward: item x K/V
// head, so that dk/dv of a group are owned by one unit), sorted longest first and
// pulled from an atomic counter by the caller and the workers of XLA's intra-op
// thread pool (ffi::ThreadPool), or std::threads when VSLA_ATTENTION_THREADS=std.
// All arithmetic goes through one small register-blocked GEMM on packed tiles whose
// row strides are padded to whole SIMD vectors; the hot functions are compiled for
// AVX-512, AVX2+FMA and baseline x86-64 and picked at load time (target_clones).
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
#include <thread>
#include <vector>

#include "common.h"

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define VSLA_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define VSLA_CLONES
#endif

namespace vsla {
namespace attn {

constexpr int kTQ = 64;  // query rows per tile
constexpr int kTK = 64;  // keys per tile
constexpr int kMR = 4;   // GEMM rows per register block

// One 64-byte SIMD vector of T (GCC vector extension: a zmm, two ymm or four xmm).
template <class T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int kLanes = 64 / sizeof(T);
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// C[M, N] (= or +=) A[M, K] . B[K, N]; M % kMR == 0, N % lanes == 0, row strides
// lda/ldb/ldc in elements. B rows and C rows need not be aligned.
template <class T, bool kAccumulate>
VSLA_CLONES void gemm(int64_t m, int64_t n, int64_t kdim, const T* __restrict a,
                      int64_t lda, const T* __restrict b, int64_t ldb, T* __restrict c,
                      int64_t ldc) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::kLanes;
  for (int64_t i0 = 0; i0 < m; i0 += kMR) {
    int64_t j0 = 0;
    for (; j0 + 2 * W <= n; j0 += 2 * W) {
      V acc[kMR][2];
      for (int r = 0; r < kMR; ++r)
        for (int s = 0; s < 2; ++s) {
          if (kAccumulate) std::memcpy(&acc[r][s], c + (i0 + r) * ldc + j0 + s * W, sizeof(V));
          else acc[r][s] = V{};
        }
      for (int64_t k = 0; k < kdim; ++k) {
        V b0, b1;
        std::memcpy(&b0, b + k * ldb + j0, sizeof(V));
        std::memcpy(&b1, b + k * ldb + j0 + W, sizeof(V));
        for (int r = 0; r < kMR; ++r) {
          const T x = a[(i0 + r) * lda + k];
          acc[r][0] += x * b0;
          acc[r][1] += x * b1;
        }
      }
      for (int r = 0; r < kMR; ++r)
        for (int s = 0; s < 2; ++s)
          std::memcpy(c + (i0 + r) * ldc + j0 + s * W, &acc[r][s], sizeof(V));
    }
    for (; j0 < n; j0 += W) {
      V acc[kMR];
      for (int r = 0; r < kMR; ++r) {
        if (kAccumulate) std::memcpy(&acc[r], c + (i0 + r) * ldc + j0, sizeof(V));
        else acc[r] = V{};
      }
      for (int64_t k = 0; k < kdim; ++k) {
        V b0;
        std::memcpy(&b0, b + k * ldb + j0, sizeof(V));
        for (int r = 0; r < kMR; ++r) acc[r] += a[(i0 + r) * lda + k] * b0;
      }
      for (int r = 0; r < kMR; ++r) std::memcpy(c + (i0 + r) * ldc + j0, &acc[r], sizeof(V));
    }
  }
}

// exp over whole vectors, for arguments <= ~0 (scores minus a row maximum or a
// log-sum-exp); exactly 0 below -87 (and for -inf). float: round-to-nearest range
// reduction and Cephes' degree-6 polynomial (~2 ulp), all in vector registers.
VSLA_CLONES static void exp_vectors(float* x, int64_t n) {
  using V = Vec<float>::type;
  typedef int32_t IV __attribute__((vector_size(64)));
  constexpr int W = Vec<float>::kLanes;
  for (int64_t i = 0; i + W <= n; i += W) {
    V v;
    std::memcpy(&v, x + i, sizeof(V));
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
    y = v < lo ? V{} : y;
    std::memcpy(x + i, &y, sizeof(V));
  }
}

static void exp_vectors(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

// Max and sum of x[0, n), n a multiple of the vector width.
template <class T>
VSLA_CLONES T max_vectors(const T* x, int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::kLanes;
  V m = V{} - std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i + W <= n; i += W) {
    V v;
    std::memcpy(&v, x + i, sizeof(V));
    m = v > m ? v : m;
  }
  T out = -std::numeric_limits<T>::infinity();
  for (int l = 0; l < W; ++l) out = std::max(out, m[l]);
  return out;
}

template <class T>
VSLA_CLONES T sum_vectors(const T* x, int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::kLanes;
  V s = V{};
  for (int64_t i = 0; i + W <= n; i += W) {
    V v;
    std::memcpy(&v, x + i, sizeof(V));
    s += v;
  }
  T out = 0;
  for (int l = 0; l < W; ++l) out += s[l];
  return out;
}

// Scratch buffers of one worker, reused across its units.
template <class T>
struct Scratch {
  std::vector<T> a, b, c, d, e, f, g, h, i, j;
};

template <class T>
T* sized(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// Shapes of one call, checked.
struct Dims {
  int64_t B, Cq, Ck, H, Hkv, D, Dv, G;
  int64_t Dp, Dvp;  // D, Dv rounded up to whole vectors
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

inline bool use_std_threads() {
  static const bool std_threads = [] {
    const char* s = std::getenv("VSLA_ATTENTION_THREADS");
    return s != nullptr && std::string(s) == "std";
  }();
  return std_threads;
}

inline int64_t std_thread_count() {
  static const int64_t n = [] {
    int64_t hw = static_cast<int64_t>(std::thread::hardware_concurrency());
    return std::max<int64_t>(1, std::min<int64_t>(hw, 64));
  }();
  return n;
}

// Units sorted by decreasing cost (longest processing time first).
inline std::vector<int64_t> by_cost(const std::vector<double>& cost) {
  std::vector<int64_t> order(cost.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
  return order;
}

// fn(unit, worker) over units, worker in [0, workers); returns after every unit ran.
template <class Fn>
void parallel_units(ffi::ThreadPool& pool, const std::vector<double>& cost, int64_t workers,
                    Fn&& fn) {
  if (cost.empty()) return;
  auto job = std::make_shared<Job>();
  job->order = by_cost(cost);
  job->fn = std::forward<Fn>(fn);
  const int64_t n = static_cast<int64_t>(job->order.size());
  const int64_t extra = std::min(workers, n) - 1;
  if (use_std_threads()) {
    std::vector<std::thread> threads;
    for (int64_t w = 0; w < extra; ++w) threads.emplace_back([job] { job->drain(); });
    job->drain();
    for (auto& t : threads) t.join();
    return;
  }
  // Late-starting tasks find the counter exhausted and touch nothing but the job.
  for (int64_t w = 0; w < extra; ++w) pool.Schedule([job] { job->drain(); });
  job->drain();
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == n; });
}

inline int64_t worker_count(ffi::ThreadPool& pool) {
  if (use_std_threads()) return std_thread_count();
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

// Rows [i0, i0 + n) of head h of item b (n <= kTQ), lk > 0.
template <class T>
void fwd_unit(const FwdArgs<T>& a, const Dims& s, int64_t b, int64_t h, int64_t i0,
              int64_t n, Scratch<T>& w) {
  const int64_t lk = a.lk[b], hk = h / s.G;
  const int64_t M = round_up(n, kMR);
  const int64_t kend = a.causal ? std::min<int64_t>(lk, i0 + n) : lk;
  T* qs = sized(w.a, M * s.D);        // scaled queries [M, D]
  T* kt = sized(w.b, s.D * kTK);      // keys transposed [D, kTK]
  T* vt = sized(w.c, kTK * s.Dvp);    // values [kTK, Dvp]
  T* sc = sized(w.d, M * kTK);        // scores, then probabilities [M, kTK]
  T* acc = sized(w.e, M * s.Dvp);     // output accumulator [M, Dvp]
  T* mx = sized(w.f, M);
  T* sum = sized(w.g, M);
  std::fill(qs, qs + M * s.D, T(0));
  for (int64_t r = 0; r < n; ++r) {
    const T* src = a.q + ((b * s.Cq + i0 + r) * s.H + h) * s.D;
    for (int64_t d = 0; d < s.D; ++d) qs[r * s.D + d] = src[d] * a.scale;
  }
  std::fill(acc, acc + M * s.Dvp, T(0));
  std::fill(mx, mx + M, -std::numeric_limits<T>::infinity());
  std::fill(sum, sum + M, T(0));
  constexpr int W = Vec<T>::kLanes;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j0 = 0; j0 < kend; j0 += kTK) {
    const int64_t nk = std::min<int64_t>(kTK, kend - j0), nkp = round_up(nk, W);
    for (int64_t c = 0; c < nk; ++c) {
      const T* ks = a.k + ((b * s.Ck + j0 + c) * s.Hkv + hk) * s.D;
      const T* vs = a.v + ((b * s.Ck + j0 + c) * s.Hkv + hk) * s.Dv;
      for (int64_t d = 0; d < s.D; ++d) kt[d * kTK + c] = ks[d];
      std::memcpy(vt + c * s.Dvp, vs, s.Dv * sizeof(T));
      std::fill(vt + c * s.Dvp + s.Dv, vt + (c + 1) * s.Dvp, T(0));
    }
    for (int64_t d = 0; d < s.D; ++d) std::fill(kt + d * kTK + nk, kt + d * kTK + nkp, T(0));
    std::fill(vt + nk * s.Dvp, vt + nkp * s.Dvp, T(0));
    gemm<T, false>(M, nkp, s.D, qs, s.D, kt, kTK, sc, kTK);
    for (int64_t r = 0; r < M; ++r) {
      T* row = sc + r * kTK;
      // keys of this tile that row r sees: [0, lim)
      int64_t lim = r < n ? nk : 0;
      if (a.causal) lim = std::min<int64_t>(lim, i0 + r - j0 + 1);
      if (lim <= 0) {
        std::fill(row, row + nkp, T(0));
        continue;
      }
      std::fill(row + lim, row + nkp, ninf);
      const T m = std::max(mx[r], max_vectors(row, nkp));
      const T corr = std::exp(mx[r] - m);  // 0 on the first tile (mx = -inf)
      for (int64_t c = 0; c < nkp; ++c) row[c] -= m;
      exp_vectors(row, nkp);
      mx[r] = m;
      sum[r] = sum[r] * corr + sum_vectors(row, nkp);
      if (corr != T(1)) {
        T* ar = acc + r * s.Dvp;
        for (int64_t d = 0; d < s.Dvp; ++d) ar[d] *= corr;
      }
    }
    gemm<T, true>(M, s.Dvp, nkp, sc, kTK, vt, s.Dvp, acc, s.Dvp);
  }
  for (int64_t r = 0; r < n; ++r) {
    T* dst = a.o + ((b * s.Cq + i0 + r) * s.H + h) * s.Dv;
    const T inv = T(1) / sum[r];  // sum >= 1: the row maximum contributes exp(0)
    for (int64_t d = 0; d < s.Dv; ++d) dst[d] = acc[r * s.Dvp + d] * inv;
    a.lse[(b * s.H + h) * s.Cq + i0 + r] = mx[r] + std::log(sum[r]);
  }
}

template <class T>
void forward(const FwdArgs<T>& a, const Dims& s, ffi::ThreadPool& pool) {
  const T ninf = -std::numeric_limits<T>::infinity();
  // padding and items without keys: zeros and lse = -inf
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t from = a.lk[b] > 0 ? a.lq[b] : 0;
    std::fill(a.o + (b * s.Cq + from) * s.H * s.Dv, a.o + (b + 1) * s.Cq * s.H * s.Dv, T(0));
    for (int64_t h = 0; h < s.H; ++h)
      std::fill(a.lse + (b * s.H + h) * s.Cq + from, a.lse + (b * s.H + h + 1) * s.Cq, ninf);
  }
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
        cost.push_back(static_cast<double>(round_up(n, kMR)) * round_up(kend, kTK) + 64.0);
      }
    }
  }
  parallel_units(pool, cost, worker_count(pool), [&a, &s, &units](int64_t u) {
    const Unit& x = units[u];
    fwd_unit(a, s, x.b, x.h, x.i0, x.n, thread_scratch<T>());
  });
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

// Transpose src [rows, cols] (stride lds) into dst [cols, rows] (stride ldd).
template <class T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// Item b, K/V head hk: dq of its G query heads, dk and dv of hk; lq, lk > 0.
template <class T>
void bwd_unit(const BwdArgs<T>& a, const Dims& s, int64_t b, int64_t hk, Scratch<T>& w) {
  const int64_t lq = a.lq[b], lk = a.lk[b], G = s.G;
  const int64_t Mq = round_up(lq, kTQ);
  T* qs = sized(w.a, G * Mq * s.Dp);      // scaled queries, per head [Mq, Dp]
  T* dos = sized(w.b, G * Mq * s.Dvp);    // output cotangents, per head [Mq, Dvp]
  T* dqa = sized(w.c, G * Mq * s.Dp);     // dq accumulators, per head [Mq, Dp]
  T* di = sized(w.d, G * Mq);             // rowsum(dO * O)
  T* lse = sized(w.e, G * Mq);
  T* kt = sized(w.f, s.D * kTK + kTK * s.Dp);  // keys [D, kTK] and [kTK, Dp]
  T* kr = kt + s.D * kTK;
  T* vtt = sized(w.g, s.Dv * kTK);         // values transposed [Dv, kTK]
  T* dka = sized(w.h, kTK * s.Dp + kTK * s.Dvp);  // dk [kTK, Dp], dv [kTK, Dvp]
  T* dva = dka + kTK * s.Dp;
  T* p = sized(w.i, 4 * kTQ * kTK);        // P, dS [kTQ, kTK] and their transposes
  T* ds = p + kTQ * kTK;
  T* pt = ds + kTQ * kTK;
  T* dst = pt + kTQ * kTK;
  T* dp = sized(w.j, kTQ * kTK);
  std::fill(qs, qs + G * Mq * s.Dp, T(0));
  std::fill(dos, dos + G * Mq * s.Dvp, T(0));
  std::fill(dqa, dqa + G * Mq * s.Dp, T(0));
  std::fill(di, di + G * Mq, T(0));
  std::fill(lse, lse + G * Mq, T(0));
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t i = 0; i < lq; ++i) {
      const T* qr = a.q + ((b * s.Cq + i) * s.H + h) * s.D;
      const T* orow = a.o + ((b * s.Cq + i) * s.H + h) * s.Dv;
      const T* dor = a.dout + ((b * s.Cq + i) * s.H + h) * s.Dv;
      T* qd = qs + (g * Mq + i) * s.Dp;
      T* dd = dos + (g * Mq + i) * s.Dvp;
      for (int64_t d = 0; d < s.D; ++d) qd[d] = qr[d] * a.scale;
      T acc = 0;
      for (int64_t d = 0; d < s.Dv; ++d) {
        dd[d] = dor[d];
        acc += dor[d] * orow[d];
      }
      di[g * Mq + i] = acc;
      lse[g * Mq + i] = a.lse[(b * s.H + h) * s.Cq + i];
    }
  }
  constexpr int W = Vec<T>::kLanes;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j0 = 0; j0 < lk; j0 += kTK) {
    const int64_t nk = std::min<int64_t>(kTK, lk - j0), nkp = round_up(nk, W);
    std::fill(kt, kt + s.D * kTK + nkp * s.Dp, T(0));
    std::fill(vtt, vtt + s.Dv * kTK, T(0));
    std::fill(dka, dka + nkp * s.Dp, T(0));
    std::fill(dva, dva + nkp * s.Dvp, T(0));
    for (int64_t c = 0; c < nk; ++c) {
      const T* ks = a.k + ((b * s.Ck + j0 + c) * s.Hkv + hk) * s.D;
      const T* vs = a.v + ((b * s.Ck + j0 + c) * s.Hkv + hk) * s.Dv;
      for (int64_t d = 0; d < s.D; ++d) kt[d * kTK + c] = ks[d];
      std::memcpy(kr + c * s.Dp, ks, s.D * sizeof(T));
      for (int64_t d = 0; d < s.Dv; ++d) vtt[d * kTK + c] = vs[d];
    }
    const int64_t istart = a.causal ? j0 / kTQ * kTQ : 0;
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t i0 = istart; i0 < lq; i0 += kTQ) {
        const int64_t n = std::min<int64_t>(kTQ, lq - i0), M = round_up(n, kMR);
        const T* qg = qs + (g * Mq + i0) * s.Dp;
        const T* dog = dos + (g * Mq + i0) * s.Dvp;
        gemm<T, false>(M, nkp, s.D, qg, s.Dp, kt, kTK, p, kTK);         // S
        gemm<T, false>(M, nkp, s.Dv, dog, s.Dvp, vtt, kTK, dp, kTK);    // dP = dO V^T
        for (int64_t r = 0; r < M; ++r) {
          T* pr = p + r * kTK;
          T* dsr = ds + r * kTK;
          int64_t lim = r < n ? nk : 0;
          if (a.causal) lim = std::min<int64_t>(lim, i0 + r - j0 + 1);
          lim = std::max<int64_t>(lim, 0);
          const T l = lse[g * Mq + i0 + r], dr = di[g * Mq + i0 + r];
          for (int64_t c = 0; c < lim; ++c) pr[c] -= l;
          std::fill(pr + lim, pr + nkp, ninf);
          exp_vectors(pr, nkp);
          const T* dpr = dp + r * kTK;
          for (int64_t c = 0; c < nkp; ++c) dsr[c] = pr[c] * (dpr[c] - dr);
        }
        transpose(p, M, nkp, kTK, pt, M);
        transpose(ds, M, nkp, kTK, dst, M);
        gemm<T, true>(nkp, s.Dvp, M, pt, M, dog, s.Dvp, dva, s.Dvp);     // dV += P^T dO
        gemm<T, true>(nkp, s.Dp, M, dst, M, qg, s.Dp, dka, s.Dp);        // dK += dS^T Qs
        gemm<T, true>(M, s.Dp, nkp, ds, kTK, kr, s.Dp,                   // dQ += dS K
                      dqa + (g * Mq + i0) * s.Dp, s.Dp);
      }
    }
    for (int64_t c = 0; c < nk; ++c) {
      std::memcpy(a.dk + ((b * s.Ck + j0 + c) * s.Hkv + hk) * s.D, dka + c * s.Dp,
                  s.D * sizeof(T));
      std::memcpy(a.dv + ((b * s.Ck + j0 + c) * s.Hkv + hk) * s.Dv, dva + c * s.Dvp,
                  s.Dv * sizeof(T));
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    for (int64_t i = 0; i < lq; ++i) {
      T* dst_row = a.dq + ((b * s.Cq + i) * s.H + h) * s.D;
      const T* src = dqa + (g * Mq + i) * s.Dp;
      for (int64_t d = 0; d < s.D; ++d) dst_row[d] = src[d] * a.scale;
    }
  }
}

template <class T>
void backward(const BwdArgs<T>& a, const Dims& s, ffi::ThreadPool& pool) {
  // Zero everything the units do not write: rows past the lengths, items without keys.
  for (int64_t b = 0; b < s.B; ++b) {
    const bool live = a.lq[b] > 0 && a.lk[b] > 0;
    const int64_t fq = live ? a.lq[b] : 0, fk = live ? a.lk[b] : 0;
    std::fill(a.dq + (b * s.Cq + fq) * s.H * s.D, a.dq + (b + 1) * s.Cq * s.H * s.D, T(0));
    std::fill(a.dk + (b * s.Ck + fk) * s.Hkv * s.D, a.dk + (b + 1) * s.Ck * s.Hkv * s.D, T(0));
    std::fill(a.dv + (b * s.Ck + fk) * s.Hkv * s.Dv, a.dv + (b + 1) * s.Ck * s.Hkv * s.Dv,
              T(0));
  }
  std::vector<std::pair<int64_t, int64_t>> units;
  std::vector<double> cost;
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t lq = a.lq[b], lk = a.lk[b];
    if (lq == 0 || lk == 0) continue;
    const double work = static_cast<double>(round_up(lq, kTQ)) * round_up(lk, kTK) * s.G;
    for (int64_t hk = 0; hk < s.Hkv; ++hk) {
      units.emplace_back(b, hk);
      cost.push_back(a.causal ? work / 2 : work);
    }
  }
  parallel_units(pool, cost, worker_count(pool), [&a, &s, &units](int64_t u) {
    bwd_unit(a, s, units[u].first, units[u].second, thread_scratch<T>());
  });
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

// Checks q/k/v ranks and sizes, dtypes and lengths; fills dims.
inline ffi::Error check_qkv(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                            ffi::Buffer<ffi::S32> lq, ffi::Buffer<ffi::S32> lk, Dims* s) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return bad("q, k, v must have rank 4 ([B, C, H, D]); got q " + dims_str(qd) + ", k " +
               dims_str(kd) + ", v " + dims_str(vd));
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type())
    return bad("q, k, v must share one dtype");
  if (q.element_type() != ffi::F32 && q.element_type() != ffi::F64)
    return bad("q, k, v must be float32 or float64");
  *s = Dims{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], vd[3], 1, 0, 0};
  if (kd[0] != s->B || vd[0] != s->B)
    return bad("batch sizes differ: q " + dims_str(qd) + ", k " + dims_str(kd) + ", v " +
               dims_str(vd));
  if (vd[1] != s->Ck || vd[2] != s->Hkv)
    return bad("k and v capacities or head counts differ: k " + dims_str(kd) + ", v " +
               dims_str(vd));
  if (kd[3] != s->D) return bad("q and k head sizes differ: " + dims_str(qd) + " vs " +
                                dims_str(kd));
  if (s->Hkv <= 0 || s->H % s->Hkv != 0)
    return bad(std::to_string(s->H) + " query heads are not a multiple of " +
               std::to_string(s->Hkv) + " K/V heads");
  s->G = s->H / s->Hkv;
  const int64_t lanes = q.element_type() == ffi::F32 ? Vec<float>::kLanes
                                                     : Vec<double>::kLanes;
  s->Dp = round_up(s->D, lanes);
  s->Dvp = round_up(s->Dv, lanes);
  if (lq.dimensions().size() != 1 || lq.dimensions()[0] != s->B || lk.dimensions().size() != 1 ||
      lk.dimensions()[0] != s->B)
    return bad("lengths must be int32 [B] with B = " + std::to_string(s->B));
  for (int64_t b = 0; b < s->B; ++b) {
    const int64_t a = lq.typed_data()[b], c = lk.typed_data()[b];
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
  if (x.element_type() != dtype || !same_dims(x.dimensions(), want))
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
                   ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse, bool causal,
                   double scale) {
  Dims s;
  VSLA_TRY(check_qkv(q, k, v, lq, lk, &s));
  const auto t = q.element_type();
  VSLA_TRY(check_out("o", *o, t, {s.B, s.Cq, s.H, s.Dv}));
  VSLA_TRY(check_out("lse", *lse, t, {s.B, s.H, s.Cq}));
  if (t == ffi::F32) {
    FwdArgs<float> a{q.typed_data<float>(), k.typed_data<float>(), v.typed_data<float>(),
                     lq.typed_data(), lk.typed_data(), o->typed_data<float>(),
                     lse->typed_data<float>(), causal, static_cast<float>(scale)};
    forward(a, s, pool);
  } else {
    FwdArgs<double> a{q.typed_data<double>(), k.typed_data<double>(), v.typed_data<double>(),
                      lq.typed_data(), lk.typed_data(), o->typed_data<double>(),
                      lse->typed_data<double>(), causal, scale};
    forward(a, s, pool);
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::Buffer<ffi::S32> lq, ffi::Buffer<ffi::S32> lk, ffi::AnyBuffer o,
                    ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq,
                    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                    bool causal, double scale) {
  Dims s;
  VSLA_TRY(check_qkv(q, k, v, lq, lk, &s));
  const auto t = q.element_type();
  VSLA_TRY(check_out("o", o, t, {s.B, s.Cq, s.H, s.Dv}));
  VSLA_TRY(check_out("dout", dout, t, {s.B, s.Cq, s.H, s.Dv}));
  VSLA_TRY(check_out("lse", lse, t, {s.B, s.H, s.Cq}));
  VSLA_TRY(check_out("dq", *dq, t, {s.B, s.Cq, s.H, s.D}));
  VSLA_TRY(check_out("dk", *dk, t, {s.B, s.Ck, s.Hkv, s.D}));
  VSLA_TRY(check_out("dv", *dv, t, {s.B, s.Ck, s.Hkv, s.Dv}));
  if (t == ffi::F32) {
    BwdArgs<float> a{q.typed_data<float>(), k.typed_data<float>(), v.typed_data<float>(),
                     o.typed_data<float>(), lse.typed_data<float>(), dout.typed_data<float>(),
                     lq.typed_data(), lk.typed_data(), dq->typed_data<float>(),
                     dk->typed_data<float>(), dv->typed_data<float>(), causal,
                     static_cast<float>(scale)};
    backward(a, s, pool);
  } else {
    BwdArgs<double> a{q.typed_data<double>(), k.typed_data<double>(), v.typed_data<double>(),
                      o.typed_data<double>(), lse.typed_data<double>(),
                      dout.typed_data<double>(), lq.typed_data(), lk.typed_data(),
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
                                  .Attr<bool>("causal")
                                  .Attr<double>("scale"));

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
                                  .Attr<double>("scale"));
