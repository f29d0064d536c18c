// Standalone micro-benchmark: our register-blocked attention GEMM against OpenBLAS
// cblas_sgemm on the small tile products of the attention kernel (single-threaded,
// float32, warm L1/L2 data). Built and run by experiments/gemm_tile_bench.py, which
// extracts the GEMM from csrc/attention.cc into attention_gemm.inc first.
//
// Build: run gemm_tile_bench.py (it writes attention_gemm.inc next to the binary and
// compiles with -I there, against scipy_openblas32's include and lib folders).
// Output: one CSV line per case (see the header line it prints).
//
// scipy-openblas32 prefixes its symbols: scipy_cblas_sgemm, scipy_openblas_*.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include <cblas.h>

namespace vsla {
namespace attn {

// The GEMM of csrc/attention.cc (from "// One 64-byte SIMD vector" to the vector
// helpers), cut out of the source by gemm_tile_bench.py at build time, so the benchmark
// always times the code the kernel runs.
#include "attention_gemm.inc"

}  // namespace attn
}  // namespace vsla

namespace {

using Clock = std::chrono::steady_clock;

struct Case {
  const char* name;
  int m, n, k;
  int64_t rsa, csa, ldb, ldc;
  bool acc;
};

float* alloc(size_t n, std::mt19937* rng) {
  size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  std::uniform_real_distribution<float> d(-0.5f, 0.5f);
  for (size_t i = 0; i < n; ++i) p[i] = d(*rng);
  return p;
}

inline void clobber() { asm volatile("" ::: "memory"); }

struct Buffers {
  float *a, *b, *c0, *c;
  size_t nc;
};

void run_ours(const Case& cs, const Buffers& x) {
  if (cs.acc)
    vsla::attn::gemm<float, true>(cs.m, cs.n, cs.k, x.a, cs.rsa, cs.csa, x.b, cs.ldb, x.c,
                                  cs.ldc);
  else
    vsla::attn::gemm<float, false>(cs.m, cs.n, cs.k, x.a, cs.rsa, cs.csa, x.b, cs.ldb, x.c,
                                   cs.ldc);
}

// A read through strides: csa == 1 is row-major A (lda = rsa); rsa == 1 is A^T stored
// row-major (lda = csa), i.e. CblasTrans.
void run_blas(const Case& cs, const Buffers& x) {
  const bool trans = cs.csa != 1;
  const int lda = static_cast<int>(trans ? cs.csa : cs.rsa);
  scipy_cblas_sgemm(CblasRowMajor, trans ? CblasTrans : CblasNoTrans, CblasNoTrans, cs.m, cs.n,
                    cs.k, 1.0f, x.a, lda, x.b, static_cast<int>(cs.ldb), cs.acc ? 1.0f : 0.0f,
                    x.c, static_cast<int>(cs.ldc));
}

// Best and median ns per call over `trials` trials of `reps` calls each (reps picked so a
// trial takes >= min_trial_s). Alternates ours/BLAS trials so drift hits both alike.
template <class F, class G>
void time_pair(F f, G g, double min_trial_s, int trials, double out[4]) {
  auto once = [](auto fn, long reps) {
    auto t0 = Clock::now();
    for (long r = 0; r < reps; ++r) {
      fn();
      clobber();
    }
    return std::chrono::duration<double>(Clock::now() - t0).count();
  };
  auto calibrate = [&](auto fn) {
    long reps = 1000;
    for (;;) {
      double t = once(fn, reps);
      if (t >= min_trial_s) return reps;
      reps = static_cast<long>(reps * std::min(100.0, 1.2 * min_trial_s / std::max(t, 1e-6)));
    }
  };
  long rf = calibrate(f), rg = calibrate(g);
  std::vector<double> tf, tg;
  for (int t = 0; t < trials; ++t) {
    tf.push_back(once(f, rf) / rf * 1e9);
    tg.push_back(once(g, rg) / rg * 1e9);
  }
  std::sort(tf.begin(), tf.end());
  std::sort(tg.begin(), tg.end());
  out[0] = tf[0];
  out[1] = tf[trials / 2];
  out[2] = tg[0];
  out[3] = tg[trials / 2];
}

}  // namespace

