// Shared helpers of the CPU kernels: the export macro and argument checks.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

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

// The OS page size in bytes (4096 where sysconf cannot tell).
inline uintptr_t page_size() {
  static const long page = sysconf(_SC_PAGESIZE);
  return page > 0 ? static_cast<uintptr_t>(page) : 4096;
}

// The whole pages inside bytes [p, p + n): [*lo, *hi), empty when *hi <= *lo.
inline void page_interior(const void* p, size_t n, uintptr_t* lo, uintptr_t* hi) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), sz = page_size();
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

// The size in bytes of a transparent huge page (2 MiB where the kernel does not say).
inline uintptr_t huge_page_size() {
  static const uintptr_t size = [] {
    uintptr_t v = 0;
    if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "r")) {
      unsigned long long x = 0;
      if (std::fscanf(f, "%llu", &x) == 1) v = static_cast<uintptr_t>(x);
      std::fclose(f);
    }
    return v >= 4096 && (v & (v - 1)) == 0 ? v : uintptr_t{2} << 20;
  }();
  return size;
}

// Asks the OS to back the whole huge pages inside bytes [p, p + n) with transparent huge
// pages when they are next faulted in (madvise MADV_HUGEPAGE; it never changes what the
// memory holds, and pages already mapped in stay as they are). One fault then maps 2 MiB,
// where a buffer XLA has just mmapped otherwise takes a fault per 4 KiB page
// (experiments/time_page_faults.py). A hint only: nothing happens where the kernel lacks
// it, or where THP is off ("never").
inline void advise_huge(void* p, size_t n) {
#ifdef MADV_HUGEPAGE
  const uintptr_t huge = huge_page_size(), a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (a + huge - 1) / huge * huge, hi = (a + n) / huge * huge;
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
}

// Maps in the pages of bytes [p, p + n) that are about to be written, in one call
// (madvise MADV_POPULATE_WRITE, Linux 5.14+): cheaper than a fault per page of a buffer
// XLA has just mmapped; its whole huge pages are asked for as such first (advise_huge).
// A hint only; nothing happens where the kernel lacks it.
inline void prefault_bytes(void* p, size_t n) {
#ifdef MADV_POPULATE_WRITE
  constexpr size_t kMinAdvise = size_t{1} << 14;
  const uintptr_t page = page_size();
  if (n < kMinAdvise) return;
  advise_huge(p, n);
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

// Whether more than half of the whole pages of bytes [p, p + n) are mapped in (mincore):
// memory malloc handed out again from its heap, rather than freshly mmapped. Handing
// such pages back (MADV_DONTNEED) only moves their cost to the next writer, which then
// takes a page fault (~1 us on a VM) for each, where writing zeros costs ~0.1 us a page.
// True when mincore fails or the range holds no whole page.
inline bool mostly_resident(const void* p, size_t n) {
  uintptr_t lo, hi;
  page_interior(p, n, &lo, &hi);
  if (hi <= lo) return true;
  std::vector<unsigned char> resident((hi - lo) / page_size());
  if (mincore(reinterpret_cast<void*>(lo), hi - lo, resident.data()) != 0) return true;
  size_t in = 0;
  for (unsigned char r : resident) in += r & 1;
  return 2 * in > resident.size();
}

// Zeroes bytes [p, p + n) by handing its whole pages back to the OS (madvise
// MADV_DONTNEED) when at least half of them are not mapped in (mincore), as in an output
// XLA has just mmapped: its pages then cost a page fault only where something is later
// written, and its padding no memory traffic at all. Returns false, leaving the bytes as
// they were, when the range is below kMinDontNeed or mostly resident (writing it is then
// cheaper than the faults a later writer would take), and on memory that MADV_DONTNEED
// does not zero (a sentinel written before comes back: shared memory, which keeps its
// bytes, the sentinel's word restored, and file mappings). The caller then writes the
// zeros itself. With `populate` the zeroed pages are mapped in again at once (madvise
// MADV_POPULATE_WRITE, one call instead of a fault per page), for a caller that is about
// to write most of them.
inline bool zero_if_absent(void* p, size_t n, bool populate) {
  if (n < kMinDontNeed || mostly_resident(p, n)) return false;
  uintptr_t lo, hi;
  page_interior(p, n, &lo, &hi);
  if (hi <= lo) return false;
  volatile uint64_t* first = reinterpret_cast<uint64_t*>(lo);
  const uint64_t kept = *first;
  *first = ~uint64_t{0};
  if (madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED) != 0) {
    *first = kept;
    return false;
  }
  if (*first != 0) {
    *first = kept;
    return false;
  }
  char* c = static_cast<char*>(p);
  const uintptr_t a = reinterpret_cast<uintptr_t>(c);
  std::memset(c, 0, lo - a);
  std::memset(reinterpret_cast<void*>(hi), 0, a + n - hi);
  if (populate) prefault_bytes(reinterpret_cast<void*>(lo), hi - lo);
  return true;
}

// Ranges of at least this many bytes are zeroed by zero_stream with non-temporal stores.
constexpr size_t kMinStream = size_t{1} << 12;

// Sets bytes [p, p + n) to zero without reading them: from kMinStream bytes on, the
// aligned middle is written with non-temporal stores (SSE2, every x86-64 CPU), which
// skip the read-for-ownership of each cache line and leave the caches to the data; the
// ragged ends, and short ranges, are memset. For the padding of an output that nothing
// reads before the call returns. The stores are weakly ordered: call stream_fence once
// after the last zero_stream of a thread, before it signals that its work is done.
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
    return;
  }
#endif
  std::memset(c, 0, n);
}

// Orders this thread's earlier zero_stream stores before its later stores (sfence).
inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Typed form: elements [p, end) of a float type to +0.
template <class T>
inline void zero_fill(T* p, T* end) {
  if (end > p) zero_bytes(p, static_cast<size_t>(end - p) * sizeof(T));
}

}  // namespace vsla
