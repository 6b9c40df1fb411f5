"""Exact U-net inference at any size, level by level (docs/levelwise.md).

Tiling the whole U-net needs margins of its whole receptive field (~160 px), but that field is
large only because of the coarse levels. Here the network ``models.UNet`` (``L`` poolings) is
cut into three stages, each run over its own grid in fixed-shape tiles with only its own halo:

    S1  x  (B, *4t, 1)                    -> p2 (B, *t, 48)   enc1, pool, enc2, pool
    S2  p2 (B, *t, 48)                    -> h2 (B, *t, 96)   enc3..enc{L+1}, dec{L}..dec3
    S3  x  (B, *t, 1), h2 (B, *t/4, 96)   -> y  (B, *t, 1)    enc1, pool (p1 again), dec2, dec1

``t`` is the stage's tile on its output grid (S1, S2: 1/4 resolution; S3: full). The maps p2
and h2 between stages live in host memory (48 and 96 channels at 1/16 of the pixels in 2D,
1/64 in 3D). Each stage uses the model's own Flax blocks with its parameter sub-trees, so the
arithmetic is the whole model's. A tile window lies inside the (stride-padded) image, where
the stage's zero 'same' padding is the whole image's at true borders; near an interior window
edge it is wrong within the stage's halo, which :func:`stage_halo` finds by propagating
dependency intervals through the same stage code, and which every tile discards
(``tiling.plan`` with ``margin = halo``). Window origins and sizes are multiples of the stage's
down-sampling, so pooling and up-sampling phases line up with the whole image's. Result: the
whole (padded) image's output, for any size, with a few percent of extra work.

Tile shapes are chosen per stage from the memory budget, using XLA's memory analysis of the
compiled stage kernel (measured once per model, stage, platform and dtype, scaled by volume,
checked again at the chosen shape), to minimise the stage's executed volume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cryoden import depthstream, tiling, xla_scratch
from cryoden.conv import depth_taps
from cryoden.memory import compiled_bytes
from cryoden.models import NF, ConvBlock, ModelSpec, build_model, max_pool2, out_dtype

# Per-call cost, in output-grid units of volume, added to each tile when comparing plans
# (favours fewer, larger tiles among plans of nearly equal volume).
CALL_OVERHEAD = 1024
# Tile side (output-grid units) at which each stage's bytes and FLOPs per unit are measured.
# 3D blocks streamed over depth slabs in the stage kernels (each stage's finer levels), on
# these platforms (measured on CPU; GPU kernels unchanged, not measured there).
STREAMED = ("enc1", "enc2", "enc3", "dec3", "dec2", "dec1")
STREAM_PLATFORMS = ("cpu",)
_STREAM = [True]  # False while tracing for FLOP counts (_unscanned)
MEASURE_SIDE = {2: {"s1": 128, "s2": 256, "s3": 512}, 3: {"s1": 32, "s2": 32, "s3": 128}}
# Platforms whose device memory is the host's: the host maps (x, p2, h2, y) and the caller's
# arrays share the budget with the stage kernels there.
HOST_MEMORY_PLATFORMS = ("cpu",)


# ------------------------------------------------------------------ stage structure


def _stage1(spec: ModelSpec, ops, x):
    h = ops.block("enc1", (NF,), (spec.base_width,), x, pool=True)
    return ops.block("enc2", (NF,), (3,), h, pool=True)


def _stage2(spec: ModelSpec, ops, p2):
    skips, h = [p2], p2
    for i in range(3, spec.levels + 1):
        h = ops.block(f"enc{i}", (NF,), (3,), h, pool=True)
        skips.append(h)
    h = ops.block(f"enc{spec.levels + 1}", (NF,), (3,), h)
    skips.pop()  # the deepest pooled map feeds enc{L+1} only
    for i in range(spec.levels, 2, -1):
        h = ops.block(f"dec{i}", (2 * NF, 2 * NF), (3, 3), h, skips.pop())
    return h


def _stage3(spec: ModelSpec, ops, x, h2):
    p1 = ops.block("enc1", (NF,), (spec.base_width,), x, pool=True)
    return _decode_fine(spec, ops, x, p1, h2)


def _decode_fine(spec: ModelSpec, ops, x, p1, h2):
    """``dec2`` (up ``h2`` ++ ``p1``) and ``dec1`` (up ++ ``x``): the two finest decoder levels."""
    h = ops.block("dec2", (2 * NF, 2 * NF), (3, 3), h2, p1)
    t = spec.top_width
    return ops.block("dec1", (64, 32, 1), (t, t, t), h, x, last_activation=False)


def forward(spec: ModelSpec, params, x, dtype, stream: bool = True):
    """The whole U-net forward through the stage blocks (``enc1`` once): on ``stream``, 3D
    blocks in ``STREAMED`` run over depth slabs, so a whole volume needs a slab, not a volume,
    of each full-resolution map. x: (B, *S, 1) -> (B, *S, 1), ``S`` stride multiples."""
    ops = _FlaxOps(params, spec.ndim, dtype, stream)
    p1 = ops.block("enc1", (NF,), (spec.base_width,), x, pool=True)
    h2 = _stage2(spec, ops, ops.block("enc2", (NF,), (3,), p1, pool=True))
    return _decode_fine(spec, ops, x, p1, h2).astype(out_dtype(dtype))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: ``inputs`` are (map name, channels, e) with the input at ``2**e`` times the
    output grid's resolution; ``out_scale``: output grid = padded image / ``2**out_scale``;
    ``align``: tile origins and sizes are multiples of it (output-grid units)."""

    name: str
    fn: Callable
    inputs: tuple[tuple[str, int, int], ...]
    out: tuple[str, int]
    out_scale: int
    align: int


