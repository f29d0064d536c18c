// The vsla_jax.cpu_kernels extension module: a Python module with no functions whose
// shared object exports the XLA FFI handlers of the CPU kernels (csrc/*.cc) as C
// symbols; vsla_jax/kernels.py loads them with ctypes and registers them with
// jax.ffi.register_ffi_target.
#include <Python.h>

#include "common.h"

extern "C" {

// The ABI version of the exported handlers, checked by vsla_jax/kernels.py.
VSLA_EXPORT int vsla_kernels_abi_version() { return 3; }

}  // extern "C"

static PyModuleDef cpu_kernels_module = {
    PyModuleDef_HEAD_INIT, "cpu_kernels",
    "XLA FFI CPU kernels of vsla_jax (handlers exported as C symbols).", -1, nullptr,
};

PyMODINIT_FUNC PyInit_cpu_kernels(void) { return PyModule_Create(&cpu_kernels_module); }
