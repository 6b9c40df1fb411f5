"""cryoden-topaz: Topaz-Denoise's command line (topaz-em 0.3) on cryoden.

A drop-in for the topaz executable that cryoSPARC, RELION External jobs and Scipion call:

  cryoden-topaz denoise mics/*.mrc --model unet --device 0 --format mrc --patch-size 1280 \\
      --patch-padding 384 --normalize --output Denoised
  cryoden-topaz denoise --dir-a odd/ --dir-b even/ --num-epochs 100 --save-prefix run/model
  cryoden-topaz denoise3d tomo.rec -o denoised/ --model unet-3d-20a
  cryoden-topaz --version                                   prints 0.3.20

Flags, defaults, output names and numbers are Topaz 0.3's (docs/topaz-compat.md lists every
flag and each difference); models come from cryoden's weights (pretrained names, cryoden
files, Topaz .sav files). Bad flags and flags cryoden does not support stop the run with one
line naming the flag (exit 2); a file that cannot be read or written is reported on one line and
the others go on (exit 1). Inputs are never overwritten; outputs are written atomically.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

from cryoden import __version__

TOPAZ_VERSION = "0.3.20"  # what --version prints: the Topaz release whose interface this is
PROG = "cryoden-topaz"
FORMATS_2D = {
    "mrc": "mrc",
    "tiff": "tiff",
    "tif": "tiff",
    "png": "png",
    "jpg": "jpg",
    "jpeg": "jpg",
}
TRAIN_ARCHS = ("unet", "unet-small", "affine")  # Topaz 0.3 starts training from these models
RUN_SUFFIX = "_cryoden_run"  # <save-prefix> + this: the cryoden training run (resumable)


class Fail(Exception):
    """A problem that stops the whole run: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


UNSUPPORTED: dict[str, tuple[str, str]] = {}  # dest -> (flag, why): refused when given


def _unsupported(p, flag: str, why: str, **kw) -> None:
    """A Topaz flag cryoden refuses when given (default None = not given)."""
    action = p.add_argument(flag, default=None, help=f"not supported: {why}", **kw)
    UNSUPPORTED[action.dest] = (flag, why)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help does not state its default itself and there is
    one to state (not None or an empty string)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, "", argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=f"{__doc__.split(chr(10) * 2)[0]} (cryoden {__version__})",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        fromfile_prefix_chars="@",
    )
    p.add_argument("--version", action="version", version=TOPAZ_VERSION)
    sub = p.add_subparsers(dest="command", metavar="{denoise,denoise3d}", required=True)
    kw = dict(formatter_class=_DefaultsFormatter)
    _denoise_args(sub.add_parser("denoise", help="denoise micrographs (2D)", **kw))
    _denoise3d_args(sub.add_parser("denoise3d", help="denoise tomograms (3D)", **kw))
    return p


def _denoise_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("-d", "--device", type=int, default=0, help="accelerator index; -1 for CPU")
    a("micrographs", nargs="*", help="micrographs to denoise")
    a("-o", "--output", default="", help="output folder (default: beside each input)")
    a("--suffix", default="", help="added to output names (no -o: default .denoised)")
    a("--format", dest="format_", default="mrc", help="output format: mrc, tiff, png, jpg")
    a("--normalize", action="store_true", help="standardise each output (mean 0, std 1)")
    a("--stack", action="store_true", help="denoise the sections of one MRC stack into -o FILE")
    a("--save-prefix", help="training: save models as PREFIX_epochN.sav")
    a("--save-interval", default=10, type=int, help="training: also save every N epochs")
    a("-m", "--model", nargs="+", help="models, outputs averaged (default: unet)")
    a("-a", "--dir-a", help="training: folder of first halves")
    a("-b", "--dir-b", help="training: folder of second halves, same names")
    _unsupported(p, "--hdf", why="give -a/-b folders of MRC halves")
    a("--preload", action="store_true", help="accepted; cryoden reads halves as needed")
    a("--holdout", type=float, default=0.1, help="training: fraction of pairs for validation")
    a("--lowpass", type=float, default=1, help="hard low-pass by this binning factor")
    a("--gaussian", type=float, default=0, help="Gaussian filter sigma (px) before denoising")
    a("--inv-gaussian", type=float, default=0, help="inverse Gaussian sigma (px) before")
    a("--deconvolve", action="store_true", help="correct the spatial covariance before")
    a("--deconv-patch", type=int, default=1, help="--deconvolve in this many patches per axis")
    a("--pixel-cutoff", type=float, default=0, help="pixels beyond this many std -> mean")
    a(
        "-s",
        "--patch-size",
        type=int,
        default=1024,
        help="images larger than this + padding are tiled (exactly, see docs/topaz-compat.md)",
    )
    a("-p", "--patch-padding", type=int, default=500, help="see --patch-size")
    a(
        "--method",
        choices=["noise2noise", "masked"],
        default="noise2noise",
        help="training method (masked: not supported)",
    )
    a(
        "--arch",
        choices=["unet", "unet-small", "unet2", "unet3", "fcnet", "fcnet2", "affine"],
        default="unet",
        help="training: architecture, started from its pretrained model",
    )
    a("--optim", choices=["adam", "adagrad", "sgd"], default="adagrad", help="training optimiser")
    a("--lr", default=0.001, type=float, help="training learning rate")
    a("--criteria", default="L2", choices=["L0", "L1", "L2"], help="training loss")
    a("-c", "--crop", type=int, default=800, help="training crop size")
    a("--batch-size", type=int, default=4, help="training batch size")
    a("--num-epochs", default=100, type=int, help="training epochs")
    a("--num-workers", default=16, type=int, help="accepted; no effect on results")
    a("-j", "--num-threads", type=int, default=0, help="accepted; no effect on results")


