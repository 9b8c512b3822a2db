"""Native CPU kernels: small C files compiled once per machine with the system C compiler and
loaded with ctypes. They cover what torch's CPU kernels do poorly for LLM decoding (see each .c
file); every caller keeps a pure-torch path, used when no compiler is present, when the build
fails, or when LEANLM_NATIVE=0.

Why ctypes and not a torch C++ extension: a plain C file with no torch headers compiles in under
a second, and a ctypes call costs a few microseconds. The library links the OpenMP runtime torch
already loaded (same soname), so both share one thread pool and torch.set_num_threads applies.
Builds are cached under $LEANLM_CACHE/native (default ~/.cache/leanlm/native), keyed by the
source, the flags, the compiler and the CPU, so a copied cache never runs code built for another
machine's instruction set.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp first: the kernels then bind to the same one)

log = logging.getLogger("leanlm")
SOURCE_DIR = Path(__file__).parent
CFLAGS = ["-O3", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
# The instruction set: this CPU's (native) unless LEANLM_NATIVE_MARCH names another GCC -march,
# e.g. x86-64-v3 (AVX2 + FMA), which the tests use to run the AVX2 code paths on an AVX-512 CPU.
MARCH_ENV = "LEANLM_NATIVE_MARCH"
_loaded: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    return os.environ.get("LEANLM_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    root = os.environ.get("LEANLM_CACHE") or Path.home() / ".cache" / "leanlm"
    return Path(root) / "native"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def cflags() -> list[str]:
    return [*CFLAGS, f"-march={os.environ.get(MARCH_ENV, '').strip() or 'native'}"]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def build(name: str) -> Path:
    """Compile leanlm/native/{name}.c (once per machine) and return the shared library's path.
    Raises RuntimeError with the compiler's message when that fails."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (gcc or cc on PATH, or $CC)")
    # the source and every header beside it (vec.h): a changed header must rebuild its users
    src = b"\0".join([(SOURCE_DIR / f"{name}.c").read_bytes()]
                      + [h.read_bytes() for h in sorted(SOURCE_DIR.glob("*.h"))])
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    flags = cflags()
    key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), version.encode(),
                                     platform.machine().encode(), _cpu_signature().encode()]))
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"{name}-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    with open(out_dir / f".{name}.lock", "w") as lock:  # one build at a time across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return lib
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            r = subprocess.run([cc, *flags, str(SOURCE_DIR / f"{name}.c"), "-o", tmp],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{cc} failed to build {name}.c with {' '.join(flags[-1:])}"
                                   f"{f' (from ${MARCH_ENV})' if os.environ.get(MARCH_ENV, '').strip() else ''}:\n"
                                   f"{r.stderr.strip()[-2000:]}")
            os.replace(tmp, lib)  # atomic: a reader never sees a half-written library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library `name`, or None (with one warning) when native kernels are off or the
    build fails: callers then use their torch path."""
    if not enabled():
        return None
    if name not in _loaded:
        try:
            _loaded[name] = ctypes.CDLL(str(build(name)))
        except (RuntimeError, OSError) as e:
            log.warning("native kernel %s unavailable, using torch ops instead: %s", name, e)
            _loaded[name] = None
    return _loaded[name]


def function(lib_name: str, fn_name: str, argtypes: list, restype=None):
    """A C function of library `lib_name` with its ctypes signature set, or None (see load)."""
    lib = load(lib_name)
    if lib is None:
        return None
    f = getattr(lib, fn_name)
    f.argtypes, f.restype = argtypes, restype
    return f
