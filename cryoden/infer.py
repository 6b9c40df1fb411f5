"""Denoise micrographs, image stacks and tomograms with pretrained or trained models.

Example::

    cryoden infer micrographs/*.mrc -o denoised/
    cryoden infer tomo.rec -o denoised/ --model unet-3d-20a --device gpu
    python -m cryoden.infer data/ -o png/ --format png --suffix _dn

Inputs: image files (.mrc .mrcs .map .rec .st .ali .tif .tiff .png) or directories, which expand
to the image files directly inside them. Each is read, denoised and written to
``OUTDIR/<name><suffix><ext>``: ``--format auto`` (default) keeps the input's format and extension;
``mrc`` writes float32 MRC (an MRC input keeps its extension, others get ``.mrc``), ``tiff``
float32 ``.tif``, ``png`` 8-bit ``.png`` (2D only, normalised, +-3 std mapped to 0..255).
MRC output keeps the input's voxel size, origin and extended header.

Kinds (``--kind auto`` decides per file, see :mod:`cryoden.io`): a ``2d`` image and each slice
of a ``stack`` go through the 2D model (default ``unet``); a ``volume`` through the 3D model
(default ``unet-3d``). Several ``--model`` are averaged. Denoised images are for visualisation,
picking and segmentation: extract particles for reconstruction from the raw data.

A file that cannot be read, denoised or written is reported on one line
(``cryoden: error: <file>: <problem>``), leaves no output, and the run goes on; the exit status
is then 1. Bad options, a model that does not exist, an unusable device or output directory stop
the run before any file, with exit status 2. Compiled kernels are cached on disk (see
:mod:`cryoden.runtime`; env ``CRYODEN_CACHE_DIR``). ``OUTDIR/cryoden-infer.json`` records the
version, command line, options and per-file outcome of the last run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

OUT_EXT = {"mrc": ".mrc", "tiff": ".tif", "png": ".png"}
RECORD = "cryoden-infer.json"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or directories")
    parser.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    a = parser.add_argument_group("model")
    a.add_argument(
        "-m",
        "--model",
        action="append",
        metavar="MODEL",
        help="pretrained name, weights file or training run directory; repeat to "
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
        help="how to treat each file (default: auto, from the file)",
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
    a.add_argument("--batch-size", type=int, metavar="N", help="tiles per device per step")
    a.add_argument(
        "--normalize",
        action="store_true",
        help="keep the output normalised (zero mean, unit std of the input)",
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
        help="Gaussian filter sigma in px: before denoising in 2D, after in 3D",
    )
    a.add_argument(
        "--topaz-compat",
        action="store_true",
        help="whole image, unpadded: Topaz's exact numbers at sizes that are not a "
        "multiple of the network stride",
    )
    a = parser.add_argument_group("output")
    a.add_argument(
        "--format",
        choices=("auto", "mrc", "tiff", "png"),
        default="auto",
        help="output format (default: auto, same as the input)",
    )
    a.add_argument("--suffix", default="", help="added to each output's base name (default: '')")
    a.add_argument("--skip-existing", action="store_true", help="skip inputs whose output exists")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cryoden.infer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_args(parser)
    return parser.parse_args(argv)


def error(where: object, problem: object) -> None:
    """Print ``cryoden: error: <where>: <problem>`` as one line on stderr."""
    from tqdm import tqdm  # writes above any progress bar

    text = " ".join(str(problem).split()).removeprefix(f"{where}: ")
    tqdm.write(f"cryoden: error: {where}: {text}", file=sys.stderr)


def expand(inputs: list[str]) -> list[Path]:
    """Input arguments -> files; a directory gives its (non-hidden) image files, sorted."""
    from cryoden.io import FORMATS

    files = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            files += sorted(
                f
                for f in p.iterdir()
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in FORMATS
            )
        else:
            files.append(p)
    return files


def output_path(src: Path, outdir: Path, fmt: str, suffix: str) -> Path:
    """Where ``src`` is written: ``outdir/<stem><suffix><ext>``; ValueError for unknown input."""
    from cryoden.io import image_format

    in_fmt = image_format(src)
    fmt = in_fmt if fmt == "auto" else fmt
    ext = src.suffix if fmt == in_fmt else OUT_EXT[fmt]
    return outdir / f"{src.stem}{suffix}{ext}"


def _check_options(args: argparse.Namespace) -> str | None:
    checks = [
        (args.patch_size is None or args.patch_size >= 1, "--patch-size must be >= 1"),
        (args.padding is None or args.padding >= 0, "--padding must be >= 0"),
        (args.batch_size is None or args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.lowpass >= 1, "--lowpass must be >= 1 (1 is off)"),
        (args.gaussian >= 0, "--gaussian must be >= 0"),
        (
            not (args.topaz_compat and (args.patch_size or args.padding is not None)),
            "--topaz-compat runs whole images: it excludes --patch-size and --padding",
        ),
    ]
    return next((msg for ok, msg in checks if not ok), None)


class Runner:
    """Denoises one image at a time, keeping one Denoiser per dimensionality (compiled kernels
    are cached there), made on first use; a model that fails to load fails every later image of
    that dimensionality with the same error."""

    def __init__(self, args: argparse.Namespace, devices: list, tile_bar):
        self.args, self.devices, self.bar = args, devices, tile_bar
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

    def __call__(self, data, kind: str):
        """``data``: (H, W), (N, H, W) stack or (D, H, W) volume -> float32, same shape."""
        import numpy as np

        den = self.denoiser(3 if kind == "volume" else 2)
        if kind != "stack":
            return den(np.asarray(data, np.float32), progress=self._progress(0, 1), **self.kw)
        y = np.empty(data.shape, np.float32)
        for i, section in enumerate(data):
            try:
                x = np.asarray(section, np.float32)
                y[i] = den(x, progress=self._progress(i, len(y)), **self.kw)
            except ValueError as e:
                raise ValueError(f"slice {i}: {e}") from e
        return y

    def _progress(self, i: int, n: int):
        def update(done: int, total: int) -> None:  # section i of n: tile batch done of total
            self.bar.total = total * n
            self.bar.update(total * i + done - self.bar.n)

        return update


def main(args: argparse.Namespace) -> int:
    """Denoise every input; 0 when all succeeded, 1 when some failed, 2 when none could start."""
    t0 = time.perf_counter()
    problem = _check_options(args)
    if problem:
        error("options", problem)
        return 2
    outdir = Path(args.output)
    try:  # fail early on an unusable output directory
        outdir.mkdir(parents=True, exist_ok=True)
        probe = outdir / f".cryoden-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        error(outdir, f"cannot write to the output directory: {e.strerror or e}")
        return 2

    import dataclasses
    import json

    from tqdm import tqdm

    from cryoden import __version__, io, runtime, weights

    try:
        devices = runtime.setup(args.device)
        for m in args.model or []:
            weights.resolve(m)
    except (RuntimeError, ValueError) as e:
        error("--device" if isinstance(e, RuntimeError) else "--model", e)
        return 2

    files = expand(args.inputs)
    quiet = True if args.quiet else None  # None: bars only on a terminal
    file_bar = tqdm(files, unit="file", delay=1, disable=quiet or len(files) < 2)
    tile_bar = tqdm(unit="tile", leave=False, position=len(files) > 1, delay=1, disable=quiet)
    run = Runner(args, devices, tile_bar)
    label = f"cryoden {__version__} infer, model {'+'.join(args.model or ['default'])}"[:80]
    log, seen = [], {}
    for src in file_bar:
        entry = {"input": str(src)}
        try:
            out = output_path(src, outdir, args.format, args.suffix)
            entry["output"] = str(out)
            if src.exists() and out.exists() and out.samefile(src):
                raise ValueError("output would overwrite the input; choose another -o or --suffix")
            if out in seen:
                raise ValueError(f"output {out} is already written for {seen[out]}")
            seen[out] = src
            if args.skip_existing and out.exists():
                entry["status"] = "skipped"
            else:
                img = io.read(src, kind=None if args.kind == "auto" else args.kind)
                entry["kind"] = img.kind
                y = run(img.data, img.kind)
                io.write(out, dataclasses.replace(img, data=y), label=label)
                entry["status"] = "ok"
        except Exception as e:  # one bad file must not stop the batch
            msg = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
            error(src, msg)
            entry.update(status="failed", error=msg)
        log.append(entry)
    tile_bar.close()

    seconds = time.perf_counter() - t0
    counts = {k: sum(e["status"] == k for e in log) for k in ("ok", "skipped", "failed")}
    options = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    record = dict(
        version=__version__,
        command=sys.argv,
        options=options,
        seconds=seconds,
        devices=[str(d) for d in devices],
        files=log,
    )
    try:
        with io.atomic(outdir / RECORD) as tmp:
            tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    except OSError as e:
        error(outdir / RECORD, e.strerror or e)
    if not args.quiet:
        print(
            f"cryoden: {counts['ok']} written, {counts['skipped']} skipped, "
            f"{counts['failed']} failed in {seconds:.1f} s -> {outdir}",
            file=sys.stderr,
        )
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
