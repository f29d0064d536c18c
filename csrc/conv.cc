// Ragged Model A convolution of rank-1 items on capacity-padded batches: forward and
// correlation (its transposes), one XLA FFI custom call per batch each.
//
// Layout (row-major, as XLA hands the buffers over; `...` is any batch shape, the same
// for every operand, flattened to B items):
//   a [..., Ca], b [..., Cb], la/lb int32 [...] -> out [..., Ca + Cb - 1] and the output
//   lengths int32 [...] (la + lb - 1, 0 when la or lb is 0)
//   correlation: g [..., Cy + Cw - 1], w [..., Cw], lo/lw -> y [..., Cy] (the transposes)
// Item i: out[n] = sum_j a[n - j] * b[j] over the pairs with 0 <= n - j < la and
// 0 <= j < lb, for n < la + lb - 1; everything past that (and the whole row when la or
// lb is 0) is zero. Only products of two logical values are ever formed, so inf/nan
// reach exactly the outputs numpy.convolve gives them, and the slack is never read.
// Correlation: y[p] = sum_{j < lw} g[p + j] w[j] for p < lo, zero past lo. The forward's
// transposes are ga = corr(g, b) (lo = la, lw = lb) and gb = corr(g, a) (lo = lb, lw = la);
// the correlation's are the forward and the correlation again (vsla_jax/conv/cpu.py).
//
// Algorithm: direct summation, output-stationary in tiles of kTile outputs; inside a
// tile the taps of the shorter operand go in blocks of kTaps fused into one pass (one
// load and one store of the output per kTaps multiply-adds, the loop over outputs
// vectorised by the compiler). A block's taps are all valid on an interior range of
// outputs; the at most kTaps - 1 outputs on each side run a bounds-checked scalar loop.
// Long pairs take the same path: the tiles keep the output in L1 and stream the long
// operand once per tile (the blocked direct path; no FFT, which would spread inf/nan).
// Correlations with few outputs (backward of a short operand) run as dot products over
// a fixed number of lanes.
//
// Threads: each item's output range is cut into pieces of similar work; pieces are
// sorted by work (largest first), grouped into shrinking chunks (guided
// self-scheduling, chunk_bounds) and pulled from an atomic counter by the caller and
// XLA's intra-op thread pool (ffi::ThreadPool). Small batches (few multiply-adds and
// under 2 MiB of slack to zero) run on the caller only.
// The hot loops are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at
// load time (target_clones).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define VSLA_CONV_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define VSLA_CONV_CLONES
#endif
#define VSLA_CONV_INLINE inline __attribute__((always_inline))

