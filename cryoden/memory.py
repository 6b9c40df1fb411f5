"""Memory and per-call cost of a model's compiled forward, measured from XLA, cached.

The tile planner needs, for a model, a compute dtype and a platform, how many bytes one kernel
call on a batch ``(B, *S, 1)`` needs and how much a call costs beyond its pixels. Both come from
the compiled kernel itself, not from a table:

- :func:`kernel_bytes`: XLA's memory analysis of ``jit(apply).lower(params, x).compile()``,
  argument + output + temporary bytes, for one exact input shape (per device).
- :func:`bytes_model`: ``(fixed, per_px)`` with ``bytes ~= fixed + per_px * B * prod(S)``, fitted
  through :func:`kernel_bytes` at two shapes per shape class (2D: 256² and 512²; 3D: 32x64x64
  and 64x64x64). The U-nets' bytes are linear in 2D; in 3D the bytes per voxel fall slowly
  with size (2670 -> 2460 B/voxel on CPU from 32x64² to 64x128²), so the fit from the small
  shapes over-estimates larger tiles slightly (the safe side).
- :func:`call_overhead`: the fixed time of one kernel call, in pixels of work (``c / r`` of a
  ``t = c + r * px`` fit through timed runs of the same two compiled shapes).

Everything is cached per model architecture, shape class, dtype, platform, device kind and jax
version: in this process, and on disk in ``memory-model.json`` under the compilation cache
directory (:func:`cryoden.runtime.cache_dir`; ``CRYODEN_CACHE_DIR=''`` keeps it in memory only).
A first measurement costs two compilations (~5 s for a 2D U-net on CPU, ~50 s in 3D).

Usage::

    from cryoden import memory
    fixed, per_px = memory.bytes_model(spec, "float32", "cpu")
    exact = memory.kernel_bytes(spec, "float32", (2, 512, 512), "cpu")  # batch 2 of 512²
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from cryoden import atomic, runtime
from cryoden.models import ModelSpec, build_model

# Input shapes (spatial) of the two-point fits, per shape class: multiples of every stride.
FIT_SHAPES = {2: ((256, 256), (512, 512)), 3: ((32, 64, 64), (64, 64, 64))}
CACHE_FILE = "memory-model.json"
_VERSION = 1  # bump when what is measured changes

_models: dict[str, dict] = {}  # key -> {"fixed", "per_px", "overhead_px"}
_exact: dict[str, int] = {}  # key + shape -> bytes


def compiled_bytes(compiled: Any) -> int:
    """Argument + output + temporary bytes (per device) of a compiled JAX computation."""
    ma = compiled.memory_analysis()
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes)


def kernel_bytes(
    spec: ModelSpec, dtype: Any, shape: tuple[int, ...], platform: str | None = None
) -> int:
    """XLA's bytes for one forward of ``spec`` on an input batch of ``shape = (B, *S)`` (float32
    input, ``dtype`` compute), compiled for ``platform`` (default: JAX's default backend).

    Compiles (no run); cached in this process."""
    key = f"{_key(spec, dtype, platform)}|{tuple(shape)}"
    if key not in _exact:
        _exact[key] = compiled_bytes(_compile(spec, dtype, tuple(shape), platform))
    return _exact[key]


def bytes_model(spec: ModelSpec, dtype: Any, platform: str | None = None) -> tuple[int, float]:
    """``(fixed, per_px)``: bytes of one kernel call on ``B`` tiles of ``P`` pixels (voxels) each
    are about ``fixed + per_px * B * P`` (per device) for this model, its shape class
    (``spec.ndim``), compute ``dtype`` and ``platform``. Measured once, cached (module doc).

    Fitted at batch 1, where it is within ~1% in 2D; a batch of several tiles takes up to ~5%
    more per pixel (XLA picks other layouts), so check those with :func:`kernel_bytes`."""
    m = _measure(spec, dtype, platform)
    return int(m["fixed"]), float(m["per_px"])


def call_overhead(spec: ModelSpec, dtype: Any, platform: str | None = None) -> float:
    """Fixed cost of one kernel call, in pixels (voxels) of work: a call on ``P`` pixels costs
    about as much as ``P + call_overhead`` pixels of pure compute. Measured once, cached."""
    return float(_measure(spec, dtype, platform)["overhead_px"])


# ---------------------------------------------------------------------------- measurement


def _device(platform: str | None) -> jax.Device:
    return jax.devices(platform)[0] if platform else jax.devices()[0]


def _key(spec: ModelSpec, dtype: Any, platform: str | None) -> str:
    dev = _device(platform)
    return (
        f"v{_VERSION}|jax {jax.__version__}|{dev.platform}|{dev.device_kind}|{spec.arch}|"
        f"{spec.ndim}d|{spec.base_width}/{spec.top_width}|{jnp.dtype(dtype).name}"
    )


def _apply_fn(spec: ModelSpec, dtype: Any):
    module = build_model(spec, dtype=jnp.dtype(dtype))

    def apply(p, x):
        return module.apply({"params": p}, x)

    return module, apply


def _param_shapes(module, spec: ModelSpec) -> Any:
    size = max(spec.stride, 8)
    x = jax.ShapeDtypeStruct((1,) + (size,) * spec.ndim + (1,), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), x)["params"]


def _compile(spec: ModelSpec, dtype: Any, shape: tuple[int, ...], platform: str | None):
    module, apply = _apply_fn(spec, dtype)
    sharding = SingleDeviceSharding(_device(platform))
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        _param_shapes(module, spec),
    )
    x = jax.ShapeDtypeStruct((*shape, 1), jnp.float32, sharding=sharding)
    return jax.jit(apply).lower(params, x).compile()


def _timed(compiled, spec: ModelSpec, dtype: Any, shape, platform) -> float:
    """Best of 2 runs of ``compiled`` on zeros, seconds (after one warm-up run)."""
    dev = _device(platform)
    module, _ = _apply_fn(spec, dtype)
    params = jax.tree.map(
        lambda a: jax.device_put(np.zeros(a.shape, a.dtype), dev), _param_shapes(module, spec)
    )
    x = jax.device_put(np.zeros((*shape, 1), np.float32), dev)
    compiled(params, x).block_until_ready()
    best = math.inf
    for _ in range(2):
        t = time.perf_counter()
        np.asarray(compiled(params, x))  # includes the copy back, as the tiled run does
        best = min(best, time.perf_counter() - t)
    return best


def _measure(spec: ModelSpec, dtype: Any, platform: str | None) -> dict:
    key = _key(spec, dtype, platform)
    if key in _models:
        return _models[key]
    disk = _load_disk().get(key)
    if _valid(disk):
        _models[key] = disk
        return disk
    (sa, sb) = FIT_SHAPES[spec.ndim]
    pa, pb = math.prod(sa), math.prod(sb)
    ca = _compile(spec, dtype, (1, *sa), platform)
    cb = _compile(spec, dtype, (1, *sb), platform)
    ba, bb = compiled_bytes(ca), compiled_bytes(cb)
    _exact[f"{key}|{(1, *sa)}"], _exact[f"{key}|{(1, *sb)}"] = ba, bb
    per_px = max((bb - ba) / (pb - pa), 0.0)
    fixed = max(ba - per_px * pa, 0.0)
    ta = _timed(ca, spec, dtype, (1, *sa), platform)
    tb = _timed(cb, spec, dtype, (1, *sb), platform)
    rate = (tb - ta) / (pb - pa)  # seconds per pixel
    overhead = (ta - rate * pa) / rate if rate > 0 else 0.0
    m = {"fixed": fixed, "per_px": per_px, "overhead_px": min(max(overhead, 0.0), 64.0 * pb)}
    _models[key] = m
    _save_disk(key, m)
    return m


def _valid(m: Any) -> bool:
    return isinstance(m, dict) and all(
        isinstance(m.get(k), (int, float)) and math.isfinite(m[k]) and m[k] >= 0
        for k in ("fixed", "per_px", "overhead_px")
    )


def _load_disk() -> dict:
    path = runtime.cache_dir()
    try:
        data = json.loads((path / CACHE_FILE).read_text()) if path else {}
    except (OSError, ValueError):
        return {}  # missing, unreadable or corrupt: measure again
    return data if isinstance(data, dict) else {}


def _save_disk(key: str, m: dict) -> None:
    """Merge ``key: m`` into the cache file, atomically; an unwritable cache is not an error."""
    path = runtime.cache_dir()
    if path is None:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        data = _load_disk()
        data[key] = m
        atomic.remove_stale_temporaries(path)  # those of killed processes
        atomic.write_text(path / CACHE_FILE, json.dumps(data, indent=1))
    except OSError:
        return
