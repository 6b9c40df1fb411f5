"""Partitions of a movie's frames into two independent halves, and window sums of them.

Noise2Noise needs two independent exposures of the same specimen: the frames of one movie,
split into two disjoint sets, give two. :func:`partition` makes the split:

* ``'even-odd'``: frames 0, 2, 4, ... and 1, 3, 5, ... (MotionCor2 ``-SplitSum``, the paper's
  pairs). With an odd number of frames the even half has one frame more.
* ``'random'``: a random permutation cut into two halves of ``n // 2`` frames each; with an odd
  number of frames one random frame is left out, so both halves always carry the same dose.

:func:`sample_partition` draws the partition of training sample ``k`` of epoch ``e`` as a pure
function of ``(seed, e, k)``: a resumed run redraws exactly the same halves.

:func:`window_sum` sums a window of chosen frames, each moved by its subpixel shift (a windowed
sinc over a margin around the window, matching the whole-frame Fourier shifts of
:func:`cryoden.align.aligned_sum` away from the frame edges), gain-multiplied and defect-filled,
the way training crops are cut from memory-mapped frames; :func:`write_sums` writes the sums of
``cryoden movies``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MODES = ("even-odd", "random")
_TAG = 0x4A1F  # separates partition draws from the crop/augmentation draws of the same sample


def partition(
    n_frames: int, mode: str, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split frames ``0..n_frames-1`` into two disjoint halves -> ``(even_idx, odd_idx)``.

    Both are sorted int64 arrays. ``mode`` is ``'even-odd'`` (``rng`` unused) or ``'random'``
    (``rng`` required; halves of ``n_frames // 2`` frames each). Needs at least 2 frames.
    """
    if mode not in MODES:
        raise ValueError(f"unknown split {mode!r}; expected one of {', '.join(MODES)}")
    if n_frames < 2:
        raise ValueError(f"{n_frames} frame(s): two halves need at least 2 frames")
    if mode == "even-odd":
        return np.arange(0, n_frames, 2), np.arange(1, n_frames, 2)
    if rng is None:
        raise ValueError("a random split needs a random generator")
    m = n_frames // 2
    perm = rng.permutation(n_frames)
    return np.sort(perm[:m]), np.sort(perm[m : 2 * m])