def _denoise3d_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("volumes", nargs="*", help="volumes to denoise")
    a("-o", "--output", default="", help="output folder (default: beside each input)")
    a("--suffix", default="", help="added to output names (no -o: default .denoised)")
    a(
        "-m",
        "--model",
        nargs="+",
        help="model(s), outputs averaged; training starts from it (default: unet-3d)",
    )
    a("-a", "--even-train-path", help="training: even half tomogram(s), file or folder")
    a("-b", "--odd-train-path", help="training: odd half tomogram(s), file or folder")
    a("--N-train", type=int, default=1000, help="training tiles per volume pair per epoch")
    _unsupported(p, "--N-test", type=int, why="cryoden validates on held-out volume pairs")
    a("-c", "--crop", type=int, default=96, help="training tile size")
    _unsupported(p, "--base-kernel-width", type=int, why="the architecture comes from --model")
    a("--optim", choices=["adam", "adagrad", "sgd"], default="adagrad", help="training optimiser")
    a("--lr", default=0.001, type=float, help="training learning rate")
    a("--criteria", default="L2", choices=["L1", "L2"], help="training loss")
    a(
        "--momentum",
        type=float,
        help="SGD momentum, Nesterov (default: 0.9, what Topaz uses: it ignores its 0.8)",
    )
    a("--batch-size", type=int, default=10, help="training batch size")
    a("--num-epochs", type=int, default=500, help="training epochs")
    a("-w", "--weight_decay", type=float, default=0, help="training L2 penalty")
    a("--save-interval", default=10, type=int, help="training: also save every N epochs")
    a("--save-prefix", help="training: save models as PREFIX_epochN.sav")
    a("--num-workers", type=int, default=1, help="accepted; no effect on results")
    a("-j", "--num-threads", type=int, default=0, help="accepted; no effect on results")
    a("-g", "--gaussian", type=float, default=0, help="Gaussian filter sigma (px) after denoising")
    a(
        "-s",
        "--patch-size",
        type=int,
        default=96,
        help="< 1: whole volume (Topaz's numbers); else tiled (cryoden's tiles)",
    )
    a("-p", "--patch-padding", type=int, default=48, help="tile margin per side")
    a("-d", "--device", type=int, default=-2, help="-2 all accelerators, N one, -1 CPU")


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run ``cryoden-topaz``; exit status 0 done, 1 some file failed, 2 bad flags or model,
    130 interrupted."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        _check(args)
        if _training(args):
            from cryoden import runtime

            runtime.keep_host_memory()  # before JAX starts its threads, as cryoden train does
        devices = _devices(args.device)
        models = [_train(args)] if _training(args) else list(args.model)
        inputs = args.micrographs if args.command == "denoise" else args.volumes
        if not inputs:
            return 0
        den = _denoiser(models, 2 if args.command == "denoise" else 3, devices)
        jobs = _plan(args, inputs)
    except Fail as e:
        _say(f"{PROG}: error: {' '.join(str(e).split())}")
        return 2
    except KeyboardInterrupt:
        _say(f"{PROG}: interrupted")
        return 130
    try:
        failed = sum(
            not _one(args, den, src, out, i, len(jobs)) for i, (src, out) in enumerate(jobs, 1)
        )
    except KeyboardInterrupt:
        _say(f"{PROG}: interrupted; unfinished outputs removed")
        return 130
    _say(f"{PROG}: {len(jobs) - failed} written, {failed} failed")
    return 1 if failed else 0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _training(args) -> bool:
    if args.command == "denoise":
        return args.dir_a is not None or args.dir_b is not None
    return args.even_train_path is not None or args.odd_train_path is not None


