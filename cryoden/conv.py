"""Stride-1 convolutions for the models, with CPU-specific forms that XLA:CPU runs faster.

``conv(h, kernel, pads)`` is the only entry point: channels-last ``h (B, *s, I)``, kernel
``(*k, I, O)``, explicit zero padding per spatial axis, output ``(B, *s_out, O)``. On GPU/TPU it
is XLA's native convolution. On CPU these rewrites apply, each the same arithmetic as the
native convolution (equal to float rounding, tested in ``tests/test_conv.py``; speed-ups measured
with ``scripts/bench_train.py``, see docs/benchmarks.md):

* A 3D convolution is a sum over its depth taps of 2D convolutions on ``(B * D, H, W, I)``
  slices: XLA:CPU's 2D kernels are several times faster than its 3D ones. Inference sums the
  taps one at a time (``lax.scan``, half the memory) unless traced in ``depth_taps(False)``
  (the depth slabs of :mod:`cryoden.depthstream`); training unrolled (faster).
* Convolutions to one output channel are a matrix product and a shifted sum
  (:func:`_conv_one_out`), ~4x faster.
* Narrow images (rows under ``MOSAIC_WIDTH / 2``) are convolved side by side in one wide row
  (:func:`_conv2d_wide`): XLA:CPU runs ~1.7x faster on rows of >= 256 pixels.
* Kernel gradients (the training backward pass) are sums over independent blocks of ~8k
  output pixels (:func:`kernel_grad`). XLA:CPU computes a kernel gradient as one convolution
  whose contraction runs over every pixel of the batch, on one core at 15-60 GFLOP/s; in
  blocks it is cache-resident and uses every core, 2-5x faster. With few output channels the
  operands swap roles (~20x faster for one output).
* Data gradients are computed as convolutions of the same form (flipped, transposed kernel),
  not by autodiff through the rewrites above.

Inside :func:`spatial_split` (traced under ``shard_map``, see :mod:`cryoden.spatial`) every
convolution first takes its zero-padding rows along the split axis from the neighbouring devices'
slabs (``lax.ppermute``; the end devices receive zeros, the image's own zero padding), so a model
run on slabs computes the whole image's convolutions exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Pads = tuple[tuple[int, int], ...]

# Kernel-gradient blocking: aim for this many output pixels per block, and at most this many
# blocks per convolution (each block is one XLA op: more blocks, longer compiles).
BLOCK_PIXELS = 8192
MAX_BLOCKS = 32
# Narrow images are convolved side by side in rows of up to this many pixels (_conv2d_wide).
MOSAIC_WIDTH = 520
# Kernel gradients of convs with fewer output channels than this (and than inputs) are
# computed with the operands swapped (_kernel_grad_cpu).
FEW_OUT = 8


@dataclasses.dataclass(frozen=True)
class Split:
    """A spatial split active while tracing under ``shard_map``: spatial axis ``axis`` (0-based,
    after the batch axis) of every feature map is cut into equal slabs over the ``n_dev``
    devices of mesh axis ``axis_name``. At full resolution a slab has ``local`` positions and
    the image's first ``valid`` positions (along that axis, over all slabs) are real; the rest
    (an extension up to ``n_dev * local``) is treated as zeros by every convolution."""

    axis_name: str
    axis: int
    n_dev: int
    local: int
    valid: int


_SPLITS: list[Split] = []
_DEPTH_SCAN: list[bool] = [True]


@contextlib.contextmanager
def depth_taps(scan: bool):
    """Trace inference 3D convolutions (CPU) inside this block with the depth taps summed one
    at a time under ``lax.scan`` (``scan=True``, the default: ~0.4x the memory, ~15% slower)
    or unrolled (``False``: faster where the memory is there; :func:`_conv3d_as_slices`)."""
    _DEPTH_SCAN.append(bool(scan))
    try:
        yield
    finally:
        _DEPTH_SCAN.pop()


@contextlib.contextmanager
def spatial_split(split: Split):
    """Trace convolutions as slab-wise with halo exchange (module doc) inside this block."""
    _SPLITS.append(split)
    try:
        yield
    finally:
        _SPLITS.pop()


def _exchange_halos(h: jax.Array, pads: Pads, split: Split) -> tuple[jax.Array, Pads]:
    """``h``'s slab (B, *s, I) with ``lo``/``hi`` rows of the neighbouring slabs attached along
    the split axis (zeros beyond the image) -> (slab with halos, pads with (0, 0) there).

    The slab's resolution relative to full resolution is ``s[axis] / split.local``; positions
    at or beyond the valid length at that resolution are zeroed first."""
    a, name, n = split.axis + 1, split.axis_name, split.n_dev
    n_loc = h.shape[a]
    lo, hi = pads[split.axis]
    if max(lo, hi) > n_loc:
        raise ValueError(f"slab of {n_loc} px is narrower than a conv halo of {max(lo, hi)} px")
    if split.valid < n * split.local:
        valid = split.valid * n_loc // split.local
        pos = jax.lax.axis_index(name) * n_loc + jnp.arange(n_loc)
        shape = [1] * h.ndim
        shape[a] = n_loc
        h = jnp.where((pos < valid).reshape(shape), h, jnp.zeros((), h.dtype))
    parts = []
    if lo:  # the previous slab's last rows; device 0 receives zeros
        tail = jax.lax.slice_in_dim(h, n_loc - lo, n_loc, axis=a)
        parts.append(jax.lax.ppermute(tail, name, [(i, i + 1) for i in range(n - 1)]))
    parts.append(h)
    if hi:  # the next slab's first rows; the last device receives zeros
        head = jax.lax.slice_in_dim(h, 0, hi, axis=a)
        parts.append(jax.lax.ppermute(head, name, [(i + 1, i) for i in range(n - 1)]))
    h = jnp.concatenate(parts, axis=a) if len(parts) > 1 else h
    pads = tuple((0, 0) if i == split.axis else p for i, p in enumerate(pads))
    return h, pads


def conv(h: jax.Array, kernel: jax.Array, pads: Sequence[tuple[int, int]]) -> jax.Array:
    """Stride-1 cross-correlation (torch/XLA convention), channels-last.

    h: (B, *s, I); kernel: (*k, I, O); pads: ((lo, hi),) per spatial axis, zeros.
    Returns (B, *s_out, O) with ``s_out = s + lo + hi - k + 1``. Inside :func:`spatial_split`,
    ``h`` is one slab and the padding along the split axis comes from the neighbouring slabs.
    """
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if _SPLITS:
        h, pads = _exchange_halos(h, pads, _SPLITS[-1])
    if jax.default_backend() != "cpu":
        return _xla_conv(h, kernel, pads)
    return _conv_cpu(h, kernel, pads)


def _xla_conv(h: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
    nd = h.ndim - 2
    spec = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NDHWC", "DHWIO", "NDHWC")
    return jax.lax.conv_general_dilated(h, kernel, (1,) * nd, pads, dimension_numbers=spec)


def _forward_cpu(h: jax.Array, kernel: jax.Array, pads: Pads, scan: bool = False) -> jax.Array:
    """The CPU forward form for these shapes (every form computes the same convolution);
    ``scan``: 3D depth taps one at a time (less memory, slower; :func:`_conv3d_as_slices`)."""
    taps, c_in, c_out = math.prod(kernel.shape[:-2]), kernel.shape[-2], kernel.shape[-1]
    if c_out == 1 and taps <= 2 * c_in:
        return _conv_one_out(h, kernel, pads)
    if h.ndim == 5:
        return _conv3d_as_slices(h, kernel, pads, scan)
    return _conv2d_wide(h, kernel, pads)


def _conv_one_out(h: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
    """Convolution to one output channel (the U-nets' last conv) as a matrix product and a
    shifted sum: ``z = h @ W`` gives each pixel's contribution to every tap (a few dozen
    values), then the output sums ``z`` shifted by each tap. XLA:CPU runs 1-output convolutions
    ~4x slower than this. h: (B, *s, I); kernel: (*k, I, 1) -> (B, *s_out, 1).
    """
    k = kernel.shape[:-2]
    z = jnp.einsum("...i,ti->...t", h, kernel.reshape(-1, kernel.shape[-2]))  # (B, *s, taps)
    zp = jax.lax.pad(
        z, jnp.zeros((), z.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
    )
    s_out = [n + lo + hi - kk + 1 for n, (lo, hi), kk in zip(h.shape[1:-1], pads, k, strict=True)]
    y = None
    for t, offsets in enumerate(itertools.product(*map(range, k))):
        window = tuple(slice(o, o + n) for o, n in zip(offsets, s_out, strict=True))
        part = zp[(slice(None), *window, slice(t, t + 1))]
        y = part if y is None else y + part
    return y


def _conv2d_wide(h: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
    """2D convolution of narrow images laid side by side: h (N, H, W, I) -> (N, H', W', O).

    XLA:CPU's 2D convolution runs ~1.7x faster on rows of >= 256 pixels than on rows of 64-128
    (the 3D U-net's slices, the 2D U-net's deeper levels). So ``g`` images, each zero-padded
    in width, are placed side by side in one row, convolved with no width padding, and cut
    apart again: the zero gutters keep every output reading only its own image.
    """
    n, rows, w, c = h.shape
    (lo, hi), kw = pads[1], kernel.shape[1]
    wp = w + lo + hi
    g = _mosaic_factor(n, wp)
    if g == 1:
        return _xla_conv(h, kernel, pads)
    hp = jax.lax.pad(h, jnp.zeros((), h.dtype), [(0, 0, 0), (0, 0, 0), (lo, hi, 0), (0, 0, 0)])
    wide = hp.reshape(n // g, g, rows, wp, c).transpose(0, 2, 1, 3, 4)
    y = _xla_conv(wide.reshape(n // g, rows, g * wp, c), kernel, (pads[0], (0, kw - 1)))
    r_out, o = y.shape[1], y.shape[-1]
    y = y.reshape(n // g, r_out, g, wp, o)[:, :, :, : wp - kw + 1]
    return y.transpose(0, 2, 1, 3, 4).reshape(n, r_out, wp - kw + 1, o)


def _mosaic_factor(n: int, width: int) -> int:
    """Images per row for :func:`_conv2d_wide`: the largest divisor of ``n`` whose row stays
    within ``MOSAIC_WIDTH`` pixels (1 when images are already wide)."""
    if width * 2 > MOSAIC_WIDTH:
        return 1
    return max(g for g in range(1, min(n, MOSAIC_WIDTH // width) + 1) if n % g == 0)


def _conv3d_as_slices(h: jax.Array, kernel: jax.Array, pads: Pads, scan: bool = False) -> jax.Array:
    """3D convolution as ``sum_j conv2d(depth slices j.., kernel[j])``: h (B, D, H, W, I),
    kernel (kd, kh, kw, I, O) -> (B, D_out, H_out, W_out, O).

    Unrolled, XLA fuses the sum into one pass after all ``kd`` 2D convolutions, so every depth
    shift of the input and every tap's output are live at once (~2.5 kB per voxel for the 3D
    U-net). ``scan=True`` sums the taps under ``lax.scan`` (tap 0 starts the sum, taps 1.. are
    the steps, in order: the same sum, bitwise): one shift and one 2D convolution live at a
    time, ~1.06 kB per voxel, but ~15% slower on XLA:CPU (one add pass and one input copy per
    tap, the taps run one after another). Inference uses it (memory sets its tile sizes), the
    training step does not (see :func:`_with_cpu_backward`).
    """
    (lo, hi), kd = pads[0], kernel.shape[0]
    b, d, hh, ww, c = h.shape
    hp = jax.lax.pad(h, jnp.zeros((), h.dtype), [(0, 0, 0), (lo, hi, 0)] + [(0, 0, 0)] * 3)
    d_out = d + lo + hi - kd + 1

    def tap(j, k2d):  # the contribution of depth tap j: (B * D_out, H_out, W_out, O)
        if isinstance(j, int):
            shifted = hp[:, j : j + d_out]
        else:
            shifted = jax.lax.dynamic_slice_in_dim(hp, j, d_out, axis=1)
        return _conv2d_wide(shifted.reshape(b * d_out, hh, ww, c), k2d, pads[1:])

    y = tap(0, kernel[0])
    if scan and kd > 1:
        step = lambda acc, jk: (acc + tap(*jk), None)  # noqa: E731
        y, _ = jax.lax.scan(step, y, (jnp.arange(1, kd), kernel[1:]))
    else:
        for j in range(1, kd):
            y = y + tap(j, kernel[j])
    return y.reshape((b, d_out) + y.shape[1:])


def _flip(kernel: jax.Array) -> jax.Array:
    """Kernel of the data gradient: spatially flipped, in/out swapped. (*k, I, O) -> (*k, O, I)."""
    nd = kernel.ndim - 2
    return jnp.flip(kernel, axis=tuple(range(nd))).swapaxes(-1, -2)


def _transposed_pads(kernel_shape: Sequence[int], pads: Pads) -> Pads:
    """Pads of the data gradient's convolution, which maps the output size back to the input's."""
    return tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel_shape, pads, strict=False))


def blocks(b: int, d: int, rows: int, cols: int) -> list[tuple[int, int, int, int, int]]:
    """Split a ``(b, d, rows, cols)`` output into blocks ``(i, d0, d1, r0, r1)`` (volume ``i``,
    slices ``d0:d1``, rows ``r0:r1``) of about ``BLOCK_PIXELS`` pixels, at most ``MAX_BLOCKS``
    (but at least one per volume): runs of whole slices when slices are small, runs of rows of
    one slice when they are large. The blocks tile the output exactly once."""
    n = min(MAX_BLOCKS, max(1, math.ceil(b * d * rows * cols / BLOCK_PIXELS)))
    per_volume = max(1, n // b)
    if per_volume <= d:
        run = math.ceil(d / per_volume)
        return [(i, d0, min(d, d0 + run), 0, rows) for i in range(b) for d0 in range(0, d, run)]
    run = math.ceil(rows / (per_volume // d))
    return [
        (i, j, j + 1, r0, min(rows, r0 + run))
        for i in range(b)
        for j in range(d)
        for r0 in range(0, rows, run)
    ]


def kernel_grad(h: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], pads: Pads) -> jax.Array:
    """Gradient of the 3D ``conv(h, W, pads)`` with respect to ``W``, given its output cotangent.

    h: (B, D, H, W, I); dy: (B, D_out, H_out, W_out, O); kernel_shape: (kd, kh, kw, I, O).
    Returns (kd, kh, kw, I, O) in ``h``'s dtype: the sum over :func:`blocks` of XLA's 2D kernel
    gradient of each block, whose input is the block's window of the padded ``h`` with the
    ``kd`` depth shifts stacked as channels (so each block is one small, independent op).
    """
    kd, kh, kw, c_in, c_out = kernel_shape
    (lo_d, hi_d), (lo_h, hi_h), pads_w = pads
    zero = jnp.zeros((), h.dtype)
    hp = jax.lax.pad(h, zero, [(0, 0, 0), (lo_d, hi_d, 0), (lo_h, hi_h, 0), (0, 0, 0), (0, 0, 0)])
    w0 = jnp.zeros((kh, kw, kd * c_in, c_out), h.dtype)
    total = None
    for i, d0, d1, r0, r1 in blocks(*dy.shape[:4]):
        x = jnp.concatenate([hp[i, d0 + j : d1 + j, r0 : r1 + kh - 1] for j in range(kd)], -1)
        _, vjp = jax.vjp(lambda w, x=x: _xla_conv(x, w, ((0, 0), pads_w)), w0)
        (g,) = vjp(dy[i, d0:d1, r0:r1])
        total = g if total is None else total + g
    return total.reshape(kh, kw, kd, c_in, c_out).transpose(2, 0, 1, 3, 4)


def _kernel_grad_cpu(h, dy, kernel_shape, pads):
    """Kernel gradient of a 2D or 3D convolution: h (B, *s, I), dy (B, *s_out, O) -> (*k, I, O).

    A 2D convolution over a batch is a 3D one over a single volume with a depth-1 kernel. With
    few output channels (the last conv), the roles of ``h`` and ``dy`` are swapped: the kernel
    gradient is symmetric in them (that of the data gradient's convolution, whose cotangent is
    ``h``, flipped and transposed), and XLA:CPU computes it ~20x faster with ``dy`` as the input.
    """
    *k, c_in, c_out = kernel_shape
    if c_out < min(c_in, FEW_OUT):
        swapped = _kernel_grad_cpu(dy, h, (*k, c_out, c_in), _transposed_pads(k, pads))
        return _flip(swapped)
    if h.ndim == 5:
        return kernel_grad(h, dy, kernel_shape, pads)
    return kernel_grad(h[None], dy[None], (1, *kernel_shape), ((0, 0), *pads))[0]


def _with_cpu_backward(forward, grad_kernel):
    """``forward(h, kernel, pads, scan)`` with a custom backward pass: the data gradient is the
    same kind of convolution (of ``dy`` with the flipped, transposed kernel; for 3D this
    replaces autodiff through the depth slicing, which makes large copies), the kernel gradient
    is ``grad_kernel`` (blockwise, see :func:`kernel_grad`).

    Not differentiated (inference), the forward sums 3D depth taps one at a time
    (``scan=True``: half the memory, where memory sets the tile size) unless traced inside
    ``depth_taps(False)``; differentiated (the training step: its forward and data gradient),
    it keeps the faster unrolled sum."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def f(h, kernel, pads):
        return forward(h, kernel, pads, scan=_DEPTH_SCAN[-1])

    def fwd(h, kernel, pads):
        return forward(h, kernel, pads), (h, kernel)

    def bwd(pads, res, dy):
        h, kernel = res
        dh = forward(dy, _flip(kernel), _transposed_pads(kernel.shape, pads))
        return dh, grad_kernel(h, dy, kernel.shape, pads).astype(kernel.dtype)

    f.defvjp(fwd, bwd)
    return f


_conv_cpu = _with_cpu_backward(_forward_cpu, _kernel_grad_cpu)
