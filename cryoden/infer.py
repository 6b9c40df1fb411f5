"""Denoise micrographs, image stacks and tomograms with pretrained or trained models.

Examples:
  cryoden infer micrographs/*.mrc -o denoised/
  cryoden infer tomo.rec -o denoised/ --model unet-3d-20a --device gpu
  cryoden infer data/ -o png/ --format png --suffix _dn

Inputs are image files (.mrc .mrcs .map .rec .st .ali .tif .tiff .png) or folders, which give
the image files directly inside them. Each is written to OUTDIR/<name><suffix><ext>. Format
auto keeps the input's format and extension; mrc writes float32 MRC (an MRC input keeps its
extension, others get .mrc); tiff writes float32 .tif; png writes an 8-bit .png of a single 2D
image (normalised, -3..+3 std mapped to 0..255): a stack or volume given with --format png is
refused before any work (use mrc or tiff). MRC output keeps the input's voxel size, origin and
extended header.

Inputs are never replaced: every output path is planned before any work. When an output (or the
run record) would replace a file that is an input of the run (also through a symlink or a hard
link), or two inputs would share an output, the run stops at once with exit status 2 and writes
nothing.

Kinds: with --kind auto each file decides. One section is 2d. The extension decides for .mrcs,
.st, .ali (stacks) and .rec, .map (volumes); for .mrc the MRC space group does (0: stack, 1-230:
volume); a TIFF is a volume when it has an ImageJ Z axis, otherwise a stack. Before each file
a line gives its kind and what decided it, the shape, the model and the tiling; 'weak cue' marks
a decision the file does not state clearly (space group and mz disagree, mrcfile's default
header, a plain multi-page TIFF): check it, and use --kind to override. A 2d image and each
slice of a stack go through the 2D model (default unet), a volume through the 3D model (default
unet-3d); several --model are averaged. Denoised images are for visualisation, picking and
segmentation: extract particles for reconstruction from the raw data.

Errors: a file that cannot be read, denoised or written is reported on one line
("cryoden: error: FILE: problem"), leaves no output, and the run goes on; the exit status is
then 1. Bad options, a model that does not exist, an unusable device, output folder or
CRYODEN_MEMORY_BUDGET stop the run before any file, with exit status 2. Ctrl-C (or SIGTERM)
removes the unfinished output, writes the record and exits with status 130 (143).

Progress goes to stderr: bars on a terminal, plain lines in a log file; -q keeps only errors.
OUTDIR/cryoden-infer.json records the version, command line, options and per-file outcome of
the last run. --preview adds OUTDIR/previews/<output name>.png per file (raw | denoised, binned;
a failed preview is reported on one line and makes the exit status 1, the output stays).
Temporary files that a killed cryoden left in OUTDIR are removed by the next run.
Environment: CRYODEN_MEMORY_BUDGET (bytes, or with a K, M, G or T suffix) caps the memory of one
tile batch (default: 60% of an accelerator's memory, 40% of RAM on CPU); CRYODEN_CACHE_DIR is
where compiled kernels are cached.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path

from cryoden import outputs, shard, watch

RECORD = "cryoden-infer.json"
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUTDIR", help="output folder (made if needed)"
    )
    a = parser.add_argument_group("model")
    a.add_argument(
        "-m",
        "--model",
        action="append",
        metavar="MODEL",
        help="pretrained name, weights file or training run folder; repeat to "
        "average (default: unet for 2D, unet-3d for volumes)",
    )
    a.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype (default: float32)",
    )
    a.add_argument(
        "--device",
        choices=("cpu", "gpu", "tpu"),
        help="device kind (default: an accelerator if JAX sees one, else cpu)",
    )
    a = parser.add_argument_group("denoising")
    a.add_argument(
        "--kind",
        choices=("auto", "2d", "stack", "volume"),
        default="auto",
        help="how to treat each file (default: auto, from the file; see Kinds above)",
    )
    a.add_argument(
        "--patch-size",
        type=int,
        metavar="PX",
        help="kept core of each tile (default: as large as memory allows)",
    )
    a.add_argument(
        "--padding",
        "--patch-padding",
        type=int,
        metavar="PX",
        help="tile margin per side (default: the receptive field in 2D, exact; 48 in 3D)",
    )
    a.add_argument(
        "--batch-size", type=int, metavar="N", help="tiles per device per step (default: 1)"
    )
    a.add_argument(
        "--normalize",
        action="store_true",
        help="keep the output normalised, zero mean and unit std of the input (default: off, "
        "the input's mean and std are restored)",
    )
    a.add_argument(
        "--lowpass",
        type=float,
        default=1.0,
        metavar="F",
        help="hard low-pass by binning factor F before denoising (default: 1, off)",
    )
    a.add_argument(
        "--gaussian",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="Gaussian filter sigma in px: before denoising in 2D, after in 3D (default: 0, off)",
    )
    a.add_argument(
        "--topaz-compat",
        action="store_true",
        help="whole image, unpadded: Topaz's exact numbers at sizes that are not a "
        "multiple of the network stride (default: off, tiled)",
    )
    a = parser.add_argument_group("output")
    a.add_argument(
        "--format",
        choices=("auto", "mrc", "tiff", "png"),
        default="auto",
        help="output format; png only for single 2D images (default: auto, as the input)",
    )
    a.add_argument("--suffix", default="", help="added to each output's base name (default: none)")
    a.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip inputs whose output exists (default: off, existing outputs are replaced)",
    )
    a = parser.add_argument_group("collection time and clusters")
    watch.add_args(a, "file", "denoise")
    shard.add_arg(a, "input")
    a.add_argument(
        "--preview",
        action="store_true",
        help="also write OUTDIR/previews/<output name>.png: raw | denoised, binned to at most "
        "1024 px (stacks: the central slice; volumes: central XY, XZ, YZ slices) "
        "(default: off)",
    )
    a.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no per-file lines, progress or summary; errors only (default: off)",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cryoden.infer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_args(parser)
    return parser.parse_args(argv)


def line(where: object, problem: object) -> str:
    """``cryoden: error: <where>: <problem>`` on one line (no ``where``: the problem alone)."""
    text = " ".join(str(problem).split())
    if where is None:
        return f"cryoden: error: {text}"
    return f"cryoden: error: {where}: {text.removeprefix(f'{where}: ')}"


def error(where: object, problem: object) -> None:
    """Print :func:`line` on stderr, above any progress bar."""
    from tqdm import tqdm

    tqdm.write(line(where, problem), file=sys.stderr)


def _check_options(args: argparse.Namespace) -> str | None:
    finite = math.isfinite(args.lowpass) and math.isfinite(args.gaussian)
    checks = [
        (args.patch_size is None or args.patch_size >= 1, "--patch-size must be >= 1"),
        (args.padding is None or args.padding >= 0, "--padding must be >= 0"),
        (args.batch_size is None or args.batch_size >= 1, "--batch-size must be >= 1"),
        (finite, "--lowpass and --gaussian must be finite numbers"),
        (not set("/\\\0") & set(args.suffix), "--suffix goes into file names: no '/' or '\\'"),
        (args.lowpass >= 1, "--lowpass must be >= 1 (1 is off)"),
        (args.gaussian >= 0, "--gaussian must be >= 0"),
        (
            not (args.topaz_compat and (args.patch_size or args.padding is not None)),
            "--topaz-compat runs whole images: it excludes --patch-size and --padding",
        ),
    ]
    return next((msg for ok, msg in checks if not ok), None) or watch.option_problem(args)


class Runner:
    """Denoises one image at a time, keeping one Denoiser per dimensionality (compiled kernels
    are cached there), made on first use; a model that fails to load fails every later image of
    that dimensionality with the same error."""

    def __init__(self, args: argparse.Namespace, devices: list):
        self.args, self.devices = args, devices
        self.denoisers: dict = {}  # ndim -> Denoiser, or the exception making it raised
        self.kw = dict(
            patch_size=args.patch_size,
            padding=args.padding,
            batch_size=args.batch_size,
            normalize=args.normalize,
            topaz_compat=args.topaz_compat,
            lowpass=args.lowpass,
            gaussian=args.gaussian,
        )

    def denoiser(self, ndim: int):
        from cryoden import Denoiser

        if ndim not in self.denoisers:
            try:
                a = self.args
                self.denoisers[ndim] = Denoiser(
                    a.model, ndim=ndim, dtype=a.dtype, devices=self.devices
                )
            except ValueError as e:
                self.denoisers[ndim] = e
        if isinstance(self.denoisers[ndim], Exception):
            raise self.denoisers[ndim]
        return self.denoisers[ndim]

    def describe(self, data, kind: str) -> tuple[str, int, str]:
        """-> (model and tiling of ``data`` as a phrase, steps of work, unit of a step)."""
        from cryoden.inference import DEFAULT_MODEL
        from cryoden.tiling import tile_shape

        a, ndim = self.args, 3 if kind == "volume" else 2
        den = self.denoiser(ndim)
        models = a.model or [DEFAULT_MODEL[ndim]]
        text = f"model {'+'.join(map(str, models))}, "
        shape = data.shape[1:] if kind == "stack" else data.shape
        if a.topaz_compat:
            text += "whole image unpadded (--topaz-compat)"
            n, per_call = 1, 1
        else:
            routes = [
                den.route(net, shape, a.patch_size, a.padding, a.batch_size) for net in den.nets
            ]
            plan, kinds = routes[0].plan, {r.kind for r in routes}
            n, per_call = len(plan.tiles), plan.per_call
            size = "x".join(map(str, tile_shape(plan.tiles)))
            if kinds == {"levelwise"}:  # steps: stage kernel calls over all models
                text += "level by level (exact; stages planned from the memory budget)"
            elif kinds == {"spatial"}:
                r = routes[0].spatial.plan
                text += (
                    f"whole image split over {r.n_dev} devices along axis {r.axis}, "
                    f"work x{routes[0].work:.2f}"
                )
            else:
                text += "whole image" if n == 1 else f"{n} tiles of {size}, work x{plan.work:.2f}"
            if kind != "stack":
                steps = sum(r.calls for r in routes)
                return text, steps, "step" if kinds != {"tiles"} or per_call > 1 else "tile"
        if kind == "stack":
            return text + " per slice", len(data), "slice"
        steps = -(-n // per_call) * len(models)  # kernel calls over all models
        return text, steps, "tile" if per_call == 1 else "step"

    def __call__(self, data, kind: str, update=None):
        """``data``: (H, W), (N, H, W) stack or (D, H, W) volume -> float32, same shape.

        update(done): progress in tile batches (2D, volume) or slices (stack)."""
        import numpy as np

        den = self.denoiser(3 if kind == "volume" else 2)
        if kind != "stack":
            return den(np.asarray(data, np.float32), progress=self._batches(update), **self.kw)
        y = np.empty(data.shape, np.float32)
        for i, section in enumerate(data):
            try:
                y[i] = den(np.asarray(section, np.float32), **self.kw)
            except ValueError as e:
                raise ValueError(f"slice {i}: {e}") from e
            if update:
                update(i + 1)
        return y

    def _batches(self, update):
        """Denoiser progress (done, total batches), once per model -> update(done over all)."""
        if update is None:
            return None
        state = {"offset": 0, "last": 0}

        def progress(done: int, total: int) -> None:
            if done <= state["last"]:  # the next model started (done rises within one)
                state["offset"] += total
            state["last"] = done
            update(state["offset"] + done)

        return progress


def _problem(e: BaseException, stage: str, budget: int | None) -> str:
    """One-line description of a per-file failure while ``stage`` ('reading', 'denoising'...)."""
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
        if stage != "denoising":
            return f"out of memory while {stage}: the file is too large for this machine"
        now = f" (tile budget {budget / 2**30:.3g} GiB)" if budget else ""
        return (
            f"out of memory while denoising{now}: use a smaller --patch-size, or set "
            f"CRYODEN_MEMORY_BUDGET (e.g. 4G) below what the device can hold"
        )
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM raises KeyboardInterrupt('SIGTERM') here, as Ctrl-C raises KeyboardInterrupt."""

    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _signals_ignored():
    """Let nothing interrupt writing the record."""
    try:
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _kind_text(img, forced: bool) -> str:
    shape = "x".join(map(str, img.data.shape))
    if forced:
        return f"{img.kind} {shape} (--kind)"
    if img.kind_weak:
        return f"{img.kind} {shape} (weak cue: {img.kind_cue}; use --kind to override)"
    return f"{img.kind} {shape} ({img.kind_cue})"