namespace vsla {
namespace rconv {

constexpr int64_t kTaps = 8;            // taps fused into one pass over the outputs
static_assert(kTaps == 8, "partial blocks are split into 4 + 2 + 1 taps");
constexpr int64_t kTile = 512;          // outputs per tile (stays in L1)
constexpr int64_t kPadTaps = 8;         // from this many taps (and at most kPadLength
constexpr int64_t kPadLength = 256;     // samples in the longer input): conv_range_padded
constexpr int64_t kLanes = 16;          // partial sums of the dot-product form
constexpr int64_t kDotOutputs = 32;     // fewer outputs than this: dot-product form
constexpr double kSerialWork = 1 << 20; // multiply-adds below which one thread runs,
constexpr double kSerialZeroBytes = 2 << 20;  // unless it has this much slack to zero
constexpr double kMinPieceWork = 1 << 15;
constexpr int64_t kGuided = 4;             // a chunk: <= 1/(kGuided * threads) of what is left
constexpr double kMinChunkCost = 1 << 15;  // ... or at least this cost (a few us of work)
constexpr double kZeroCost = 8;  // a piece's cost of zeroing one output, in multiply-adds
// From this many bytes on an output is taken to be freshly mapped for each call: glibc's
// largest mmap threshold (see zero_output).
constexpr size_t kMinFresh = size_t{32} << 20;
constexpr double kHugeShare = 8;  // see zero_output

// ------------------------------------------------------------------ inner loops -------
// out[n] += sum_{k<K} w[j0 + k] * xs[n - k] for n in [0, count); xs[-K + 1] onward
// valid. Outputs [lo, hi) of x * w for taps j0.. are xs = x + lo - j0, out + lo.
template <class T, int K>
VSLA_CONV_INLINE void conv_fused(const T* __restrict xs, const T* __restrict w, int64_t j0,
                                 int64_t count, T* __restrict out) {
  T wk[K];
  for (int k = 0; k < K; ++k) wk[k] = w[j0 + k];
  for (int64_t n = 0; n < count; ++n) {
    T s = out[n];
    for (int k = 0; k < K; ++k) s += wk[k] * xs[n - k];
    out[n] = s;
  }
}

// Taps [j0, j0 + kk) (kk <= kTaps) of conv_fused: one pass of kTaps, or sub-blocks of
// 4, 2 and 1 taps for the last, partial block.
template <class T>
VSLA_CONV_INLINE void conv_taps(const T* xs, const T* w, int64_t j0, int64_t kk,
                                int64_t count, T* out) {
  if (kk == kTaps) return conv_fused<T, kTaps>(xs, w, j0, count, out);
  if (kk & 4) conv_fused<T, 4>(xs, w, j0, count, out), xs -= 4, j0 += 4;
  if (kk & 2) conv_fused<T, 2>(xs, w, j0, count, out), xs -= 2, j0 += 2;
  if (kk & 1) conv_fused<T, 1>(xs, w, j0, count, out);
}

// The same sum for n in [lo, hi) with every x index checked against [0, nx).
template <class T>
VSLA_CONV_INLINE void conv_edge(const T* x, int64_t nx, const T* w, int64_t j0, int64_t kk,
                                int64_t lo, int64_t hi, T* out) {
  for (int64_t n = lo; n < hi; ++n) {
    T s = out[n];
    for (int64_t k = 0; k < kk; ++k) {
      const int64_t i = n - j0 - k;
      if (i >= 0 && i < nx) s += w[j0 + k] * x[i];
    }
    out[n] = s;
  }
}

// The walk both conv_range forms share: outputs [n0, n1) of x * w (nx >= nw >= 1,
// n1 <= nx + nw - 1) in tiles of kTile, each zeroed (in L1, just before its sums), then
// block(t0, t1, j0, kk) for every block of kk <= kTaps taps from j0 that touches the tile.
template <class T, class Block>
VSLA_CONV_INLINE void tap_blocks(int64_t nx, int64_t nw, int64_t n0, int64_t n1, T* out,
                                 Block&& block) {
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t t1 = std::min(n1, t0 + kTile);
    std::fill(out + t0, out + t1, T(0));
    const int64_t jlo = std::max<int64_t>(0, t0 - nx + 1);  // taps touching this tile
    const int64_t jhi = std::min(nw, t1);
    for (int64_t j0 = jlo - jlo % kTaps; j0 < jhi; j0 += kTaps)
      block(t0, t1, j0, std::min(kTaps, nw - j0));
  }
}

// Writes outputs [n0, n1) of x * w (nx >= nw >= 1, n1 <= nx + nw - 1) to out, whatever
// it held, accumulating each tile's tap blocks (tap_blocks).
template <class T>
VSLA_CONV_INLINE void conv_range(const T* x, int64_t nx, const T* w, int64_t nw, int64_t n0,
                                 int64_t n1, T* out) {
  tap_blocks(nx, nw, n0, n1, out, [&](int64_t t0, int64_t t1, int64_t j0, int64_t kk) {
    // every tap of the block is valid for n in [j0 + kk - 1, j0 + nx)
    const int64_t lo = std::clamp(j0 + kk - 1, t0, t1);
    const int64_t hi = std::clamp(j0 + nx, lo, t1);
    conv_edge(x, nx, w, j0, kk, std::max(t0, j0), lo, out);
    if (hi > lo) conv_taps(x + lo - j0, w, j0, kk, hi - lo, out + lo);
    conv_edge(x, nx, w, j0, kk, hi, std::min(t1, j0 + kk - 1 + nx), out);
  });
}

// conv_range through a zero-padded copy of the inputs that outputs [n0, n1) read: xp[i -
// base] = x[i] for i in [base, n1), base = n0 - nw + 1, 0 outside [0, nx). Every tap block
// then runs whole vectors over the tile, where conv_range runs conv_edge's checked scalar
// loop on the kTaps - 1 outputs at either end of each block, a large share of the time
// on short items (BENCHMARKS.md, ninth session). `xp` holds n1 - base values.
template <class T>
VSLA_CONV_INLINE void conv_range_padded(const T* x, int64_t nx, const T* w, int64_t nw,
                                        int64_t n0, int64_t n1, T* out, T* xp) {
  const int64_t base = n0 - nw + 1;
  const int64_t from = std::max<int64_t>(base, 0), to = std::min(n1, nx);
  std::fill(xp, xp + (from - base), T(0));
  std::copy(x + from, x + to, xp + (from - base));
  std::fill(xp + (to - base), xp + (n1 - base), T(0));
  tap_blocks(nx, nw, n0, n1, out, [&](int64_t t0, int64_t t1, int64_t j0, int64_t kk) {
    // conv_taps reads xs[n - k] = x[t0 + n - j0 - k]
    conv_taps(xp + (t0 - j0 - base), w, j0, kk, t1 - t0, out + t0);
  });
}

// out[p] += sum_{k<K} w[j0 + k] * g[p + j0 + k] for p in [lo, hi).
template <class T, int K>
VSLA_CONV_INLINE void corr_fused(const T* __restrict g, const T* __restrict w, int64_t j0,
                                 int64_t lo, int64_t hi, T* __restrict out) {
  T wk[K];
  for (int k = 0; k < K; ++k) wk[k] = w[j0 + k];
  const T* gs = g + j0;
  for (int64_t p = lo; p < hi; ++p) {
    T s = out[p];
    for (int k = 0; k < K; ++k) s += wk[k] * gs[p + k];
    out[p] = s;
  }
}

// out[p] = sum_{j<nw} g[p + j] * w[j] for p in [p0, p1) (g holds p1 + nw - 1 values).
template <class T>
VSLA_CONV_INLINE void corr_range(const T* g, const T* w, int64_t nw, int64_t p0, int64_t p1,
                                 T* out) {
  if (p1 - p0 < kDotOutputs && nw >= kDotOutputs) {  // few outputs: dot products
    for (int64_t p = p0; p < p1; ++p) {
      const T* gp = g + p;
      T acc[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= nw; j += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) acc[l] += gp[j + l] * w[j + l];
      T s = 0;
      for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
      for (; j < nw; ++j) s += gp[j] * w[j];
      out[p] = s;
    }
    return;
  }
  for (int64_t t0 = p0; t0 < p1; t0 += kTile) {
    const int64_t t1 = std::min(p1, t0 + kTile);
    std::fill(out + t0, out + t1, T(0));  // zeroed in L1, just before its sums
    int64_t j0 = 0;
    for (; j0 + kTaps <= nw; j0 += kTaps) corr_fused<T, kTaps>(g, w, j0, t0, t1, out);
    const int64_t rest = nw - j0;  // fewer than kTaps: sub-blocks of 4, 2 and 1 taps
    if (rest & 4) corr_fused<T, 4>(g, w, j0, t0, t1, out), j0 += 4;
    if (rest & 2) corr_fused<T, 2>(g, w, j0, t0, t1, out), j0 += 2;
    if (rest & 1) corr_fused<T, 1>(g, w, j0, t0, t1, out);
  }
}

VSLA_CONV_CLONES void conv_range_f32(const float* x, int64_t nx, const float* w, int64_t nw,
                                     int64_t n0, int64_t n1, float* out) {
  conv_range(x, nx, w, nw, n0, n1, out);
}
VSLA_CONV_CLONES void conv_range_f64(const double* x, int64_t nx, const double* w, int64_t nw,
                                     int64_t n0, int64_t n1, double* out) {
  conv_range(x, nx, w, nw, n0, n1, out);
}
VSLA_CONV_CLONES void conv_range_padded_f32(const float* x, int64_t nx, const float* w,
                                            int64_t nw, int64_t n0, int64_t n1, float* out,
                                            float* xp) {
  conv_range_padded(x, nx, w, nw, n0, n1, out, xp);
}
VSLA_CONV_CLONES void conv_range_padded_f64(const double* x, int64_t nx, const double* w,
                                            int64_t nw, int64_t n0, int64_t n1, double* out,
                                            double* xp) {
  conv_range_padded(x, nx, w, nw, n0, n1, out, xp);
}
VSLA_CONV_CLONES void corr_range_f32(const float* g, const float* w, int64_t nw, int64_t p0,
                                     int64_t p1, float* out) {
  corr_range(g, w, nw, p0, p1, out);
}
VSLA_CONV_CLONES void corr_range_f64(const double* g, const double* w, int64_t nw, int64_t p0,
                                     int64_t p1, double* out) {
  corr_range(g, w, nw, p0, p1, out);
}

// The zero-padded inputs of conv_range_padded, per thread: grows to the largest piece
// the thread ran and is reused (a thread runs one piece at a time).
template <class T>
T* padded_scratch(int64_t n) {
  thread_local std::vector<T> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

// Whether w[0, n) are all finite (w * 0 is 0 for each).
template <class T>
bool all_finite(const T* w, int64_t n) {
  T acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += w[i] * T(0);
  return acc == T(0);
}

// Whether outputs of x * w (nx >= nw) go through a zero-padded copy of x
// (conv_range_padded): from kPadTaps taps on and up to kPadLength samples, where
// conv_range's checked edges cost more than the copy (measured single-threaded,
// BENCHMARKS.md, ninth session: faster on short items, level or slower from ~1,000
// samples, where the edges' share is small and the copy is one more pass over the
// input); and only for finite taps, since a padded zero times inf is nan where
// numpy.convolve forms no product at all.
template <class T>
bool use_padded(int64_t nx, const T* w, int64_t nw) {
  return nw >= kPadTaps && nx <= kPadLength && all_finite(w, nw);
}

inline void conv_kernel(const float* x, int64_t nx, const float* w, int64_t nw, int64_t n0,
                        int64_t n1, float* out) {
  if (!use_padded(nx, w, nw)) return conv_range_f32(x, nx, w, nw, n0, n1, out);
  conv_range_padded_f32(x, nx, w, nw, n0, n1, out, padded_scratch<float>(n1 - n0 + nw - 1));
}
inline void conv_kernel(const double* x, int64_t nx, const double* w, int64_t nw, int64_t n0,
                        int64_t n1, double* out) {
  if (!use_padded(nx, w, nw)) return conv_range_f64(x, nx, w, nw, n0, n1, out);
  conv_range_padded_f64(x, nx, w, nw, n0, n1, out, padded_scratch<double>(n1 - n0 + nw - 1));
}
inline void corr_kernel(const float* g, const float* w, int64_t nw, int64_t p0, int64_t p1,
                        float* out) {
  corr_range_f32(g, w, nw, p0, p1, out);
}
inline void corr_kernel(const double* g, const double* w, int64_t nw, int64_t p0, int64_t p1,
                        double* out) {
  corr_range_f64(g, w, nw, p0, p1, out);
}

// ------------------------------------------------------------------ threading ---------
// A piece of work: item, output range [lo, hi)
// (hi may reach into the slack, which the piece zeroes), and its cost.
struct Piece {
  int64_t item, lo, hi;
  double cost;
};

struct Job {
  std::vector<Piece> pieces;
  std::vector<int64_t> chunks;  // chunk c is pieces [chunks[c], chunks[c + 1])
  std::function<void(const Piece&)> fn;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
  bool fence = false;

  // Runs chunks until none is left, then counts their pieces done (one fence per thread
  // first).
  void drain() {
    const int64_t n = static_cast<int64_t>(chunks.size()) - 1;
    int64_t mine = 0;
    for (int64_t c; (c = next.fetch_add(1)) < n;) {
      for (int64_t u = chunks[c]; u < chunks[c + 1]; ++u) fn(pieces[u]);
      mine += chunks[c + 1] - chunks[c];
    }
    if (mine == 0) return;
    if (fence) stream_fence();
    const int64_t total = static_cast<int64_t>(pieces.size());
    if (done.fetch_add(mine) + mine == total) {
      std::lock_guard<std::mutex> lock(mu);
      cv.notify_all();
    }
  }
};

// Groups pieces sorted by cost (largest first) into chunks that threads pull whole,
// guided self-scheduling: a chunk gathers pieces until it holds 1/(kGuided * threads)
// of the cost still unassigned, or kMinChunkCost; a larger piece is a chunk of its own.
// Chunks shrink toward the end, so the threads finish together, and a batch of 1,024
// small items takes ~50 atomic pulls instead of 1,024 (the counter's cache line,
// bouncing between the cores, took ~14% of such a call). Returns the chunk bounds (the
// first piece of each chunk, then the piece count).
inline std::vector<int64_t> chunk_bounds(const std::vector<Piece>& pieces, int64_t threads) {
  double left = 0;
  for (const Piece& p : pieces) left += p.cost;
  std::vector<int64_t> out{0};
  const int64_t n = static_cast<int64_t>(pieces.size());
  double acc = 0, target = 0;
  for (int64_t u = 0; u < n; ++u) {
    if (acc == 0) target = std::max(kMinChunkCost, left / static_cast<double>(kGuided * threads));
    acc += pieces[u].cost;
    if (acc >= target || u + 1 == n) {
      out.push_back(u + 1);
      left -= acc;
      acc = 0;
    }
  }
  return out;
}

// The threads a call gets: the caller alone below kSerialWork multiply-adds and
// kSerialZeroBytes of slack to zero (waking XLA's pool costs more than a second thread
// saves there: 16 x 6,581 outputs, 0.6 MB, ran 97 us on one thread and 146 us on two),
// else up to `threads`. Zeroing 2.9 MB of slack (256 x 2,852 float32) took 322 us on one
// thread and 248 us on two.
inline int64_t threads_for(double macs, double zero_bytes, int64_t threads) {
  return macs < kSerialWork && zero_bytes < kSerialZeroBytes ? 1 : threads;
}

// Runs fn on every piece, largest first, on up to `threads` threads (caller included).
// With `fence` each thread ends its share with stream_fence (fn used zero_stream).
template <class Fn>
void run_pieces(ffi::ThreadPool& pool, std::vector<Piece> pieces, int64_t threads, Fn&& fn,
                bool fence) {
  if (pieces.empty()) return;
  const int64_t n = static_cast<int64_t>(pieces.size());
  const int64_t extra = std::min(threads, n) - 1;
  if (extra <= 0) {
    for (const Piece& p : pieces) fn(p);
    if (fence) stream_fence();
    return;
  }
  auto job = std::make_shared<Job>();
  job->fence = fence;
  job->pieces = std::move(pieces);
  std::stable_sort(job->pieces.begin(), job->pieces.end(),
                   [](const Piece& x, const Piece& y) { return x.cost > y.cost; });
  job->chunks = chunk_bounds(job->pieces, extra + 1);
  job->fn = std::forward<Fn>(fn);
  // Late-starting tasks find the counter exhausted and touch nothing but the job.
  for (int64_t w = 0; w < extra; ++w) pool.Schedule([job] { job->drain(); });
  job->drain();
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == n; });
}