def stages(spec: ModelSpec) -> tuple[Stage, Stage, Stage]:
    """The three stages of a U-net ``spec`` (``levels >= 3``)."""
    if spec.arch not in ("unet", "unet-small"):
        raise ValueError(f"level-wise inference is for U-nets, not {spec.arch!r}")
    return (
        Stage("s1", _stage1, (("x", 1, 2),), ("p2", NF), 2, 1),
        Stage("s2", _stage2, (("p2", NF, 0),), ("h2", 2 * NF), 2, 2 ** (spec.levels - 2)),
        Stage("s3", _stage3, (("x", 1, 0), ("h2", 2 * NF, -2)), ("y", 1), 0, 4),
    )


class _FlaxOps:
    """Stage operations on arrays: the model's own blocks with their parameter sub-trees; in 3D
    on ``stream`` platforms the blocks in ``STREAMED`` run over depth slabs (:mod:`depthstream`)."""

    def __init__(self, params, ndim: int, dtype, stream: bool):
        self.params, self.ndim, self.dtype, self.stream = params, ndim, dtype, stream

    def block(self, name, features, kernels, h, skip=None, last_activation=True, pool=False):
        p = self.params[name]
        streamed = self.stream and name in STREAMED and _STREAM[-1]
        if streamed and depthstream.streamable(h, skip, pool, len(kernels)):
            return depthstream.block(p, kernels, h, skip, last_activation, self.dtype, pool)
        blk = ConvBlock(features, kernels, self.ndim, last_activation, self.dtype)
        h = blk.apply({"params": p}, h, skip)
        return max_pool2(h) if pool else h


class _IntervalOps:
    """Stage operations on dependency intervals along one axis: a map is a dict
    ``source -> (lo, hi)``, the first and last index of that source each position reads."""

    def block(self, name, features, kernels, h, skip=None, last_activation=True, pool=False):
        if skip is not None:
            up = {s: (np.repeat(lo, 2), np.repeat(hi, 2)) for s, (lo, hi) in h.items()}
            h = dict(skip)
            for s, (lo, hi) in up.items():
                h[s] = (np.minimum(lo, h[s][0]), np.maximum(hi, h[s][1])) if s in h else (lo, hi)
        for k in kernels:
            h = {s: _box(lo, hi, k) for s, (lo, hi) in h.items()}
        return self.pool(h) if pool else h

    def pool(self, h):
        return {
            s: (lo.reshape(-1, 2).min(-1), hi.reshape(-1, 2).max(-1)) for s, (lo, hi) in h.items()
        }


