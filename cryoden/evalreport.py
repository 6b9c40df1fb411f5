"""Outputs of ``cryoden evaluate``: metrics.tsv, metrics.json, report.html and its PNGs.

Pictures use :mod:`cryoden.pictures` (contrast, crops by content, binning, spectra, central
slices, montages, curves) and :mod:`cryoden.htmlpage`. For each pair, :class:`Views` keeps only
small pieces of every method's denoised even half (crops, a binned copy, a spectrum, central
slices of a volume) so that large images are not all held at once. Every file is written
atomically (:func:`cryoden.io.atomic`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryoden import evaluation, io, pictures
from cryoden.htmlpage import Page

CROP = 256  # full-resolution crop side, px
N_CROPS = 2
BINNED = 512  # longest side of binned whole images, px
SPECTRUM = 1024  # side of the central region whose power spectrum is shown, px
SPECTRUM_SHOWN = 256  # px of the spectrum picture


class Views:
    """Small views of one pair's processed halves, for the pictures.

    Built from the raw even half ``(H, W)`` or ``(D, H, W)``: crop corners are chosen by content
    (:func:`cryoden.pictures.choose_crops` on the raw half) once, so every method shows the same
    crops. Call the instance as the ``view`` callback of :func:`cryoden.evaluation.evaluate_pair`:
    ``views(name, d_even) -> dict`` of 2D arrays (``crop0.. crop{n-1}``, ``binned``,
    ``spectrum`` for images; ``XY``, ``XZ``, ``YZ`` binned central slices for volumes)."""

    def __init__(self, raw: np.ndarray):
        self.ndim = raw.ndim
        if raw.ndim == 2:
            self.size = min(CROP, *raw.shape)
            self.corners = pictures.choose_crops(raw, self.size, N_CROPS)
            self.bin = max(1, math.ceil(max(raw.shape) / BINNED))
        else:
            self.bin = max(1, math.ceil(max(raw.shape) / BINNED))

    def __call__(self, name: str, d: np.ndarray) -> dict[str, np.ndarray]:
        if self.ndim == 3:
            return {
                k: pictures.bin_image(v, self.bin) if min(v.shape) >= self.bin else v
                for k, v in pictures.central_slices(d).items()
            }
        out = {
            f"crop{i}": np.array(pictures.crop(d, c, self.size)) for i, c in enumerate(self.corners)
        }
        out["binned"] = pictures.bin_image(d, self.bin)
        s = min(SPECTRUM, *d.shape)
        y0, x0 = (d.shape[0] - s) // 2, (d.shape[1] - s) // 2
        spec = pictures.power_spectrum(d[y0 : y0 + s, x0 : x0 + s])
        out["spectrum"] = pictures.bin_image(spec, max(1, s // SPECTRUM_SHOWN))
        return out


# ---------------------------------------------------------------------------------- tables


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def write_tsv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` (dicts with :data:`cryoden.evaluation.COLUMNS`) as a tab-separated table."""
    cols = evaluation.COLUMNS
    lines = ["\t".join(cols)] + ["\t".join(_fmt(r[c]) for c in cols) for r in rows]
    with io.atomic(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


TITRATION_COLUMNS = ("file", "method", "frames", "dose", "p", "snr_db")


def write_titration(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Dose-titration rows (:data:`TITRATION_COLUMNS`; dose in e/Å^2, nan when unknown)."""
    cols = TITRATION_COLUMNS
    lines = ["\t".join(cols)] + ["\t".join(_fmt(r[c]) for c in cols) for r in rows]
    with io.atomic(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _jsonable(x: Any) -> Any:
    """NaN and infinities -> None (strict JSON), tuples -> lists, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


def write_json(path: Path, record: dict[str, Any]) -> None:
    """``record`` as strict JSON (NaN/inf -> null)."""
    with io.atomic(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(record), indent=1, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------- pictures

SIGNAL_CAPTION = (
    "estimated correlation with the clean signal per frequency: FRC / sqrt(FRC(even, odd)), "
    "shown where FRC(even, odd) is above its 3-sigma noise level; a curve below the raw one "
    "lost signal there"
)


def _stem(k: int, file: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(file).stem)[:60]
    return f"{k:03d}_{name}"


def shown_methods(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Methods shown in pictures: raw, the best low-pass (by split SNR), then every model."""
    best = evaluation.best_baseline(rows)
    names = ["raw"] + ([best] if best else [])
    return names + [r["method"] for r in rows if r.get("kind") == "model"]


def pair_pictures(outdir: Path, k: int, result: evaluation.PairResult) -> list[tuple[str, str]]:
    """Write one pair's PNGs under ``outdir/pictures`` -> ``[(relative path, caption)]``."""
    folder = outdir / "pictures"
    folder.mkdir(parents=True, exist_ok=True)
    stem = _stem(k, result.file)
    names = shown_methods(result.rows)
    views = result.views
    out = []

    def rel(what):
        return f"pictures/{stem}_{what}.png"

    if len(result.shape) == 2:
        crops = sorted(k for k in views["raw"] if k.startswith("crop"))
        rows = [[views[m][c] for m in names] for c in crops]
        pictures.montage(rows, names, outdir / rel("crops"))
        out.append((rel("crops"), "full-resolution crops chosen by content (even half), "
                    "each panel at mean ± 3 std"))  # fmt: skip
        pictures.montage([[views[m]["binned"] for m in names]], names, outdir / rel("binned"))
        out.append((rel("binned"), "whole image, binned"))
        pictures.montage([[views[m]["spectrum"] for m in names]], names, outdir / rel("spectra"))
        out.append((rel("spectra"), "log power spectra (central region)"))
    else:
        rows = [[views[m][s] for m in names] for s in ("XY", "XZ", "YZ")]
        labels = [[f"{m} {s}" for m in names] for s in ("XY", "XZ", "YZ")]
        pictures.montage(rows, labels, outdir / rel("slices"))
        out.append((rel("slices"), "central XY, XZ and YZ slices (even half)"))
    curves = result.curves
    freq = np.asarray(curves["freq"])
    every = [r["method"] for r in result.rows]
    pictures.plot_curves(
        freq,
        {m: np.asarray(curves[m]["frc"]) for m in every},
        outdir / rel("frc"),
        "spatial frequency (1/px)",
        "FRC(processed half, raw other half)",
        hline=0.0,
    )
    out.append((rel("frc"), "FRC between each processed half and the raw other half"))
    signal = {"raw half: sqrt FRC(even, odd)": np.asarray(curves["raw"]["signal"], float)}
    signal.update({m: np.asarray(curves[m]["signal"], float) for m in names if m != "raw"})
    pictures.plot_curves(
        freq,
        signal,
        outdir / rel("signal"),
        "spatial frequency (1/px)",
        "estimated correlation with the signal",
        hline=0.0,
    )
    out.append((rel("signal"), SIGNAL_CAPTION))
    if result.titration:
        by: dict[str, tuple[list, list]] = {}
        for r in result.titration:
            xs, ys = by.setdefault(r["method"], ([], []))
            xs.append(r["frames"])
            ys.append(r["snr_db"])
        pictures.plot_curves(
            {m: np.asarray(v[0], float) for m, v in by.items()},
            {m: np.asarray(v[1], float) for m, v in by.items()},
            outdir / rel("titration"),
            "frames of the even half summed",
            "SNR vs the full odd half (dB)",
        )
        out.append((rel("titration"), "dose titration: the first k frames of the even half, "
                    "processed, against the whole raw odd half"))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------- page

EXPLAIN = (
    "split SNR (dB): each half is processed and correlated with the raw other half, "
    "p = CCC, SNR = 10 log10(p / (1 - p)), mean of both directions; for raw it is the SNR of "
    "one half. Higher is better; differences between methods are meaningful, the absolute "
    "value of a processed half is lowered by the noise of the raw half it is compared with.",
    "n2n_loss: mean squared difference between a processed half and the raw other half, over "
    "the raw half's variance (both directions averaged): the mean squared error to the signal "
    "plus a constant, lower is better.",
    "seam_score: squared differences across tile boundaries over those next to them, minus 1: "
    "about 0 without seams; empty when the image ran as one piece.",
    "region_snr_db: the paper's region SNR on the given signal/background boxes (mean of the "
    "two processed halves).",
)


def _table(rows):
    cols = [c for c in evaluation.COLUMNS if c != "file"]
    return cols, [[r[c] for c in cols] for r in rows]


def write_report(
    outdir: Path,
    results: Sequence[evaluation.PairResult],
    summary: Sequence[dict[str, Any]],
    failed: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write ``outdir/report.html`` and its PNGs (``outdir/pictures/``) -> the page's path."""
    page = Page("cryoden evaluate")
    text = f"{len(results)} pair(s) evaluated."
    if failed:
        text += f" {len(failed)} failed: " + "; ".join(f"{f}: {p}" for f, p in failed)
    page.paragraph(text)
    if summary:
        page.heading("Mean over files")
        page.table(*_table(summary))
    for text in EXPLAIN:
        page.paragraph(text, note=True)
    for k, res in enumerate(results):
        page.heading(f"{res.file}  ({' x '.join(map(str, res.shape))})")
        page.table(*_table(res.rows))
        for src, caption in pair_pictures(outdir, k, res):
            page.image(src, caption, caption=caption)
    return page.write(outdir / "report.html")