// Cuts outputs [0, valid) of one item (work `work`) into pieces of about `piece_work`;
// the last piece also covers the slack [valid, cap). A piece costs its share of the work
// plus `per_output` for each output it zeroes.
inline void add_pieces(std::vector<Piece>* out, int64_t item, int64_t valid,
                       int64_t cap, double work, double piece_work, double per_output) {
  int64_t k = 1;
  if (valid > 0 && work > piece_work) {
    k = std::min<int64_t>(static_cast<int64_t>(work / piece_work) + 1,
                          (valid + kTile - 1) / kTile);
  }
  if (k <= 1) {  // most items of a batch: one piece, no divisions
    out->push_back({item, 0, cap, work + per_output * static_cast<double>(cap)});
    return;
  }
  const double per = work / static_cast<double>(k);
  for (int64_t q = 0; q < k; ++q) {
    const int64_t lo = valid * q / k;
    const int64_t hi = q + 1 == k ? cap : valid * (q + 1) / k;
    out->push_back({item, lo, hi, per + per_output * static_cast<double>(hi - lo)});
  }
}

inline int64_t thread_count(ffi::ThreadPool& pool, int64_t max_threads) {
  int64_t n = std::max<int64_t>(1, pool.num_threads());
  if (max_threads > 0) n = std::min(n, max_threads);
  return n;
}

