"""Evaluate denoising methods on even/odd half pairs (the engine of ``cryoden evaluate``).

A *method* turns one raw half into an image of the same shape: ``raw`` (identity), a model
(:class:`cryoden.inference.Denoiser`, loaded once and kept warm across files), or a baseline
(:mod:`cryoden.baselines`). :func:`evaluate_pair` applies every method to both halves of a pair
once and measures it against the *raw* other half with :mod:`cryoden.metrics`. Images are
``(H, W)`` micrographs or ``(D, H, W)`` volumes; a method sees float32 arrays.

:func:`dose_titration` scores partial-dose subsets of one half against the other full half
(the paper's Fig. 3) through any "partial sum" callable.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryoden import baselines, metrics

Box = tuple[int, int, int, int]


@dataclasses.dataclass
class Method:
    """A named way of processing one half: ``run(x) -> y`` (same shape, float32); ``kind`` is
    ``raw``, ``model`` or ``baseline``; ``cuts(shape)`` gives tile boundaries per axis when the
    method tiles an image of that shape (None: not tiled)."""

    name: str
    kind: str
    run: Callable[[np.ndarray], np.ndarray]
    cuts: Callable[[tuple[int, ...]], list[list[int]] | None] = lambda shape: None


def raw_method() -> Method:
    """The identity: the raw halves themselves (split SNR = the per-half SNR estimate)."""
    return Method("raw", "raw", lambda x: np.asarray(x, np.float32))


def baseline_method(name: str) -> Method:
    """A :mod:`cryoden.baselines` filter as a method (ValueError for an unknown name)."""
    baselines.parse(name)
    return Method(name, "baseline", lambda x: baselines.apply(name, x))


def model_method(
    name: str, denoiser, patch_size: int | None = None, padding: int | None = None
) -> Method:
    """A loaded :class:`~cryoden.inference.Denoiser` as a method named ``name`` (the model as
    given). ``patch_size`` forces tiles of that core size (to measure seams), ``padding`` their
    margin (default: the Denoiser's, exact in 2D)."""

    def run(x):
        return denoiser(np.asarray(x, np.float32), patch_size=patch_size, padding=padding)

    def cuts(shape):
        plan = denoiser.plan(tuple(shape), patch_size, padding)
        if len(plan.tiles) <= 1:
            return None
        if any(denoiser.uses_levelwise(n.spec, len(plan.tiles), patch_size, padding) for n in
               denoiser.nets):  # fmt: skip
            return None  # level by level: the stage tiles are planned at run time
        return [
            sorted({t.keep[a].start for t in plan.tiles if 0 < t.keep[a].start < shape[a]})
            for a in range(len(shape))
        ]

    return Method(name, "model", run, cuts)


@dataclasses.dataclass
class PairResult:
    """Everything measured on one pair: ``rows`` (one dict per method: the metrics.tsv columns),
    ``curves`` (method -> ``{"freq", "frc", "signal"}`` lists, ``(n_shells,)`` each, plus
    ``"raw_frc"``: FRC(even, odd)), ``views`` (method -> whatever the ``view`` callback made of
    its denoised even half), ``titration`` (rows of :func:`dose_titration`, or None)."""

    file: str
    shape: tuple[int, ...]
    rows: list[dict[str, Any]]
    curves: dict[str, Any]
    views: dict[str, Any]
    titration: list[dict[str, Any]] | None = None


def evaluate_pair(
    file: str,
    even: np.ndarray,
    odd: np.ndarray,
    methods: Sequence[Method],
    *,
    boxes: Sequence[tuple[Box, Box]] | None = None,
    view: Callable[[str, np.ndarray], Any] | None = None,
    on_method: Callable[[dict[str, Any]], None] | None = None,
) -> PairResult:
    """Apply every method to both halves ``even``, ``odd`` (one shape, ``(H, W)`` or
    ``(D, H, W)``) and measure it against the raw other half.

    Row columns: ``file``, ``method``, ``split_snr_db`` (mean of both directions, dB),
    ``split_snr_db_odd_even``, ``split_snr_db_even_odd``, ``n2n_loss``, ``seam_score`` (NaN
    when untiled), ``region_snr_db`` (NaN without ``boxes``; 2D only: on the mean of the two
    processed halves), ``seconds`` (the method's time on both halves). ``view(name, d_even)``
    is called once per method (e.g. to keep crops for pictures); ``on_method(row)`` after each.
    """
    even = np.asarray(even, np.float32)
    odd = np.asarray(odd, np.float32)
    if even.shape != odd.shape:
        raise ValueError(f"halves differ in shape: {even.shape} vs {odd.shape}")
    shape = even.shape
    spec_even, spec_odd = metrics.spectrum(even), metrics.spectrum(odd)
    freq, raw_frc = metrics.frc(spec_even, spec_odd, shape)
    counts = metrics.shell_counts(shape)
    result = PairResult(file, shape, [], {"freq": freq.tolist(), "raw_frc": raw_frc.tolist()}, {})
    for m in methods:
        t0 = time.perf_counter()
        d_even, d_odd = m.run(even), m.run(odd)
        seconds = time.perf_counter() - t0
        snr = metrics.split_snr(d_even, d_odd, even, odd)
        _, f1 = metrics.frc(metrics.spectrum(d_odd), spec_even, shape)
        _, f2 = metrics.frc(metrics.spectrum(d_even), spec_odd, shape)
        curve = (f1 + f2) / 2
        cuts = m.cuts(shape)
        seam = (
            (metrics.seam_score(d_even, cuts) + metrics.seam_score(d_odd, cuts)) / 2
            if cuts
            else math.nan
        )
        region = math.nan
        if boxes and len(shape) == 2:
            region = metrics.region_snr((d_even + d_odd) / 2, boxes)
        row = {
            "file": file,
            "method": m.name,
            "kind": m.kind,
            "split_snr_db": snr["snr_db"],
            "split_snr_db_odd_even": snr["snr_db_odd_even"],
            "split_snr_db_even_odd": snr["snr_db_even_odd"],
            "n2n_loss": metrics.n2n_loss(d_even, d_odd, even, odd),
            "seam_score": seam,
            "region_snr_db": region,
            "seconds": seconds,
        }
        result.rows.append(row)
        result.curves[m.name] = {
            "frc": curve.tolist(),
            "signal": metrics.signal_correlation(curve, raw_frc, counts).tolist(),
        }
        if view is not None:
            result.views[m.name] = view(m.name, d_even)
        if on_method is not None:
            on_method(row)
    return result


COLUMNS = (
    "file",
    "method",
    "split_snr_db",
    "split_snr_db_odd_even",
    "split_snr_db_even_odd",
    "n2n_loss",
    "seam_score",
    "region_snr_db",
    "seconds",
)


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method with ``file = "mean"``: the mean over files of every numeric column
    (NaN entries left out; a column NaN for every file stays NaN). Methods in first-seen order."""
    order: list[str] = []
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] not in by:
            order.append(r["method"])
            by[r["method"]] = []
        by[r["method"]].append(r)
    out = []
    for name in order:
        row: dict[str, Any] = {"file": "mean", "method": name}
        for col in COLUMNS[2:]:
            vals = [r[col] for r in by[name] if not math.isnan(r[col])]
            row[col] = float(np.mean(vals)) if vals else math.nan
        out.append(row)
    return out


def best_baseline(rows: Sequence[dict[str, Any]], prefix: str = "lowpass-") -> str | None:
    """The method named ``prefix...`` with the highest split SNR among ``rows``, or None."""
    cands = [
        r for r in rows if r["method"].startswith(prefix) and not math.isnan(r["split_snr_db"])
    ]
    return max(cands, key=lambda r: r["split_snr_db"])["method"] if cands else None


# ---------------------------------------------------------------------------------- boxes


def read_boxes(path: str | Path) -> dict[str | None, list[tuple[Box, Box]]]:
    """Read a box file -> ``{file or None: [(signal box, background box), ...]}``.

    Format (docs/evaluate.md): text, one box per line, fields separated by tabs, commas or
    spaces: ``x y w h label [file]``; x, y: top-left corner (column, row) in pixels of the
    micrograph; w, h: size in pixels; label ``signal`` or ``background``. The k-th signal box
    of a file pairs with its k-th background box. ``file`` (optional): the name of the even
    half it applies to (without it, every file). Blank lines, lines starting with ``#`` and a
    header line starting with ``x`` are skipped. ValueError (one line, naming the file and
    line) for anything else, or unequal signal and background counts.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the box file: {e}") from None
    sides: dict[str | None, dict[str, list[Box]]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields or fields[0].startswith("#") or fields[0].lower() == "x":
            continue
        if len(fields) not in (5, 6):
            raise ValueError(f"{path}:{n}: expected 'x y w h label [file]', got {line.strip()!r}")
        try:
            box = tuple(int(float(v)) for v in fields[:4])
        except ValueError:
            raise ValueError(f"{path}:{n}: x y w h must be numbers, got {line.strip()!r}") from None
        label = fields[4].lower()
        if label not in ("signal", "background"):
            raise ValueError(f"{path}:{n}: label must be signal or background, got {fields[4]!r}")
        if box[2] < 1 or box[3] < 1 or box[0] < 0 or box[1] < 0:
            raise ValueError(f"{path}:{n}: box {box} must have x, y >= 0 and w, h >= 1")
        key = fields[5] if len(fields) == 6 else None
        sides.setdefault(key, {"signal": [], "background": []})[label].append(box)
    if not sides:
        raise ValueError(f"{path}: no boxes")
    out = {}
    for key, s in sides.items():
        if len(s["signal"]) != len(s["background"]):
            where = f" for {key}" if key else ""
            raise ValueError(
                f"{path}: {len(s['signal'])} signal but {len(s['background'])} background "
                f"boxes{where}: they pair in order and must be as many"
            )
        out[key] = list(zip(s["signal"], s["background"], strict=True))
    return out


def boxes_for(boxes: dict | None, even: Path) -> list[tuple[Box, Box]] | None:
    """The box pairs of :func:`read_boxes` that apply to the pair with even half ``even``."""
    if not boxes:
        return None
    return boxes.get(even.name, []) + boxes.get(None, []) or None


# ---------------------------------------------------------------------------- dose titration


def dose_titration(
    partial: Callable[[float], np.ndarray],
    other: np.ndarray,
    doses: Sequence[float],
    methods: Sequence[Method],
) -> list[dict[str, Any]]:
    """Denoise partial-dose versions of one half and score each against the other full half.

    ``partial(dose)`` returns the half summed over a subset of its frames worth ``dose`` (any
    unit, e.g. e/Å^2 or a fraction), ``(H, W)`` or ``(D, H, W)`` like ``other`` (the other
    half, all its frames). For each dose and method: ``p = CCC(method(partial(dose)), other)``
    and ``snr_db = 10 log10(p / (1 - p))`` (one direction of the split SNR). Returns rows
    ``{"dose", "method", "p", "snr_db"}`` in dose order, then method order.
    """
    other = np.asarray(other, np.float32)
    rows = []
    for dose in doses:
        x = np.asarray(partial(dose), np.float32)
        if x.shape != other.shape:
            raise ValueError(f"partial sum at dose {dose} has shape {x.shape}, not {other.shape}")
        for m in methods:
            p = metrics.ccc(m.run(x), other)
            rows.append(
                {"dose": float(dose), "method": m.name, "p": p, "snr_db": metrics.snr_db(p)}
            )
    return rows


def frame_partial_sum(frames: np.ndarray) -> Callable[[float], np.ndarray]:
    """A ``partial`` for :func:`dose_titration` from one half's frames ``(N, H, W)``: dose ``k``
    (a number of frames, 1..N) gives the sum of the first ``round(k)`` frames, ``(H, W)``."""
    frames = np.asarray(frames)
    cum = np.cumsum(frames, axis=0, dtype=np.float64)

    def partial(k: float) -> np.ndarray:
        n = int(round(k))
        if not 1 <= n <= len(frames):
            raise ValueError(f"dose of {k} frames is outside 1..{len(frames)}")
        return cum[n - 1].astype(np.float32)

    return partial