def _check(args) -> None:
    """Refuse (Fail) flags cryoden does not support and values no run can use."""
    for dest, (flag, why) in UNSUPPORTED.items():
        if getattr(args, dest, None) is not None:
            raise Fail(f"{flag} is not supported by cryoden-topaz: {why}")
    given_model = args.model is not None
    if args.model is None:
        args.model = ["unet" if args.command == "denoise" else "unet-3d"]
    finite = all(math.isfinite(getattr(args, k, 0.0)) for k in ("gaussian", "lowpass", "lr"))
    checks = [
        (finite, "--lowpass, --gaussian and --lr must be finite numbers"),
        (args.gaussian >= 0, "--gaussian must be >= 0"),
        (args.patch_padding >= 0, "--patch-padding must be >= 0"),
        (not set("/\\\0") & set(args.suffix), "--suffix goes into file names: no '/' or '\\'"),
        (args.save_interval >= 1, "--save-interval must be >= 1"),
        (args.num_epochs >= 1, "--num-epochs must be >= 1"),
        ("none" not in args.model or args.model == ["none"], "--model none cannot be averaged"),
    ]
    if args.command == "denoise":
        cutoff, inv = args.pixel_cutoff, args.inv_gaussian
        prefilters = [args.gaussian > 0, inv > 0, args.deconvolve]
        checks += [
            (
                args.format_ in FORMATS_2D,
                f"--format {args.format_}: expected mrc, tiff, png or jpg",
            ),
            (
                math.isfinite(cutoff) and math.isfinite(inv),
                "--pixel-cutoff and --inv-gaussian must be finite numbers",
            ),
            (args.lowpass >= 1, "--lowpass must be >= 1 (1 is off)"),
            (inv >= 0, "--inv-gaussian must be >= 0"),
            (
                sum(prefilters) <= 1,
                "--gaussian, --inv-gaussian and --deconvolve exclude each "
                "other (Topaz applies only the first)",
            ),
            (args.deconv_patch >= 1, "--deconv-patch must be >= 1"),
            (
                args.deconvolve or args.deconv_patch == 1,
                "--deconv-patch has no effect without --deconvolve",
            ),
            (args.method == "noise2noise", "--method masked is not supported (noise2noise only)"),
            (
                not args.stack or (len(args.micrographs) <= 1 and args.output),
                "--stack denoises one MRC stack into the file given by -o",
            ),
        ]
        if _training(args):
            checks += [
                (
                    args.dir_a is not None and args.dir_b is not None,
                    "training needs both -a/--dir-a and -b/--dir-b",
                ),
                (
                    args.arch in TRAIN_ARCHS,
                    f"--arch {args.arch}: cryoden trains "
                    f"{', '.join(TRAIN_ARCHS)} (as Topaz 0.3, from the pretrained model)",
                ),
                (not cutoff > 0, "--pixel-cutoff is not supported in training"),
                (
                    not given_model,
                    "-m/--model is not used in training (it starts from --arch, as Topaz 0.3); "
                    "denoise with -m PREFIX_epochN.sav afterwards",
                ),
            ]
    elif _training(args):
        checks += [
            (
                args.even_train_path is not None and args.odd_train_path is not None,
                "training needs both -a/--even-train-path and -b/--odd-train-path",
            ),
            (len(args.model) == 1 and args.model != ["none"], "training starts from one --model"),
        ]
    if _training(args):
        checks += [
            (bool(args.save_prefix), "training needs --save-prefix (where models are saved)"),
            (args.crop >= 1 and args.batch_size >= 1, "--crop and --batch-size must be >= 1"),
        ]
    for ok, problem in checks:
        if not ok:
            raise Fail(problem)