def _check_kind(img, out: Path) -> None:
    """Refuse before any work what the kind makes impossible."""
    if img.kind == "volume" and img.data.shape[0] == 1:
        raise ValueError(
            "one 2D section cannot be denoised as a volume (--kind volume): "
            "use --kind auto or 2d, or give a 3D file"
        )
    if out.suffix == ".png" and img.kind != "2d":
        raise ValueError(outputs.png_problem(f"a {img.kind} of shape {img.data.shape}"))


def main(args: argparse.Namespace) -> int:
    """Denoise every input; 0 when all succeeded, 1 when some failed, 2 when none could start,
    130 (143) when interrupted by SIGINT (SIGTERM)."""
    try:
        return _main(args)
    except KeyboardInterrupt:  # before any file: nothing to record
        print("cryoden: interrupted before any file was processed", file=sys.stderr)
        return EXIT_SIGNAL["SIGINT"]


def _main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    problem = _check_options(args)
    if problem:
        error("options", problem)
        return 2
    from cryoden import shard as sharding

    try:
        share = sharding.from_environment(args.shard)
    except ValueError as e:
        error(None, e)  # the message names --shard or the Slurm variable
        return 2
    outdir = Path(args.output)
    record = outdir / (RECORD if share is None else RECORD.replace(".json", f".{share.tag}.json"))
    if args.watch:
        jobs, total = [], None
        problem = watch.output_folder_problem(args.inputs, outdir)
        if problem:
            error("--watch", problem)
            return 2
    else:
        jobs = outputs.plan(args.inputs, outdir, args.format, args.suffix, args.skip_existing)
        clash = outputs.conflicts(jobs, record)  # over all shares: each process sees the same
        if args.preview and not clash:  # previews may not replace inputs either
            import dataclasses

            from cryoden import preview

            shown = [
                dataclasses.replace(j, out=preview.path_for(outdir, j.out)) for j in jobs if j.out
            ]
            clash = outputs.conflicts(shown, record)
        if clash:
            error(None, clash)
            return 2
        jobs = sharding.take(jobs, share)
        total = len(jobs)
    try:  # fail early on an unusable output directory
        from cryoden import io

        outdir.mkdir(parents=True, exist_ok=True)
        io.new_temporary(outdir / "cryoden-probe").unlink()
    except OSError as e:
        error(outdir, f"cannot write to the output directory: {e.strerror or e}")
        return 2
    if args.preview:
        from cryoden import preview

        folder = outdir / preview.PREVIEWS
        try:
            folder.mkdir(exist_ok=True)
            io.new_temporary(folder / "cryoden-probe").unlink()
        except OSError as e:
            error(folder, f"cannot write the previews folder: {e.strerror or e}")
            return 2

    from cryoden import runtime, weights
    from cryoden.inference import memory_budget

    try:
        devices = runtime.setup(args.device)
        for m in args.model or []:
            weights.resolve(m)
    except (RuntimeError, ValueError) as e:
        error("--device" if isinstance(e, RuntimeError) else "--model", e)
        return 2
    try:
        budget = memory_budget(devices[0])
    except ValueError as e:
        error(None, e)
        return 2
    stale = io.remove_stale_temporaries(outdir, keep=[j.src for j in jobs])
    if args.preview:
        stale += io.remove_stale_temporaries(outdir / preview.PREVIEWS, keep=[j.src for j in jobs])
    if stale and not args.quiet:
        names = ", ".join(p.name for p in stale[:3]) + (", ..." if len(stale) > 3 else "")
        print(f"cryoden: removed {len(stale)} stale temporary file(s): {names}", file=sys.stderr)

    from cryoden.progress import Progress

    show = Progress(total or 1, args.quiet)
    if share is not None:
        what = "files as they come" if args.watch else f"{total} file(s)"
        show.say(f"cryoden: {share}: {what}")
    log: list[dict] = []
    stopped = None
    with _signals_interrupt():
        try:
            run = Runner(args, devices)
            if args.watch:
                _watch(args, outdir, share, run, show, log, budget)
            else:
                _run(args, jobs, total, run, show, log, budget, _identities(jobs))
        except KeyboardInterrupt as e:
            stopped = e.args[0] if e.args and e.args[0] in EXIT_SIGNAL else "SIGINT"
            for entry in log:
                entry.setdefault("status", "interrupted")
        finally:
            show.close()
    with _signals_ignored():
        return _finish(args, devices, log, record, time.perf_counter() - t0, stopped, show)


