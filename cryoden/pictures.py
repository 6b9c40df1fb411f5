"""Pictures of images and results: contrast, crops, binning, spectra, slices, montages, plots.

Array conventions: a 2D image is ``(H, W)``; a volume ``(D, H, W)`` (Z, Y, X). Pixel values are
any real dtype; everything is computed in float64 and displayed as 8-bit grey.

Contrast: :func:`contrast` gives display limits ``(lo, hi)`` = pooled mean -/+ ``clip`` pooled
standard deviations of the images given (the same rule as cryoden's and Topaz's PNG output, which
use ``clip = 3``), so several pictures of one crop can share one mapping ("matched contrast").
:func:`montage` takes the limits per panel, per row, or shared.

All PNGs are drawn by matplotlib (Agg canvas, no pyplot state) and written atomically
(:func:`cryoden.io.atomic`). Montage panels are shown at one screen pixel per image pixel.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from . import io

Limits = tuple[float, float]
_DPI = 100
_LABEL_PX = 18  # height of the text line above each panel
_GAP_PX = 4
_CHAR_PX = 7  # generous width of one character of the 9 pt label font at 100 dpi


def contrast(images: Sequence[np.ndarray] | np.ndarray, clip: float = 3.0) -> Limits:
    """Shared display limits of ``images`` (arrays of any shape): pooled mean -/+ clip * std.

    Non-finite values are ignored. A constant (or empty) input gives ``(v - 0.5, v + 0.5)``.
    """
    if isinstance(images, np.ndarray):
        images = [images]
    n = s = ss = 0.0
    for im in images:
        x = np.asarray(im, np.float64)
        x = x[np.isfinite(x)]
        n, s = n + x.size, s + x.sum()
        ss += np.square(x).sum()
    if n == 0:
        return (-0.5, 0.5)
    mean = s / n
    std = float(np.sqrt(max(ss / n - mean * mean, 0.0)))
    if not std > 1e-12 * max(1.0, abs(mean)):
        return (mean - 0.5, mean + 0.5)
    return (mean - clip * std, mean + clip * std)


def to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly to ``0..255`` (clipped; NaN -> 0); same shape, uint8."""
    x = np.asarray(x, np.float64)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    y = np.clip(np.round((x - lo) * scale), 0, 255)
    return np.nan_to_num(y, nan=0.0).astype(np.uint8)


def bin_image(x: np.ndarray, f: int) -> np.ndarray:
    """Average ``f x f`` blocks of the last two axes: ``(..., H, W) -> (..., H//f, W//f)`` float32.

    The remainder rows/columns (``H % f``, ``W % f``) are dropped. ``f = 1`` returns a float32 copy.
    """
    f = int(f)
    if f < 1:
        raise ValueError(f"bin factor must be >= 1, got {f}")
    x = np.asarray(x)
    h, w = x.shape[-2] // f, x.shape[-1] // f
    if h == 0 or w == 0:
        raise ValueError(f"image {x.shape[-2]}x{x.shape[-1]} is smaller than the bin factor {f}")
    x = x[..., : h * f, : w * f].astype(np.float64)
    x = x.reshape(*x.shape[:-2], h, f, w, f).mean(axis=(-3, -1))
    return x.astype(np.float32)


