// A tiny handler the build and the loader are tested with: y = x * 2 (f32).
#include "common.h"

namespace vsla {

static ffi::Error Twice(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t n = x.element_count();
  const float* in = x.typed_data();
  float* out = y->typed_data();
  for (int64_t i = 0; i < n; ++i) out[i] = 2.0f * in[i];
  return ffi::Error::Success();
}

}  // namespace vsla

XLA_FFI_DEFINE_HANDLER_SYMBOL(vsla_selftest_twice, vsla::Twice,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());

// vsla::zero_bytes (csrc/common.h) on caller memory, for its tests.
extern "C" VSLA_EXPORT void vsla_selftest_zero_bytes(void* p, size_t n) {
  vsla::zero_bytes(p, n);
}

// vsla::zero_stream (csrc/common.h) on caller memory, for its tests.
extern "C" VSLA_EXPORT void vsla_selftest_zero_stream(void* p, size_t n) {
  vsla::zero_stream(p, n);
  vsla::stream_fence();
}

// vsla::zero_if_absent (csrc/common.h) on caller memory, for its tests: 1 when it zeroed.
extern "C" VSLA_EXPORT int vsla_selftest_zero_if_absent(void* p, size_t n, int populate) {
  return vsla::zero_if_absent(p, n, populate != 0) ? 1 : 0;
}

// vsla::advise_huge (csrc/common.h) on caller memory, for its tests.
extern "C" VSLA_EXPORT void vsla_selftest_advise_huge(void* p, size_t n) {
  vsla::advise_huge(p, n);
}

// vsla::huge_page_size (csrc/common.h), for its tests.
extern "C" VSLA_EXPORT size_t vsla_selftest_huge_page_size() {
  return vsla::huge_page_size();
}