inline double piece_work_for(double total, int64_t threads) {
  return std::max(kMinPieceWork, total / static_cast<double>(4 * threads));
}

// Zeroes the slack among outputs [lo, hi) of a row whose first `valid` outputs the piece
// then writes (conv_range and corr_range zero each tile in L1 before its sums, so those
// are written first even when the whole output is zero already: a read first would map
// the shared zero page and then take a second, copy-on-write fault). The slack is left
// alone when `zeroed` (zero_if_absent handed its pages back); otherwise it is memset, or
// written with non-temporal stores where `stream` (an output larger than a core's L2:
// its slack would only evict the caches).
template <class T>
inline void clear_piece(T* o, int64_t lo, int64_t hi, int64_t valid, bool zeroed,
                        bool stream) {
  const int64_t mid = std::clamp(valid, lo, hi);
  if (zeroed) return;
  if (stream) {
    zero_stream(o + mid, static_cast<size_t>(hi - mid) * sizeof(T));
  } else {
    std::fill(o + mid, o + hi, T(0));
  }
}

// Whether an output of `bytes` exceeds one core's L2 cache (2 MiB where unknown).
inline bool beyond_l2(size_t bytes) {
  static const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
  return bytes > (l2 > 0 ? static_cast<size_t>(l2) : size_t{2} << 20);
}

