"""Measures of denoising without ground truth (pure NumPy, no I/O): split SNR, FRC, the
per-frequency signal-correlation estimate, held-out Noise2Noise loss, seam score, region SNR.

Definitions (docs/evaluate.md, docs/snr.md). ``even``/``odd`` are the two raw halves of one
exposure (signal + independent noise of equal power); ``d_even``/``d_odd`` are what a method
made of each (for ``raw``: the halves themselves). Images are ``(H, W)`` or volumes
``(D, H, W)``; every pair of arrays compared has one shape. Sums run in float64.

* split SNR (Bepler et al. 2020, Methods): ``p1 = CCC(d_odd, even)``, ``p2 = CCC(d_even, odd)``;
  each direction gives ``10 log10(p / (1 - p))`` dB; the split SNR is the mean of the two dB
  values. For ``raw`` both directions are ``CCC(even, odd)``: the per-half SNR estimate.
* FRC between a denoised half and the raw other half, per frequency shell, both directions
  averaged; the signal-correlation estimate divides it by ``sqrt(FRC(even, odd))``.
* held-out N2N loss: ``mean((d_odd - even)^2) / var(even)``, both directions averaged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.fft


def ccc(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation coefficient of two arrays of one shape (float64 sums)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else math.nan


def snr_db(p: float) -> float:
    """Split-method SNR in dB of a correlation ``p``: ``10 log10(p / (1 - p))``.

    ``p <= 0`` (no signal seen) gives ``-inf``; ``p >= 1`` gives ``+inf``; NaN stays NaN."""
    if math.isnan(p):
        return math.nan
    if p <= 0:
        return -math.inf
    if p >= 1:
        return math.inf
    return 10.0 * math.log10(p / (1.0 - p))


def split_snr(
    d_even: np.ndarray, d_odd: np.ndarray, even: np.ndarray, odd: np.ndarray
) -> dict[str, float]:
    """Split SNR of a method: ``d_even``/``d_odd`` (the method applied to each raw half) against
    the raw other half. All four arrays of one shape.

    Returns ``snr_db`` (mean of the two directions' dB), ``snr_db_odd_even`` (denoised odd vs raw
    even), ``snr_db_even_odd`` (denoised even vs raw odd) and their correlations ``p_odd_even``,
    ``p_even_odd``."""
    p1 = ccc(d_odd, even)
    p2 = ccc(d_even, odd)
    s1, s2 = snr_db(p1), snr_db(p2)
    return {
        "snr_db": (s1 + s2) / 2,
        "snr_db_odd_even": s1,
        "snr_db_even_odd": s2,
        "p_odd_even": p1,
        "p_even_odd": p2,
    }


def _shells(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """Shell index of every ``rfftn`` coefficient of an array of ``shape`` and its weight.

    Shell ``k`` holds radial frequencies in ``[k, k + 1) / n`` cycles/px, ``n = min(shape)``;
    ``k = n // 2`` and above (corners beyond Nyquist) are dropped (index -1). The weight is 2 for
    the coefficients that ``rfftn`` stores once for a conjugate pair, so that weighted sums over
    the half spectrum equal sums over the full spectrum. Returns ``(index, weight, n_shells)``,
    both arrays of the ``rfftn`` shape."""
    n = min(shape)
    axes = [np.fft.fftfreq(s) for s in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    r = np.sqrt(sum(g * g for g in grids))
    n_shells = n // 2
    index = np.floor(r * n).astype(np.int64)
    index[index >= n_shells] = -1
    last = shape[-1]
    w = np.full(last // 2 + 1, 2.0)
    w[0] = 1.0
    if last % 2 == 0:
        w[-1] = 1.0
    weight = np.broadcast_to(w, index.shape)
    return index, weight, n_shells


def spectrum(x: np.ndarray) -> np.ndarray:
    """``rfftn`` of ``x`` minus its mean: ``(..., W)`` -> complex64 ``(..., W // 2 + 1)``
    (scipy.fft in single precision on all cores)."""
    x = np.asarray(x, np.float32)
    return scipy.fft.rfftn(x - np.float32(x.mean(dtype=np.float64)), workers=-1)


def frc(a, b, shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fourier ring (2D) / shell (3D) correlation of two images of one shape.

    ``a``, ``b``: real arrays, or their :func:`spectrum` (then give the real ``shape``).
    Returns ``(freq, curve)``: shell centres in cycles/px, ``(n_shells,)``, and
    ``sum Re(A B*) / sqrt(sum |A|^2 sum |B|^2)`` per shell, ``(n_shells,)`` (NaN for an empty
    shell)."""
    if shape is None:
        shape = np.shape(a)
        a, b = spectrum(a), spectrum(b)
    index, weight, n_shells = _shells(tuple(shape))
    keep = index >= 0
    idx, w = index[keep], weight[keep]
    A, B = a[keep], b[keep]
    cross = np.bincount(idx, w * (A.real * B.real + A.imag * B.imag), n_shells)
    pa = np.bincount(idx, w * (A.real**2 + A.imag**2), n_shells)
    pb = np.bincount(idx, w * (B.real**2 + B.imag**2), n_shells)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = cross / np.sqrt(pa * pb)
    freq = (np.arange(n_shells) + 0.5) / min(shape)
    return freq, curve


def shell_counts(shape: tuple[int, ...]) -> np.ndarray:
    """Fourier coefficients (full spectrum) per :func:`frc` shell of ``shape``: ``(n_shells,)``."""
    index, weight, n_shells = _shells(tuple(shape))
    keep = index >= 0
    return np.bincount(index[keep], weight[keep], n_shells)


def signal_correlation(
    frc_denoised: np.ndarray, frc_raw: np.ndarray, counts: np.ndarray | None = None
) -> np.ndarray:
    """Estimated correlation of a denoised half with the clean signal per shell, ``(n_shells,)``:
    ``FRC(denoised half, raw other half) / sqrt(FRC(even, odd))``.

    With raw halves ``S + N1``, ``S + N2`` and a denoised half whose error is independent of
    ``N2``, ``FRC(d, S + N2) = corr(d, S) * corr(S, S + N2)`` and ``FRC(even, odd) =
    corr(S, S + N)^2``. Shells where the raw FRC is not positive, or (given ``counts``, the
    :func:`shell_counts`) not above ``3 / sqrt(count)`` (three standard deviations of the FRC of
    pure noise), are NaN: there the ratio is noise over noise. A curve below the raw halves'
    ``sqrt(FRC(even, odd))`` means signal was smoothed away at that frequency."""
    raw = np.asarray(frc_raw, np.float64)
    out = np.full(raw.shape, np.nan)
    ok = raw > 0
    if counts is not None:
        ok &= raw > 3 / np.sqrt(np.maximum(np.asarray(counts, np.float64), 1))
    out[ok] = np.asarray(frc_denoised, np.float64)[ok] / np.sqrt(raw[ok])
    return out


def n2n_loss(d_even, d_odd, even, odd) -> float:
    """Held-out Noise2Noise loss: ``mean((d_odd - even)^2) / var(even)`` and
    ``mean((d_even - odd)^2) / var(odd)``, averaged; arrays of one shape.

    Its expectation is ``(MSE(d, signal) + noise variance) / var(raw half)``: the MSE to the
    clean signal up to a constant shared by all methods on one pair (lower is better)."""

    def one(d, raw):
        raw = np.asarray(raw, np.float64)
        diff = np.asarray(d, np.float64) - raw
        return float(np.mean(diff * diff)) / float(np.var(raw))

    return (one(d_odd, even) + one(d_even, odd)) / 2


def seam_score(y: np.ndarray, cuts: Sequence[Sequence[int]], width: int = 2) -> float:
    """Excess squared difference across tile boundaries: ``mean(across) / mean(near) - 1``.

    ``y``: ``(H, W)`` or ``(D, H, W)``; ``cuts[axis]``: positions ``c`` where one tile's kept
    region ends and the next begins (between index ``c - 1`` and ``c``). ``across`` are the
    squared neighbour differences ``y[c] - y[c - 1]`` along that axis; ``near`` the same at the
    ``width`` positions on each side (within tiles). About 0 for seamless output, positive for
    visible seams. NaN when there is no cut (one tile)."""
    y = np.asarray(y, np.float64)
    across, near = [], []
    for axis, positions in enumerate(cuts):
        n = y.shape[axis]
        for c in positions:
            if not 0 < c < n:
                continue
            across.append(_step2(y, axis, c))
            for k in range(c - width, c + width + 1):
                if k != c and 1 <= k < n:
                    near.append(_step2(y, axis, k))
    if not across or not near or np.mean(near) == 0:
        return math.nan
    return float(np.mean(across) / np.mean(near) - 1.0)


def _step2(y: np.ndarray, axis: int, k: int) -> float:
    """Mean of ``(y[k] - y[k - 1])^2`` along ``axis``."""
    return float(np.mean((np.take(y, k, axis) - np.take(y, k - 1, axis)) ** 2))


def region_snr(image: np.ndarray, pairs: Sequence[tuple[tuple, tuple]]) -> float:
    """Region SNR in dB (the paper's): ``(10 / N) sum_i (log10 s_i - log10 v_i)`` with
    ``s_i = (mean(signal_i) - mean(background_i))^2`` and ``v_i = var(background_i)``.

    ``image``: ``(H, W)``; ``pairs``: N pairs ``((x, y, w, h), (x, y, w, h))`` of a signal box
    and its background box in pixels (x: column, y: row of the top-left corner). Raises
    ValueError for an empty box or a constant background."""
    image = np.asarray(image, np.float64)
    if not pairs:
        raise ValueError("no signal/background box pairs")
    terms = []
    for signal, background in pairs:
        sig, bg = _box(image, signal), _box(image, background)
        s = (sig.mean() - bg.mean()) ** 2
        v = bg.var()
        if v <= 0:
            raise ValueError(f"background box {background} is constant")
        terms.append(math.log10(s) - math.log10(v) if s > 0 else -math.inf)
    return 10.0 * float(np.mean(terms))


def _box(image: np.ndarray, box: tuple) -> np.ndarray:
    """Pixels of ``box = (x, y, w, h)`` inside ``image: (H, W)``; ValueError when outside/empty."""
    x, y, w, h = (int(v) for v in box[:4])
    H, W = image.shape
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > W or y + h > H:
        raise ValueError(f"box x={x} y={y} w={w} h={h} is empty or outside the {W}x{H} image")
    return image[y : y + h, x : x + w]


def true_snr_db(d: np.ndarray, clean: np.ndarray) -> float:
    """SNR in dB of ``d`` against a known clean signal (simulations): ``c^2 / (1 - c^2)`` with
    ``c = CCC(d, clean)``. For ``d = clean + noise`` this is ``var(clean) / var(noise)``; the
    split SNR of a method estimates ``c`` times a factor shared by all methods, so both rank
    methods alike."""
    c = ccc(d, clean)
    return snr_db(c * c) if c > 0 else -math.inf
