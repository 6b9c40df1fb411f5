"""Partitions of a movie's frames into two independent halves, and window sums of them.

Noise2Noise needs two independent exposures of the same specimen: the frames of one movie,
split into two disjoint sets, give two. :func:`partition` makes the split:

* ``'even-odd'``: frames 0, 2, 4, ... and 1, 3, 5, ... (MotionCor2 ``-SplitSum``, the paper's
  pairs). With an odd number of frames the even half has one frame more.
* ``'random'``: a random permutation cut into two halves of ``n // 2`` frames each; with an odd
  number of frames one random frame is left out, so both halves always carry the same dose.

:func:`sample_partition` draws the partition of training sample ``k`` of epoch ``e`` as a pure
function of ``(seed, e, k)``: a resumed run redraws exactly the same halves.

:func:`window_sum` sums a window of chosen frames, each displaced by its whole-pixel shift, the
way training crops are cut from memory-mapped frames; :func:`write_sums` writes the sums of
``cryoden movies``.
"""

from __future__ import annotations

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


def window_sum(
    frames: np.ndarray,
    indices: Sequence[int],
    shifts: np.ndarray,
    origin: Sequence[int],
    crop: int | Sequence[int],
    gain: np.ndarray | None = None,
) -> np.ndarray:
    """Sum of one window of the chosen frames, each aligned by a whole-pixel shift.

    frames: ``(N, H, W)`` in any real dtype (a memory map: only the windows are read);
    indices: frames to sum; shifts: ``(N, 2)`` integer ``(x, y)`` offsets: the window of frame
    ``i`` starts at ``(origin[0] + shifts[i, 1], origin[1] + shifts[i, 0])`` (row, column), and
    must lie inside the frame; crop: the window's edge, or its ``(rows, columns)``; gain:
    ``(H, W)`` multiplied into each frame's window, or None. Returns ``(rows, columns)`` float64.
    """
    h, w = (crop, crop) if np.ndim(crop) == 0 else (int(crop[0]), int(crop[1]))
    y0, x0 = int(origin[0]), int(origin[1])
    out = np.zeros((h, w), np.float64)
    for i in indices:
        y, x = y0 + int(shifts[i, 1]), x0 + int(shifts[i, 0])
        if y < 0 or x < 0 or y + h > frames.shape[1] or x + w > frames.shape[2]:
            raise ValueError(f"window at ({y}, {x}) of frame {i} is outside {frames.shape[1:]}")
        win = np.asarray(frames[i, y : y + h, x : x + w], np.float64)
        out += win if gain is None else win * gain[y : y + h, x : x + w]
    return out


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