def choose_crops(image: np.ndarray, size: int, n: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of up to ``n`` non-overlapping ``size x size`` crops of ``image``
    ``(H, W)``, chosen by content: highest variance of the low-passed image, best first.

    The image is binned so that a crop is about 32 binned pixels wide (the low-pass), the variance
    of every crop position is computed with summed-area tables, and crops are taken greedily,
    each excluding the positions that would overlap it. Crops keep a margin of ``size // 8``
    from the image border where the image is big enough (edges of micrographs are often
    artefacts). An image smaller than ``size`` gives ``[(0, 0)]``. Deterministic.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"choose_crops needs a 2D image, got shape {image.shape}")
    H, W = image.shape
    size, n = int(size), int(n)
    if n < 1:
        return []
    if size >= H or size >= W:
        return [(0, 0)]
    f = max(1, size // 32)
    b = bin_image(np.nan_to_num(image.astype(np.float64)), f).astype(np.float64)
    w = max(1, size // f)
    margin = size // 8 // f
    if b.shape[0] - w - 2 * margin < 0 or b.shape[1] - w - 2 * margin < 0:
        margin = 0
    var = _window_variance(b, w)  # (bh - w + 1, bw - w + 1)
    valid = np.full(var.shape, -np.inf)
    ys, xs = slice(margin, var.shape[0] - margin), slice(margin, var.shape[1] - margin)
    valid[ys, xs] = var[ys, xs]
    out = []
    for _ in range(n):
        k = int(np.argmax(valid))
        by, bx = divmod(k, valid.shape[1])
        if not np.isfinite(valid[by, bx]):
            break
        out.append((min(by * f, H - size), min(bx * f, W - size)))
        valid[max(0, by - w + 1) : by + w, max(0, bx - w + 1) : bx + w] = -np.inf
    return out


def _window_variance(b: np.ndarray, w: int) -> np.ndarray:
    """Variance in every ``w x w`` window of ``b`` (bh, bw) -> (bh - w + 1, bw - w + 1)."""
    b = b - b.mean()
    s1 = np.pad(b.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    s2 = np.pad((b * b).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def box(s):
        return s[w:, w:] - s[:-w, w:] - s[w:, :-w] + s[:-w, :-w]

    m = box(s1) / (w * w)
    return box(s2) / (w * w) - m * m


def crop(image: np.ndarray, corner: tuple[int, int], size: int) -> np.ndarray:
    """``image[..., y:y+size, x:x+size]`` for ``corner = (y, x)``."""
    y, x = corner
    return np.asarray(image)[..., y : y + size, x : x + size]


def power_spectrum(x: np.ndarray) -> np.ndarray:
    """Log power spectrum ``log10(|F(x - mean)|^2)`` of ``x`` (H, W), zero frequency at the
    centre (``fftshift``): (H, W) float32. The zero-frequency term (0 after the mean is removed)
    is set to the smallest other value so it does not dominate the contrast.
    """
    x = np.asarray(x, np.float64)
    x = np.nan_to_num(x - np.nanmean(x))
    p = np.abs(np.fft.fftshift(np.fft.fft2(x))) ** 2
    c = (x.shape[0] // 2, x.shape[1] // 2)
    p[c] = np.inf
    floor = p.min() if np.isfinite(p.min()) else 1.0
    p[c] = floor
    return np.log10(np.maximum(p, max(floor, 1e-30))).astype(np.float32)


def central_slices(vol: np.ndarray) -> dict[str, np.ndarray]:
    """The central sections of a volume ``(D, H, W)``: ``XY`` (H, W) at z = D//2,
    ``XZ`` (D, W) at y = H//2, ``YZ`` (D, H) at x = W//2."""
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise ValueError(f"central_slices needs a volume (D, H, W), got shape {vol.shape}")
    d, h, w = vol.shape
    return {"XY": vol[d // 2], "XZ": vol[:, h // 2, :], "YZ": vol[:, :, w // 2]}


def _limits_grid(rows, limits, clip):
    if limits is None:
        return [[contrast(im, clip) for im in row] for row in rows]
    if isinstance(limits, tuple) and len(limits) == 2 and np.isscalar(limits[0]):
        return [[limits] * len(row) for row in rows]
    if len(limits) != len(rows):
        raise ValueError(f"{len(limits)} limits for {len(rows)} rows")
    return [[lim] * len(row) for row, lim in zip(rows, limits, strict=True)]


def montage(
    rows: Sequence[Sequence[np.ndarray]],
    labels: Sequence[str] | Sequence[Sequence[str]],
    path: str | os.PathLike,
    *,
    limits: Limits | Sequence[Limits] | None = None,
    clip: float = 3.0,
    title: str | None = None,
) -> Path:
    """Write a grid of grey images to the PNG ``path`` at one screen pixel per image pixel.

    rows: a list of rows, each a list of 2D images ``(h, w)`` (sizes may differ).
    labels: one text per column (shared by all rows), or one list per row.
    limits: ``None`` = each panel its own :func:`contrast` (``clip``); one ``(lo, hi)`` = shared by
    every panel; a list of ``(lo, hi)``, one per row = matched within each row.
    -> the path written (atomically).
    """
    rows = [[np.asarray(im) for im in row] for row in rows]
    if not rows or not all(rows):
        raise ValueError("montage needs at least one image in every row")
    for row in rows:
        for im in row:
            if im.ndim != 2:
                raise ValueError(f"montage panels must be 2D images, got shape {im.shape}")
    if labels and isinstance(labels[0], str):
        labels = [list(labels)] * len(rows)
    grid = _limits_grid(rows, limits, clip)
    ncol = max(len(r) for r in rows)
    col_w = [max((r[c].shape[1] for r in rows if c < len(r)), default=0) for c in range(ncol)]
    for row_labels in labels or []:  # a column is at least as wide as its labels
        for c, text in enumerate(row_labels[:ncol]):
            col_w[c] = max(col_w[c], _CHAR_PX * len(text) + 2)
    row_h = [max(im.shape[0] for im in r) for r in rows]
    top = _LABEL_PX + (_LABEL_PX if title else 0)
    width = sum(col_w) + _GAP_PX * (ncol + 1)
    height = sum(row_h) + (_LABEL_PX + _GAP_PX) * len(rows) + _GAP_PX + (top - _LABEL_PX)
    if title:
        width = max(width, _CHAR_PX * 11 // 9 * len(title) + 2 * _GAP_PX)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    if title:
        fig.text(0.5, 1 - 2 / height, title, ha="center", va="top", fontsize=10)
    y = height - (top - _LABEL_PX)
    for r, row in enumerate(rows):
        y -= _LABEL_PX + row_h[r]
        x = _GAP_PX
        for c, im in enumerate(row):
            h, w = im.shape
            ax = fig.add_axes([x / width, (y + row_h[r] - h) / height, w / width, h / height])
            lo, hi = grid[r][c]
            grey = np.repeat(to_uint8(im, lo, hi)[..., None], 3, axis=-1)  # RGB: no colormap
            ax.imshow(grey, interpolation="nearest", aspect="auto")  # 1 image px = 1 screen px
            ax.set_axis_off()
            text = labels[r][c] if labels and c < len(labels[r]) else ""
            fig.text(
                (x + 1) / width,
                (y + row_h[r] + 3) / height,
                text,
                ha="left",
                va="bottom",
                fontsize=9,
                clip_on=False,
            )
            x += col_w[c] + _GAP_PX
        y -= _GAP_PX
    return _save(fig, path)


def side_by_side(
    raw: np.ndarray,
    denoised: np.ndarray,
    path: str | os.PathLike,
    bin: int = 1,
    labels: Sequence[str] = ("raw", "denoised"),
    title: str | None = None,
) -> Path:
    """Write ``raw | denoised`` (both 2D ``(H, W)``) binned by ``bin`` to the PNG ``path``.

    Each panel has its own contrast (mean -/+ 3 std, after binning), so a denoised image whose
    values shrank is still readable; -> the path written.
    """
    panels = [bin_image(raw, bin), bin_image(denoised, bin)]
    return montage([panels], list(labels), path, title=title)


def plot_curves(
    xs: np.ndarray | Mapping[str, np.ndarray],
    ys_by_label: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    *,
    title: str | None = None,
    logy: bool = False,
    hline: float | None = None,
    size: tuple[float, float] = (6.0, 4.0),
) -> Path:
    """Line plot of curves (FRC, loss...) to the PNG ``path``; -> the path written.

    xs: one x array ``(n,)`` shared by all curves, or a mapping label -> its own x ``(n_label,)``.
    ys_by_label: label -> y ``(n_label,)``; non-finite points are left out of the line.
    hline: a dashed horizontal reference line (e.g. an FRC threshold), or None.
    """
    fig = Figure(figsize=size, dpi=_DPI, facecolor="white")
    ax = fig.add_subplot(1, 1, 1)
    for label, y in ys_by_label.items():
        x = xs[label] if isinstance(xs, Mapping) else xs
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            raise ValueError(f"curve {label!r}: x has shape {x.shape}, y has {y.shape}")
        ok = np.isfinite(x) & np.isfinite(y)
        if logy:
            ok &= y > 0
        ax.plot(x[ok], y[ok], marker="." if ok.sum() < 30 else None, label=str(label))
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=0.8)
    if logy:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:.3g}")  # 0.5, 2, 30 rather than 5x10^-1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    if all(float(v).is_integer() for v in _all_x(xs, ys_by_label)):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ys_by_label:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _all_x(xs, ys_by_label) -> np.ndarray:
    """Every finite x value of the curves, flattened."""
    keys = list(ys_by_label) if isinstance(xs, Mapping) else [None]
    parts = [np.ravel(np.asarray(xs[k] if k is not None else xs, np.float64)) for k in keys]
    x = np.concatenate(parts) if parts else np.zeros(0)
    return x[np.isfinite(x)]


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Render ``fig`` with Agg and write it atomically as PNG to ``path``."""
    path = Path(path)
    FigureCanvasAgg(fig)
    with io.atomic(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, facecolor="white")
    return path