def _box(lo, hi, k):
    r = k // 2
    win = np.lib.stride_tricks.sliding_window_view
    lo_p, hi_p = np.pad(lo, r, mode="edge"), np.pad(hi, r, mode="edge")
    return win(lo_p, 2 * r + 1).min(-1), win(hi_p, 2 * r + 1).max(-1)


def dependencies(spec: ModelSpec, stage: Stage, n_out: int) -> dict[str, tuple]:
    """Along one axis of an output grid of ``n_out`` (a multiple of 4 * the stage's alignment):
    for each stage input, ``(lo, hi)`` arrays (n_out,) of the first and last input index that
    each output position depends on (interior positions; borders clip)."""
    srcs = []
    for name, _, e in stage.inputs:
        n = n_out * 2**e if e >= 0 else n_out // 2**-e
        srcs.append({name: (np.arange(n), np.arange(n))})
    return stage.fn(spec, _IntervalOps(), *srcs)


def stage_halo(spec: ModelSpec, stage: Stage) -> int:
    """Margin (output-grid units) that a kept output position must keep from an interior window
    edge so that every input it depends on lies inside the window."""
    n = 64 * stage.align * 4
    deps = dependencies(spec, stage, n)
    j = np.arange(n)[n // 4 : 3 * n // 4]
    margin = 0
    for name, _, e in stage.inputs:
        lo, hi = (a[n // 4 : 3 * n // 4] for a in deps[name])
        if e >= 0:  # input index i covers output coordinate i >> e
            first, last = lo >> e, hi >> e
        else:  # input index i covers output coordinates [i << -e, (i + 1) << -e)
            first, last = lo << -e, ((hi + 1) << -e) - 1
        margin = max(margin, int((j - first).max()), int((last - j).max()))
    return margin


# ------------------------------------------------------------------ planning


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Tiles of one stage on its output grid ``grid``: tile shape ``tile``, ``calls`` kernel
    calls of ``batch`` tiles each; ``flops`` executed; ``bytes``: per-device memory of a call
    (:meth:`Levelwise.kernel_bytes`; scaled from a smaller tile when the plan was not
    verified); ``host``: bytes of the arrays held meanwhile in the same memory (host maps and
    the caller's arrays, :meth:`Levelwise.host_bytes`; 0 where the device has its own).
    ``bytes + host`` is within the planning budget unless no tile fits."""

    stage: Stage
    grid: tuple[int, ...]
    tile: tuple[int, ...]
    halo: int
    tiles: tuple[tiling.Tile, ...]
    batch: int
    flops: float
    bytes: float
    host: float = 0.0

    @property
    def calls(self) -> int:
        return -(-len(self.tiles) // self.batch)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Stage plans for a padded image (see :meth:`Levelwise.work` for the work factor)."""

    padded: tuple[int, ...]
    stages: tuple[StagePlan, ...]


_MEASURED: dict = {}  # (spec, stage, platform, dtype, devices) -> (bytes, flops) per unit volume


class Levelwise:
    """Plans and runs a U-net level by level. params: the model's parameters (replicated on
    ``mesh``); mesh: 1D device mesh with axis ``'tiles'`` (tiles of a call are sharded on it)."""

    def __init__(self, spec: ModelSpec, params: Any, dtype: Any, mesh: jax.sharding.Mesh):
        self.spec, self.params, self.dtype, self.mesh = spec, params, jnp.dtype(dtype), mesh
        self.stages = stages(spec)
        self.halos = {s.name: stage_halo(spec, s) for s in self.stages}
        self.n_dev = mesh.devices.size
        self.platform = mesh.devices.flat[0].platform
        self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tiles"))
        self._compiled: dict = {}

    # -- kernels

    def _fn(self, stage: Stage):
        ops_args = (self.spec.ndim, self.dtype, self.platform in STREAM_PLATFORMS)

        def f(params, *inputs):
            return stage.fn(self.spec, _FlaxOps(params, *ops_args), *inputs)

        return f

    def compiled(self, stage: Stage, tile: tuple[int, ...]):
        """The stage kernel for output tiles ``tile``, batch ``n_dev`` (compiled once)."""
        key = (stage.name, tuple(tile))
        if key not in self._compiled:
            args = self._args(stage, tile)
            self._compiled[key] = jax.jit(self._fn(stage)).lower(self.params, *args).compile()
        return self._compiled[key]

    def _args(self, stage: Stage, tile: tuple[int, ...]) -> list:
        return [
            jax.ShapeDtypeStruct(
                (self.n_dev, *_scale_shape(tile, e), c), jnp.float32, sharding=self.sharding
            )
            for _, c, e in stage.inputs
        ]

    def _flops(self, stage: Stage, tile: tuple[int, ...]) -> float:
        """FLOPs of one kernel call (per device) on ``tile``: XLA's cost analysis of the stage
        traced without loops (it counts a loop body once, not once per iteration)."""
        with _unscanned():
            lowered = jax.jit(self._fn(stage)).lower(self.params, *self._args(stage, tile))
        return _flops(lowered)

    def _per_unit(self, stage: Stage, grid: tuple[int, ...]) -> tuple[float, float]:
        """(bytes per device, FLOPs) per unit of tile volume, measured on a small tile."""
        key = (self.spec, stage.name, self.platform, str(self.dtype), self.n_dev)
        if key not in _MEASURED:
            side = MEASURE_SIDE[self.spec.ndim][stage.name]
            tile = tuple(min(n, tiling.round_up(side, stage.align)) for n in grid)
            c = self.compiled(stage, tile)
            # memory and cost analyses are per device, i.e. per tile
            vol = math.prod(tile)
            _MEASURED[key] = (self.kernel_bytes(c) / vol, self._flops(stage, tile) / vol)
        return _MEASURED[key]

    def whole_flops_per_px(self, shape: tuple[int, ...] | None = None) -> float:
        """FLOPs per pixel of one whole-image pass over ``shape`` (default: a small size),
        from XLA's cost analysis of the traced model (lowered only: cheap at any size)."""
        side = 512 if self.spec.ndim == 2 else 64
        shape = tuple(shape) if shape else (side,) * self.spec.ndim
        key = (self.spec, "whole", shape, str(self.dtype))
        if key not in _MEASURED:
            module = build_model(self.spec, dtype=self.dtype)
            x = jax.ShapeDtypeStruct((1, *shape, 1), jnp.float32)
            params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.params)
            with _unscanned():
                lowered = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(params, x)
            _MEASURED[key] = (0.0, _flops(lowered) / math.prod(shape))
        return _MEASURED[key][1]

    # -- planning

    def plan(
        self,
        padded: tuple[int, ...],
        budget: int,
        tiles: dict[str, tuple[int, ...]] | None = None,
        verify: bool = True,
        held: int = 0,
    ) -> Plan:
        """Plan a padded image (each side a multiple of the stride) under ``budget`` bytes per
        device. tiles: optional output-grid tile shape per stage name (tests, benchmarks);
        verify: compile the chosen kernels and shrink a tile whose measured memory exceeds the
        budget (planning only for a report: False); held: bytes the caller holds in host memory
        during the run (its image, output...). Where host memory is device memory
        (``HOST_MEMORY_PLATFORMS``) each stage's kernel gets the budget less the host maps alive
        during it and ``held``."""
        if any(n % self.spec.stride for n in padded):
            raise ValueError(f"shape {padded} is not a multiple of the stride {self.spec.stride}")
        plans = []
        for i, st in enumerate(self.stages):
            grid = tuple(n >> st.out_scale for n in padded)
            halo = self.halos[st.name]
            host = 0
            if self.platform in HOST_MEMORY_PLATFORMS:
                host = self.host_bytes(padded, i) + held
            avail = budget - host
            if tiles and st.name in tiles:
                least = tiling.round_up(2 * halo + st.align, st.align)  # smallest valid tile
                tile = tuple(
                    min(tiling.round_up(max(t, least), st.align), n)
                    for t, n in zip(tiles[st.name], grid, strict=True)
                )
                c = self.compiled(st, tile)
                bpu = self.kernel_bytes(c) / math.prod(tile)
                fpu = self._flops(st, tile) / math.prod(tile)
            else:
                bpu, fpu = self._per_unit(st, grid)
                tile = _best_tile(grid, halo, st.align, max(avail, 0) / bpu, self.n_dev)
                if verify:
                    tile = self._fit(st, grid, tile, avail)
                    bpu = self.kernel_bytes(self.compiled(st, tile)) / math.prod(tile)
                fpu = self._flops(st, tile) / math.prod(tile)  # at the tile itself
            tl = tuple(tiling.plan(grid, tile, halo, st.align))
            flops = -(-len(tl) // self.n_dev) * self.n_dev * math.prod(tile) * fpu
            used = bpu * math.prod(tile)
            plans.append(StagePlan(st, grid, tile, halo, tl, self.n_dev, flops, used, host))
        return Plan(tuple(padded), tuple(plans))

    def kernel_bytes(self, compiled) -> int:
        """Per-device bytes of one call of a compiled stage kernel as :meth:`run` makes it:
        XLA's memory analysis (arguments, output, temporaries), plus the next call's arguments
        and the previous call's output (``_run_stage`` prepares call k+1 while k runs), plus on
        CPU what the run allocates outside the analysis: YNNPACK's convolution scratch
        (:func:`xla_scratch.conv_scratch_bytes`) and the NumPy batch each argument is copied
        from."""
        ma = compiled.memory_analysis()
        used = compiled_bytes(compiled) + ma.argument_size_in_bytes + ma.output_size_in_bytes
        if self.platform in HOST_MEMORY_PLATFORMS:
            used += xla_scratch.conv_scratch_bytes(compiled) + ma.argument_size_in_bytes
        return int(used)

    def host_bytes(self, padded: tuple[int, ...], i: int) -> int:
        """Bytes of the host maps :meth:`run` holds while stage ``i`` runs on a ``padded``
        image: ``x`` and earlier outputs still needed by stage ``i`` or later, and stage ``i``'s
        output (float32; 2D: 4, 12, 24, 4 B per image px for x, p2, h2, y)."""
        size = {"x": 4 * math.prod(padded)}
        for st in self.stages:
            size[st.out[0]] = 4 * st.out[1] * math.prod(n >> st.out_scale for n in padded)
        needed = {m for st in self.stages[i:] for m, _, _ in st.inputs}
        alive = ({"x"} | {st.out[0] for st in self.stages[:i]}) & needed
        return sum(size[m] for m in alive | {self.stages[i].out[0]})

    def _fit(self, st: Stage, grid, tile, budget: int) -> tuple[int, ...]:
        """Compile ``tile``, re-plan with the bytes per unit measured at that shape, repeat
        (a few times): the least-work tile whose compiled kernel fits ``budget``, else the
        last one tried."""
        halo, best, tried = self.halos[st.name], None, set()
        for _ in range(4):
            if tile in tried:
                break
            tried.add(tile)
            used = self.kernel_bytes(self.compiled(st, tile))
            if used <= budget:
                work = _work(grid, tile, halo, st.align, self.n_dev)
                if best is None or work < best[0]:
                    best = (work, tile)
            slack = 1.0 if used <= budget else 0.97
            tile = _best_tile(
                grid, halo, st.align, slack * max(budget, 0) * math.prod(tile) / used, self.n_dev
            )
        return best[1] if best else tile

    def work(self, plan: Plan) -> float:
        """FLOPs the plan executes (halos, recomputed enc1 and padding tiles included) / FLOPs
        of one whole-image pass (XLA's cost analysis; compiles the whole model at a small size)."""
        return sum(p.flops for p in plan.stages) / (
            self.whole_flops_per_px(plan.padded) * math.prod(plan.padded)
        )

    # -- execution

    def run(
        self,
        xn: np.ndarray,
        plan: Plan,
        progress: Callable[[int, int], None] | None = None,
        padded: np.ndarray | None = None,
    ) -> np.ndarray:
        """Denoise the normalised ``xn: (*S)`` (zero-padded here to ``plan.padded``) -> (*S).
        padded: optionally the caller's zero-padded copy ``(*plan.padded)`` whose crop is
        ``xn``, read as the ``x`` map (not written): no second copy is made."""
        if padded is not None and padded.shape == tuple(plan.padded) and padded.flags.c_contiguous:
            maps = {"x": padded[..., None]}
        else:
            maps = {"x": np.zeros((*plan.padded, 1), np.float32)}
            maps["x"][tuple(slice(0, n) for n in xn.shape)] = xn[..., None]
        total = sum(p.calls for p in plan.stages)
        done = 0
        for i, sp in enumerate(plan.stages):
            name, c = sp.stage.out
            maps[name] = np.empty((*sp.grid, c), np.float32)

            def step(k, done=done):
                if progress:
                    progress(done + k, total)

            self._run_stage(sp, maps, maps[name], step)
            done += sp.calls
            needed = {m for later in plan.stages[i + 1 :] for m, _, _ in later.stage.inputs}
            for m in [m for m in maps if m not in needed and m != "y"]:
                del maps[m]  # p2 after S2, x and h2 after S3: host memory back early
        return maps["y"][tuple(slice(0, n) for n in xn.shape) + (0,)]

    def _run_stage(self, sp: StagePlan, maps: dict, out: np.ndarray, step) -> None:
        kernel = self.compiled(sp.stage, sp.tile)
        groups = [sp.tiles[i : i + sp.batch] for i in range(0, len(sp.tiles), sp.batch)]

        def submit(group):
            args = []
            for name, c, e in sp.stage.inputs:
                batch = np.zeros((sp.batch, *_scale_shape(sp.tile, e), c), np.float32)
                for b, t in enumerate(group):
                    batch[b] = maps[name][_scale_window(t.window, e)]
                args.append(jax.device_put(batch, self.sharding))
            return kernel(self.params, *args)

        def collect(group, result):
            result = np.asarray(result)
            for b, t in enumerate(group):
                out[t.keep] = result[(b, *t.local)]

        pending = None  # dispatch is asynchronous: prepare batch k+1 while k runs
        for k, group in enumerate(groups):
            result = submit(group)
            if pending is not None:
                collect(*pending)
                step(k)
            pending = (group, result)
        collect(*pending)
        step(len(groups))


def _scale_shape(shape, e: int) -> tuple[int, ...]:
    return tuple(n << e if e >= 0 else n >> -e for n in shape)


def _scale_window(window, e: int) -> tuple[slice, ...]:
    f = functools.partial(lambda v: v << e if e >= 0 else v >> -e)
    return tuple(slice(f(s.start), f(s.stop)) for s in window)


@contextlib.contextmanager
def _unscanned():
    """Trace without depth streaming and with unrolled depth taps: the same FLOPs, no loops."""
    _STREAM.append(False)
    try:
        with depth_taps(False):
            yield
    finally:
        _STREAM.pop()


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def _work(grid, tile, halo: int, align: int, n_dev: int) -> float:
    count = math.prod(
        len(tiling.plan_axis(n, t, halo, align).origins) for n, t in zip(grid, tile, strict=True)
    )
    return -(-count // n_dev) * n_dev * (math.prod(tile) + CALL_OVERHEAD)


def _best_tile(
    grid: tuple[int, ...], halo: int, align: int, max_vol: float, n_dev: int
) -> tuple[int, ...]:
    """Tile shape (multiples of ``align``, capped by ``grid``) of volume <= ``max_vol`` that
    minimises the executed volume ``calls * n_dev * (volume + CALL_OVERHEAD)``; the smallest
    tile when none fits."""
    axes = []
    for n in grid:
        smallest = tiling.round_up(2 * halo + align, align)
        sizes = [t for t in range(smallest, n, align)] + [n]
        counts = [len(tiling.plan_axis(n, t, halo, align).origins) for t in sizes]
        axes.append((np.array(sizes, np.float64), np.array(counts, np.float64)))
    vol = functools.reduce(np.multiply.outer, [a[0] for a in axes])
    count = functools.reduce(np.multiply.outer, [a[1] for a in axes])
    work = np.ceil(count / n_dev) * n_dev * (vol + CALL_OVERHEAD)
    work = np.where(vol <= max_vol, work, np.inf)
    if not np.isfinite(work).any():
        idx = np.unravel_index(np.argmin(vol), vol.shape)
    else:
        idx = np.unravel_index(np.argmin(work), work.shape)
    return tuple(int(a[0][i]) for a, i in zip(axes, idx, strict=True))


def is_unet(spec: ModelSpec) -> bool:
    return spec.arch in ("unet", "unet-small")
