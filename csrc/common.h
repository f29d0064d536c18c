// Shared helpers of the CPU kernels: the export macro and argument checks.
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

#define VSLA_EXPORT __attribute__((visibility("default")))

namespace vsla {

namespace ffi = xla::ffi;

// An InvalidArgument error naming what is wrong (the message reaches Python).
inline ffi::Error invalid(const char* what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, what);
}

}  // namespace vsla
