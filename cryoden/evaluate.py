"""Measure denoising on even/odd halves: split SNR, FRC, held-out loss, seams; report with pictures.

Examples:
  cryoden evaluate --even even/ --odd odd/ -o eval/                     default model + baselines
  cryoden evaluate --even even/ --odd odd/ -m unet -m runs/mine -o eval/
  cryoden evaluate --even a_EVN.mrc --odd a_ODD.mrc -m affine -o eval/ --boxes boxes.tsv
  cryoden evaluate --movies movies/ --gain gain.mrc --dose-titration -o eval/

Halves are paired exactly as 'cryoden train' pairs them (two folders matched by name, or two
files), or made from --movies (aligned; frames 1, 3, 5... and 2, 4, 6..., as 'cryoden movies'
makes them). Each half of a pair goes through every method once: raw (the halves themselves), each
--model exactly as given (default: unet for micrographs, unet-3d for tomograms), and the
baselines lowpass-2/4/8/16 (hard low-pass by binning) and gaussian-1/2/4 (sigma in px) unless
--no-baselines. Each processed half is compared with the RAW other half:

  split_snr_db   p = CCC(processed odd, raw even) and CCC(processed even, raw odd); each gives
                 10 log10(p / (1 - p)) dB; the mean of the two. For raw: the SNR of one half.
  n2n_loss       mean((processed half - raw other half)^2) / var(raw other half), both
                 directions averaged: the error to the signal plus a constant.
  seam_score     squared differences across tile boundaries over those beside them, minus 1
                 (about 0 without seams; nan when the image ran in one piece: see --patch-size).
  region_snr_db  with --boxes: the paper's region SNR, signal vs background boxes.
FRC curves and the per-frequency correlation with the signal are in metrics.json and plotted.

Writes OUTDIR/metrics.tsv (a row per file and method, then rows with file 'mean'),
OUTDIR/metrics.json (the same plus the curves), OUTDIR/report.html and OUTDIR/pictures/*.png.
--dose-titration (movies): the sums of the first k frames of the even half, through each
model, raw and the best low-pass, scored against the whole odd half (one direction of the
split SNR), in OUTDIR/titration.tsv and plotted.
Box file (--boxes): one box per line, 'x y w h label [file]' separated by tabs, commas or
spaces; label signal or background (the k-th signal box pairs with the k-th background box);
file: the even half's name it applies to (default: every file); '#' lines are comments.

Errors: bad options, unpairable inputs or an unknown model stop the run before any work (exit
2); a pair that fails is reported on one line and the others go on (exit 1). docs/evaluate.md
has the details.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from cryoden.movie import add_reading_args, reading_problem

OUTPUTS = ("metrics.tsv", "metrics.json", "report.html", "titration.tsv")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--even", help="even half: a file or a folder")
    parser.add_argument("--odd", help="odd half: a file or a folder")
    parser.add_argument(
        "--movies",
        nargs="+",
        metavar="MOVIE",
        help="movies (files or folders) instead of --even/--odd: each is aligned and split into "
        "frames 1, 3, 5... and 2, 4, 6... as 'cryoden movies' does",
    )
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUTDIR", help="output folder (made if needed)"
    )
    parser.add_argument(
        "-m",
        "--model",
        action="append",
        metavar="MODEL",
        help="pretrained name, weights file or training run folder; repeat to compare several "
        "(default: unet for 2D, unet-3d for volumes)",
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the low-pass and Gaussian baselines"
    )
    parser.add_argument(
        "--boxes", metavar="FILE", help="signal/background boxes for the region SNR (2D only)"
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        metavar="PX",
        help="denoise in tiles of this core size (default: as large as memory allows); "
        "gives the seam score something to measure",
    )
    g = parser.add_argument_group("movies")
    g.add_argument(
        "--dose-titration",
        action="store_true",
        help="with --movies: denoise sums of the first k frames of the even half and score them "
        "against the whole odd half (titration.tsv, plotted)",
    )
    add_reading_args(g)
    g.add_argument("--pixel-size", type=float, metavar="A", help="Å/px (default: from headers)")
    g.add_argument(
        "--dose-per-frame", type=float, metavar="E", help="e/Å^2 per frame, to label doses"
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype"
    )
    parser.add_argument("--device", choices=("cpu", "gpu", "tpu"), help="device kind")
    parser.add_argument("-q", "--quiet", action="store_true", help="errors only")


def _fail(where, problem) -> int:
    from cryoden.infer import line

    print(line(where, problem), file=sys.stderr)
    return 2


def _check_options(args) -> str | None:
    halves = args.even is not None or args.odd is not None
    checks = [
        (halves != bool(args.movies), "give either --even and --odd, or --movies"),
        (not halves or (args.even and args.odd), "--even and --odd go together"),
        (not args.dose_titration or args.movies, "--dose-titration needs --movies (frames)"),
        (args.patch_size is None or args.patch_size >= 1, "--patch-size must be >= 1"),
        (args.pixel_size is None or args.pixel_size > 0, "--pixel-size must be positive"),
        (args.dose_per_frame is None or args.dose_per_frame > 0, "--dose-per-frame must be > 0"),
        (reading_problem(args) is None, reading_problem(args)),
        (
            args.movies or not (args.gain or args.defects or args.eer_grouping),
            "--gain, --defects and --eer-grouping apply to --movies only",
        ),
    ]
    return next((msg for ok, msg in checks if not ok), None)


def main(args: argparse.Namespace) -> int:
    """0 when every pair was evaluated, 1 when some failed, 2 when nothing could start."""
    from cryoden import evalreport, evaluation, io, runtime

    problem = _check_options(args)
    if problem:
        return _fail("options", problem)
    try:
        jobs = _jobs(args)
    except ValueError as e:
        return _fail(None, e)
    boxes = None
    if args.boxes:
        try:
            boxes = evaluation.read_boxes(args.boxes)
        except ValueError as e:
            return _fail(None, e)
    outdir = Path(args.output)
    inputs = [p for job in jobs for p in job[1]] + [
        Path(a) for a in (args.boxes, args.gain, args.defects) if a
    ]
    for name in OUTPUTS:
        target = outdir / name
        if any(target.exists() and p.exists() and os.path.samefile(target, p) for p in inputs):
            return _fail(target, "is an input of this run: choose another output folder")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        io.new_temporary(outdir / "cryoden-probe").unlink()
    except OSError as e:
        return _fail(outdir, f"cannot write to the output folder: {e.strerror or e}")
    io.remove_stale_temporaries(outdir, keep=inputs)
    try:
        devices = runtime.setup(args.device)
    except (RuntimeError, ValueError) as e:
        return _fail("--device", e)
    try:
        methods = _methods(args, sorted({job[2] for job in jobs}), devices)
    except ValueError as e:
        return _fail("--model", e)

    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    t0 = time.perf_counter()
    results, failed = [], []
    for i, (name, paths, ndim) in enumerate(jobs, 1):
        say(f"cryoden: evaluate {' + '.join(map(str, paths))} ({i}/{len(jobs)})")
        try:
            results.append(_one(args, name, paths, methods[ndim], boxes, say))
        except (ValueError, OSError, MemoryError) as e:
            failed.append((name, " ".join(str(e).split()) or type(e).__name__))
            print(evaluation_line(name, e), file=sys.stderr)
    rows = [r for res in results for r in res.rows]
    summary = evaluation.summary(rows)
    evalreport.write_tsv(outdir / "metrics.tsv", rows + summary)
    titration = [r for res in results for r in res.titration or []]
    if args.dose_titration:
        evalreport.write_titration(outdir / "titration.tsv", titration)
    evalreport.write_json(outdir / "metrics.json", _record(args, results, summary, failed))
    if results:
        evalreport.write_report(outdir, results, summary, failed)
    else:  # no pair evaluated: a report of an earlier run must not pass for this one
        (outdir / "report.html").unlink(missing_ok=True)
    for r in summary if len(results) > 1 else rows:
        say(f"cryoden: {r['method']:>16}  split SNR {r['split_snr_db']:7.2f} dB")
    say(f"cryoden: {len(results)} pair(s) in {time.perf_counter() - t0:.1f} s -> {outdir}")
    return 1 if failed else 0


def evaluation_line(where, e: BaseException) -> str:
    from cryoden.infer import line

    return line(where, str(e) or type(e).__name__)


def _jobs(args) -> list[tuple[str, list[Path], int]]:
    """-> ``(name, input paths, ndim)`` per pair or movie; ValueError (one line) when halves do
    not pair (as training pairs them) or a movie argument is not a movie."""
    from cryoden.train.pairs import find_pairs, half_shape

    if not args.movies:
        return [(str(e), [e, o], len(half_shape(e))) for e, o in find_pairs(args.even, args.odd)]
    from cryoden.movies import expand

    jobs = []
    for path, problem in expand(args.movies):
        if problem:
            raise ValueError(f"{path}: {problem}")
        if not path.is_file():
            raise ValueError(f"{path}: no such movie file")
        jobs.append((str(path), [path], 2))
    return jobs


def _methods(args, ndims: list[int], devices) -> dict[int, list]:
    """ndim -> methods: raw, each model (loaded once, kept warm), each baseline."""
    from cryoden import baselines, evaluation
    from cryoden.inference import DEFAULT_MODEL, Denoiser

    out = {}
    for ndim in ndims:
        ms = [evaluation.raw_method()]
        for m in args.model or [DEFAULT_MODEL[ndim]]:
            den = Denoiser(m, ndim=ndim, dtype=args.dtype, devices=devices)
            ms.append(evaluation.model_method(str(m), den, args.patch_size))
        if not args.no_baselines:
            ms += [evaluation.baseline_method(b) for b in baselines.DEFAULT]
        out[ndim] = ms
    return out


def _read(args, paths: list[Path]):
    """-> (even, odd, MovieHalves or None): both halves whole, float32."""
    import numpy as np

    from cryoden.train.pairs import open_half

    if len(paths) == 1:  # a movie
        from cryoden.evalmovies import movie_halves
        from cryoden.movie import reading_kwargs

        mh = movie_halves(
            paths[0],
            reading=reading_kwargs(args),
            pixel_size=args.pixel_size,
            titration=args.dose_titration,
        )
        return mh.even, mh.odd, mh
    halves = [np.asarray(open_half(p), np.float32) for p in paths]
    for half, path in zip(halves, paths, strict=True):
        bad = int(np.count_nonzero(~np.isfinite(half)))
        if bad:
            raise ValueError(f"{path} contains {bad} NaN/Inf pixel(s)")
    return halves[0], halves[1], None


def _one(args, name: str, paths: list[Path], methods, boxes, say):
    """Evaluate one pair or movie -> PairResult (with its dose titration for a movie)."""
    from cryoden import evalreport, evaluation

    e, o, movie = _read(args, paths)

    def report(row):
        snr = row["split_snr_db"]
        say(f"cryoden:   {row['method']:>16}  split SNR {snr:7.2f} dB  ({row['seconds']:.1f} s)")

    result = evaluation.evaluate_pair(
        name, e, o, methods, boxes=evaluation.boxes_for(boxes, paths[0]),
        view=evalreport.Views(e), on_method=report,
    )  # fmt: skip
    if movie is not None and movie.partial:
        best = evaluation.best_baseline(result.rows)
        chosen = [m for m in methods if m.kind != "baseline" or m.name == best]
        rows = evaluation.dose_titration(movie.partial.get, o, sorted(movie.partial), chosen)
        for r in rows:
            r["file"] = name
            r["frames"] = int(r["dose"])
            dpf = args.dose_per_frame
            r["dose"] = r["frames"] * dpf if dpf else math.nan
        result.titration = rows
    return result


def _record(args, results, summary, failed) -> dict:
    from cryoden import __version__

    return {
        "cryoden": __version__,
        "command": ["cryoden", "evaluate", *sys.argv[2:]] if len(sys.argv) > 1 else None,
        "models": args.model,
        "baselines": not args.no_baselines,
        "pairs": [
            {
                "file": res.file,
                "shape": list(res.shape),
                "rows": res.rows,
                "curves": res.curves,
                "titration": res.titration,
            }
            for res in results
        ],
        "summary": summary,
        "failed": [{"file": f, "error": p} for f, p in failed],
        "null": "not applicable (seam_score untiled, region_snr_db without boxes) or infinite",
    }
