"""Host memory reuse: keep freed memory in the process, so training steps stop paying for fresh pages.

glibc's malloc serves every request above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it to
the kernel on ``free``. A training step on a CPU allocates many such blocks, each time again: the vocabulary-sized
logits and gradients of every lens chunk (256 x 49,152 fp32 is 48 MiB), the bf16 copy autocast makes of a 49,152 x
576 unembedding, the weight gradients. Each fresh block is faulted in and zeroed page by page by the kernel, which on
a 2-core machine took more time than the lens's matrix products (measured on the embedded default's lens, 1,700 rows:
2.14 s a step, 1.38 s once freed memory is kept). PyTorch's CPU performance guide suggests preloading jemalloc or
tcmalloc for the same reason; this does it without a library or an environment variable: it tells glibc to serve
every block from its heap (``M_MMAP_MAX`` 0) and to keep up to 2 GiB of freed memory at the top of it
(``M_TRIM_THRESHOLD``), as a caching allocator does on a GPU. The process's resident memory therefore stays near its
peak instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_FREED_BYTES = 2**31 - 1
"""mallopt takes a C int: keep up to 2 GiB of freed memory at the top of the heap."""


def keep_freed_memory() -> bool:
    """Make glibc keep freed host memory for reuse (see the module docstring); False where it does not apply (not
    glibc, e.g. macOS or musl) or where glibc refused, and nothing changes."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        kept = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES) == 1
    except (OSError, AttributeError):
        return False
    if not kept:
        log.debug("glibc refused the allocator settings; freed memory goes back to the kernel as before")
    return kept