int main(int argc, char** argv) {
  double min_trial_s = argc > 1 ? std::atof(argv[1]) : 0.1;
  int trials = argc > 2 ? std::atoi(argv[2]) : 5;
  scipy_openblas_set_num_threads(1);
  const char* isa = "base";
  switch (vsla::attn::host_isa()) {
    case vsla::attn::Isa::kAvx512: isa = "avx512"; break;
    case vsla::attn::Isa::kAvx2: isa = "avx2"; break;
    default: break;
  }
  std::printf("# ours_isa=%s openblas_core=%s openblas_threads=%d\n", isa,
              scipy_openblas_get_corename(), scipy_openblas_get_num_threads());
  std::printf("# openblas_config=%s\n", scipy_openblas_get_config());

  // Layouts as the forward kernel calls them (csrc/attention.cc):
  //   S^T = K . Q^T: A = K rows in place (row stride 512 = Hkv * D), B = packed Q^T tile
  //     (ld kTQ = 64), C = S^T tile (ld 64), overwrite.
  //   O += P . V: A = P^T tile read transposed (rsa 1, csa kTQ = 64), B = V rows in place
  //     (ld 512), C = accumulator (ld n = Dv), accumulate.
  const Case cases[] = {
      {"S=K.Q^T", 64, 64, 64, 512, 1, 64, 64, false},
      {"O+=P.V", 64, 64, 64, 1, 64, 512, 64, true},
      {"S=K.Q^T", 30, 32, 64, 512, 1, 64, 64, false},
      {"O+=P.V", 30, 32, 64, 1, 64, 512, 32, true},
      {"S=K.Q^T", 30, 64, 30, 512, 1, 64, 64, false},
      {"O+=P.V", 30, 64, 30, 1, 64, 512, 64, true},
      // The backward's products at D = Dv = 80 (rows of H * D = 320 in place):
      {"S^T=K.Q^T D80", 64, 64, 80, 320, 1, 64, 64, false},
      {"dV+=P^T.dO D80", 64, 80, 64, 64, 1, 320, 80, true},
      {"dQ+=dS.K D80", 64, 80, 64, 1, 64, 320, 80, true},
  };
  std::printf(
      "case,m,n,k,rsa,csa,ldb,ldc,acc,ours_best_ns,ours_med_ns,blas_best_ns,blas_med_ns,"
      "maxdiff,ours_maxerr,blas_maxerr\n");
  std::mt19937 rng(1234);
  for (const Case& cs : cases) {
    const size_t na = static_cast<size_t>((cs.m - 1) * cs.rsa + (cs.k - 1) * cs.csa + 1);
    const size_t nb = static_cast<size_t>((cs.k - 1) * cs.ldb + cs.n);
    const size_t nc = static_cast<size_t>((cs.m - 1) * cs.ldc + cs.n);
    Buffers x{alloc(na, &rng), alloc(nb, &rng), alloc(nc, &rng), alloc(nc, &rng), nc};

    // Correctness: one call each from the same C, against a double-precision reference.
    std::vector<float> co(nc), cb(nc);
    std::memcpy(x.c, x.c0, nc * sizeof(float));
    run_ours(cs, x);
    std::memcpy(co.data(), x.c, nc * sizeof(float));
    std::memcpy(x.c, x.c0, nc * sizeof(float));
    run_blas(cs, x);
    std::memcpy(cb.data(), x.c, nc * sizeof(float));
    double maxdiff = 0, errs[2] = {0, 0};
    for (int i = 0; i < cs.m; ++i)
      for (int j = 0; j < cs.n; ++j) {
        double ref = cs.acc ? x.c0[i * cs.ldc + j] : 0.0;
        for (int p = 0; p < cs.k; ++p)
          ref += double(x.a[i * cs.rsa + p * cs.csa]) * double(x.b[p * cs.ldb + j]);
        const size_t o = static_cast<size_t>(i * cs.ldc + j);
        maxdiff = std::max(maxdiff, std::fabs(double(co[o]) - cb[o]));
        errs[0] = std::max(errs[0], std::fabs(co[o] - ref));
        errs[1] = std::max(errs[1], std::fabs(cb[o] - ref));
      }

    // Timing: accumulating calls keep adding to C (it grows linearly, far from overflow).
    double t[4];
    time_pair(
        [&] {
          run_ours(cs, x);
        },
        [&] {
          run_blas(cs, x);
        },
        min_trial_s, trials, t);
    std::printf("%s,%d,%d,%d,%ld,%ld,%ld,%ld,%d,%.1f,%.1f,%.1f,%.1f,%.3g,%.3g,%.3g\n", cs.name,
                cs.m, cs.n, cs.k, long(cs.rsa), long(cs.csa), long(cs.ldb), long(cs.ldc),
                int(cs.acc), t[0], t[1], t[2], t[3], maxdiff, errs[0], errs[1]);
    std::fflush(stdout);
    std::free(x.a);
    std::free(x.b);
    std::free(x.c0);
    std::free(x.c);
  }
  return 0;
}
