"""Topaz-Denoise architectures as functional Flax linen modules (channels-last).

Every module takes ``x: (B, *spatial, 1)`` and returns ``(B, *spatial, 1)``; ``spatial`` is
``(H, W)`` for ``ndim=2`` and ``(D, H, W)`` for ``ndim=3``. Submodule and parameter names mirror
Topaz's state-dict keys so the converter only renames and transposes:

    Topaz ``enc1.0.weight`` (O, I, *k)   <->   ``params['enc1']['conv0']['kernel']`` (*k, I, O)
    Topaz ``dec1.4.bias``   (O,)         <->   ``params['dec1']['conv4']['bias']``   (O,)

Architectures are described by :class:`ModelSpec` (a frozen dataclass, JSON-serialisable), so a
weights file carries the spec it needs and :func:`build_model` makes the module.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cryoden.conv import conv

ARCHS = ("unet", "unet-small", "fcnn", "affine")
NF = 48  # Topaz U-net feature width


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Architecture of a denoiser.

    arch: one of ``ARCHS``; ndim: 2 or 3; base_width: first-conv kernel (U-nets, fcnn) or filter
    size (affine); top_width: kernel of the three ``dec1`` convs (U-nets).
    """

    arch: str = "unet"
    ndim: int = 2
    base_width: int = 11
    top_width: int = 5

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; expected one of {ARCHS}")
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim}")
        if self.arch in ("fcnn", "affine") and self.ndim != 2:
            raise ValueError(f"{self.arch} exists in 2D only")
        for w in (self.base_width, self.top_width):
            if w < 1 or w % 2 == 0:
                raise ValueError(f"kernel widths must be odd and positive, got {w}")

    @property
    def levels(self) -> int:
        """Number of 2x poolings (0 for the fully convolutional models)."""
        return {"unet": 5, "unet-small": 3}.get(self.arch, 0)

    @property
    def stride(self) -> int:
        """Total down-sampling factor: sizes that are multiples of it keep every level even."""
        return 2**self.levels

    @property
    def halo(self) -> int:
        """Receptive-field half-width in input pixels on a stride-aligned grid (exact).

        Found by propagating, along one axis, the interval of input indices each feature depends
        on through every conv, pooling, up-sampling and concatenation of the architecture (convs
        are boxes, so one axis is enough). A kept region at least ``halo`` inside a stride-aligned
        tile's edges sees everything it depends on, so tiling reproduces whole-image output.
        """
        return _dependency_halo(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(**{k: d[k] for k in ("arch", "ndim", "base_width", "top_width") if k in d})


def _dependency_halo(spec: ModelSpec) -> int:
    n = 64 * max(spec.stride, 8) + 32 * spec.base_width  # long enough that the centre is free
    lo0 = hi0 = np.arange(n)

    def box(lo, hi, k):
        r = k // 2
        lo_p = np.pad(lo, r, mode="edge")
        hi_p = np.pad(hi, r, mode="edge")
        win = np.lib.stride_tricks.sliding_window_view
        return win(lo_p, 2 * r + 1).min(-1), win(hi_p, 2 * r + 1).max(-1)

    if spec.arch == "affine":
        return spec.base_width // 2
    if spec.arch == "fcnn":
        return 3 * (spec.base_width // 2)
    lo, hi = box(lo0, hi0, spec.base_width)
    skips = [(lo0, hi0)]
    for i in range(1, spec.levels + 1):
        if i > 1:
            lo, hi = box(lo, hi, 3)
        m = len(lo) // 2 * 2
        lo, hi = lo[:m].reshape(-1, 2).min(-1), hi[:m].reshape(-1, 2).max(-1)
        skips.append((lo, hi))
    skips.pop()
    lo, hi = box(lo, hi, 3)
    while skips:
        s_lo, s_hi = skips.pop()
        idx = torch_nearest_index(len(lo), len(s_lo))
        lo, hi = np.minimum(lo[idx], s_lo), np.maximum(hi[idx], s_hi)
        for k in (3, 3) if skips else (spec.top_width,) * 3:
            lo, hi = box(lo, hi, k)
    j = np.arange(n)
    centre = slice(n // 4, 3 * n // 4)
    return int(max((j - lo)[centre].max(), (hi - j)[centre].max()))


def torch_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of torch ``F.interpolate(mode='nearest', size=n_out)`` along one axis.

    torch (CPU and CUDA) uses ``min(floor(i * float32(n_in / n_out)), n_in - 1)`` in float32,
    with exact shortcuts for equal sizes and for ``n_out == 2 * n_in``.
    """
    if n_out == n_in:
        return np.arange(n_out)
    if n_out == 2 * n_in:
        return np.arange(n_out) >> 1
    scale = np.float32(np.float32(n_in) / np.float32(n_out))
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def upsample_like(h: jax.Array, size: Sequence[int]) -> jax.Array:
    """Nearest up-sampling of ``h: (B, *s, C)`` to ``(B, *size, C)`` with torch's index rule.

    Exact doubling (every level of a stride-multiple input) is a broadcast, not a gather.
    """
    for axis, n_out in enumerate(size, start=1):
        n_in = h.shape[axis]
        if n_out == 2 * n_in:
            h = jnp.repeat(h, 2, axis=axis)
        elif n_out != n_in:
            h = jnp.take(h, jnp.asarray(torch_nearest_index(n_in, n_out)), axis=axis)
    return h


def out_dtype(dtype: Any) -> jnp.dtype:
    """Output dtype of a model computing in ``dtype``: float32, or float64 for a float64 model
    (a float64 run of the same structure is the reference that float32 runs are measured by)."""
    return jnp.promote_types(dtype, jnp.float32)


def max_pool2(h: jax.Array) -> jax.Array:
    """2x max pooling of ``h: (B, *s, C)``, flooring odd sizes like torch ``MaxPool(2)``."""
    nd = h.ndim - 2
    window = (1,) + (2,) * nd + (1,)
    return nn.max_pool(h, window[1:-1], strides=window[1:-1], padding="VALID")


class ConvBlock(nn.Module):
    """Topaz ``nn.Sequential`` of convs, each followed by LeakyReLU(0.1) (optionally not the last).

    Convs are named ``conv{i}`` with ``i`` the torch Sequential index (0, 2, 4: activations sit
    between them), so ``enc1.0`` maps to ``enc1/conv0``. Called with a ``skip`` (decoders), the
    first conv is an :class:`UpConv` that up-samples its input to the skip's size and
    concatenates ``[upsampled, skip]`` first.
    """

    features: Sequence[int]
    kernels: Sequence[int]
    ndim: int
    last_activation: bool = True
    dtype: Any = jnp.float32
    polyphase: bool = True

    @nn.compact
    def __call__(self, h, skip=None):
        n = len(self.features)
        for i, (f, k) in enumerate(zip(self.features, self.kernels, strict=True)):
            if i == 0 and skip is not None:
                up = UpConv(f, k, self.ndim, self.dtype, self.polyphase, name="conv0")
                h = up(h, skip)
            else:
                h = Conv(f, k, self.ndim, self.dtype, name=f"conv{2 * i}")(h)
            if i < n - 1 or self.last_activation:
                h = nn.leaky_relu(h, 0.1)
        return h


def _phase_kernel(kernel: jax.Array, phases: Sequence[int]) -> tuple[jax.Array, list]:
    """Kernel and padding that convolve ``h`` like ``kernel`` convolves ``upsample2(h)`` at one
    output phase (``phases[a]`` = parity of the output index on spatial axis ``a``).

    Output index ``2i + p`` with tap ``t`` (offset ``t - k//2``) reads ``h[i + (p + t - k//2)//2]``,
    so taps reading the same source index are summed: a ``k``-tap axis becomes ``k//2 + 1`` taps.
    """
    pads = []
    for axis, p in enumerate(phases):
        k = kernel.shape[axis]
        src = np.array([(p + t - k // 2) // 2 for t in range(k)])
        lo, hi = int(src.min()), int(src.max())
        gather = np.zeros((hi - lo + 1, k), np.float32)
        gather[src - lo, np.arange(k)] = 1.0
        kernel = jnp.moveaxis(
            jnp.tensordot(jnp.asarray(gather, kernel.dtype), kernel, axes=([1], [axis])), 0, axis
        )
        pads.append((-lo, hi))
    return kernel, pads


class Conv(nn.Module):
    """``nn.Conv`` with zero padding ``k // 2`` (same params: ``kernel (*k, I, O)``, ``bias``),
    computed by :func:`cryoden.conv.conv`. h: (B, *s, I) -> (B, *s, O)."""

    features: int
    kernel_size: int
    ndim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        k = self.kernel_size
        shape = (k,) * self.ndim + (h.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        h = h.astype(self.dtype)
        y = conv(h, kernel.astype(self.dtype), [(k // 2, k // 2)] * self.ndim)
        return y + bias.astype(self.dtype)


class UpConv(nn.Module):
    """First conv of a decoder block: ``conv(concat([upsample(h, skip size), skip]))``.

    Params are exactly ``nn.Conv``'s (``kernel (*k, Ch + Cs, O)``, ``bias (O,)``), so weights
    and names are unchanged. When every spatial axis exactly doubles (all stride-multiple
    inputs), the up-sampled part is computed at ``h``'s resolution in polyphase form: for each
    of the ``2**ndim`` output phases, a convolution of ``h`` with taps summed per source pixel
    (5x5 -> 3x3, 3x3 -> 2x2), interleaved afterwards; the same function with 36-44% of the FLOPs
    of that part. Otherwise torch's nearest rule and a plain convolution (odd sizes).
    h: (B, *s, Ch), skip: (B, *S, Cs) -> (B, *S, O).
    """

    features: int
    kernel_size: int
    ndim: int
    dtype: Any = jnp.float32
    polyphase: bool = True

    @nn.compact
    def __call__(self, h, skip):
        k, nd, dt = self.kernel_size, self.ndim, self.dtype
        c_h = h.shape[-1]
        shape = (k,) * nd + (c_h + skip.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        same = [(k // 2, k // 2)] * nd
        h, skip = h.astype(dt), skip.astype(dt)
        doubles = all(b == 2 * a for a, b in zip(h.shape[1:-1], skip.shape[1:-1], strict=True))
        if not (doubles and self.polyphase):
            up = upsample_like(h, skip.shape[1:-1])
            y = conv(jnp.concatenate([up, skip], axis=-1), kernel.astype(dt), same)
            return y + bias.astype(dt)
        phases = list(itertools.product((0, 1), repeat=nd))
        outs = []
        for ph in phases:
            w, pads = _phase_kernel(kernel[..., :c_h, :].astype(out_dtype(dt)), ph)
            outs.append(conv(h, w.astype(dt), pads))  # taps summed in float32 or float64
        b, *s, o = outs[0].shape
        y = jnp.stack(outs).reshape((2,) * nd + (b, *s, o))  # (2, .., 2, B, *s, O)
        perm = [nd] + [i for a in range(nd) for i in (nd + 1 + a, a)] + [2 * nd + 1]
        y = y.transpose(perm).reshape((b, *(2 * n for n in s), o))
        return y + conv(skip, kernel[..., c_h:, :].astype(dt), same) + bias.astype(dt)


class UNet(nn.Module):
    """Topaz ``UDenoiseNet`` / ``UDenoiseNetSmall`` / ``UDenoiseNet3D`` (Noise2Noise U-net).

    levels=5: enc1..enc5 pooled, enc6 not; dec5..dec2 two convs; dec1 three convs (top kernel).
    levels=3 (small): enc1..enc3 pooled, enc4 not; dec3, dec2; dec1.
    x: (B, *spatial, 1) -> (B, *spatial, 1). Any spatial size >= 1 runs; sizes that are multiples
    of ``2**levels`` are the translation-consistent case (see docs/inference.md).
    """

    ndim: int = 2
    levels: int = 5
    base_width: int = 11
    top_width: int = 5
    dtype: Any = jnp.float32
    polyphase: bool = True

    @nn.compact
    def __call__(self, x):
        blk = dict(ndim=self.ndim, dtype=self.dtype, polyphase=self.polyphase)
        x = x.astype(self.dtype)
        skips = [x]
        h = x
        for i in range(1, self.levels + 1):
            k = self.base_width if i == 1 else 3
            h = max_pool2(ConvBlock((NF,), (k,), name=f"enc{i}", **blk)(h))
            skips.append(h)
        h = ConvBlock((NF,), (3,), name=f"enc{self.levels + 1}", **blk)(h)
        skips.pop()  # the deepest pooled map feeds enc{levels+1} only
        for i in range(self.levels, 1, -1):
            h = ConvBlock((2 * NF, 2 * NF), (3, 3), name=f"dec{i}", **blk)(h, skips.pop())
        t = self.top_width
        h = ConvBlock((64, 32, 1), (t, t, t), last_activation=False, name="dec1", **blk)(
            h, skips.pop()
        )
        return h.astype(out_dtype(self.dtype))


class FCNN(nn.Module):
    """Topaz ``DenoiseNet2(64, width)``: three convs 1->64->64->1, keys ``net.0/2/4``.

    x: (B, H, W, 1) -> (B, H, W, 1).
    """

    width: int = 11
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.width
        h = ConvBlock(
            (64, 64, 1), (w, w, w), ndim=2, last_activation=False, dtype=self.dtype, name="net"
        )(x.astype(self.dtype))
        return h.astype(out_dtype(self.dtype))


class Affine(nn.Module):
    """Topaz ``AffineDenoise``: one ``size`` x ``size`` conv 1->1, keys ``filter.weight|bias``.

    x: (B, H, W, 1) -> (B, H, W, 1).
    """

    size: int = 31
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Conv(1, self.size, 2, self.dtype, name="filter")(x).astype(out_dtype(self.dtype))


def build_model(spec: ModelSpec, dtype: Any = jnp.float32, polyphase: bool = True) -> nn.Module:
    """Flax module for ``spec``; ``dtype`` is the compute dtype (params stay float32; output
    float32, or float64 for ``dtype=float64`` under ``jax_enable_x64``: the reference structure);
    ``polyphase=False`` computes the U-net decoders literally (up-sample, concat, conv)."""
    if spec.arch in ("unet", "unet-small"):
        return UNet(spec.ndim, spec.levels, spec.base_width, spec.top_width, dtype, polyphase)
    if spec.arch == "fcnn":
        return FCNN(spec.base_width, dtype=dtype)
    return Affine(spec.base_width, dtype=dtype)


def init_params(spec: ModelSpec, key: jax.Array) -> dict:
    """Fresh parameters for ``spec`` (a small dummy input; convs are size-independent)."""
    size = max(spec.stride, 8)
    x = jnp.zeros((1,) + (size,) * spec.ndim + (1,), jnp.float32)
    return build_model(spec).init(key, x)["params"]
