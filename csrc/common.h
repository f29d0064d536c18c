// Shared helpers of the CPU kernels: the export macro and argument checks.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

#define VSLA_EXPORT __attribute__((visibility("default")))

namespace vsla {

namespace ffi = xla::ffi;

// An InvalidArgument error naming what is wrong (the message reaches Python).
inline ffi::Error invalid(const char* what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, what);
}

// Ranges of at least this many bytes are handed back to the OS page by page (madvise
// MADV_DONTNEED) rather than written: below it, memset is as cheap.
constexpr size_t kMinDontNeed = size_t{1} << 18;

// The whole pages inside bytes [p, p + n): [*lo, *hi), empty when *hi <= *lo.
inline void page_interior(const void* p, size_t n, uintptr_t* lo, uintptr_t* hi) {
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), sz = page > 0 ? page : 1;
  *lo = (a + sz - 1) / sz * sz;
  *hi = (a + n) / sz * sz;
}

// Sets bytes [p, p + n) to zero. Large ranges hand their whole pages back to the OS
// (madvise MADV_DONTNEED), which maps zero pages on the next access: a mostly padded
// output that XLA has just mmapped then costs no page faults for its padding, and a
// reused one no memory traffic. That is only zeroing for private anonymous memory (what
// malloc, and so XLA:CPU, hands out); where a re-read first word is not zero (any other
// mapping) the range is memset instead.
inline void zero_bytes(void* p, size_t n) {
  char* c = static_cast<char*>(p);
  if (n >= kMinDontNeed) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(c);
    uintptr_t lo, hi;
    page_interior(p, n, &lo, &hi);
    if (hi > lo && madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED) == 0) {
      volatile const uint64_t* first = reinterpret_cast<const uint64_t*>(lo);
      if (*first != 0) std::memset(reinterpret_cast<void*>(lo), 0, hi - lo);
      std::memset(c, 0, lo - a);
      std::memset(reinterpret_cast<void*>(hi), 0, a + n - hi);
      return;
    }
  }
  std::memset(c, 0, n);
}

// Hands back to the OS the whole pages of bytes [p, p + n) of a buffer that holds
// zeros there and that the caller only reads: they stay zero (private anonymous memory,
// what XLA:CPU allocates), and read-only mappings of the shared zero page that earlier
// readers left are gone, so a later writer of this memory (XLA reuses a dead buffer for
// another value) takes one plain page fault instead of a copy-on-write with a TLB
// flush per page. Ranges below kMinDontNeed are left alone.
inline void release_zero_pages(const void* p, size_t n) {
  if (n < kMinDontNeed) return;
  uintptr_t lo, hi;
  page_interior(p, n, &lo, &hi);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

// Maps in the pages of bytes [p, p + n) that are about to be written, in one call
// (madvise MADV_POPULATE_WRITE, Linux 5.14+): cheaper than a fault per page of a buffer
// XLA has just mmapped. A hint only; nothing happens where the kernel lacks it.
inline void prefault_bytes(void* p, size_t n) {
#ifdef MADV_POPULATE_WRITE
  constexpr size_t kMinAdvise = size_t{1} << 14;
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  if (n < kMinAdvise || page == 0) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = a / page * page, hi = (a + n + page - 1) / page * page;
  (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
#else
  (void)p;
  (void)n;
#endif
}

template <class T>
inline void prefault(T* p, T* end) {
  if (end > p) prefault_bytes(p, static_cast<size_t>(end - p) * sizeof(T));
}

// Ranges of at least this many bytes are zeroed by zero_stream with non-temporal stores.
constexpr size_t kMinStream = size_t{1} << 11;

// Sets bytes [p, p + n) to zero without reading them: from kMinStream bytes on, the
// aligned middle is written with non-temporal stores (SSE2, every x86-64 CPU), which
// skip the read-for-ownership of each cache line and leave the caches to the data; the
// ragged ends, and short ranges, are memset. For the padding of an output that nothing
// reads before the call returns. Ends with an sfence (the stores are weakly ordered), so
// the zeros are visible to whoever the caller then signals.
inline void zero_stream(void* p, size_t n) {
  char* c = static_cast<char*>(p);
#if defined(__x86_64__)
  if (n >= kMinStream) {
    const size_t head = (16 - reinterpret_cast<uintptr_t>(c) % 16) % 16;
    std::memset(c, 0, head);
    char* end = c + n;
    c += head;
    const __m128i z = _mm_setzero_si128();
    for (; end - c >= 16; c += 16) _mm_stream_si128(reinterpret_cast<__m128i*>(c), z);
    std::memset(c, 0, static_cast<size_t>(end - c));
    _mm_sfence();
    return;
  }
#endif
  std::memset(c, 0, n);
}

// Typed form: elements [p, end) of a float type to +0.
template <class T>
inline void zero_fill(T* p, T* end) {
  if (end > p) zero_bytes(p, static_cast<size_t>(end - p) * sizeof(T));
}

}  // namespace vsla
