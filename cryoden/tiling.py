"""Tile planning (NumPy only): stride-aligned tiles whose kept regions tile the image.

Along each axis of a (padded) image of size ``n`` we place windows ``[o, o + t)`` with origins
``o`` that are multiples of the network stride ``s`` and ``t <= n``. Each window keeps
``[a, b)``; consecutive kept regions abut, the first starts at 0 and the last ends at ``n``.
Every kept boundary that is not an image border lies at least ``margin`` inside its window, so
when ``margin >= halo`` (the receptive-field half-width, see ``ModelSpec.halo``) and ``n`` and
``t`` are multiples of ``s``, the tiled output equals the whole-image output exactly.

A plan is the Cartesian product of the per-axis plans: all tiles have the same shape, so one
compiled kernel serves the whole image.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """Windows along one axis: ``origins[i]`` and kept ``[starts[i], stops[i])``, tile ``size``."""

    size: int
    origins: tuple[int, ...]
    starts: tuple[int, ...]
    stops: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Tile:
    """One tile: ``window`` slices the padded image, ``keep`` slices the output image, ``local``
    slices the tile's own output to the kept part."""

    window: tuple[slice, ...]
    keep: tuple[slice, ...]
    local: tuple[slice, ...]


def round_up(n: int, s: int) -> int:
    return -(-n // s) * s


def plan_axis(n: int, tile: int, margin: int, stride: int) -> AxisPlan:
    """Plan one axis of length ``n`` (a multiple of ``stride``) with windows of ``tile``.

    ``tile`` is rounded up to a multiple of ``stride`` and capped at ``n``; the step between
    origins is the largest multiple of ``stride`` that keeps ``margin`` on both inner sides.
    Raises ValueError when the tile cannot hold two margins plus one stride.
    """
    if n % stride:
        raise ValueError(f"axis length {n} is not a multiple of the stride {stride}")
    t = min(round_up(tile, stride), n)
    if t == n:
        return AxisPlan(t, (0,), (0,), (n,))
    step = (t - 2 * margin) // stride * stride
    if step < stride:
        raise ValueError(
            f"tile {t} px is too small for a margin of {margin} px on each side "
            f"(needs at least {2 * margin + stride} px)"
        )
    count = 1 + math.ceil((n - t) / step)
    origins = [min(i * step, n - t) for i in range(count)]
    # Boundary between window i and i+1: as far from both inner edges as possible.
    cuts = [(origins[i + 1] + margin + origins[i] + t - margin) // 2 for i in range(count - 1)]
    starts = [0, *cuts]
    stops = [*cuts, n]
    return AxisPlan(t, tuple(origins), tuple(starts), tuple(stops))


def plan(shape: tuple[int, ...], tile: tuple[int, ...], margin: int, stride: int) -> list[Tile]:
    """Tiles covering a padded image of ``shape`` (each entry a multiple of ``stride``)."""
    axes = [plan_axis(n, t, margin, stride) for n, t in zip(shape, tile, strict=True)]
    tiles = []
    for idx in itertools.product(*(range(len(a.origins)) for a in axes)):
        window, keep, local = [], [], []
        for a, i in zip(axes, idx, strict=True):
            o, s0, s1 = a.origins[i], a.starts[i], a.stops[i]
            window.append(slice(o, o + a.size))
            keep.append(slice(s0, s1))
            local.append(slice(s0 - o, s1 - o))
        tiles.append(Tile(tuple(window), tuple(keep), tuple(local)))
    return tiles


def tile_shape(tiles: list[Tile]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in tiles[0].window)


def axis_options(n: int, margin: int, stride: int) -> list[tuple[int, int]]:
    """``(tile, count)`` choices along an axis of padded length ``n``: for every reachable
    number of windows, the smallest stride-multiple tile that needs no more (fewest pixels).
    The whole axis (``(n, 1)``) is always one of them."""
    best: dict[int, int] = {1: n}
    smallest = round_up(2 * margin + stride, stride)
    for t in range(smallest, n, stride):
        count = len(plan_axis(n, t, margin, stride).origins)
        best[count] = min(best.get(count, t), t)
    return sorted((t, c) for c, t in best.items())


def call_cost(
    tile: tuple[int, ...], count: int, per_call: int, per_dev: int, overhead_px: float
) -> float:
    """Time of a plan in pixels of one device's work: calls x (its tiles' pixels + overhead).

    ``count`` tiles go ``per_call`` at a time over the devices, ``per_dev`` to each."""
    calls = -(-count // per_call)
    return calls * (per_dev * math.prod(tile) + overhead_px)


def least_work_tile(
    shape: tuple[int, ...],
    margin: int,
    stride: int,
    max_px: float,
    n_dev: int = 1,
    per_dev: int = 1,
    overhead_px: float = 0.0,
) -> tuple[int, ...]:
    """Tile shape of least total cost for a padded image of ``shape`` -> ``tile``.

    The cost is :func:`call_cost`: tiles (margins included) run ``per_dev`` per device and
    call on ``n_dev`` devices, each call costing ``overhead_px`` pixels more. So with several
    devices the plan prefers tile counts that keep them all busy, and an image slightly over
    the budget is cut into the least overlapping tiles, not the largest that fit. Only tiles of
    at most ``max_px`` pixels are allowed (the memory budget per tile); when none is, the
    smallest possible tile is returned. Exhaustive over the per-axis options of
    :func:`axis_options` (a few hundred per axis at most).
    """
    options = [np.array(axis_options(int(n), margin, stride)) for n in shape]
    grids = np.meshgrid(*[o[:, 0] for o in options], indexing="ij")
    counts = np.meshgrid(*[o[:, 1] for o in options], indexing="ij")
    px = np.prod(np.stack(grids).astype(np.float64), axis=0).ravel()
    count = np.prod(np.stack(counts).astype(np.float64), axis=0).ravel()
    calls = np.ceil(count / (n_dev * per_dev))
    cost = calls * (per_dev * px + overhead_px)
    ok = np.flatnonzero(px <= max_px)
    if ok.size == 0:  # nothing fits: the smallest tile
        return tuple(int(o[0, 0]) for o in options)
    # least cost, then fewest tiles, then the largest tile
    i = ok[np.lexsort((-px[ok], count[ok], cost[ok]))[0]]
    return tuple(int(g.ravel()[i]) for g in grids)


def work(shape: tuple[int, ...], tiles: list[Tile]) -> float:
    """Computed pixels (tiles with their margins) per image pixel: 1.0 = one whole pass."""
    return len(tiles) * float(math.prod(tile_shape(tiles))) / float(math.prod(shape))


def waste(shape: tuple[int, ...], tiles: list[Tile]) -> float:
    """Computed pixels per output pixel (1.0 = no overlap): :func:`work`, former name."""
    return work(shape, tiles)
