"""Host-side tuning of the CPU process, applied once when an engine starts on the CPU.

glibc serves every allocation above its mmap threshold (128 KiB, adapted up to 32 MiB) with a
fresh mmap, so each large temporary of a step (logits, gathered KV blocks, prefill activations)
is page-faulted and zeroed by the kernel again: converting a [64, 49152] bf16 logits tensor to
float32 took 5.8 ms that way against 0.55 ms from reused heap memory. Raising the mmap and trim
thresholds keeps freed blocks in the heap for reuse (what tcmalloc/jemalloc do, which vLLM's
CPU backend preloads). Memory freed is then not returned to the OS until the process exits.
Set LEANLM_MALLOC_TUNING=0 to leave malloc alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("leanlm")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap / trim thresholds once per process; False where that does not apply."""
    global _done
    if _done:
        return True
    if os.environ.get("LEANLM_MALLOC_TUNING", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if not name or "libc" not in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, threshold) == 1
    _done = ok
    if not ok:
        log.debug("mallopt refused the thresholds; malloc left as is")
    return ok