// The pages that elements [lo, hi) of `o` touch (0 for an empty range).
template <class T>
inline double pages_touched(const T* o, int64_t lo, int64_t hi) {
  if (hi <= lo) return 0;
  const uintptr_t a = reinterpret_cast<uintptr_t>(o + lo);
  const uintptr_t b = reinterpret_cast<uintptr_t>(o + hi) - 1;
  return static_cast<double>(b / page_size() - a / page_size() + 1);
}

// zero_if_absent over a [rows, cap] output whose valid outputs touch `touched()` pages:
// true when it is all zero now. Outputs of kMinFresh bytes or more, which malloc maps
// fresh for each call, keep their untouched pages unmapped (no fault, no traffic), unless
// most pages get written anyway. Smaller ones are mapped in again at once, one call
// instead of a fault per page: malloc hands them out again from its heap, and unmapped
// padding would fault in again on every call. `touched` (a pass over the items) runs only
// for outputs that large; below kMinDontNeed zero_if_absent declines at once.
template <class T, class Touched>
inline bool zero_output(T* o, int64_t rows, int64_t cap, Touched&& touched) {
  const size_t bytes = static_cast<size_t>(rows * cap) * sizeof(T);
  if (bytes < kMinDontNeed) return false;
  if (bytes < kMinFresh) return zero_if_absent(o, bytes, true);
  const double written = touched() * page_size();
  const bool populate = 2 * written > static_cast<double>(bytes);  // asks for huge pages
  if (!zero_if_absent(o, bytes, populate)) return false;
  // A huge page's fault zeroes 2 MiB, which costs about as much as faulting in 1/8 of
  // its 4 KiB pages one by one (experiments/time_page_faults.py): where the valid
  // outputs touch more than 1/kHugeShare of the pages, ask for huge ones.
  if (!populate && kHugeShare * written > static_cast<double>(bytes)) advise_huge(o, bytes);
  return true;
}