def sample_partition(
    n_frames: int, mode: str, seed: int, epoch: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The partition of training sample ``k`` of epoch ``epoch``: a pure function of its
    arguments (``np.random.default_rng((seed, epoch, k, tag))``), see :func:`partition`."""
    rng = np.random.default_rng((seed, epoch, k, _TAG)) if mode == "random" else None
    return partition(n_frames, mode, rng)


def half_sizes(n_frames: int, mode: str) -> tuple[int, int]:
    """Number of frames in each half of :func:`partition` (without drawing one)."""
    if mode == "even-odd":
        return (n_frames + 1) // 2, n_frames // 2
    return n_frames // 2, n_frames // 2


TAPS = 8  # windowed-sinc half-width (pixels) of the subpixel shift of a window
KAISER_BETA = 6.0  # shape of the Kaiser window of the sinc


@functools.lru_cache(maxsize=4096)
def _kernel_spectrum(frac: float, n: int, real: bool) -> np.ndarray:
    """Conjugate DFT of :func:`shift_kernel` zero-padded to ``n``: ``(n,)`` (``real``: the
    ``(n // 2 + 1,)`` rfft) complex64; multiplying a spectrum by it correlates with the kernel."""
    from scipy import fft

    k = shift_kernel(frac)
    return np.conj(fft.rfft(k, n) if real else fft.fft(k, n)).astype(np.complex64)


def shift_kernel(frac: float, taps: int = TAPS) -> np.ndarray:
    """Weights ``k`` ``(2 taps + 1,)`` float64 of a value between pixels: ``g(x + frac) ~
    sum_t k[t] g(x + t - taps)`` for ``|frac| <= 0.5``: a sinc with a Kaiser window (beta
    :data:`KAISER_BETA`), normalised to sum 1 (a delta for ``frac == 0``)."""
    d = np.arange(-taps, taps + 1) - float(frac)
    window = np.i0(KAISER_BETA * np.sqrt(np.clip(1 - (d / (taps + 1)) ** 2, 0, None)))
    k = np.sinc(d) * window
    return k / k.sum()


def defect_depth(defects: np.ndarray | None) -> int:
    """Layers of the defect filling of a ``(H, W)`` bool mask (:class:`cryoden.gain.DefectFill`):
    how far a filled value can depend on other pixels (0 without defects)."""
    from cryoden.gain import DefectFill

    if defects is None or not np.any(defects):
        return 0
    return len(DefectFill(defects).layers)


def window_sum(
    frames: np.ndarray,
    indices: Sequence[int],
    offsets: np.ndarray,
    origin: Sequence[int],
    crop: int | Sequence[int],
    gain: np.ndarray | None = None,
    defects: np.ndarray | None = None,
    depth: int | None = None,
) -> np.ndarray:
    """Sum of one window of the chosen frames, each aligned by its (subpixel) shift.

    frames: ``(N, H, W)`` in any real dtype (a memory map: only the windows and a margin are
    read); indices: frames to sum; offsets: ``(N, 2)`` ``(x, y)``: pixel ``(r, c)`` of the window
    is frame ``i`` at ``(origin[0] + r + offsets[i, 1], origin[1] + c + offsets[i, 0])``, i.e.
    ``offsets = -shifts`` in :mod:`cryoden.align`'s convention; the window moved by the rounded
    offsets must lie inside the frame. crop: the window's edge, or its ``(rows, columns)``; gain:
    ``(H, W)`` multiplied into each frame, or None; defects: ``(H, W)`` bool, pixels replaced as
    :class:`cryoden.gain.DefectFill` replaces them in the whole frame (``depth``: its
    :func:`defect_depth`, computed when None), or None. Returns ``(rows, columns)`` float64.

    Each frame is read at its whole-pixel position with a margin of :data:`TAPS` pixels (plus
    ``depth`` for the defects; mirrored where it leaves the frame), gain-multiplied,
    defect-filled, and moved by the remaining fraction of a pixel with the separable windowed
    sinc of :func:`shift_kernel` (applied by FFT over the margin-padded window: the window's
    frames' spectra are summed, one inverse transform per call). Frames with whole-pixel offsets
    are added as they are.
    """
    from scipy import fft

    h, w = (crop, crop) if np.ndim(crop) == 0 else (int(crop[0]), int(crop[1]))
    y0, x0 = int(origin[0]), int(origin[1])
    offsets = np.asarray(offsets, np.float64)
    whole = np.rint(offsets)
    frac = offsets - whole
    if defects is not None and depth is None:
        depth = defect_depth(defects)
    depth = int(depth or 0) if defects is not None else 0
    m = TAPS
    size = (fft.next_fast_len(h + 2 * m, real=True), fft.next_fast_len(w + 2 * m, real=True))
    out = np.zeros((h, w), np.float64)
    spectrum = None
    for i in indices:
        y, x = y0 + int(whole[i, 1]), x0 + int(whole[i, 0])
        if y < 0 or x < 0 or y + h > frames.shape[1] or x + w > frames.shape[2]:
            raise ValueError(f"window at ({y}, {x}) of frame {i} is outside {frames.shape[1:]}")
        fx, fy = float(frac[i, 0]), float(frac[i, 1])
        if fx == 0 and fy == 0:
            out += _corrected(frames, i, y, x, (h, w), 0, gain, defects, depth)
            continue
        win = _corrected(frames, i, y, x, (h, w), m, gain, defects, depth)
        spec = fft.rfft2(win, s=size)  # then correlated with the kernel: sum k[t] win[p + t]
        spec *= _kernel_spectrum(fy, size[0], False)[:, None]
        spec *= _kernel_spectrum(fx, size[1], True)[None, :]
        if spectrum is None:
            spectrum = spec
        else:
            spectrum += spec
    if spectrum is not None:
        out += fft.irfft2(spectrum, s=size)[:h, :w]
    return out


def _corrected(frames, i, y, x, size, margin, gain, defects, depth) -> np.ndarray:
    """Frame ``i``'s window at ``(y, x)`` of ``size`` plus ``margin`` on every side, gain-multiplied
    and defect-filled (read ``depth`` further, so that filled values are the whole frame's), and
    mirrored where it leaves the frame: ``(rows + 2 margin, columns + 2 margin)`` float32
    (as :meth:`cryoden.movie.Movie.frame` computes a frame)."""
    from cryoden.gain import DefectFill

    h, w = size
    H, W = frames.shape[1:]
    e = margin + depth
    r0, r1 = max(y - e, 0), min(y + h + e, H)
    c0, c1 = max(x - e, 0), min(x + w + e, W)
    win = np.array(frames[i, r0:r1, c0:c1], np.float32)
    if gain is not None:
        win *= gain[r0:r1, c0:c1]
    if depth:
        mask = np.asarray(defects[r0:r1, c0:c1], bool)
        if mask.any():
            DefectFill(mask).apply(win)
    # the part of the window plus margin that lies in the frame, then mirrored beyond it
    top, left = y - margin, x - margin
    inner = win[max(top, 0) - r0 : min(y + h + margin, H) - r0,
                max(left, 0) - c0 : min(x + w + margin, W) - c0]  # fmt: skip
    pad = (
        (max(-top, 0), max(y + h + margin - H, 0)),
        (max(-left, 0), max(x + w + margin - W, 0)),
    )
    return np.pad(inner, pad, mode="symmetric") if any(map(any, pad)) else inner


def write_sums(
    paths: Sequence[os.PathLike], images: Sequence[np.ndarray], pixel_size: float, label: str
) -> None:
    """Write each ``(H, W)`` image as a float32 MRC file with ``pixel_size`` (Å) in its header
    and ``label``, each atomically, all or none: when one fails, those this call already wrote
    are removed again and the error (ValueError naming the file) is raised."""
    from cryoden import io

    done: list[Path] = []
    try:
        for path, image in zip(paths, images, strict=True):
            img = io.Image(np.asarray(image, np.float32), "2d", voxel_size=(pixel_size,) * 3)
            io.write(path, img, label=label)
            done.append(Path(path))
    except BaseException:
        for p in done:
            p.unlink(missing_ok=True)
        raise
