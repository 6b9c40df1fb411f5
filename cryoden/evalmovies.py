"""Even/odd halves and partial-dose sums of a movie, for ``cryoden evaluate --movies``.

A movie is read with :func:`cryoden.movie.open_movie`, aligned with
:func:`cryoden.align.estimate_shifts`, split into frames 1, 3, 5, ... (even half) and 2, 4, 6, ...
(odd half) as ``cryoden movies`` does (:func:`cryoden.halfsums.partition`), and summed with the
same shifts (:func:`cryoden.align.aligned_sums`), in one pass over the frames together with the
partial sums of the even half's first ``k`` frames used by the dose titration.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


@dataclasses.dataclass
class MovieHalves:
    """``even``, ``odd``: aligned half sums ``(H, W)`` float32; ``partial``: frames ``k`` of the
    even half -> the aligned sum of its first ``k`` frames ``(H, W)``; ``n_frames``: frames in the
    movie; ``pixel_size``: Å/px or None."""

    even: np.ndarray
    odd: np.ndarray
    partial: dict[int, np.ndarray]
    n_frames: int
    pixel_size: float | None


def titration_steps(n_even: int, steps: int = 6) -> list[int]:
    """Frame counts of the even half to titrate: about ``steps`` values from 1 to ``n_even``,
    evenly spaced, always including both ends."""
    if n_even < 1:
        return []
    return sorted({int(round(v)) for v in np.linspace(1, n_even, min(steps, n_even))})


def movie_halves(
    path: str | os.PathLike,
    *,
    reading: dict | None = None,
    pixel_size: float | None = None,
    titration: bool = False,
) -> MovieHalves:
    """Align the movie at ``path`` and sum its halves (and, with ``titration``, the partial sums
    of the even half at :func:`titration_steps`). ``reading``: :func:`cryoden.movie.open_movie`
    keywords (gain, defects, EER grouping, ...). Raises ValueError (one line, naming the movie)
    when it cannot be read or has fewer than 4 frames."""
    from cryoden import align, halfsums
    from cryoden.movie import open_movie

    with open_movie(path, **(reading or {})) as m:
        n = len(m)
        if n < 4:
            raise ValueError(f"{path}: {n} frames: a dose titration and halves need at least 4")
        ps = pixel_size or m.info.pixel_size or None
        alignment = align.estimate_shifts(m, pixel_size=ps)
        even, odd = halfsums.partition(n, "even-odd")
        ks = titration_steps(len(even)) if titration else []
        sums = align.aligned_sums(m, alignment, [even, odd] + [even[:k] for k in ks])
    return MovieHalves(sums[0], sums[1], dict(zip(ks, sums[2:], strict=True)), n, ps)
