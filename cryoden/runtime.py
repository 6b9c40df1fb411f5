"""Process-wide setup shared by inference and training: device kind, compilation cache, and
host memory reuse (:func:`keep_host_memory`).

Call :func:`setup` once, before any JAX computation::

    from cryoden import runtime

    devices = runtime.setup(device="gpu")  # -> [CudaDevice(id=0), ...]

The persistent compilation cache keeps compiled kernels on disk so a second run with the same
model and tile shapes does not compile again. Its directory is env ``CRYODEN_CACHE_DIR`` (set it
empty to disable the cache), else ``$XDG_CACHE_HOME/cryoden/jax``, else ``~/.cache/cryoden/jax``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import warnings
from pathlib import Path

PLATFORMS = ("cpu", "gpu", "tpu")


def cache_dir() -> Path | None:
    """The compilation cache directory, or None when disabled (``CRYODEN_CACHE_DIR=''``)."""
    env = os.environ.get("CRYODEN_CACHE_DIR")
    if env is not None:
        return Path(env).expanduser() if env else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cryoden" / "jax"


def keep_host_memory(default: bool = True) -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS -> applied?

    XLA:CPU allocates each run's intermediates (3.2 GB for a 3D training step at 64³, batch 2)
    and frees them after the run. glibc hands blocks that large back to the OS, so every run
    page-faults them in again, at ~4 GB/s: 40% of that 3D training step on 2 cores, 15% of a
    2D inference. With one heap (``M_ARENA_MAX=1``), no separate mappings (``M_MMAP_MAX=0``)
    and no trimming (``M_TRIM_THRESHOLD=-1``), later runs reuse the memory of earlier ones, with
    no page faults. The cost is memory: the process holds its peak until it exits, and small
    allocations made between runs can split the freed block, so peak resident memory can reach
    about twice XLA's temporaries (measured on that 3D step: 5.1-8.2 GB vs 5.3 GB default).

    ``cryoden train`` applies it (``default=True``); ``cryoden infer`` does not by default
    (its memory budget assumes one tile's temporaries). Env ``CRYODEN_KEEP_HOST_MEMORY=1`` or
    ``0`` overrides ``default``. Call it before JAX starts (each thread that has allocated keeps
    its own heap). Returns whether it was applied (never on other C libraries).
    """
    env = os.environ.get("CRYODEN_KEEP_HOST_MEMORY")
    if not (env == "1" if env in ("0", "1") else default):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    ok = libc.mallopt(m_arena_max, 1) and libc.mallopt(m_mmap_max, 0)
    return bool(ok and libc.mallopt(m_trim_threshold, -1))


def setup(device: str | None = None, cache: bool = True) -> list:
    """Select the device kind, enable the persistent compilation cache, and keep host memory
    when env ``CRYODEN_KEEP_HOST_MEMORY=1`` asks (:func:`keep_host_memory`) -> devices to use.

    device: ``'cpu'``, ``'gpu'``, ``'tpu'``, or None for JAX's default (an accelerator when there
    is one). ``'cpu'`` also keeps JAX from initialising any accelerator, when called before JAX
    has started its backends. Raises RuntimeError when no device of that kind is visible.
    An unusable cache directory only warns.
    """
    if device is not None and device not in PLATFORMS:
        raise ValueError(f"unknown device {device!r} (expected one of {', '.join(PLATFORMS)})")
    keep_host_memory(default=False)
    import jax

    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")  # no effect once backends are initialised
    path = cache_dir() if cache else None
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", str(path))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
        except OSError as e:
            warnings.warn(f"compilation cache disabled: {path}: {e.strerror}", stacklevel=2)
    try:
        return jax.local_devices(backend=device)
    except RuntimeError as e:
        raise RuntimeError(f"no {device} device visible to JAX ({e})") from e