# ----------------------------------------------------------------------------- devices


def _devices(device: int) -> list:
    """Topaz's ``--device`` -> JAX devices: -1 the CPU, N >= 0 accelerator N (the CPU, with a
    note, when JAX sees no accelerator, as Topaz falls back), -2 every accelerator."""
    from cryoden import runtime

    if device < -2:
        raise Fail(f"--device {device}: expected -1 (CPU), -2 (all accelerators) or N >= 0")
    if device == -1:
        return runtime.setup("cpu")
    chosen = _restrict_cuda(device) if device >= 0 else False
    try:
        devs = runtime.setup(None)
    except (RuntimeError, ValueError) as e:
        raise Fail(f"--device {device}: {e}") from None
    accel = [d for d in devs if d.platform != "cpu"]
    if not accel:
        _say(f"{PROG}: no accelerator visible to JAX; running on the CPU")
        return devs
    if device == -2:
        return accel
    index = 0 if chosen and len(accel) == 1 else device
    if index >= len(accel):
        raise Fail(f"--device {device}: only {len(accel)} accelerator(s) visible")
    return [accel[index]]


def _restrict_cuda(n: int) -> bool:
    """Make accelerator ``n`` (of those in CUDA_VISIBLE_DEVICES, else of all) the only GPU JAX
    will see, so that training uses it alone; False when JAX's backends already started."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",") if e.strip()] if visible else None
    if entries is not None and n >= len(entries):
        raise Fail(f"--device {n}: CUDA_VISIBLE_DEVICES={visible} lists {len(entries)} device(s)")
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = entries[n] if entries is not None else str(n)
    return True


def _denoiser(models: list, ndim: int, devices: list):
    """One Denoiser for every file (kernels compile once per shape); None for ``--model
    none`` (filters only)."""
    if models == ["none"]:
        return None
    from cryoden.inference import Denoiser

    try:
        return Denoiser(models, ndim=ndim, devices=devices)
    except ValueError as e:
        raise Fail(f"--model: {e}") from None


# ----------------------------------------------------------------------------- training


def sav_path(prefix: str, epoch: int, num_epochs: int) -> Path:
    """Topaz's model name: ``<prefix>_epoch<N>.sav``, N zero-padded to ceil(log10(epochs))."""
    digits = int(math.ceil(math.log10(num_epochs)))
    return Path(f"{prefix}_epoch{epoch:0{digits}d}.sav")


def train_config(args):
    """Topaz training flags -> cryoden training Config (cryoden.train.config)."""
    from cryoden import weights
    from cryoden.train import config as C

    two = args.command == "denoise"
    even, odd = (args.dir_a, args.dir_b) if two else (args.even_train_path, args.odd_train_path)
    init = args.arch if two else args.model[0]
    if weights.is_path(init):
        init = str(Path(init).expanduser().absolute())
    cfg = C.merge(C.Config(), C.load_preset("train-2d" if two else "train-3d"))
    over = {
        "model": {"init": init},
        "data": {
            "even": str(Path(even).absolute()),
            "odd": str(Path(odd).absolute()),
            "crop": args.crop,
            "batch_size": args.batch_size,
        },
        "optim": {"name": args.optim, "lr": args.lr, "loss": args.criteria},
        "run": {
            "out": str(Path(args.save_prefix + RUN_SUFFIX).absolute()),
            "epochs": args.num_epochs,
            "progress": sys.stderr.isatty(),
        },
    }
    if two:
        over["data"]["holdout"] = args.holdout
        over["model"].update(C.arch_fields(args.arch))
    else:
        over["data"]["samples_per_pair"] = args.N_train
        over["optim"]["weight_decay"] = args.weight_decay
        if args.momentum is not None:
            over["optim"]["momentum"] = args.momentum
    cfg = C.merge(cfg, over)
    _, spec, _ = weights.load(cfg.model.init)
    return C.with_init_spec(cfg, spec, arch_given=False).validate()


