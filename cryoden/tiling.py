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


def auto_tile(
    shape: tuple[int, ...], margin: int, stride: int, budget_px: int, min_tiles: int = 1
) -> tuple[int, ...]:
    """Largest tile (each side a multiple of ``stride``, capped by the image) of <= ``budget_px``.

    The whole (padded) image when it fits and ``min_tiles`` is 1. Otherwise the tile side ``t``
    is the largest for which ``prod(min(t, n_i))`` fits, so short axes (a thin tomogram's depth)
    are kept whole and the long ones are cut. With ``min_tiles > 1`` (several devices), ``t``
    shrinks until there are enough tiles to keep every device busy.
    """
    n = [int(v) for v in shape]
    if math.prod(n) <= budget_px and min_tiles <= 1:
        return tuple(n)
    smallest = round_up(2 * margin + stride, stride)

    def tile_of(t: int) -> tuple[int, ...]:
        return tuple(min(t, v) for v in n)

    t = smallest
    while t + stride <= max(n) and math.prod(tile_of(t + stride)) <= budget_px:
        t += stride
    while (
        min_tiles > 1
        and t > smallest
        and len(plan(tuple(n), tile_of(t), margin, stride)) < min_tiles
    ):
        t -= stride
    return tile_of(t)


def waste(shape: tuple[int, ...], tiles: list[Tile]) -> float:
    """Computed pixels per output pixel (1.0 = no overlap)."""
    return len(tiles) * float(np.prod(tile_shape(tiles))) / float(np.prod(shape))