// The output length of an item: na + nb - 1, or 0 when either operand is empty.
inline int64_t out_length(int64_t na, int64_t nb) {
  return na > 0 && nb > 0 ? na + nb - 1 : 0;
}

// ------------------------------------------------------------------ drivers -----------
struct Dims {
  int64_t B, Ca, Cb, Co;
};

template <class T>
void forward(ffi::ThreadPool& pool, const Dims& d, const T* a, const T* b, const int32_t* la,
             const int32_t* lb, T* out, int64_t max_threads) {
  const int64_t threads = thread_count(pool, max_threads);
  double total = 0;
  for (int64_t i = 0; i < d.B; ++i) total += static_cast<double>(la[i]) * lb[i];
  const double piece_work = piece_work_for(total, threads);
  const bool zeroed = zero_output(out, d.B, d.Co, [&] {
    double written = 0;
    for (int64_t i = 0; i < d.B; ++i)
      written += pages_touched(out, i * d.Co, i * d.Co + out_length(la[i], lb[i]));
    return written;
  });
  const bool stream = beyond_l2(static_cast<size_t>(d.B * d.Co) * sizeof(T));
  const double zero_bytes = zeroed ? 0.0 : static_cast<double>(d.B * d.Co * sizeof(T));
  auto run = [&](const Piece& p) {
    T* o = out + p.item * d.Co;
    const int64_t na = la[p.item], nb = lb[p.item];
    const int64_t valid = out_length(na, nb);
    clear_piece(o, p.lo, p.hi, valid, zeroed, stream);
    const int64_t hi = std::min(p.hi, valid);
    if (p.lo < hi) {
      const T* x = a + p.item * d.Ca;
      const T* w = b + p.item * d.Cb;
      if (na >= nb) {
        conv_kernel(x, na, w, nb, p.lo, hi, o);
      } else {
        conv_kernel(w, nb, x, na, p.lo, hi, o);
      }
    }
  };
  if (threads_for(total, zero_bytes, threads) == 1) {  // whole items in order, no list
    for (int64_t i = 0; i < d.B; ++i) run(Piece{i, 0, d.Co, 0.0});
    if (stream) stream_fence();
    return;
  }
  std::vector<Piece> pieces;
  pieces.reserve(static_cast<size_t>(d.B));
  for (int64_t i = 0; i < d.B; ++i) {
    add_pieces(&pieces, i, out_length(la[i], lb[i]), d.Co,
               static_cast<double>(la[i]) * lb[i], piece_work, zeroed ? 0.0 : kZeroCost);
  }
  run_pieces(pool, std::move(pieces), threads, run, stream);
}