def _train(args) -> str:
    """Train as Topaz's flags say; models go to ``<prefix>_epoch<N>.sav`` (cryoden's weights
    format) whenever the validation loss improves and every --save-interval epochs, as Topaz
    saves them. -> path of the final model (what Topaz then denoises the inputs with)."""
    import logging

    import cryoden
    from cryoden import weights
    from cryoden.progress import StderrHandler
    from cryoden.train import checkpoint, loop

    try:
        cfg = train_config(args)
        for epoch in range(1, args.num_epochs + 1):  # never replace a file that is not ours
            path = sav_path(args.save_prefix, epoch, args.num_epochs)
            if os.path.lexists(path):
                weights.check_destination(path)
    except ValueError as e:
        raise Fail(e) from None
    logger = logging.getLogger("cryoden")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = StderrHandler()  # not bound to this call's sys.stderr
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    meta = dict(config=cfg.to_dict(), source=PROG, cryoden_version=cryoden.__version__)

    def on_epoch(epoch: int, improved: bool, params) -> None:
        if improved or epoch % args.save_interval == 0:
            path = sav_path(args.save_prefix, epoch, args.num_epochs)
            weights.save(path, params(), cfg.model.spec, epoch=epoch, **meta)
            logger.info("saved %s", path)

    try:
        result = loop.train(cfg, command=sys.argv, on_epoch=on_epoch)
    except (ValueError, OSError, MemoryError, checkpoint.CheckpointError) as e:
        raise Fail(f"training: {e}") from None
    if result["interrupted"]:
        raise KeyboardInterrupt
    final = Path(cfg.run.out) / "final.npz"
    weights.save(final, result["params"], cfg.model.spec, **meta)
    return str(final)


# ----------------------------------------------------------------------------- planning


def output_path(args, src: str) -> Path:
    """Where Topaz writes ``src``: ``OUT/<stem><suffix>.<format>`` (2D; 3D keeps the input's
    extension), or beside the input with suffix ``.denoised`` when no -o is given."""
    stem, ext = os.path.splitext(os.path.basename(src))
    if args.command == "denoise":
        ext = "." + args.format_
    suffix = args.suffix
    if not args.output:
        return Path(os.path.splitext(src)[0] + (suffix or ".denoised") + ext)
    return Path(args.output) / f"{stem}{suffix}{ext}"


def _plan(args, inputs: list[str]) -> list[tuple[str, Path]]:
    """(input, output) per file; Fail when an output would replace an input or two inputs
    would share an output (Topaz would overwrite: issue #56), before anything is written."""
    from cryoden import outputs

    if args.command == "denoise" and args.stack:
        jobs = [(inputs[0], Path(args.output))]
    else:
        jobs = [(src, output_path(args, src)) for src in inputs]
    taken: dict = {}
    for src in inputs:
        if os.path.lexists(src):
            taken.update(dict.fromkeys(outputs.identity(Path(src)), f"the input {src}"))
    for src, out in jobs:
        keys = outputs.identity(out)
        hit = next((taken[k] for k in keys if k in taken), None)
        if hit is not None:
            raise Fail(
                f"the output of {src}, {out}, would replace {hit}: nothing was done; "
                "choose another -o or --suffix"
            )
        taken.update(dict.fromkeys(keys, f"the output of {src}"))
    from cryoden import io

    try:
        for folder in {out.parent for _, out in jobs}:
            folder.mkdir(parents=True, exist_ok=True)
            io.remove_stale_temporaries(folder, keep=inputs)  # left by a killed run
    except OSError as e:
        raise Fail(f"{e.filename}: cannot make the output folder: {e.strerror or e}") from None
    return jobs


# ----------------------------------------------------------------------------- one file


def _one(args, den, src: str, out: Path, i: int, n: int) -> bool:
    """Denoise ``src`` into ``out``; a problem is one line on stderr -> whether it worked."""
    import dataclasses

    from cryoden import __version__, io

    try:
        if args.command == "denoise3d":
            img = io.read(src, kind="volume")
            if img.data.shape[0] == 1:
                raise ValueError("one 2D section is not a volume: use cryoden-topaz denoise")
            y = denoise_3d(img.data, den, args)
        elif args.stack:
            img = io.read(src, kind="stack")
            y = np.stack([denoise_2d(s, den, args) for s in img.data])
        else:
            img = io.read(src)
            if img.kind != "2d":
                raise ValueError(f"holds {len(img.data)} sections: use --stack for a stack")
            y = denoise_2d(img.data, den, args)
        img = dataclasses.replace(img, data=y)
        if out.suffix.lower() in (".jpg", ".jpeg"):
            _write_jpeg(out, y)
        else:
            io.write(out, img, label=f"cryoden {__version__} ({PROG} {args.command})"[:80])
    except Exception as e:  # one bad file must not stop the others
        _say(f"{PROG}: error: {src}: {_problem(e).removeprefix(f'{src}: ')}")
        return False
    _say(f"{PROG}: [{i}/{n}] {src} -> {out}")
    return True


