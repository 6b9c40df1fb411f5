"""The one module that owns devices: distributed start-up, the mesh, shardings, global batches.

Training is data-parallel over every device of every process: a 1-D mesh with axis ``data``;
batches ``(B, *spatial, 1)`` are sharded along ``B``; params, optimiser state, step and RNG are
replicated. ``B`` is the *global* batch: each process feeds ``B / process_count`` examples and
each device sees ``B / device_count``.

Nothing else in cryoden creates a ``Mesh``, a ``NamedSharding``, calls
``jax.distributed.initialize`` or builds global arrays from host data.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)
AXIS = "data"


# ----------------------------------------------------------------------------- processes


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def wants_distributed(mode: str = "auto", coordinator: str | None = None) -> bool:
    """Whether to call ``jax.distributed.initialize``.

    mode ``on``/``off`` decide; ``auto`` starts it when a coordinator is named (flag or
    ``JAX_COORDINATOR_ADDRESS``) or when running as one of several Slurm tasks under ``srun``.
    TPU pods and other cluster managers need ``on`` (jax then auto-detects the cluster).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode must be auto, on or off, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    if coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_STEP_ID" in os.environ


def initialize(
    mode: str = "auto",
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Start multi-process JAX if asked (see :func:`wants_distributed`); call before any jax use.

    Unset arguments fall back to ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``, then to jax's cluster auto-detection (Slurm, Cloud TPU, MPI, k8s).
    CPU processes exchange collectives over gloo.
    """
    if not wants_distributed(mode, coordinator):
        return
    if jax.distributed.is_initialized():
        return
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def is_main_process() -> bool:
    """True on the process that writes logs, the exported model and the run directory files."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- mesh, shardings


def make_mesh(devices: list | None = None) -> Mesh:
    """1-D ``('data',)`` mesh over ``devices`` (default: every device of every process).

    The axis is ``Auto`` (jax.make_mesh defaults to ``Explicit``): shardings are declared at
    the jit boundary and XLA propagates them inside the step.
    """
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (AXIS,), (jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of params, optimiser state, step, RNG and scalar metrics."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of batch arrays ``(B, ...)``: ``B`` split over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    """Raise ValueError unless the global ``batch_size`` divides over devices and processes."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if batch_size < n_dev or batch_size % n_dev:
        raise ValueError(
            f"the global {what} ({batch_size}) must be a positive multiple of the number of "
            f"devices ({n_dev} = {n_proc} process(es) x {n_dev // n_proc} device(s)); "
            f"use e.g. --batch-size {max(n_dev, batch_size // n_dev * n_dev)} "
            f"or {(batch_size // n_dev + 1) * n_dev}"
        )


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice ``(B / process_count, ...)`` of each array -> global ``(B, ...)``.

    Processes' slices are concatenated in process order, so the global batch equals the one a
    single process would build from the same stream.
    """
    sharding = batch_sharding(mesh)
    n = jax.process_count()
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(
            sharding, v, (v.shape[0] * n,) + v.shape[1:]
        )
    return out


def local_slice(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of a global host batch ``(B, ...)`` -> ``(B / process_count, ...)``."""
    i, n = jax.process_index(), jax.process_count()
    out = {}
    for k, v in batch.items():
        b = v.shape[0] // n
        out[k] = v[i * b : (i + 1) * b]
    return out


def create_replicated(fn: Callable[[], Any], mesh: Mesh) -> Any:
    """Run ``fn() -> pytree`` so its outputs are born replicated (never gathered to one device)."""
    abstract = jax.eval_shape(fn)
    shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
    return jax.jit(fn, out_shardings=shardings)()


def replicate_from_host(tree: Any, mesh: Mesh) -> Any:
    """Host arrays (identical on every process) -> replicated global ``jax.Array`` pytree."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """Replicated ``jax.Array`` pytree -> numpy pytree (reads this process's local copy)."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def describe(mesh: Mesh) -> str:
    """One line naming the devices, for the log."""
    d = mesh.devices.flat[0]
    return (
        f"{mesh.devices.size} {d.platform} device(s) ({getattr(d, 'device_kind', '')}) over "
        f"{jax.process_count()} process(es); this is process {jax.process_index()}"
    )