// Correlation of each item with a weight row: y[p] = sum_{j < lw} g[p + j] w[j] for
// p < lo, zero from lo on (all zero when lo or lw is 0). g [B, Cy + Cw - 1], w [B, Cw],
// y [B, Cy]. The transposes of the forward: ga = corr(g, b) (lo = la, lw = lb) and
// gb = corr(g, a) (lo = lb, lw = la); and of the correlation itself.
template <class T>
void correlate(ffi::ThreadPool& pool, int64_t B, int64_t Cy, int64_t Cw, const T* g,
               const T* w, const int32_t* lo, const int32_t* lw, T* y, int64_t max_threads) {
  const int64_t threads = thread_count(pool, max_threads), Cg = Cy + Cw - 1;
  auto valid = [&](int64_t i) -> int64_t { return lo[i] > 0 && lw[i] > 0 ? lo[i] : 0; };
  double total = 0;
  for (int64_t i = 0; i < B; ++i) total += static_cast<double>(valid(i)) * lw[i];
  const double piece_work = piece_work_for(total, threads);
  const bool zeroed = zero_output(y, B, Cy, [&] {
    double pages = 0;  // the pages the valid outputs touch
    for (int64_t i = 0; i < B; ++i) pages += pages_touched(y, i * Cy, i * Cy + valid(i));
    return pages;
  });
  const bool stream = beyond_l2(static_cast<size_t>(B * Cy) * sizeof(T));
  const double zero_bytes = static_cast<double>(zeroed ? 0 : B * Cy) * sizeof(T);
  auto run = [&](const Piece& p) {
    T* o = y + p.item * Cy;
    const int64_t n = valid(p.item);
    clear_piece(o, p.lo, p.hi, n, zeroed, stream);
    const int64_t hi = std::min(p.hi, n);
    if (p.lo < hi) corr_kernel(g + p.item * Cg, w + p.item * Cw, lw[p.item], p.lo, hi, o);
  };
  if (threads_for(total, zero_bytes, threads) == 1) {  // whole items in order, no list
    for (int64_t i = 0; i < B; ++i) run(Piece{i, 0, Cy, 0.0});
    if (stream) stream_fence();
    return;
  }
  std::vector<Piece> pieces;
  pieces.reserve(static_cast<size_t>(B));
  for (int64_t i = 0; i < B; ++i) {
    const int64_t n = valid(i);
    add_pieces(&pieces, i, n, Cy, static_cast<double>(n) * lw[i], piece_work,
               zeroed ? 0.0 : kZeroCost);
  }
  run_pieces(pool, std::move(pieces), threads, run, stream);
}

// ------------------------------------------------------------------ validation --------
inline ffi::Error bad(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "vsla conv kernel: " + what);
}

inline std::string dims_str(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// Batch dims of x (all but the last) equal `batch`, last dim `last`.
inline bool fits(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions batch,
                 int64_t last) {
  if (x.size() != batch.size() + 1 || x.back() != last) return false;
  return std::equal(batch.begin(), batch.end(), x.begin());
}

inline ffi::Error check_lengths(const char* name, ffi::Buffer<ffi::S32> l, int64_t cap) {
  const int32_t* p = l.typed_data();
  const int64_t n = static_cast<int64_t>(l.element_count());
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] < 0 || p[i] > cap)
      return bad(std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(p[i]) +
                 " is outside [0, capacity " + std::to_string(cap) + "]");
  }
  return ffi::Error::Success();
}

inline ffi::Error check_inputs(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> la,
                               ffi::Buffer<ffi::S32> lb, Dims* d) {
  const auto da = a.dimensions(), db = b.dimensions();
  if (a.element_type() != ffi::F32 && a.element_type() != ffi::F64)
    return bad("a must be float32 or float64");
  if (b.element_type() != a.element_type()) return bad("a and b must have one dtype");
  if (da.size() < 1) return bad("a must have a capacity axis, got dims " + dims_str(da));
  const auto batch = la.dimensions();
  if (!std::equal(batch.begin(), batch.end(), lb.dimensions().begin(),
                  lb.dimensions().end()))
    return bad("la " + dims_str(batch) + " and lb " + dims_str(lb.dimensions()) +
               " must have one shape");
  d->Ca = da.back();
  d->Cb = db.size() == 0 ? -1 : db.back();
  if (!fits(da, batch, d->Ca) || !fits(db, batch, d->Cb))
    return bad("a " + dims_str(da) + " and b " + dims_str(db) +
               " must be [*batch, capacity] with batch " + dims_str(batch));
  if (d->Ca < 1 || d->Cb < 1) return bad("capacities must be >= 1, got a " + dims_str(da) +
                                         ", b " + dims_str(db));
  d->Co = d->Ca + d->Cb - 1;
  d->B = static_cast<int64_t>(la.element_count());
  if (ffi::Error e = check_lengths("la", la, d->Ca); e.failure()) return e;
  return check_lengths("lb", lb, d->Cb);
}

inline ffi::Error check_out(const char* name, ffi::AnyBuffer x, ffi::DataType t,
                            ffi::AnyBuffer::Dimensions batch, int64_t last) {
  if (x.element_type() != t) return bad(std::string(name) + " has the wrong dtype");
  if (!fits(x.dimensions(), batch, last))
    return bad(std::string(name) + " " + dims_str(x.dimensions()) + " must be [*batch, " +
               std::to_string(last) + "] with batch " + dims_str(batch));
  return ffi::Error::Success();
}

