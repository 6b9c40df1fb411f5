"""Topaz-Denoise's optional pre-filters that cryoden's own pipeline does not have:
outlier pixel replacement (``--pixel-cutoff``), the inverse Gaussian filter (``--inv-gaussian``)
and spatial-covariance correction (``--deconvolve`` with ``--deconv-patch``), as topaz-em 0.3
defines them (its ``denoise.py`` and ``filters.py``), in NumPy. All act on the normalised
micrograph ``x = (m - mean) / std``, shape ``(H, W)``, and return float32 of the same shape.

Topaz applies its filters as torch ``conv2d`` layers: cross-correlation with zero padding of
``k // 2`` on each side. :func:`correlate` does the same in float64 through FFTs.
"""

from __future__ import annotations

import math

import numpy as np

DECONV_WIDTH = 11  # Topaz's window for the spatial covariance (n = s = 11)


def pixel_cutoff(x: np.ndarray, cutoff: float) -> np.ndarray:
    """Pixels more than ``cutoff`` std from the mean (``|x| > cutoff`` on the normalised image)
    become 0, the mean. ``cutoff <= 0`` leaves ``x`` unchanged. x: (H, W) -> float32 copy."""
    x = np.array(x, dtype=np.float32)
    if cutoff > 0:
        x[(x < -cutoff) | (x > cutoff)] = 0
    return x


def correlate(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``x`` cross-correlated with the odd-sized kernel ``k``, zero-padded so that the output
    has the shape of ``x`` (torch ``conv2d(x, k, padding=k.shape // 2)``).

    x: (H, W), k: (kh, kw) both odd -> float32 (H, W).
    """
    x = np.asarray(x, np.float64)
    k = np.asarray(k, np.float64)[::-1, ::-1]  # correlation = convolution with the flipped kernel
    shape = [a + b - 1 for a, b in zip(x.shape, k.shape, strict=True)]
    full = np.fft.irfft2(np.fft.rfft2(x, shape) * np.fft.rfft2(k, shape), shape)
    (h, w), (ph, pw) = x.shape, (k.shape[0] // 2, k.shape[1] // 2)
    return full[ph : ph + h, pw : pw + w].astype(np.float32)


def gaussian_kernel_2d(sigma: float) -> np.ndarray:
    """Topaz's normalised 2D Gaussian, truncated at 5 sigma: (w, w), w = 1 + 2 ceil(5 sigma)."""
    r = int(math.ceil(5 * sigma))
    t = np.arange(-r, r + 1, dtype=np.float64)
    f = np.exp(-0.5 * (t[:, None] ** 2 + t[None, :] ** 2) / sigma**2)
    return f / f.sum()


def inverse_kernel(w: np.ndarray) -> np.ndarray:
    """Topaz's ``inverse_filter``: the kernel whose spectrum is ``1 / spectrum(w)`` on the
    kernel's own grid. w: (n, n) centred -> (n, n) centred."""
    spectrum = np.fft.rfft2(np.fft.ifftshift(w))
    return np.fft.fftshift(np.fft.irfft2(1 / spectrum, s=w.shape))


def inv_gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """Inverse Gaussian filter of ``sigma`` px (Topaz ``InvGaussianFilter``): correlate with
    the inverse of the normalised Gaussian of :func:`gaussian_kernel_2d`. x: (H, W) -> float32.

    topaz-em 0.3.20 defines this filter but cannot build it (its constructor fails), so its
    ``--inv-gaussian`` stops with a TypeError; here it runs.
    """
    x = np.asarray(x, np.float32)
    if sigma <= 0:
        return x
    return correlate(x, inverse_kernel(gaussian_kernel_2d(sigma)).astype(np.float32))


def spatial_covariance(x: np.ndarray, n: int = DECONV_WIDTH) -> np.ndarray:
    """Topaz's ``spatial_covariance``: ``cov[a, b] = mean(x_c * x[a:a+h, b:b+w])`` where
    ``x_c = x[p:-p, p:-p]`` (p = n // 2, size h x w), for shifts a, b in 0..n-1.

    x: (H, W) with H, W > 2p -> (n, n) float64.
    """
    x = np.asarray(x, np.float64)
    p = n // 2
    if min(x.shape) <= 2 * p:
        raise ValueError(
            f"spatial covariance needs regions larger than {2 * p} px, got {x.shape[0]}x"
            f"{x.shape[1]} (use a smaller --deconv-patch)"
        )
    xc = x[p:-p, p:-p]
    h, w = xc.shape
    cov = np.empty((n, n))
    for a in range(n):
        for b in range(n):
            cov[a, b] = np.vdot(x[a : a + h, b : b + w], xc)
    return cov / xc.size


def unblur_kernel(x: np.ndarray, n: int = DECONV_WIDTH) -> np.ndarray:
    """Topaz's ``estimate_unblur_filter``: the (n, n) kernel that flattens the power spectrum
    estimated from ``x``'s spatial covariance (non-positive powers and the zero frequency set
    to 1). x: (H, W) -> (n, n) float32."""
    ps = np.fft.fft2(np.fft.ifftshift(spatial_covariance(x, n))).real
    ps[ps <= 0] = 1
    ps[0, 0] = 1
    return np.fft.fftshift(np.fft.ifft2(1 / np.sqrt(ps))).real.astype(np.float32)


def deconvolve(x: np.ndarray, patch: int = 1, n: int = DECONV_WIDTH) -> np.ndarray:
    """Topaz's ``correct_spatial_covariance``: decorrelate the noise of ``x`` with
    :func:`unblur_kernel`, estimated on the whole image (``patch`` 1) or separately on each of
    ``patch x patch`` blocks (the first ``H % patch`` rows of blocks one pixel taller, likewise
    for columns), each block seen with ``n // 2`` pixels of context. x: (H, W) -> float32.
    """
    x = np.asarray(x, np.float32)
    if patch <= 1:
        return correlate(x, unblur_kernel(x, n))
    y = np.zeros_like(x)
    rows, cols = _split(x.shape[0], patch), _split(x.shape[1], patch)
    m = n // 2
    i = 0
    for nr in rows:
        j = 0
        for nc in cols:
            i0, i1 = max(0, i - m), min(x.shape[0], i + nr + m)
            j0, j1 = max(0, j - m), min(x.shape[1], j + nc + m)
            block = deconvolve(x[i0:i1, j0:j1], 1, n)
            y[i : i + nr, j : j + nc] = block[i - i0 : i - i0 + nr, j - j0 : j - j0 + nc]
            j += nc
        i += nr
    return y


def _split(size: int, parts: int) -> list[int]:
    """``size`` into ``parts`` lengths, the first ``size % parts`` one longer."""
    return [size // parts + (k < size % parts) for k in range(parts)]
