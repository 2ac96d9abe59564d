"""Keep the memory of freed CPU tensors in the process, so a training step does not page-fault its big tensors.

glibc's malloc hands every block over its mmap threshold (which adapts, but never past 32 MB) to the kernel
with mmap and returns it with munmap when it is freed; the next step's tensor of that size is mapped again and
every one of its 4 KB pages faults on first touch (in a VM, an exit each). A model's step allocates the same
sizes every time, so a tensor over 32 MB costs these faults at every step: K stacked members' (K, V, H)
word-embedding gradient, AdamW temporaries and (N x V) logits are all past it (5 x 30,522 x 128 fp32 = 78 MB)
where one member's are not, which made K = 5 stacked members slower than five single runs on a CPU
(bench/results/2026-12-07-cpu-members.md: 0.60x at one thread, 0.96x with the blocks kept).

`keep_freed_memory()` tells malloc to serve every block from its heap (M_MMAP_MAX = 0) and to keep the freed
top of the heap (M_TRIM_THRESHOLD): the process's resident memory stays at its peak, as CUDA's caching
allocator keeps device memory. A no-op (False) where the C library is not glibc.
"""
import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """True if glibc's malloc now keeps freed blocks in the heap (for the whole process, from now on)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
