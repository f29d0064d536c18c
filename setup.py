"""Builds the optional C++ extension ``vsla_jax.cpu_kernels`` (XLA FFI CPU kernels).

Everything else is in pyproject.toml. The extension is ``optional``: if the compiler or
the XLA FFI headers (shipped with jaxlib, ``jax.ffi.include_dir()``) are missing, the
install still succeeds and ``vsla_jax.kernels`` falls back to the XLA path with one
warning. ``VSLA_SANITIZE=1`` builds with AddressSanitizer and UBSan (the CI's sanitiser
job); ``VSLA_NO_KERNELS=1`` skips the extension.
"""

import glob
import os

from setuptools import Extension, setup


def ffi_include() -> str | None:
    """jaxlib's XLA FFI header folder, or None without jaxlib."""
    try:
        import jax.ffi
    except ImportError:
        return None
    return jax.ffi.include_dir()


def extensions() -> list[Extension]:
    inc = ffi_include()
    if inc is None or os.environ.get("VSLA_NO_KERNELS") == "1":
        return []
    compile_args = ["-std=c++17", "-O3", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
    link_args = []
    if os.environ.get("VSLA_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        compile_args = [a for a in compile_args if a != "-O3"] + ["-O1", *san]
        link_args += san
    return [Extension("vsla_jax.cpu_kernels", sorted(glob.glob("csrc/*.cc")),
                      include_dirs=[inc, "csrc"], extra_compile_args=compile_args,
                      extra_link_args=link_args, language="c++", optional=True)]


setup(ext_modules=extensions())
