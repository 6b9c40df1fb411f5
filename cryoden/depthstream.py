"""Full-resolution 3D U-net blocks streamed over depth slabs (level-wise inference).

A 3D block at full resolution holds feature maps of 32-64 channels (128-256 B per voxel), and
its convolutions several of them at once (the polyphase up-convolution's phases, their
interleaving, the skip convolution, the depth taps): ~1 kB per voxel of the whole tile. Here a
block runs under ``lax.scan`` over slabs of ``s`` depth slices of its output, so only a slab of
each full-resolution map is live; the block's inputs stay whole (they are small or already in
memory). The arithmetic is the block's own (same kernels, same 2D convolutions per depth tap),
and nothing is recomputed:

* the first conv of the block (a plain conv of ``h``, or the up-convolution of a coarse ``h``
  concatenated with ``skip`` in polyphase form, as :class:`cryoden.models.UpConv`) reads its
  slab's window of the zero-padded inputs (a ``'valid'`` conv along depth);
* each later conv ``l`` (radius ``r_l``) keeps a **line buffer**: the last ``2 r_l`` slices of
  its input from the previous step. So conv ``l``'s output lags the slab by
  ``delay_l = r_1 + .. + r_l`` slices; outputs at negative positions (first steps) are set to
  zero, which is the next conv's zero padding, and after the last slab an epilogue appends
  zeros (the padding beyond the end) to finish the last ``delay`` slices of each conv.

Shapes: ``h (B, D, H, W, C)`` (plain) or ``(B, D/2, H/2, W/2, C)`` (up-convolution, with
``skip (B, D, H, W, Cs)``) -> ``(B, D, H, W, F)``, or ``(B, D/2, H/2, W/2, F)`` pooled.
``D`` even; the slab is the largest even divisor of ``D`` up to :data:`SLAB`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cryoden.conv import conv, depth_taps
from cryoden.models import _phase_kernel, max_pool2, out_dtype

SLAB = 8  # most full-resolution depth slices per scan step
# Convs with kd * I up to this many stacked input channels run as one 2D conv (_valid_depth).
STACK_CHANNELS = 16


def slab_depth(d: int) -> int:
    """Slices per step for an output depth ``d`` (even): its largest even divisor <= SLAB."""
    return max(s for s in range(2, min(SLAB, d) + 1, 2) if d % s == 0)


def streamable(h: jax.Array, skip: jax.Array | None, pool: bool, n_convs: int) -> bool:
    """Whether :func:`block` applies: 3D, even output depth, exact doubling for an
    up-convolution, and pooling only after a single conv."""
    if h.ndim != 5 or (pool and n_convs != 1):
        return False
    if skip is None:
        return h.shape[1] % 2 == 0
    return skip.ndim == 5 and all(
        b == 2 * a for a, b in zip(h.shape[1:-1], skip.shape[1:-1], strict=True)
    )


def _valid_depth(h, kernel, bias, dtype):
    """'Valid' along depth, 'same' in-plane: (B, s + 2r, H, W, I) -> (B, s, H, W, O).

    With few input channels (``enc1``: one, 7 depth taps) the depth shifts are stacked as
    channels of one 2D convolution (kernel ``(kh, kw, kd * I, O)``) instead of a sum of ``kd``
    2D convolutions, each with its own ``O``-channel output."""
    kd, kh, kw, c_in, c_out = kernel.shape
    pads = [(kh // 2, kh // 2), (kw // 2, kw // 2)]
    h, kernel = h.astype(dtype), kernel.astype(dtype)
    if kd > 1 and kd * c_in <= STACK_CHANNELS:
        b, n, rows, cols, _ = h.shape
        s = n - kd + 1
        stacked = jnp.concatenate([h[:, j : j + s] for j in range(kd)], axis=-1)
        k2d = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kd * c_in, c_out)
        y = conv(stacked.reshape(b * s, rows, cols, kd * c_in), k2d, pads)
        y = y.reshape(b, s, rows, cols, c_out)
    else:
        with depth_taps(False):  # a slab is small: the faster unrolled tap sum
            y = conv(h, kernel, [(0, 0), *pads])
    return y + bias.astype(dtype)


def _window(h: jax.Array, start, n: int) -> jax.Array:
    """Depth slices ``start .. start + n - 1`` of ``h (B, D, ..)``, zeros outside ``[0, D)``
    (the conv's zero padding, without a padded copy of ``h``) -> (B, n, ..)."""
    idx = start + jnp.arange(n)
    inside = (idx >= 0) & (idx < h.shape[1])
    win = jnp.take(h, jnp.clip(idx, 0, h.shape[1] - 1), axis=1)
    return jnp.where(inside.reshape((1, n) + (1,) * (h.ndim - 2)), win, jnp.zeros((), h.dtype))


def _first_conv(p, h, skip, s: int, dtype):
    """The block's first conv as a function of the step index: slab ``k`` -> (B, s, H, W, O)
    (pre-activation, bias added)."""
    kernel, bias = p["kernel"], p["bias"]
    k = kernel.shape[0]
    r = k // 2
    if skip is None:
        return lambda i: _valid_depth(_window(h, i * s - r, s + 2 * r), kernel, bias, dtype)
    c_h, nd = h.shape[-1], 3
    phases = list(itertools.product((0, 1), repeat=nd))
    pk = [_phase_kernel(kernel[..., :c_h, :].astype(out_dtype(dtype)), ph) for ph in phases]
    g = max(0, *(max(pads[0]) for _, pads in pk))  # coarse slices read beyond the slab
    skip_kernel = kernel[..., c_h:, :]

    def f(i):
        # coarse indices [i s/2 - g, i s/2 + s/2 + g): the slab's coarse rows with g either side
        win = _window(h, i * (s // 2) - g, s // 2 + 2 * g).astype(dtype)
        outs = []
        for w, pads in pk:  # taps summed in float32 or float64, as UpConv
            lo, hi = pads[0]
            sub = win[:, g - lo : g + s // 2 + hi]
            with depth_taps(False):
                outs.append(conv(sub, w.astype(dtype), [(0, 0), *pads[1:]]))
        b, *sh, o = outs[0].shape
        y = jnp.stack(outs).reshape((2,) * nd + (b, *sh, o))
        perm = [nd] + [j for a in range(nd) for j in (nd + 1 + a, a)] + [2 * nd + 1]
        y = y.transpose(perm).reshape((b, *(2 * n for n in sh), o))
        sw = _window(skip, i * s - r, s + 2 * r)
        return y + _valid_depth(sw, skip_kernel, bias, dtype)

    return f


def block(
    params: dict,
    kernels: Sequence[int],
    h: jax.Array,
    skip: jax.Array | None,
    last_activation: bool,
    dtype: Any,
    pool: bool = False,
) -> jax.Array:
    """A :class:`cryoden.models.ConvBlock` (parameters ``params['conv0']``, ``['conv2']``, ..)
    applied slab by slab (module doc); ``pool``: followed by ``max_pool2`` (one conv only)."""
    d, rows, cols = (skip if skip is not None else h).shape[1:4]
    b = h.shape[0]
    s = slab_depth(d)
    n_convs = len(kernels)
    first = _first_conv(params["conv0"], h, skip, s, dtype)
    layers = [params[f"conv{2 * i}"] for i in range(1, n_convs)]
    radii = [k // 2 for k in kernels[1:]]

    def act(y, i):
        return nn.leaky_relu(y, 0.1) if i < n_convs - 1 or last_activation else y

    total = sum(radii)  # the last conv's lag behind the slab
    in_place = 0 < total <= s  # write each slab into the output (no final concatenation)

    def step(carry, i):
        bufs, out = carry
        a = act(first(i), 0)
        new, delay = [], 0
        for j, (p, r) in enumerate(zip(layers, radii, strict=True), start=1):
            buf = jnp.concatenate([bufs[j - 1], a], axis=1) if r else a
            new.append(buf[:, buf.shape[1] - 2 * r :])
            a = act(_valid_depth(buf, p["kernel"], p["bias"], dtype), j)
            delay += r
            if j < n_convs - 1:  # negative positions are the next conv's zero padding
                pos = i * s - delay + jnp.arange(s)
                a = jnp.where((pos >= 0)[None, :, None, None, None], a, jnp.zeros((), a.dtype))
        if not in_place:
            return (tuple(new), out), max_pool2(a) if pool else a
        # a: positions [i s - total, i s + s - total); the first slab's are written from 0
        # (its last `total` slices are wrong until the next slab overwrites them)
        a = jnp.where(i == 0, jnp.roll(a, -total, axis=1), a)
        out = jax.lax.dynamic_update_slice_in_dim(out, a, jnp.maximum(i * s - total, 0), axis=1)
        return (tuple(new), out), None

    widths = [params[f"conv{2 * i}"]["kernel"].shape[-1] for i in range(n_convs - 1)]
    bufs = tuple(
        jnp.zeros((b, 2 * r, rows, cols, c), dtype) for r, c in zip(radii, widths, strict=True)
    )
    f_out = params[f"conv{2 * (n_convs - 1)}"]["kernel"].shape[-1]
    out = jnp.zeros((b, d, rows, cols, f_out) if in_place else (0,), dtype)
    (bufs, out), ys = jax.lax.scan(step, (bufs, out), jnp.arange(d // s))
    if not in_place:
        y = jnp.moveaxis(ys, 0, 1)
        y = y.reshape((b, y.shape[1] * y.shape[2], *y.shape[3:]))
        if not total:
            return y
    # epilogue: the last `delay` slices of each conv, with the zero padding beyond the end
    a, delay = None, 0
    for j, (p, r, buf) in enumerate(zip(layers, radii, bufs, strict=True), start=1):
        if a is None and not r:
            continue  # nothing left to finish
        parts = [buf] + ([a] if a is not None else []) + [jnp.zeros_like(buf[:, :r])]
        a = act(_valid_depth(jnp.concatenate(parts, axis=1), p["kernel"], p["bias"], dtype), j)
        delay += r
    if in_place:
        return jax.lax.dynamic_update_slice_in_dim(out, a, d - total, axis=1)
    return jnp.concatenate([y[:, delay:], a], axis=1)
