"""``cryoden infer --preview``: a binned ``raw | denoised`` PNG per file, to check results fast.

For the output ``OUTDIR/<name>`` the preview is ``OUTDIR/previews/<name>.png`` (the output's
full name, so ``a.mrc`` and ``a.tif`` outputs cannot share a preview). What it shows:

- a 2D image: raw | denoised;
- a stack ``(N, H, W)``: the central slice ``N // 2``;
- a volume ``(D, H, W)``: the central XY, XZ and YZ slices, one row each.

Images are binned (block means) by the smallest integer factor that brings the largest shown
side to at most ``MAX_PX`` pixels; each panel has its own contrast (mean -/+ 3 std).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryoden import pictures

PREVIEWS = "previews"
MAX_PX = 1024


def path_for(outdir: str | Path, out: str | Path) -> Path:
    """Preview path of the output ``out``: ``outdir/previews/<out name>.png``."""
    return Path(outdir) / PREVIEWS / f"{Path(out).name}.png"


def auto_bin(*shapes: tuple[int, ...]) -> int:
    """Smallest factor f >= 1 with every side of ``shapes`` (2D shapes) ``// f <= MAX_PX``."""
    side = max(max(s) for s in shapes)
    return max(1, -(-side // MAX_PX))


def write(
    raw: np.ndarray, denoised: np.ndarray, kind: str, path: str | Path, title: str | None = None
) -> Path:
    """Write the preview of one file to ``path`` (PNG, atomic); -> ``path``.

    raw, denoised: the same shape, ``(H, W)`` for kind ``2d``, ``(N, H, W)`` for ``stack``,
    ``(D, H, W)`` for ``volume``.
    """
    raw, denoised = np.asarray(raw), np.asarray(denoised)
    if raw.shape != denoised.shape:
        raise ValueError(f"raw {raw.shape} and denoised {denoised.shape} differ in shape")
    if kind == "2d":
        planes = {"": (raw, denoised)}
    elif kind == "stack":
        k = raw.shape[0] // 2
        planes = {f"slice {k} of {raw.shape[0]}, ": (raw[k], denoised[k])}
    elif kind == "volume":
        r, d = pictures.central_slices(raw), pictures.central_slices(denoised)
        planes = {f"{name} ": (r[name], d[name]) for name in r}
    else:
        raise ValueError(f"unknown kind {kind!r}")
    f = auto_bin(*(a.shape for a, _ in planes.values()))
    rows, labels = [], []
    for name, (a, b) in planes.items():
        g = min(f, *a.shape)  # a thin XZ slab is binned no further than its thickness
        rows.append([pictures.bin_image(a, g), pictures.bin_image(b, g)])
        labels.append([f"{name}raw", f"{name}denoised"])
    if f > 1:
        title = f"{title + ', ' if title else ''}binned {f}x"
    return pictures.montage(rows, labels, path, title=title)