def _identities(jobs) -> set:
    """Identity keys (outputs.identity) of every existing input of ``jobs``."""
    return set().union(*(outputs.identity(j.src) for j in jobs if os.path.lexists(j.src)))


def _watch(args, outdir: Path, share, run: Runner, show, log: list[dict], budget: int) -> None:
    """Denoise files as they become complete; each input once, also across restarts."""
    from cryoden import io

    name = "cryoden-watch.jsonl" if share is None else f"cryoden-watch.{share.tag}.jsonl"
    manifest = watch.Manifest(outdir / name)
    finished = manifest.finished_unchanged()  # a failed file changed since: again
    written = {e["output"]: e["input"] for e in finished.values() if e.get("output")}
    follower = watch.follower(args.inputs, io.FORMATS, args, share, finished)
    if finished:
        show.say(f"cryoden: {len(finished)} file(s) already done according to {manifest.path}")
    show.say(
        f"cryoden: watching {', '.join(args.inputs)} "
        + (
            f"(stops after {args.idle:g} s without new files)"
            if args.idle is not None
            else "(Ctrl-C stops)"
        )
    )
    for src in follower:
        job = outputs.plan([str(src)], outdir, args.format, args.suffix, args.skip_existing)[0]
        if job.out is not None and not job.problem:
            if follower.would_take(job.out):
                job.out, job.problem = None, "its output would be watched as a new input"
            elif args.preview and follower.would_take(_preview_path(job.out)):
                job.out, job.problem = None, "its --preview would be watched as a new input"
            elif written.get(str(job.out), str(src)) != str(src):
                job.problem = f"{written[str(job.out)]} was already written to {job.out}"
        inputs = _identities([job])
        if job.out is not None and os.path.lexists(job.out):  # rare: check every input then
            inputs |= _identities([outputs.Job(Path(n)) for n in follower.listing()])
            if outputs.identity(job.out) & inputs and not job.problem:
                job.problem = f"its output {job.out} would replace an input; choose another -o"
        _run(args, [job], None, run, show, log, budget, inputs, start=len(log))
        entry = log[-1]
        if entry.get("status") == "ok":
            written[str(job.out)] = str(src)
        manifest.add({**entry, "input": str(src), "time": time.time()})


