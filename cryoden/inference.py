"""Denoise micrographs and tomograms: global normalisation, exact stride-aligned tiling, jitted
fixed-shape tile kernel spread over all local devices.

Semantics (docs/inference.md). The image is normalised once, globally: ``x = (m - mean) / std``
(std with Bessel's correction, which is what Topaz's two nested normalisations amount to). By
default the normalised image is zero-padded at the high end of each axis up to a multiple of the
network stride, run, and cropped: this is exactly Topaz's whole-image output whenever the size is
already a multiple of the stride, and it is translation-consistent, so stride-aligned tiles with
margins >= the receptive field reproduce it exactly (2D default). ``topaz_compat=True`` runs the
unpadded whole image with torch's odd-size up-sampling rule instead: Topaz's numbers at any size,
without tiling. Output is restored to ``y * std + mean`` unless ``normalize=True``.

Usage::

    import cryoden
    y = cryoden.denoise(micrograph)                       # (H, W) -> (H, W) float32, model 'unet'
    v = cryoden.denoise(tomogram, model="unet-3d-20a")    # (D, H, W)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cryoden import filters, levelwise, memory, spatial, tiling, weights
from cryoden.models import NF, ModelSpec, build_model

DEFAULT_MODEL = {2: "unet", 3: "unet-3d"}
# 3D tiles are not exact by default (an exact margin of 159 voxels per side multiplies the cost
# several times over). With global normalisation and stride-aligned tiles, a 48-voxel margin
# leaves a mean seam error of ~0.05% of the output std (32: 0.6%, 16: 1.7%), against 14% for
# Topaz's 96 + 48 tiles: see docs/benchmarks.md.
DEFAULT_PADDING_3D = 48
# Bytes per voxel that the streamed whole-volume forward holds at least (levelwise.forward): x
# and y (float32), p1 (NF channels at 1/8 of the voxels) and dec2's output (2 NF at 1/8). A
# volume above the budget by this bound is not compiled to be measured.
_STREAMED_MIN_BYTES = 4 * (2 + 3 * NF / 8)
# Bytes per image pixel that ``__call__`` holds in host memory while a model runs besides the
# level-wise maps: the image (float32; its normalised, zero-padded copy is the level-wise ``x``
# map itself), plus the output sum while a second or later model runs. Level-wise plans leave
# them out of the stage kernels' budget where host memory is device memory
# (levelwise.HOST_MEMORY_PLATFORMS).
_CALLER_BYTES_PER_PX = 4
_SUM_BYTES_PER_PX = 4


@dataclasses.dataclass
class _Net:
    """A loaded model: spec, parameters replicated on the mesh, and its jitted tile kernel."""

    name: str
    spec: ModelSpec
    params: Any
    kernel: Callable
    traces: list  # one entry per trace of the kernel (a compile per new tile shape)
    levelwise: Any = None  # levelwise.Levelwise, made on first use
    lw_plans: dict = dataclasses.field(default_factory=dict)  # (padded, budget, verify) -> plan
    spatial: dict = dataclasses.field(default_factory=dict)  # (split, budget) -> kernel | None
    whole: dict = dataclasses.field(default_factory=dict)  # batch shape -> streamed kernel


@dataclasses.dataclass(frozen=True)
class Plan:
    """How an image of ``shape`` runs: zero-padded to ``padded`` (stride multiples), cut into
    ``tiles`` (all of one shape, margins included), ``per_call`` tiles per kernel call (all
    devices together). ``predicted_bytes``: bytes per device of one call by the model's
    measured memory (:mod:`cryoden.memory`), None when the tile size was given.

    Unpacks as the 3-tuple ``padded, tiles, per_call``."""

    shape: tuple[int, ...]
    padded: tuple[int, ...]
    tiles: list[tiling.Tile]
    per_call: int
    predicted_bytes: int | None = None

    @property
    def tile(self) -> tuple[int, ...]:
        """Shape of every tile, margins included."""
        return tiling.tile_shape(self.tiles)

    @property
    def work(self) -> float:
        """Pixels computed (tiles with margins) per image pixel: 1.0 is one whole pass."""
        return tiling.work(self.shape, self.tiles)

    def __iter__(self):
        return iter((self.padded, self.tiles, self.per_call))

    def __getitem__(self, i):
        return (self.padded, self.tiles, self.per_call)[i]


@dataclasses.dataclass(frozen=True)
class Route:
    """How one model runs one image: ``kind`` 'tiles' (the ordinary ``plan``: the whole image
    when it has one tile), 'levelwise' (``levelwise``: stage plans) or 'spatial' (``spatial``:
    one call, the image split over the devices). ``work``: computed volume per image volume
    (None for 'levelwise': :meth:`levelwise.Levelwise.work` compiles to measure it)."""

    kind: str
    plan: Plan
    work: float | None
    levelwise: levelwise.Plan | None = None
    spatial: spatial.SpatialKernel | None = None
    whole: Any = None  # 'tiles', one 3D tile on CPU: the depth-streamed whole-volume kernel

    @property
    def calls(self) -> int:
        """Kernel calls of the run (its progress steps)."""
        if self.kind == "levelwise":
            return sum(sp.calls for sp in self.levelwise.stages)
        if self.kind == "spatial":
            return 1
        return -(-len(self.plan.tiles) // self.plan.per_call)


def memory_budget(device: jax.Device) -> int:
    """Bytes a tile batch may use on ``device``: env ``CRYODEN_MEMORY_BUDGET`` (bytes, or with a
    K/M/G/T suffix), else 60% of an accelerator's memory limit, else 40% of host RAM.

    Raises ValueError (one line) when the variable is set but not a positive finite size.
    """
    env = os.environ.get("CRYODEN_MEMORY_BUDGET", "").strip()
    if env:
        units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        mult = units.get(env[-1].upper(), 1)
        try:
            value = float(env[:-1] if env[-1].upper() in units else env) * mult
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 1):
            raise ValueError(
                f"CRYODEN_MEMORY_BUDGET={env!r} is not a memory size: give a positive number of "
                f"bytes, optionally with a K, M, G or T suffix (e.g. 8G)"
            )
        return int(value)
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(0.6 * stats["bytes_limit"])
    return int(0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class Denoiser:
    """Loaded models plus compiled kernels, reusable across images of one dimensionality.

    models: None (``unet`` for 2D, ``unet-3d`` for 3D), a pretrained name, a weights file, a
    training run directory, or a list of them (outputs averaged). ndim: 2 or 3. dtype: compute
    dtype (``float32`` or ``bfloat16``). devices: defaults to all local devices.
    Raises ``weights.WeightsError`` (a ValueError) for a missing or unusable model.
    """

    def __init__(
        self,
        models: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        *,
        ndim: int = 2,
        dtype: str | Any = "float32",
        devices: Sequence[jax.Device] | None = None,
    ):
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if models is None:
            models = [DEFAULT_MODEL[ndim]]
        elif isinstance(models, (str, os.PathLike)):
            models = [models]
        if not models:
            raise ValueError("no model given")
        self.ndim = ndim
        self.dtype = jnp.dtype(dtype)
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.mesh = Mesh(np.array(self.devices), ("tiles",))
        self.tile_sharding = NamedSharding(self.mesh, P("tiles"))
        self.nets = [self._load(m) for m in models]
        self.stride = max(n.spec.stride for n in self.nets)
        self.halo = max(n.spec.halo for n in self.nets)

    def _load(self, model) -> _Net:
        params, spec, _ = weights.load(model)
        if spec.ndim != self.ndim:
            raise weights.WeightsError(
                f"{model}: a {spec.ndim}D model cannot denoise {self.ndim}D data"
            )
        module = build_model(spec, dtype=self.dtype)
        traces: list = []

        def apply(p, x):
            traces.append(x.shape)  # runs at trace time only: counts compilations
            return module.apply({"params": p}, x)

        params = jax.device_put(params, NamedSharding(self.mesh, P()))
        return _Net(str(model), spec, params, jax.jit(apply), traces)

    @property
    def compilations(self) -> int:
        """Kernel traces so far, over all models (one per model and tile-batch shape)."""
        return sum(len(n.traces) for n in self.nets)

    # ------------------------------------------------------------------ public entry point

    def __call__(
        self,
        x: np.ndarray,
        *,
        patch_size: int | None = None,
        padding: int | None = None,
        batch_size: int | None = None,
        normalize: bool = False,
        topaz_compat: bool = False,
        lowpass: float = 1.0,
        gaussian: float = 0.0,
        progress: Callable[[int, int], None] | None = None,
        levelwise: bool | None = None,
    ) -> np.ndarray:
        """Denoise ``x: (H, W)`` (2D) or ``(D, H, W)`` (3D) -> float32 of the same shape.

        patch_size: kept core of each tile in px (tile = core + 2 * padding, rounded up to the
        stride); None chooses the tiles of least total work that fit the memory budget (the
        whole image when it fits; :meth:`plan`). padding: margin per tile side; None is the
        receptive field in 2D (exact) and
        ``DEFAULT_PADDING_3D`` in 3D. batch_size: tiles per device per call (default 1).
        lowpass: hard low-pass binning factor applied first; gaussian: sigma in px, applied to
        the normalised input in 2D and to the output in 3D (Topaz's conventions).
        levelwise: U-nets only; None runs an image that needs tiles (and no patch_size/padding
        was given) level by level (exact, docs/levelwise.md); True always, False never.
        """
        x = np.asarray(x)
        if x.ndim != self.ndim:
            raise ValueError(f"expected a {self.ndim}D array, got shape {x.shape}")
        if x.size == 0:
            raise ValueError(f"empty image of shape {x.shape}")
        bad = int(np.count_nonzero(~np.isfinite(x))) if x.dtype.kind == "f" else 0
        if bad:
            raise ValueError(f"image contains {bad} NaN/Inf pixel(s)")
        if topaz_compat and (patch_size is not None or padding is not None):
            raise ValueError("topaz_compat runs the whole image: patch_size/padding not allowed")
        x = filters.lowpass(x, lowpass)
        mean = float(np.mean(x, dtype=np.float64))
        std = float(np.std(x, dtype=np.float64, ddof=1)) if x.size > 1 else 0.0
        if not std > 0 or not math.isfinite(std):  # constant image: nothing to denoise
            return np.full(x.shape, 0.0 if normalize else mean, np.float32)
        # the normalised image, written zero-padded to the stride once: the tiles and the
        # level-wise maps read it as is (no second padded copy held during the run)
        xpad = np.zeros(tuple(tiling.round_up(n, self.stride) for n in x.shape), np.float32)
        xn = xpad[tuple(slice(0, n) for n in x.shape)]
        _affine_into(x, xn, 1 / std, -mean / std)
        if gaussian > 0 and self.ndim == 2:
            xn[...] = filters.gaussian(xn, gaussian)
        y = None  # the first model's output is the sum: no third image-sized array meanwhile
        for net in self.nets:
            if topaz_compat:
                r = self._run_whole(net, xn)
            else:
                r = self._run_tiled(
                    net, xpad, xn.shape, patch_size, padding, batch_size, progress, levelwise
                )
            if y is None:
                y = r
            else:
                y = _writable(y)
                y += r
        if len(self.nets) > 1:
            y /= len(self.nets)
        if gaussian > 0 and self.ndim == 3:
            y = filters.gaussian(y, gaussian)
        return _writable(y) if normalize else _affine(y, std, mean)

    # ------------------------------------------------------------------ execution

    def _run_whole(self, net: _Net, xn: np.ndarray) -> np.ndarray:
        """Unpadded whole image (torch's odd-size rule), one device. xn: (*S) -> (*S)."""
        params = jax.device_put(net.params, self.devices[0])
        batch = jax.device_put(xn[None, ..., None], self.devices[0])
        return np.asarray(net.kernel(params, batch))[0, ..., 0]

    def plan(
        self,
        shape: tuple[int, ...],
        patch_size: int | None,
        padding: int | None,
        batch_size: int | None = None,
    ) -> Plan:
        """Tiles for an image of ``shape`` -> :class:`Plan` (unpacks as padded shape, tiles,
        tiles per kernel call).

        With ``patch_size`` None the tile shape is the one of least total work (tiles with
        their margins, plus the measured per-call overhead, on all devices) whose kernel call
        fits the memory budget (:func:`memory_budget`) by the models' measured memory
        (:mod:`cryoden.memory`). A tile predicted within 10% of the budget, and every batch of
        several tiles per device (the fit is at batch 1; batches take up to ~5% more per pixel),
        is checked against XLA's memory analysis of that exact shape and shrunk until it fits.
        """
        s = self.stride
        padded = tuple(tiling.round_up(n, s) for n in shape)
        margin = (
            padding
            if padding is not None
            else (self.halo if self.ndim == 2 else DEFAULT_PADDING_3D)
        )
        if margin < 0:
            raise ValueError(f"padding must be >= 0, got {margin}")
        n_dev = len(self.devices)
        per_dev = batch_size or 1
        predicted = None
        if patch_size is not None:
            if patch_size < 1:
                raise ValueError(f"patch_size must be >= 1, got {patch_size}")
            tile = (patch_size + 2 * margin,) * self.ndim
        else:
            tile, predicted = self._least_work_tile(padded, margin, per_dev)
        tiles = tiling.plan(padded, tile, margin, s)
        per_call = n_dev * min(per_dev, -(-len(tiles) // n_dev))
        return Plan(tuple(shape), padded, tiles, per_call, predicted)

    def _least_work_tile(self, padded, margin, per_dev) -> tuple[tuple[int, ...], int]:
        """Least-work tile within the memory budget -> (tile, predicted bytes per call)."""
        platform = self.devices[0].platform
        budget = memory_budget(self.devices[0])
        fits = [memory.bytes_model(n.spec, self.dtype, platform) for n in self.nets]
        overhead = max(memory.call_overhead(n.spec, self.dtype, platform) for n in self.nets)

        def predict(tile):
            return int(max(f + p * per_dev * math.prod(tile) for f, p in fits))

        max_px = min((budget - f) / (p * per_dev) if p > 0 else math.inf for f, p in fits)
        tile, measured = None, per_dev > 1  # the fit is at batch 1: check batches exactly
        for _ in range(8):
            prev = tile
            tile = tiling.least_work_tile(
                padded, margin, self.stride, max_px, len(self.devices), per_dev, overhead
            )
            if tile == prev:  # nothing smaller is possible
                break
            if not measured and predict(tile) <= 0.9 * budget:
                return tile, predict(tile)
            exact = max(
                memory.kernel_bytes(n.spec, self.dtype, (per_dev, *tile), platform)
                for n in self.nets
            )
            if exact <= budget:
                return tile, exact
            measured = True  # the fit was optimistic here: check every smaller tile exactly
            max_px = math.prod(tile) * min(budget / exact, 0.99)
        return tile, predict(tile)

    def uses_levelwise(self, spec, n_tiles, patch_size, padding, use_levelwise=None) -> bool:
        """Whether a model ``spec`` runs level by level when ``plan`` gives ``n_tiles``: U-nets
        needing more than one tile per device with automatic tiles, or when forced."""
        if not levelwise.is_unet(spec) or use_levelwise is False:
            return False
        auto = patch_size is None and padding is None
        return bool(use_levelwise) or (auto and n_tiles > len(self.devices))

    def route(
        self, net: _Net, shape, patch_size=None, padding=None, batch_size=None, use_levelwise=None
    ) -> Route:
        """How model ``net`` runs an image of ``shape`` (:class:`Route`): the ordinary plan
        (whole image or tiles), level by level, or, with several devices, the whole image split
        spatially over them (:mod:`cryoden.spatial`) when it fits their budget and is the least
        work. Kernels and plans are cached on ``net``: routing again is cheap."""
        plan = self.plan(shape, patch_size, padding, batch_size)
        n_tiles = len(plan.tiles)
        lw = self.uses_levelwise(net.spec, n_tiles, patch_size, padding, use_levelwise)
        auto = patch_size is None and padding is None and use_levelwise is not True
        if auto and n_tiles > 1 and len(self.devices) > 1 and levelwise.is_unet(net.spec):
            kernel = self._spatial_kernel(net, plan, lw)
            if kernel is not None:
                return Route("spatial", plan, kernel.plan.work, spatial=kernel)
        whole = self._whole_volume(net, plan, lw and auto and len(self.devices) == 1)
        if whole is not None:
            return Route("tiles", whole[0], whole[0].work, whole=whole[1])
        if lw:
            lw_plan = self._levelwise_plan(net, plan.padded)
            return Route("levelwise", plan, None, levelwise=lw_plan)
        return Route("tiles", plan, plan.work)

    def _whole_volume(self, net: _Net, plan: Plan, instead_of_tiles: bool):
        """A 3D U-net volume on CPU (``levelwise.STREAM_PLATFORMS``) runs whole through the
        depth-streamed blocks (:func:`levelwise.forward`: 0.1-0.3x the memory of the whole
        model's kernel, and faster; docs/levelwise.md) when that kernel, compiled at the
        volume's shape, fits the budget by XLA's memory analysis: a volume with one tile, or,
        with ``instead_of_tiles`` (the automatic level-wise route, one device), a padded volume
        that needed tiles under the whole model's memory.
        -> (one-tile plan with the kernel's bytes, compiled kernel) or None."""
        platform = self.devices[0].platform
        if self.ndim != 3 or platform not in levelwise.STREAM_PLATFORMS:
            return None
        if not levelwise.is_unet(net.spec) or not (len(plan.tiles) == 1 or instead_of_tiles):
            return None
        budget = memory_budget(self.devices[0])
        if len(plan.tiles) > 1:
            if math.prod(plan.padded) * _STREAMED_MIN_BYTES > budget:
                return None  # cannot fit: not worth a compile
            tiles = tiling.plan(plan.padded, plan.padded, 0, self.stride)
            plan = dataclasses.replace(plan, tiles=tiles, per_call=len(self.devices))
        c = self._whole_kernel(net, (plan.per_call, *plan.tile))
        need = memory.compiled_bytes(c)
        if need > budget:
            return None
        return dataclasses.replace(plan, predicted_bytes=need), c

    def _whole_kernel(self, net: _Net, shape: tuple[int, ...]):
        """The streamed whole-volume kernel for an input batch ``shape`` (B, D, H, W), compiled
        (once per shape)."""
        if shape not in net.whole:
            x = jax.ShapeDtypeStruct((*shape, 1), jnp.float32, sharding=self.tile_sharding)
            spec, dtype = net.spec, self.dtype
            f = jax.jit(lambda p, x: levelwise.forward(spec, p, x, dtype))
            net.whole[shape] = f.lower(net.params, x).compile()
            net.traces.append(shape)
        return net.whole[shape]

    def _levelwise_plan(self, net: _Net, padded, verify: bool = True) -> levelwise.Plan:
        if net.levelwise is None:
            net.levelwise = levelwise.Levelwise(net.spec, net.params, self.dtype, self.mesh)
        key = (padded, memory_budget(self.devices[0]), verify)
        if key not in net.lw_plans:
            per_px = _CALLER_BYTES_PER_PX + _SUM_BYTES_PER_PX * (len(self.nets) > 1)
            held = per_px * math.prod(padded)
            net.lw_plans[key] = net.levelwise.plan(padded, key[1], verify=verify, held=held)
        return net.lw_plans[key]

    def _spatial_kernel(self, net: _Net, plan: Plan, lw: bool) -> spatial.SpatialKernel | None:
        """The whole padded image split over all devices, if its kernel fits the budget (XLA's
        memory analysis, per device) and no other plan is less work; else None."""
        budget = memory_budget(self.devices[0])
        split = spatial.plan(plan.padded, net.spec.stride, len(self.devices))
        cache, key = net.spatial, (split, budget)
        if key not in cache:
            cache[key] = None
            fixed, per_px = memory.bytes_model(net.spec, self.dtype, self.devices[0].platform)
            # a lower bound (halo buffers come on top): skip compiling what cannot fit
            fits = fixed + per_px * math.prod(split.extended) / split.n_dev <= budget
            if fits and split.work > 1.0:  # extended: compare with the other plans' work
                other = plan.work
                if lw:
                    lw_plan = self._levelwise_plan(net, plan.padded, verify=False)
                    other = net.levelwise.work(lw_plan)
                fits = split.work <= other
            if fits:
                module = build_model(net.spec, dtype=self.dtype)
                kernel = spatial.SpatialKernel(
                    lambda p, x: module.apply({"params": p}, x), net.params, self.mesh, split
                )
                net.traces.append(split.extended)
                cache[key] = kernel if kernel.bytes <= budget else None
        return cache[key]

    def _run_tiled(
        self, net, xpad, shape, patch_size, padding, batch_size, progress, use_levelwise=None
    ) -> np.ndarray:
        """Run tile batches through the kernel, crop. xpad: the normalised image of ``shape``
        (*S), zero-padded to the stride (read, not written) -> (*S). U-nets whose padded image
        needs tiles go level by level instead (exact at any size), or split spatially over
        several devices (:meth:`route`)."""
        xn = xpad[tuple(slice(0, n) for n in shape)]
        r = self.route(net, shape, patch_size, padding, batch_size, use_levelwise)
        if r.kind == "spatial":
            y = r.spatial(xn)
            if progress:
                progress(1, 1)
            return y
        if r.kind == "levelwise":
            return net.levelwise.run(xn, r.levelwise, progress, padded=xpad)
        padded_shape, tiles, per_call = r.plan
        kernel = net.kernel if r.whole is None else r.whole
        padded = xpad
        if padded.shape != tuple(padded_shape):
            padded = np.zeros(padded_shape, np.float32)
            padded[tuple(slice(0, n) for n in xn.shape)] = xn
        out = np.empty(padded_shape, np.float32)
        shape = (per_call, *tiling.tile_shape(tiles), 1)
        groups = [tiles[i : i + per_call] for i in range(0, len(tiles), per_call)]

        def submit(group):
            batch = np.zeros(shape, np.float32)
            for b, t in enumerate(group):
                batch[b, ..., 0] = padded[t.window]
            return kernel(net.params, jax.device_put(batch, self.tile_sharding))

        def collect(group, result):
            result = np.asarray(result)
            for b, t in enumerate(group):
                out[t.keep] = result[(b, *t.local, 0)]

        pending = None  # dispatch is asynchronous: prepare batch k+1 while k runs
        for k, group in enumerate(groups):
            result = submit(group)
            if pending is not None:
                collect(*pending)
                if progress:
                    progress(k, len(groups))
            pending = (group, result)
        collect(*pending)
        if progress:
            progress(len(groups), len(groups))
        return out[tuple(slice(0, n) for n in xn.shape)]


def denoise(
    x: np.ndarray,
    model: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    dtype: str = "float32",
    devices: Sequence[jax.Device] | None = None,
    **kwargs,
) -> np.ndarray:
    """Denoise a micrograph ``(H, W)`` or volume ``(D, H, W)`` -> float32, same shape.

    model: pretrained name, weights path, run directory, or a list (averaged); defaults to
    ``unet`` (2D) / ``unet-3d`` (3D). Other keywords as :meth:`Denoiser.__call__`. For many
    images, make one :class:`Denoiser` and reuse it (compiled kernels are cached there).
    """
    x = np.asarray(x)
    return Denoiser(model, ndim=x.ndim, dtype=dtype, devices=devices)(x, **kwargs)


def _writable(y: np.ndarray) -> np.ndarray:
    """``y`` itself if it is a writable float32 array owning or sharing a C-contiguous buffer,
    else a copy (a kernel's read-only result, a cropped view of a padded map)."""
    if y.flags.writeable and y.flags.c_contiguous and y.dtype == np.float32:
        return y
    return np.array(y, np.float32, order="C")


def _affine(x: np.ndarray, scale: float, offset: float) -> np.ndarray:
    """``x * scale + offset`` in float64, rounded once to float32; x: any shape -> float32, same.

    Normalisation (``scale = 1 / std``, ``offset = -mean / std``) and restore go through here.
    In float32 (NumPy rounds a Python-float mean to float32 for a float32 array) ``x - mean`` is
    off by up to half a float32 ulp of the mean: a constant shift of ``ulp(mean) / 2 / std`` on
    every pixel, which the network passes on, e.g. 8e-6 std (10x the network's own float32
    error) for counts around 10000 with std 60. Chunks of 64k values keep the float64 buffer in
    cache: as fast as the float32 expression, with no full-size temporaries.
    """
    out = np.empty(x.shape, np.float32)
    _affine_into(x, out, scale, offset)
    return out


def _affine_into(x, out, scale, offset, buf=None) -> None:
    """:func:`_affine` written into ``out`` (float32, x's shape; may be a view, e.g. the crop
    of a zero-padded array). A non-contiguous ``x`` or ``out`` (a cropped view) goes slice by
    slice along the first axis, so that no full-size contiguous copy is made."""
    if buf is None:
        buf = np.empty(max(1, min(x.size, 1 << 16)), np.float64)
    if x.ndim > 1 and not (x.flags.c_contiguous and out.flags.c_contiguous):
        for i in range(x.shape[0]):
            _affine_into(x[i], out[i], scale, offset, buf)
        return
    src, dst = np.ravel(x), out.reshape(-1)
    for i in range(0, src.size, buf.size):
        part = src[i : i + buf.size]
        b = buf[: part.size]
        np.multiply(part, scale, out=b, dtype=np.float64)
        np.add(b, offset, out=b)
        dst[i : i + buf.size] = b
