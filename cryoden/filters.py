"""Classical pre/post filters used around the networks (Topaz conventions, docs/inference.md)."""

from __future__ import annotations

import math

import numpy as np


def lowpass(x: np.ndarray, factor: float) -> np.ndarray:
    """Hard low-pass by a binning ``factor``: zero every Fourier component with
    ``|frequency| > 0.5 / factor`` (cycles/px) on any axis. ``x: (H, W)`` or ``(D, H, W)``.
    Returns float32 of the same shape; ``factor <= 1`` returns ``x`` unchanged (as float32).
    """
    x = np.asarray(x, dtype=np.float32)
    if factor <= 1:
        return x
    freqs = [np.fft.fftfreq(n) for n in x.shape[:-1]] + [np.fft.rfftfreq(x.shape[-1])]
    mask = np.zeros([len(f) for f in freqs], dtype=bool)
    for axis, f in enumerate(freqs):
        shape = [1] * x.ndim
        shape[axis] = -1
        mask |= (np.abs(f) > 0.5 / factor).reshape(shape)
    spectrum = np.fft.rfftn(x)
    spectrum[mask] = 0
    return np.fft.irfftn(spectrum, s=x.shape, axes=range(x.ndim)).astype(np.float32)


def gaussian_kernel_1d(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian truncated at 5 sigma: length ``1 + 2 * ceil(5 * sigma)``.

    The N-d kernel is the outer product of these, which equals Topaz's normalised N-d kernel.
    """
    r = int(math.ceil(5 * sigma))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * t**2 / sigma**2)
    return k / k.sum()


def gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian filter with zero padding at the borders (like a padded torch conv).

    ``x: (H, W)`` or ``(D, H, W)`` -> float32, same shape. Separable, applied axis by axis with
    FFT convolution, so cost does not grow with sigma.
    """
    x = np.asarray(x, dtype=np.float32)
    if sigma <= 0:
        return x
    k = gaussian_kernel_1d(sigma)
    r = len(k) // 2
    out = x.astype(np.float64)
    for axis in range(x.ndim):
        n = out.shape[axis]
        size = n + 2 * r
        fk = np.fft.rfft(k, size)
        shape = [1] * x.ndim
        shape[axis] = -1
        conv = np.fft.irfft(np.fft.rfft(out, size, axis=axis) * fk.reshape(shape), size, axis=axis)
        out = np.take(conv, np.arange(r, r + n), axis=axis)
    return out.astype(np.float32)
