"""vs.retain_host_memory: glibc keeps large freed buffers mapped in (measured page
faults of a re-allocated buffer, in a child process: the setting is process-wide)."""

import subprocess
import sys

import pytest

import vsla_jax as vs

CHILD = r"""
import ctypes, ctypes.util, resource, sys
from vsla_jax.host_memory import retain_host_memory

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 48 << 20  # above glibc's largest default mmap threshold (32 MiB)

def faults_of_a_fresh_touch():
    # malloc + write every byte + free, as XLA:CPU does with a buffer; page faults taken
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_fresh_touch()
default = faults_of_a_fresh_touch()
ok = retain_host_memory()
faults_of_a_fresh_touch()
retained = faults_of_a_fresh_touch()
print(default, retained, int(ok))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_large_buffer_allocated_again_takes_no_page_faults_once_retained():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         check=True).stdout.split()
    default, retained, ok = map(int, out)
    pages = (48 << 20) // 4096
    if not ok:
        pytest.skip("not glibc: mallopt refused")
    assert default > pages // 2, "glibc's default should map a fresh 48 MiB buffer per call"
    assert retained < pages // 20, f"{retained} faults for a retained buffer"


@pytest.mark.parametrize("bad,error", [(0, ValueError), (2**31, ValueError),
                                       (1.5, vs.VSLATypeError), (True, vs.VSLATypeError)])
def test_bad_limits_are_refused_before_anything_changes(bad, error):
    with pytest.raises(error, match="limit_bytes"):
        vs.retain_host_memory(bad)