// The output lengths la + lb - 1 (0 when either is 0) come from the kernel too: computed
// by a separate XLA fusion, they made a second thunk that cost the call more than the
// convolution of a small batch (docs/kernels.md, "Output lengths").
ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                   ffi::Buffer<ffi::S32> la, ffi::Buffer<ffi::S32> lb,
                   ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::S32>> lo,
                   int64_t max_threads) {
  Dims d;
  if (ffi::Error e = check_inputs(a, b, la, lb, &d); e.failure()) return e;
  const auto t = a.element_type();
  if (ffi::Error e = check_out("out", *out, t, la.dimensions(), d.Co); e.failure()) return e;
  const auto lo_dims = lo->dimensions(), batch = la.dimensions();
  if (!std::equal(batch.begin(), batch.end(), lo_dims.begin(), lo_dims.end()))
    return bad("output lengths " + dims_str(lo_dims) + " must have the batch shape " +
               dims_str(batch));
  int32_t* lo_data = lo->typed_data();
  for (int64_t i = 0; i < d.B; ++i) {
    const int32_t na = la.typed_data()[i], nb = lb.typed_data()[i];
    lo_data[i] = static_cast<int32_t>(out_length(na, nb));
  }
  if (t == ffi::F32) {
    forward(pool, d, a.typed_data<float>(), b.typed_data<float>(), la.typed_data(),
            lb.typed_data(), out->typed_data<float>(), max_threads);
  } else {
    forward(pool, d, a.typed_data<double>(), b.typed_data<double>(), la.typed_data(),
            lb.typed_data(), out->typed_data<double>(), max_threads);
  }
  return ffi::Error::Success();
}

// y = corr(g, w) (see correlate): g [*batch, Cy + Cw - 1], w [*batch, Cw], lo/lw int32
// [*batch] with lo <= Cy and lw <= Cw; y [*batch, Cy].
ffi::Error Correlate(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer w,
                     ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> lw,
                     ffi::Result<ffi::AnyBuffer> y, int64_t max_threads) {
  const auto t = g.element_type();
  if (t != ffi::F32 && t != ffi::F64) return bad("g must be float32 or float64");
  if (w.element_type() != t) return bad("g and w must have one dtype");
  const auto batch = lo.dimensions();
  if (!std::equal(batch.begin(), batch.end(), lw.dimensions().begin(),
                  lw.dimensions().end()))
    return bad("lo " + dims_str(batch) + " and lw " + dims_str(lw.dimensions()) +
               " must have one shape");
  const auto dy = y->dimensions(), dw = w.dimensions();
  if (dy.size() < 1 || dw.size() < 1)
    return bad("y and w must have a capacity axis, got y " + dims_str(dy) + ", w " +
               dims_str(dw));
  const int64_t Cy = dy.back(), Cw = dw.back();
  if (!fits(dy, batch, Cy) || !fits(dw, batch, Cw))
    return bad("y " + dims_str(dy) + " and w " + dims_str(dw) +
               " must be [*batch, capacity] with batch " + dims_str(batch));
  if (Cy < 1 || Cw < 1)
    return bad("capacities must be >= 1, got y " + dims_str(dy) + ", w " + dims_str(dw));
  if (ffi::Error e = check_out("g", g, t, batch, Cy + Cw - 1); e.failure()) return e;
  if (y->element_type() != t) return bad("y has the wrong dtype");
  if (ffi::Error e = check_lengths("lo", lo, Cy); e.failure()) return e;
  if (ffi::Error e = check_lengths("lw", lw, Cw); e.failure()) return e;
  const int64_t B = static_cast<int64_t>(lo.element_count());
  if (t == ffi::F32) {
    correlate(pool, B, Cy, Cw, g.typed_data<float>(), w.typed_data<float>(), lo.typed_data(),
              lw.typed_data(), y->typed_data<float>(), max_threads);
  } else {
    correlate(pool, B, Cy, Cw, g.typed_data<double>(), w.typed_data<double>(),
              lo.typed_data(), lw.typed_data(), y->typed_data<double>(), max_threads);
  }
  return ffi::Error::Success();
}

}  // namespace rconv
}  // namespace vsla

XLA_FFI_DEFINE_HANDLER_SYMBOL(vsla_conv_fwd, vsla::rconv::Forward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(vsla_conv_corr, vsla::rconv::Correlate,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("max_threads"));
