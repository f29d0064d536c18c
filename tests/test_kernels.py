"""The C++ CPU kernels' loader: the extension builds, its handlers register and run
inside jit, and a missing build falls back with one clear warning."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vsla_jax
from vsla_jax import kernels
from vsla_jax.errors import KernelFallbackWarning


def twice(x):
    name = kernels.target("vsla_selftest_twice", x)
    assert name is not None
    return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(x.shape, x.dtype))(x)


def test_the_extension_is_built_and_its_handler_runs_in_jit():
    assert kernels.library() is not None, "pip install -e . should build vsla_jax.cpu_kernels"
    x = np.arange(7, dtype=np.float32)
    np.testing.assert_array_equal(jax.jit(twice)(x), 2 * x)
    np.testing.assert_array_equal(jax.jit(twice)(jnp.zeros((0,), jnp.float32)), np.zeros(0))


def test_two_threads_share_one_compiled_kernel():
    f = jax.jit(twice)
    xs = [np.full(1000, i, np.float32) for i in range(8)]
    out = [None] * len(xs)

    def work(i):
        out[i] = np.asarray(f(xs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, o in enumerate(out):
        np.testing.assert_array_equal(o, 2 * xs[i])


def test_a_missing_build_falls_back_with_one_warning(monkeypatch):
    kernels.library.cache_clear()
    kernels.registered.cache_clear()
    monkeypatch.setitem(sys.modules, "vsla_jax.cpu_kernels", None)  # import fails
    monkeypatch.delattr(vsla_jax, "cpu_kernels", raising=False)
    try:
        with pytest.warns(KernelFallbackWarning, match="XLA path"):
            assert kernels.target("vsla_selftest_twice") is None
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.target("vsla_selftest_twice") is None  # warned once only
    finally:
        kernels.library.cache_clear()
        kernels.registered.cache_clear()


def test_an_unknown_symbol_is_a_fallback_not_a_crash():
    with pytest.warns(KernelFallbackWarning, match="lack vsla_no_such_kernel"):
        assert kernels.target("vsla_no_such_kernel") is None


def test_required_names_the_caller_and_its_fallback_or_returns_the_symbol():
    """kernels.required, the one check of the primitives of conv and attention."""
    assert kernels.required("vsla_selftest_twice", "me", "do X") == "vsla_selftest_twice"
    assert kernels.required("vsla_selftest_twice", "me", "do X",
                            jax.numpy.zeros(2)) == "vsla_selftest_twice"
    with pytest.warns(KernelFallbackWarning):
        with pytest.raises(vsla_jax.errors.VSLAError,
                           match=r"^cpu thing: the C\+\+ kernel vsla_no_kernel_here cannot "
                                 r"run here \(no build of vsla_jax.cpu_kernels\); do X$"):
            kernels.required("vsla_no_kernel_here", "cpu thing", "do X")


@pytest.mark.parametrize("offset, size", [(0, 1 << 20), (52, (1 << 20) + 4100), (4096, 300),
                                          (8, (1 << 18) + 12)])
def test_zero_bytes_zeroes_exactly_its_range_of_dirty_memory(offset, size):
    """csrc/common.h's zero_bytes returns whole pages to the OS: the range must read as
    zeros afterwards, its neighbours must keep their bytes, on heap memory (malloc, as
    XLA's buffers) whatever its alignment."""
    lib = kernels.library()
    buf = np.full(offset + size + 4096, 0xAB, np.uint8)
    lib.vsla_selftest_zero_bytes(ctypes.c_void_p(buf.ctypes.data + offset),
                                 ctypes.c_size_t(size))
    assert not buf[offset:offset + size].any()
    assert (buf[:offset] == 0xAB).all() and (buf[offset + size:] == 0xAB).all()
    buf[offset:offset + size] = 7  # the pages are usable again
    assert (buf[offset:offset + size] == 7).all()


def anonymous(size: int, shared: bool = False):
    """An anonymous mapping of ``size`` bytes (private unless ``shared``) and its address;
    no page is mapped in yet."""
    flags = (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | mmap.MAP_ANONYMOUS
    m = mmap.mmap(-1, size, flags=flags)
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


@pytest.mark.parametrize("offset, size, populate", [
    (0, 1 << 20, 0), (52, (1 << 20) + 4100, 1), (4095, (1 << 18) + 3, 0), (8, 1 << 19, 1)])
def test_zero_if_absent_zeroes_a_fresh_mapping_with_a_few_dirty_pages(offset, size,
                                                                      populate):
    """csrc/common.h's zero_if_absent on mostly unmapped private memory (an output XLA
    has just mmapped): hands the pages back and the whole range, dirty pages and ragged
    ends included, reads as zeros; the bytes around it keep theirs."""
    lib = kernels.library()
    m, addr = anonymous(offset + size + 8192)
    buf = np.frombuffer(m, np.uint8)
    buf[:offset + 64] = 0xAB                       # the head and the first page dirty
    buf[offset + size // 3:offset + size // 3 + 5000] = 0xAB  # a few pages inside
    buf[offset + size - 64:offset + size + 100] = 0xAB       # the tail and past it
    assert lib.vsla_selftest_zero_if_absent(ctypes.c_void_p(addr + offset),
                                            ctypes.c_size_t(size), populate) == 1
    assert not buf[offset:offset + size].any()
    assert (buf[:offset] == 0xAB).all() and (buf[offset + size:offset + size + 100] == 0xAB).all()
    buf[offset:offset + size] = 7  # the pages are usable again
    assert (buf[offset:offset + size] == 7).all()
    del buf


def test_zero_if_absent_leaves_resident_or_small_ranges_to_the_caller():
    """Mostly mapped-in memory, and ranges below 256 KiB, are not handed back: it
    returns 0 and the bytes are untouched."""
    lib = kernels.library()
    buf = np.full((1 << 20) + 64, 0xCD, np.uint8)  # every page written: resident
    for off, size in [(32, 1 << 20), (0, 1 << 17)]:
        assert lib.vsla_selftest_zero_if_absent(ctypes.c_void_p(buf.ctypes.data + off),
                                                ctypes.c_size_t(size), 0) == 0
        assert (buf == 0xCD).all()


def test_zero_if_absent_refuses_shared_memory_which_dontneed_does_not_zero():
    """MADV_DONTNEED only unmaps shared memory, whose bytes come back: the sentinel check
    must see that and return 0, with the sentinel's word restored."""
    lib = kernels.library()
    m, addr = anonymous(1 << 21, shared=True)
    buf = np.frombuffer(m, np.uint8)
    buf[:4096] = 0x11
    assert lib.vsla_selftest_zero_if_absent(ctypes.c_void_p(addr), ctypes.c_size_t(1 << 21),
                                            0) == 0
    assert (buf[:4096] == 0x11).all() and not buf[4096:].any()
    del buf


def vm_flags(addr: int) -> set[str]:
    """The VmFlags of the mapping holding ``addr`` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(not (os.path.exists("/proc/self/smaps")
                         and os.path.isdir("/sys/kernel/mm/transparent_hugepage")),
                    reason="needs Linux smaps and a kernel with transparent huge pages")
@pytest.mark.parametrize("offset", [0, 100, 4096 + 8])
def test_advise_huge_marks_only_the_whole_huge_pages_and_keeps_the_bytes(offset):
    """csrc/common.h's advise_huge (madvise MADV_HUGEPAGE; the conv kernels call it on
    large fresh outputs): the whole huge pages inside the range get the ``hg`` flag, the
    partial ones at either end do not, and no byte changes, written or not."""
    lib = kernels.library()
    huge = lib.vsla_selftest_huge_page_size()
    assert huge >= 4096 and huge & (huge - 1) == 0
    m, addr = anonymous(6 * huge)
    buf = np.frombuffer(m, np.uint8)
    buf[::4096] = 0x3C  # every page dirty
    first = (addr + huge - 1) // huge * huge + huge  # second whole huge page of the mapping
    lo = first - huge // 2 + offset                  # starts inside the one before it
    lib.vsla_selftest_advise_huge(ctypes.c_void_p(lo), ctypes.c_size_t(3 * huge))
    assert (buf[::4096] == 0x3C).all() and buf.sum() == 0x3C * (6 * huge // 4096)
    start = (lo + huge - 1) // huge * huge
    end = (lo + 3 * huge) // huge * huge
    assert end - start >= huge
    assert "hg" in vm_flags(start) and "hg" in vm_flags(end - 1)
    assert "hg" not in vm_flags(start - 1) and "hg" not in vm_flags(end)
    del buf


@pytest.mark.parametrize("offset, size", [(0, 4096), (3, 4095), (5, 4096), (1, 100000),
                                          (16, 1 << 12), (7, 5), (9, 8191)])
def test_zero_stream_zeroes_exactly_its_range_of_dirty_memory(offset, size):
    """csrc/common.h's zero_stream (non-temporal stores for the aligned middle of ranges
    from 4 KiB, memset for the ends and short ranges) and stream_fence: zeros exactly its
    range, at any alignment."""
    lib = kernels.library()
    buf = np.full(offset + size + 64, 0xCD, np.uint8)
    lib.vsla_selftest_zero_stream(ctypes.c_void_p(buf.ctypes.data + offset),
                                  ctypes.c_size_t(size))
    assert not buf[offset:offset + size].any()
    assert (buf[:offset] == 0xCD).all() and (buf[offset + size:] == 0xCD).all()


def test_zero_bytes_on_a_file_mapping_writes_zeros(tmp_path):
    """MADV_DONTNEED does not zero a shared file mapping (the file's bytes come back);
    zero_bytes must notice and memset instead."""
    lib = kernels.library()
    m = np.memmap(tmp_path / "f.bin", np.uint8, mode="w+", shape=(1 << 20) + 8192)
    m[:] = 0x5A
    lib.vsla_selftest_zero_bytes(ctypes.c_void_p(m.ctypes.data + 100),
                                 ctypes.c_size_t(1 << 20))
    assert not m[100:100 + (1 << 20)].any()
    assert (m[:100] == 0x5A).all() and (m[100 + (1 << 20):] == 0x5A).all()


def test_on_cpu_reads_the_first_concrete_array_or_the_default_backend():
    x = jax.numpy.zeros(3)
    assert kernels.on_cpu(x) and kernels.on_cpu(np.zeros(3), x)
    assert kernels.on_cpu() == (jax.default_backend() == "cpu")
    seen = []
    jax.jit(lambda t: seen.append(kernels.on_cpu(t)) or t)(x)
    assert seen == [jax.default_backend() == "cpu"]
    # the cached answer is per sharding: a CPU sharding says CPU every time
    assert kernels.sharding_on_cpu(x.sharding) and kernels.sharding_on_cpu(x.sharding)


def test_cpu_only_matches_the_devices_of_every_backend():
    """``cpu_only`` lets ``on_cpu`` skip its per-array device check: it must
    be False as soon as any backend has a device that is not a CPU."""
    import jax.extend

    platforms = {d.platform for name in jax.extend.backend.backends()
                 for d in jax.devices(name)}
    assert kernels.cpu_only() == (platforms == {"cpu"})
