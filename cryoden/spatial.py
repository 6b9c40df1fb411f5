"""One image split spatially over several devices: a single kernel call, exact, ~1x the work.

When an image (or tomogram) does not fit one device's memory budget but fits spread over all
local devices, it runs as ONE call with its padded array cut into equal slabs along one spatial
axis, one slab per device (``shard_map`` over the ``'tiles'`` mesh axis). Every convolution
takes its few rows of zero padding along that axis from the neighbouring slabs
(``lax.ppermute``, see :func:`cryoden.conv.spatial_split`); poolings, up-samplings and skip
concatenations act within a slab, because slab boundaries are multiples of the network stride.
So each device holds ``1/n_dev`` of every feature map and the output is the whole padded
image's, with no tile margins.

The split axis must be a multiple of ``n_dev * stride``: the image is zero-padded further along
it (the *extension*), and every convolution treats the extension as zeros (it is masked, so
the result is the whole stride-padded image's, not a larger image's). Work: the extended
volume / the padded volume (:attr:`SplitPlan.work`).

Shapes: the kernel takes ``(1, *E, 1)`` float32 (``E``: extended shape, sharded on the split
axis) and returns ``(1, *E, 1)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cryoden import conv, tiling
from cryoden.memory import compiled_bytes


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """Padded image ``padded`` extended to ``extended`` along ``axis`` (0-based spatial axis),
    cut into ``n_dev`` slabs of ``extended[axis] / n_dev``."""

    padded: tuple[int, ...]
    extended: tuple[int, ...]
    axis: int
    n_dev: int

    @property
    def work(self) -> float:
        """Volume computed / volume of one whole padded pass (1.0 when no extension)."""
        return math.prod(self.extended) / math.prod(self.padded)

    @property
    def split(self) -> conv.Split:
        return conv.Split(
            "tiles",
            self.axis,
            self.n_dev,
            self.extended[self.axis] // self.n_dev,
            self.padded[self.axis],
        )


def plan(padded: tuple[int, ...], stride: int, n_dev: int) -> SplitPlan:
    """The split axis of least extension (ties: the longest axis, then the first) for a padded
    image whose sides are multiples of ``stride``."""
    unit = n_dev * stride

    def key(a):
        return (tiling.round_up(padded[a], unit) - padded[a]) / padded[a], -padded[a], a

    axis = min(range(len(padded)), key=key)
    ext = list(padded)
    ext[axis] = tiling.round_up(padded[axis], unit)
    return SplitPlan(tuple(padded), tuple(ext), axis, n_dev)


class SpatialKernel:
    """The whole-model forward ``apply(params, x)`` on slabs of one image over ``mesh``'s
    ``'tiles'`` axis, compiled for a :class:`SplitPlan`. params: replicated on ``mesh``."""

    def __init__(self, apply: Callable, params: Any, mesh: Mesh, plan: SplitPlan):
        if mesh.devices.size != plan.n_dev:
            raise ValueError(f"plan for {plan.n_dev} devices, mesh has {mesh.devices.size}")
        self.plan, self.params = plan, params
        axes = [None] * len(plan.extended)
        axes[plan.axis] = "tiles"
        self.spec = P(None, *axes, None)
        self.sharding = NamedSharding(mesh, self.spec)
        f = jax.shard_map(
            apply, mesh=mesh, in_specs=(P(), self.spec), out_specs=self.spec, check_vma=False
        )
        x = jax.ShapeDtypeStruct((1, *plan.extended, 1), jnp.float32, sharding=self.sharding)
        with conv.spatial_split(plan.split):  # the convs are traced here, slab-wise
            self.compiled = jax.jit(f).lower(params, x).compile()

    @property
    def bytes(self) -> int:
        """Per-device bytes of the compiled call (XLA's memory analysis)."""
        return compiled_bytes(self.compiled)

    def __call__(self, xn: np.ndarray) -> np.ndarray:
        """Normalised image ``xn: (*S)``, ``S`` within the padded shape (zero-padded here) ->
        output ``(*S)`` (float32), the whole padded image's output cropped."""
        ext = np.zeros((1, *self.plan.extended, 1), np.float32)
        ext[(0, *(slice(0, n) for n in xn.shape), 0)] = xn
        y = self.compiled(self.params, jax.device_put(ext, self.sharding))
        return np.asarray(y)[(0, *(slice(0, n) for n in xn.shape), 0)]
