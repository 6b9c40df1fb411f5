"""Align movies and write their aligned sums and even/odd half sums, ready for cryoden train.

Examples:
  cryoden movies movies/*.tif -o aligned/ --gain gain.mrc --pixel-size 0.83
  cryoden movies movies/ -o aligned/ --gain gain.gain --dose-per-frame 1.2 --dose-weighting
  cryoden train --even aligned/even --odd aligned/odd --out runs/mine --init unet

Per movie NAME.tif (or .mrc, .mrcs, .tiff, .eer), OUTDIR gets:
  sums/NAME.mrc     the aligned sum of the chosen frames (dose-weighted with --dose-weighting)
  even/NAME.mrc     the aligned sum of frames 1, 3, 5, ... (same shifts and weighting)
  odd/NAME.mrc      the aligned sum of frames 2, 4, 6, ... (even + odd = the full sum)
  shifts/NAME.star  the frames' shifts, a RELION motion-correction STAR file (with --patches
                    also the local shifts of every patch and RELION's polynomial model)
and OUTDIR/cryoden-movies.json records the options and every movie's outcome and drift. All
images carry the pixel size in their header. 'cryoden train --even OUTDIR/even --odd
OUTDIR/odd' pairs the halves by name, as they are.

A movie that cannot be read or aligned costs one error line and is skipped (exit code 1); the
others are done. Outputs are written atomically (sums/ last), and no output may replace an
input. --skip-existing skips movies whose four outputs all exist.
Exit codes: 0 done, 1 some movies failed, 2 bad options, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from cryoden import shard, watch
from cryoden.movie import add_reading_args, reading_problem

SUBDIRS = ("shifts", "even", "odd", "sums")  # written in this order: sums/ marks a movie done
RECORD = "cryoden-movies.json"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("movies", nargs="+", metavar="MOVIE", help="movie files or folders of them")
    p.add_argument("-o", "--out", required=True, metavar="OUTDIR", help="output folder")
    g = p.add_argument_group("reading")
    add_reading_args(g)
    g.add_argument(
        "--pixel-size",
        type=float,
        metavar="A",
        help="Å per pixel of the frames; default: from each movie's header (required when absent)",
    )
    g.add_argument("--first", type=int, default=1, metavar="N", help="first frame (1-based)")
    g.add_argument("--last", type=int, metavar="N", help="last frame (1-based); default: the last")
    g = p.add_argument_group("alignment and sums")
    g.add_argument(
        "--patches", metavar="NxM", help="also estimate local motion on NxM patches, e.g. 5x5"
    )
    g.add_argument(
        "--shifts-from",
        metavar="DIR",
        help="read shifts from RELION motion STAR files DIR/NAME.star instead of estimating them",
    )
    g.add_argument(
        "--dose-per-frame", type=float, metavar="E", help="dose per frame, e/Å^2 (for weighting)"
    )
    g.add_argument(
        "--dose-weighting",
        action="store_true",
        help="dose-weight the sums (Grant & Grigorieff); the halves get the same weights",
    )
    g.add_argument("--voltage", type=float, default=300.0, help="kV, for dose weighting")
    g.add_argument(
        "--skip-existing", action="store_true", help="skip movies whose outputs all exist"
    )
    g.add_argument("--quiet", "-q", action="store_true", help="errors only")
    g = p.add_argument_group("collection time and clusters (as cryoden infer)")
    watch.add_args(g, "movie", "process")
    shard.add_arg(g, "movie")


def _check_options(args: argparse.Namespace) -> str | None:
    pos = lambda x: x is None or (math.isfinite(x) and x > 0)  # noqa: E731
    checks = [
        (pos(args.pixel_size), "--pixel-size must be a positive number"),
        (pos(args.dose_per_frame), "--dose-per-frame must be a positive number"),
        (args.first >= 1, "--first counts from 1"),
        (args.last is None or args.last >= args.first, "--last must be >= --first"),
        (reading_problem(args) is None, reading_problem(args)),
        (
            not args.dose_weighting or args.dose_per_frame is not None,
            "--dose-weighting needs --dose-per-frame",
        ),
        (args.patches is None or _patches(args.patches), "--patches wants NxM, e.g. 5x5"),
        (
            not (args.patches and args.shifts_from),
            "--patches estimates shifts: it excludes --shifts-from",
        ),
        (
            args.shifts_from is None or Path(args.shifts_from).is_dir(),
            f"--shifts-from {args.shifts_from}: not a folder",
        ),
    ]
    return next((msg for ok, msg in checks if not ok), None) or watch.option_problem(args)


def _patches(text: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    return (int(m[1]), int(m[2])) if m and int(m[1]) >= 1 and int(m[2]) >= 1 else None


def expand(inputs: list[str]) -> list[tuple[Path, str | None]]:
    """Arguments -> ``(movie, problem or None)``; a folder gives its movie files, sorted."""
    from cryoden.movie import SUFFIXES

    out = []
    for s in inputs:
        p = Path(s)
        if not p.is_dir():
            out.append((p, None))
            continue
        try:
            names = sorted(
                f
                for f in p.iterdir()
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in SUFFIXES
            )
        except OSError as e:
            out.append((p, f"cannot list the folder: {e.strerror or e}"))
            continue
        if not names:
            out.append((p, f"no movies ({', '.join(SUFFIXES)}) in the folder"))
        out += [(f, None) for f in names]
    return out


def outputs_of(movie: Path, outdir: Path) -> list[Path]:
    """The four outputs of ``movie``, in :data:`SUBDIRS` order."""
    return [outdir / d / (movie.stem + (".star" if d == "shifts" else ".mrc")) for d in SUBDIRS]


def main(args: argparse.Namespace) -> int:
    from cryoden.infer import line

    problem = _check_options(args)
    if problem:
        print(line(None, problem), file=sys.stderr)
        return 2
    try:
        return _main(args)
    except ValueError as e:  # a problem with the whole run: nothing was done
        print(line(None, e), file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from cryoden import io, outputs
    from cryoden.progress import Progress

    share = shard.from_environment(args.shard)
    outdir = Path(args.out)
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"-o {outdir} is a file, not a folder")
    record = outdir / (RECORD if share is None else RECORD.replace(".json", f".{share.tag}.json"))
    movies = [] if args.watch else expand(args.movies)
    if args.watch:
        problem = watch.output_folder_problem(args.movies, outdir)
        if problem:
            raise ValueError(f"--watch: {problem}")
    jobs = []
    for movie, problem in movies:
        outs = outputs_of(movie, outdir)
        skip = args.skip_existing and problem is None and all(o.exists() for o in outs)
        jobs += [outputs.Job(movie, out, problem, skip) for out in outs]
    extra = [args.gain, args.defects]
    if args.shifts_from:
        extra += [Path(args.shifts_from) / f"{m.stem}.star" for m, _ in movies]
    jobs += [outputs.Job(Path(f)) for f in extra if f]
    clash = outputs.conflicts(jobs, record)
    if clash:
        raise ValueError(re.sub(r"choose another -o.*$", "choose another -o", clash))
    names: dict[str, Path] = {}
    for movie, _ in movies:
        if movie.stem in names and names[movie.stem] != movie:
            raise ValueError(
                f"{names[movie.stem]} and {movie} would both be written as {movie.stem}.mrc: "
                "nothing was done; rename one or run them into different -o folders"
            )
        names[movie.stem] = movie
    movies = shard.take(movies, share)
    for d in SUBDIRS:
        (outdir / d).mkdir(parents=True, exist_ok=True)
        io.remove_stale_temporaries(outdir / d)

    show = Progress(1 if args.watch else len(movies), args.quiet)
    if share is not None:
        show.say(
            f"cryoden: {share}: "
            + ("movies as they come" if args.watch else f"{len(movies)} movie(s)")
        )
    t0, log = time.time(), []
    options = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    try:
        if args.watch:
            _watch(args, outdir, share, show, log)
        else:
            for movie, problem in movies:
                _process(movie, problem, outdir, args, show, log)
    except KeyboardInterrupt:
        show.close()
        _record(record, options, log, time.time() - t0, interrupted=True)
        print("cryoden: interrupted; finished movies are complete", file=sys.stderr)
        return 130
    show.close()
    _record(record, options, log, time.time() - t0, interrupted=False)
    done = sum(e["status"] == "done" for e in log)
    bad = sum(e["status"] == "error" for e in log)
    where = f"; halves in {outdir / 'even'} and {outdir / 'odd'}" if done else ""
    show.say(
        f"cryoden: {done} movie(s) done, {len(log) - done - bad} skipped, {bad} failed, "
        f"{time.time() - t0:.1f} s{where}"
    )
    return 1 if bad else 0


def _process(movie: Path, problem, outdir: Path, args, show, log: list[dict]) -> dict:
    """Process one movie (one line when it fails); append and return its record entry."""
    from cryoden.infer import line

    entry = {"movie": str(movie)}
    log.append(entry)
    if (
        problem is None
        and args.skip_existing
        and all(o.exists() for o in outputs_of(movie, outdir))
    ):
        entry["status"] = "skipped"
        show.say(f"cryoden: {movie}: skipped (outputs exist)")
        show.file_done()
        return entry
    try:
        if problem is not None:
            raise ValueError(problem)
        entry.update(_one(movie, outdir, args, show), status="done")
    except (ValueError, OSError, MemoryError) as e:
        entry.update(status="error", error=line(movie, e))
        show.error(entry["error"])
    show.file_done()
    return entry


def _watch(args, outdir: Path, share, show, log: list[dict]) -> None:
    """Process movies as they become complete; each once, also across restarts."""
    from cryoden.movie import SUFFIXES

    name = "cryoden-movies-watch" + (f".{share.tag}" if share else "") + ".jsonl"
    manifest = watch.Manifest(outdir / name)
    finished = manifest.finished_unchanged()  # a failed file changed since: again
    follower = watch.follower(args.movies, SUFFIXES, args, share, finished)
    if finished:
        show.say(f"cryoden: {len(finished)} movie(s) already done according to {manifest.path}")
    stems: dict[str, str] = {
        Path(e["input"]).stem: e["input"] for e in finished.values() if e.get("status") == "done"
    }
    for movie in follower:
        problem = None
        if any(follower.would_take(o) for o in outputs_of(movie, outdir)):
            problem = "its outputs would be watched as new movies; choose another -o"
        elif stems.get(movie.stem, str(movie)) != str(movie):
            problem = f"{stems[movie.stem]} was already written as {movie.stem}.mrc"
        entry = _process(movie, problem, outdir, args, show, log)
        if entry["status"] == "done":
            stems[movie.stem] = str(movie)
        manifest.add({**entry, "input": str(movie), "time": time.time()})


def _one(movie: Path, outdir: Path, args, show) -> dict:
    """Align one movie and write its outputs; -> its record entry. Raises ValueError."""
    from cryoden import align, halfsums, motionstar
    from cryoden.movie import open_movie, reading_kwargs

    t0 = time.time()
    first = args.first - 1
    with open_movie(movie, **reading_kwargs(args), first=first, last=args.last) as m:
        n, shape = len(m), m.info.shape
        if n < 2:
            raise ValueError(f"{n} frame: even and odd halves need at least 2 frames")
        ps = args.pixel_size or m.info.pixel_size
        if not ps:
            raise ValueError("no pixel size in the header: give --pixel-size")
        if args.shifts_from:
            source = Path(args.shifts_from) / f"{movie.stem}.star"
            alignment = align.Alignment(_read_shifts(source, first, n))
        else:
            source = "estimated"
            patches = _patches(args.patches) if args.patches else None
            alignment = align.estimate_shifts(m, pixel_size=ps, patches=patches)
        dose = None
        if args.dose_weighting:
            dose = align.DoseWeighting(ps, args.dose_per_frame, voltage=args.voltage)
        even, odd = halfsums.partition(n, "even-odd")
        full, even_sum, odd_sum = align.aligned_sums(m, alignment, [None, even, odd], dose)
    star, *images = outputs_of(movie, outdir)
    motionstar.write(
        star,
        alignment.shifts,
        movie_name=str(movie),
        shape=shape,
        gain_name=args.gain,
        pixel_size=ps,
        dose_per_frame=args.dose_per_frame,
        voltage=args.voltage,
        start_frame=args.first,
        local=alignment.local,
    )
    try:
        halfsums.write_sums(images, [even_sum, odd_sum, full], ps, f"cryoden movies {movie.name}")
    except BaseException:
        star.unlink(missing_ok=True)
        raise
    shifts = alignment.shifts
    from cryoden.train.moviedata import drift

    summary = dict(
        frames=n,
        shape=list(shape),
        pixel_size=ps,
        shifts_from=str(source),
        drift_px=round(drift(shifts), 3),
        max_shift_px=round(float(max(abs(shifts).max(), 0.0)), 3),
        final_shift_px=[round(float(v), 3) for v in shifts[-1]],
        seconds=round(time.time() - t0, 2),
    )
    show.say(
        f"cryoden: {movie}: {n} frames {shape[1]}x{shape[0]}, drift {summary['drift_px']:.1f} px "
        f"({summary['shifts_from']}), {summary['seconds']:.1f} s"
    )
    return summary


def _read_shifts(star: Path, first: int, n: int):
    """Shifts ``(n, 2)`` of frames ``first .. first + n - 1`` (0-based) from a RELION STAR."""
    import numpy as np

    from cryoden import motionstar

    if not star.is_file():
        raise ValueError(f"no shifts file {star} (--shifts-from)")
    ms = motionstar.read(star)
    numbers = np.asarray(ms.frame_numbers) - 1
    want = np.arange(first, first + n)
    pos = {int(k): i for i, k in enumerate(numbers)}
    missing = [int(k) + 1 for k in want if int(k) not in pos]
    if missing:
        raise ValueError(f"{star} has no shift for frame(s) {missing[:5]} (1-based)")
    return np.asarray(ms.shifts, np.float64)[[pos[int(k)] for k in want]]


def _record(path: Path, options: dict, log: list[dict], seconds: float, interrupted) -> None:
    """OUTDIR/cryoden-movies.json (per share: .shard-I-of-N.json): options, each movie's
    outcome, written atomically."""
    from cryoden import __version__, io

    rec = dict(
        cryoden=__version__,
        command=sys.argv,
        cwd=os.getcwd(),
        options={k: v for k, v in options.items() if k != "movies"},
        seconds=round(seconds, 2),
        interrupted=interrupted,
        movies=log,
    )
    with io.atomic(path) as tmp:
        tmp.write_text(json.dumps(rec, indent=1, default=str) + "\n")