def _run(
    args, jobs, total, run: Runner, show, log: list[dict], budget: int, inputs: set, start: int = 0
) -> None:
    """Process every job in turn, appending its record entry to ``log`` as it starts.

    ``total``: the number of jobs (None: unknown, as in --watch); ``inputs``: identity keys of
    the run's inputs, which no output may replace."""
    import dataclasses

    from cryoden import __version__, io

    label = f"cryoden {__version__} infer, model {'+'.join(args.model or ['default'])}"[:80]
    for i, job in enumerate(jobs, start + 1):
        entry = {"input": str(job.src)}
        log.append(entry)
        if job.out is not None:
            entry["output"] = str(job.out)
        count = f"{i}/{total}" if total is not None else f"{i}"
        tag, t = f"cryoden: [{count}] {job.src}", time.perf_counter()
        stage = "planning"
        try:
            if job.problem:
                raise ValueError(job.problem)
            if job.skip or args.skip_existing and os.path.lexists(job.out):
                entry["status"] = "skipped"
                show.say(f"{tag}: skipped, {job.out} exists")
                continue
            stage = "reading"
            img = io.read(job.src, kind=None if args.kind == "auto" else args.kind)
            entry["kind"] = img.kind
            _check_kind(img, job.out)
            stage = "denoising"
            what, steps, unit = run.describe(img.data, img.kind)
            show.say(f"{tag}: {_kind_text(img, args.kind != 'auto')}, {what}")
            y = run(img.data, img.kind, show.steps(f"[{count}] {job.src}", steps, unit))
            stage = "writing"
            if outputs.identity(job.out) & inputs:  # a link made since the plan: never replace
                raise ValueError(f"{job.out} now names an input of this run; not replaced")
            io.write(job.out, dataclasses.replace(img, data=y), label=label)
            entry["status"] = "ok"
            show.say(f"{tag} -> {job.out} in {time.perf_counter() - t:.1f} s")
        except Exception as e:  # one bad file must not stop the batch
            msg = _problem(e, stage, budget)
            show.error(line(job.src, msg))
            entry.update(status="failed", error=msg)
        else:
            if args.preview:
                _preview(img, y, job, entry, show)
        finally:
            show.file_done()


