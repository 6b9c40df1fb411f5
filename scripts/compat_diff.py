#!/usr/bin/env python
"""Measure how far cryoden's default (stride-padded) output is from Topaz's unpadded whole-image
output (``topaz_compat=True``) at sizes that are not a multiple of the network stride.

Usage: python scripts/compat_diff.py [SIZE ...]   (crops of the shipped real K2 micrograph)
Prints, per model and size: mean and max |default - compat| relative to the output std, and the
same 300 px away from any border.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mrcfile
import numpy as np

from cryoden.inference import Denoiser

ROOT = Path(__file__).resolve().parent.parent


def main(sizes: list[tuple[int, int]]) -> None:
    with mrcfile.open(ROOT / "examples" / "k2_micrograph_crop.mrc", permissive=True) as m:
        mic = np.asarray(m.data, np.float32)
    print(
        "| model | size | mean diff / out std | max diff / out std "
        "| max diff >= 300 px from borders / out std |"
    )
    print("|---|---|---|---|---|")
    for name in ("unet", "unet-small"):
        d = Denoiser(name, ndim=2)
        for h, w in sizes:
            x = mic[:h, :w]
            a = d(x, normalize=True)
            b = d(x, topaz_compat=True, normalize=True)
            e = np.abs(a - b)
            s = float(b.std())
            inner = e[300:-300, 300:-300]
            inner_max = f"{inner.max() / s:.3f}" if inner.size else "n/a"
            print(f"| {name} | {h}x{w} | {e.mean() / s:.4f} | {e.max() / s:.3f} | {inner_max} |")


if __name__ == "__main__":
    args = sys.argv[1:] or ["959x927", "1000x1000", "1024x1024"]
    main([tuple(int(v) for v in a.split("x")) for a in args])
