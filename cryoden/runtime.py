"""Process-wide JAX setup shared by inference and training: device kind and compilation cache.

Call :func:`setup` once, before any JAX computation::

    from cryoden import runtime

    devices = runtime.setup(device="gpu")  # -> [CudaDevice(id=0), ...]

The persistent compilation cache keeps compiled kernels on disk so a second run with the same
model and tile shapes does not compile again. Its directory is env ``CRYODEN_CACHE_DIR`` (set it
empty to disable the cache), else ``$XDG_CACHE_HOME/cryoden/jax``, else ``~/.cache/cryoden/jax``.
"""

from __future__ import annotations

import os
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


def setup(device: str | None = None, cache: bool = True) -> list:
    """Select the device kind and enable the persistent compilation cache -> devices to use.

    device: ``'cpu'``, ``'gpu'``, ``'tpu'``, or None for JAX's default (an accelerator when there
    is one). ``'cpu'`` also keeps JAX from initialising any accelerator, when called before JAX
    has started its backends. Raises RuntimeError when no device of that kind is visible.
    An unusable cache directory only warns.
    """
    if device is not None and device not in PLATFORMS:
        raise ValueError(f"unknown device {device!r} (expected one of {', '.join(PLATFORMS)})")
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