def _problem(e: Exception) -> str:
    """One line describing a per-file failure."""
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
        return (
            "out of memory while denoising: give a smaller --patch-size (images larger than "
            "patch size + padding are tiled), or set CRYODEN_MEMORY_BUDGET (e.g. 4G)"
        )
    if isinstance(e, OSError) and e.strerror:
        msg = e.strerror
    else:
        msg = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
    return " ".join(msg.split())


def _write_jpeg(path: Path, y: np.ndarray) -> None:
    """8-bit JPEG (PIL's default quality, as Topaz): -3..+3 std mapped to 0..255."""
    from PIL import Image

    from cryoden import io

    if y.ndim != 2:
        raise ValueError(f"{path}: JPEG output holds one 2D image; use --format mrc or tiff")
    with io.atomic(path) as tmp:
        Image.fromarray(io.to_uint8(y)).save(tmp, format="JPEG")


# ----------------------------------------------------------------------------- numbers


def _whole_image(args, den, shape: tuple[int, ...]) -> bool:
    """Whether Topaz runs the whole image (2D: patch + padding covers both sides or patch < 1;
    3D: patch < 1). Then cryoden runs it whole and unpadded too (Topaz's numbers, any size);
    otherwise cryoden's exact tiles replace Topaz's re-normalised patches. An image smaller
    than the network's stride on some axis (which Topaz cannot run) is zero-padded instead."""
    p = args.patch_size
    if min(shape) < den.stride:
        return False
    if args.command == "denoise3d":
        return p < 1
    return p < 1 or all(p + args.patch_padding >= n for n in shape)


def denoise_2d(m: np.ndarray, den, args) -> np.ndarray:
    """Topaz's ``denoise_image`` for one micrograph ``(H, W)`` -> float32 ``(H, W)``.

    Low-pass, standardise (population std), replace outliers, one pre-filter, the models
    (each re-standardises its input and restores it, averaged), then restore the input's mean
    and std, or with --normalize (always for png/jpg) standardise the output itself.
    """
    from cryoden import filters
    from cryoden import topaz_filters as tf

    m = filters.lowpass(np.asarray(m, np.float32), args.lowpass)
    bad = int(np.count_nonzero(~np.isfinite(m)))
    if bad:
        raise ValueError(f"image contains {bad} NaN/Inf pixel(s)")
    mean = float(np.mean(m, dtype=np.float64))
    std = float(np.std(m, dtype=np.float64))
    normalize = args.normalize or FORMATS_2D[args.format_] in ("png", "jpg")
    if not std > 0:  # constant image: nothing to denoise
        return np.full(m.shape, 0.0 if normalize else mean, np.float32)
    x = ((m - mean) / std).astype(np.float32)
    x = tf.pixel_cutoff(x, args.pixel_cutoff)
    if args.gaussian > 0:
        x = filters.gaussian(x, args.gaussian)
    elif args.inv_gaussian > 0:
        x = tf.inv_gaussian(x, args.inv_gaussian)
    elif args.deconvolve:
        x = tf.deconvolve(x, args.deconv_patch)
    y = x if den is None else den(x, topaz_compat=_whole_image(args, den, x.shape))
    y = np.asarray(y, np.float64)
    if normalize:
        s = y.std()
        return ((y - y.mean()) / s if s > 0 else y * 0).astype(np.float32)
    return (y * std + mean).astype(np.float32)


def denoise_3d(v: np.ndarray, den, args) -> np.ndarray:
    """Topaz's ``denoise3d`` for one volume ``(D, H, W)`` -> float32: standardise, model(s),
    restore; then --gaussian on the output, as its help says (Topaz 0.3 filters a copy of the
    input instead and discards it)."""
    from cryoden import filters

    v = np.asarray(v, np.float32)
    if den is None:
        return filters.gaussian(v, args.gaussian)
    if _whole_image(args, den, v.shape):
        return den(v, topaz_compat=True, gaussian=args.gaussian)
    return den(v, padding=args.patch_padding, gaussian=args.gaussian)


if __name__ == "__main__":
    sys.exit(main())