def _preview_path(out) -> Path:
    """OUTDIR/previews/<output name>.png of the output ``out``."""
    from cryoden import preview

    return preview.path_for(Path(out).parent, out)


def _preview(img, y, job, entry: dict, show) -> None:
    """Write the preview of a denoised file; a failure is reported, the output stays."""
    from cryoden import preview

    path = _preview_path(job.out)
    try:
        preview.write(img.data, y, img.kind, path, title=job.out.name)
        entry["preview"] = str(path)
    except Exception as e:  # the denoised file is fine: report, count as a failure, go on
        msg = f"preview not written: {_problem(e, 'writing the preview', None)}"
        show.error(line(job.src, msg))
        entry["preview_error"] = msg


def _finish(args, devices, log, record_path: Path, seconds: float, stopped, show) -> int:
    """Write the record, print the summary; -> exit status."""
    import json

    from cryoden import __version__, io

    outdir = record_path.parent
    counts = {k: sum(e.get("status") == k for e in log) for k in ("ok", "skipped", "failed")}
    options = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    record = dict(
        version=__version__,
        command=sys.argv,
        options=options,
        seconds=seconds,
        devices=[str(d) for d in devices],
        files=log,
    )
    if stopped:
        record["interrupted"] = stopped
    try:
        with io.atomic(record_path) as tmp:
            tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    except OSError as e:
        show.error(line(record_path, e.strerror or e))
    summary = (
        f"{counts['ok']} written, {counts['skipped']} skipped, {counts['failed']} failed "
        f"in {seconds:.1f} s -> {outdir}"
    )
    if stopped:
        where = next((e["input"] for e in log if e["status"] == "interrupted"), None)
        during = f" during {where}" if where else ""
        show.error(f"cryoden: interrupted by {stopped}{during}: {summary}; see {record_path}")
        return EXIT_SIGNAL[stopped]
    show.say(f"cryoden: {summary}")
    return 1 if counts["failed"] or any("preview_error" in e for e in log) else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
