"""Classical baselines that a denoiser must beat: hard low-pass by binning and Gaussian filters.

Names: ``lowpass-N`` is :func:`cryoden.filters.lowpass` with binning factor ``N`` (every Fourier
component above ``0.5 / N`` cycles/px on any axis set to zero, the paper's "low-pass (binning
N)"); ``gaussian-S`` is :func:`cryoden.filters.gaussian` with sigma ``S`` px (zero-padded
borders). Both keep the input's shape: ``(H, W)`` or ``(D, H, W)`` -> float32, same shape.
"""

from __future__ import annotations

import numpy as np

from cryoden import filters

LOWPASS = (2, 4, 8, 16)
GAUSSIAN = (1, 2, 4)
DEFAULT = tuple(f"lowpass-{n}" for n in LOWPASS) + tuple(f"gaussian-{s}" for s in GAUSSIAN)


def parse(name: str) -> tuple[str, float]:
    """``'lowpass-8'`` -> ``('lowpass', 8.0)``; ValueError for anything else."""
    kind, _, value = name.partition("-")
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if kind not in ("lowpass", "gaussian") or not v > 0 or v == float("inf"):
        raise ValueError(f"not a baseline: {name!r} (lowpass-N or gaussian-S, N, S > 0)")
    return kind, v


def is_baseline(name: str) -> bool:
    """Whether ``name`` is a baseline's name."""
    try:
        parse(name)
    except ValueError:
        return False
    return True


def apply(name: str, x: np.ndarray) -> np.ndarray:
    """Run baseline ``name`` on ``x: (H, W)`` or ``(D, H, W)`` -> float32, same shape."""
    kind, v = parse(name)
    if kind == "lowpass":
        return filters.lowpass(x, v)
    return filters.gaussian(x, v)
