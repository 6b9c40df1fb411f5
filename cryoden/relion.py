"""Run cryoden as a RELION External job (RELION 4 and 5): JOB is denoise, train, tomo-denoise or
tomo-train.

RELION calls the job's executable as ``EXECUTABLE --o JOBDIR --in_mics STAR ... --j N`` from the
project folder; set "External executable" to ``cryoden relion denoise`` (or train, tomo-denoise,
tomo-train; with the full path of the cryoden in your environment) and give options as
"Param" label/value pairs (label ``model``, value ``unet-3d-10a`` becomes ``--model unet-3d-10a``).
Every job writes only inside JOBDIR, lists its outputs in RELION_OUTPUT_NODES.star and ends
with RELION_JOB_EXIT_SUCCESS or RELION_JOB_EXIT_FAILURE; "continue" (running it again) does
only what is not yet done.

jobs:
  denoise       --in_mics micrographs STAR: JOBDIR/denoised_micrographs.star, every column and
                the optics table kept, rlnMicrographName -> the denoised micrograph, stored
                under JOBDIR at the input's own relative path
  train         --in_mics motion-correction STAR with rlnMicrographNameEven/Odd (RELION's
                "Save images for denoising?"): a model in JOBDIR/model (--model JOBDIR/model
                for denoise)
  tomo-train    --in_tomograms (or --in_mics) RELION 5 tomograms.star with
                rlnTomoReconstructedTomogramHalf1/Half2: a 3D model in JOBDIR/model
  tomo-denoise  --in_tomograms tomograms.star: JOBDIR/tomograms/rec_<rlnTomoName>.mrc and
                JOBDIR/tomograms.star with rlnTomoReconstructedTomogramDenoised

'cryoden relion JOB --help' lists a job's options. See docs/relion.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path

from cryoden import relionjob

JOBS = ("denoise", "train", "tomo-denoise", "tomo-train")
INPUTS = ("in_movies", "in_mics", "in_parts", "in_coords", "in_3dref", "in_mask", "in_tomograms")
# what each job reads; any other --in_* given is an error, never silently ignored
USES = {
    "denoise": {"in_mics"},
    "train": {"in_mics"},
    "tomo-denoise": {"in_tomograms", "in_mics"},
    "tomo-train": {"in_tomograms", "in_mics"},
}
TRAIN_FLAGS = ("config", "arch", "epochs", "steps", "crop", "batch_size", "init", "lr", "holdout")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", choices=JOBS, help="the job to run")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="--o JOBDIR, inputs, options")


def job_summary(job: str) -> str:
    """The ``jobs:`` entry of this module's docstring for ``job``, as one paragraph."""
    entries = re.split(r"\n  (?=\S)", __doc__.split("\njobs:\n", 1)[1].split("\n\n")[0])
    entry = next(e for e in entries if e.split()[0] == job)
    return " ".join(entry.split()[1:]).replace("``", "")


def job_parser(job: str) -> argparse.ArgumentParser:
    """The options of ``cryoden relion JOB`` (RELION's External-job arguments plus ours)."""
    p = argparse.ArgumentParser(
        prog=f"cryoden relion {job}",
        description=f"RELION External job '{job}': {job_summary(job)}. See docs/relion.md.",
    )
    p.add_argument("--o", required=True, metavar="JOBDIR", help="job folder (RELION gives it)")
    for name in INPUTS:
        used = name in USES[job]
        what = "tomograms.star" if job.startswith("tomo") else "micrographs STAR file"
        p.add_argument(f"--{name}", metavar="FILE", help=what if used else argparse.SUPPRESS)
    p.add_argument(
        "--j",
        type=int,
        default=1,
        help="RELION's thread count (accepted; cryoden uses all local devices)",
    )
    p.add_argument("--pipeline_control", metavar="JOBDIR", help=argparse.SUPPRESS)
    if job in ("denoise", "tomo-denoise"):
        p.add_argument(
            "--model",
            action="append",
            help="pretrained name, weights file or training run (repeat to average); default: "
            + ("unet" if job == "denoise" else "unet-3d"),
        )
        p.add_argument("--patch-size", type=int, help="tile core in px; default: automatic")
        p.add_argument("--padding", type=int, help="tile margin in px; default: exact (2D)")
        p.add_argument(
            "--shard",
            metavar="I/N",
            help="do the I-th of N shares of the list (default: Slurm array/srun tasks, else "
            "all); the last process to finish writes the STAR file and the exit marker",
        )
    if job == "tomo-denoise":
        p.add_argument(
            "--halves",
            action="store_true",
            help="denoise Half1 and Half2 and average them (cryoCARE's way) instead of "
            "rlnTomoReconstructedTomogram",
        )
    if job in ("train", "tomo-train"):
        p.add_argument("--config", help="cryoden train preset or JSON file")
        p.add_argument("--arch", help="network architecture (cryoden train --arch)")
        p.add_argument("--epochs", type=int, help="epochs (cryoden train --epochs)")
        p.add_argument("--steps", type=int, help="training steps instead of --epochs")
        p.add_argument("--crop", type=int, help="training crop size in px (voxels in 3D)")
        p.add_argument("--batch-size", type=int, help="crops per step (global)")
        p.add_argument("--init", help="start from this model")
        p.add_argument("--lr", type=float, help="learning rate")
        p.add_argument("--holdout", type=float, help="fraction of pairs held out for validation")
    return p


def main(args: argparse.Namespace) -> int:
    parser = job_parser(args.job)
    try:
        ns = parser.parse_args(args.options)
    except SystemExit as e:  # bad arguments: RELION still needs the failure marker
        if e.code and _jobdir(args.options):
            _fail(relionjob.Job(_jobdir(args.options)))
        return int(e.code or 0)
    job = relionjob.Job(ns.o)
    try:
        ns.share = None
        if hasattr(ns, "shard"):
            from cryoden import shard

            ns.share = shard.from_environment(ns.shard)
        # RELION removes the markers before it starts a job; shards must not remove those of
        # a shard that already finished
        job.start(clear_markers=ns.share is None)
        unused = [n for n in INPUTS if getattr(ns, n) and n not in USES[args.job]]
        if unused:
            raise ValueError(f"--{unused[0]} is not used by 'cryoden relion {args.job}'")
        ok = RUN[args.job](ns, job)
    except relionjob.Aborted as e:
        _say(f"cryoden relion {args.job}: {e}")
        job.finish(False, aborted=True)
        return 1
    except (ValueError, OSError) as e:
        _say(_line(e))
        _fail(job)
        return 2 if isinstance(e, ValueError) else 1
    if ok is not None:  # None: other shards are still working
        job.finish(ok)
    return 0 if ok or ok is None else 1


def _jobdir(options: list[str]) -> str | None:
    for i, a in enumerate(options):
        if a == "--o" and i + 1 < len(options):
            return options[i + 1]
        if a.startswith("--o="):
            return a[4:]
    return None


def _fail(job: relionjob.Job) -> None:
    try:
        job.dir.mkdir(parents=True, exist_ok=True)
        job.finish(False)
    except OSError as e:
        _say(_line(e))


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"cryoden: error: {text}"


# ----------------------------------------------------------------------------- jobs


def _input(ns, *names) -> str:
    for n in names:
        if getattr(ns, n, None):
            return getattr(ns, n)
    raise ValueError(f"no input: give --{names[0]}")


def _denoise_files(ns, job, items: list[tuple[str, Path]], ndim: int, kind_word: str) -> list:
    """Denoise every ``(input, output)`` whose output does not exist yet; -> failed inputs.

    One line per file; a failing file does not stop the others."""
    from cryoden import io, outputs, runtime, weights
    from cryoden.inference import DEFAULT_MODEL, Denoiser

    runtime.setup(cache=True)  # compiled kernels kept on disk for the next job

    models = ns.model or [DEFAULT_MODEL[ndim]]
    for m in models:
        weights.resolve(m)  # a bad model fails the job before any work
    job.check_record(
        {"job": kind_word, "model": models, "patch_size": ns.patch_size, "padding": ns.padding}
        | ({"halves": ns.halves} if hasattr(ns, "halves") else {})
    )
    inputs = set().union(*(outputs.identity(Path(s)) for s, _ in items if os.path.lexists(s)))
    todo = [(s, o) for s, o in items if not o.is_file()]
    for folder in {o.parent for _, o in todo}:  # left by a killed earlier run
        io.remove_stale_temporaries(folder)
    if len(todo) < len(items):
        _say(f"cryoden: {len(items) - len(todo)} of {len(items)} {kind_word}s already done")
    den, failed = None, []
    for i, (src, out) in enumerate(todo, 1):
        job.check_abort()
        srcs = src if isinstance(src, tuple) else (src,)
        try:
            if outputs.identity(out) & inputs:
                raise ValueError(f"its output {out} is an input of this job; not replaced")
            imgs = [io.read(s) for s in srcs]
            want = "2d" if ndim == 2 else "volume"
            for s, img in zip(srcs, imgs, strict=True):
                if img.kind != want:
                    raise ValueError(f"{s}: a {img.kind} of shape {img.data.shape}, not a {want}")
            if den is None:
                den = Denoiser(models, ndim=ndim)
            kw = dict(patch_size=ns.patch_size, padding=ns.padding)
            y = sum(den(img.data.astype("float32"), **kw) for img in imgs) / len(imgs)
            out.parent.mkdir(parents=True, exist_ok=True)
            label = f"cryoden relion {kind_word}, model {'+'.join(models)}"[:80]
            io.write(out, dataclasses.replace(imgs[0], data=y), label=label)
            _say(f"cryoden: [{i}/{len(todo)}] {srcs[0]} -> {out}")
        except Exception as e:  # one bad file must not stop the others
            text = " ".join(str(e).split()).removeprefix(f"{srcs[0]}: ")
            _say(f"cryoden: error: {srcs[0]}: {text}")
            failed.append(src)
    return failed


def _denoise_share(ns, job, items: list[tuple], ndim: int, word: str) -> bool | None:
    """Denoise this process's share of ``items``; -> True when every output of the whole list
    exists (write the STAR file), False when one of the share failed, None when other shards
    still have work."""
    from cryoden import shard

    mine = shard.take(items, ns.share)
    if ns.share is not None:
        _say(f"cryoden: {ns.share}: {len(mine)} of {len(items)} {word}s")
    failed = _denoise_files(ns, job, mine, ndim, word)
    if failed:
        _say(
            f"cryoden: {len(failed)} of {len(mine)} {word}s failed; no STAR file written "
            "(continue the job to retry them)"
        )
        return False
    left = sum(not out.is_file() for _, out in items)
    if left:
        _say(f"cryoden: {ns.share} done; {left} {word}(s) left to the other shards")
        return None
    return True


def _run_denoise(ns, job: relionjob.Job) -> bool | None:
    from cryoden import star

    path = _input(ns, "in_mics")
    blocks = star.read(path)
    mics = star.loop(blocks, "micrographs", path, ["rlnMicrographName"])
    names = list(mics["rlnMicrographName"])
    outs = [relionjob.mirrored(job.dir, n) for n in names]
    seen: dict[Path, str] = {}
    for n, o in zip(names, outs, strict=True):
        first = seen.setdefault(o, n)
        if os.path.realpath(first) != os.path.realpath(n):
            raise ValueError(f"{path}: {first} and {n} would both be written to {o}")
    done = _denoise_share(ns, job, list(zip(names, outs, strict=True)), 2, "micrograph")
    if not done:
        return done
    blocks = dict(blocks)
    blocks["micrographs"] = mics.assign(rlnMicrographName=[os.path.normpath(o) for o in outs])
    star.write(job.dir / "denoised_micrographs.star", blocks)
    job.write_nodes([("denoised_micrographs.star", relionjob.MICROGRAPHS)])
    _say(f"cryoden: wrote {job.dir / 'denoised_micrographs.star'} ({len(names)} micrographs)")
    return True


def _tomograms(ns):
    from cryoden import star

    path = _input(ns, "in_tomograms", "in_mics")
    blocks = star.read(path)
    return path, blocks, star.loop(blocks, "global", path, ["rlnTomoName"])


def _column(table, col: str, path: str) -> list[str]:
    if col not in table.columns:
        raise ValueError(f"{path}: data_global has no column _{col}")
    values = list(table[col])
    for name, v in zip(table["rlnTomoName"], values, strict=True):
        if not v or v in ("None", "N/A"):
            raise ValueError(f"{path}: tomogram {name} has no _{col}")
    return values


def _run_tomo_denoise(ns, job: relionjob.Job) -> bool | None:
    from cryoden import star

    path, blocks, tomos = _tomograms(ns)
    if ns.halves:
        h1 = _column(tomos, "rlnTomoReconstructedTomogramHalf1", path)
        h2 = _column(tomos, "rlnTomoReconstructedTomogramHalf2", path)
        srcs = list(zip(h1, h2, strict=True))
    else:
        srcs = _column(tomos, "rlnTomoReconstructedTomogram", path)
    names = list(tomos["rlnTomoName"])
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: rlnTomoName is not unique")
    outs = [job.dir / "tomograms" / f"rec_{n}.mrc" for n in names]
    if any(os.sep in n or n in ("", ".", "..") for n in names):
        raise ValueError(f"{path}: a rlnTomoName cannot name a file: {names}")
    done = _denoise_share(ns, job, list(zip(srcs, outs, strict=True)), 3, "tomogram")
    if not done:
        return done
    blocks = dict(blocks)
    blocks["global"] = tomos.assign(
        rlnTomoReconstructedTomogramDenoised=[os.path.normpath(o) for o in outs]
    )
    star.write(job.dir / "tomograms.star", blocks)
    job.write_nodes([("tomograms.star", relionjob.TOMOGRAMS_DENOISED)])
    _say(f"cryoden: wrote {job.dir / 'tomograms.star'} ({len(names)} tomograms)")
    return True


def _train(ns, job: relionjob.Job, evens: list[str], odds: list[str]) -> bool:
    flags = []
    for name in TRAIN_FLAGS:
        v = getattr(ns, name)
        if v is not None:
            flags += [f"--{name.replace('_', '-')}", str(v)]
    run = relionjob.train_halves(evens, odds, job.dir / "model", job.dir / "halves", flags)
    if run != 0:
        return False
    job.write_nodes([("model/model.npz", relionjob.MODEL)])
    return True


def _run_train(ns, job: relionjob.Job) -> bool:
    from cryoden import star

    path = _input(ns, "in_mics")
    need = ["rlnMicrographNameEven", "rlnMicrographNameOdd"]
    mics = star.loop(star.read(path), "micrographs", path, [])
    if any(c not in mics.columns for c in need):
        raise ValueError(
            f"{path}: no _rlnMicrographNameEven/_rlnMicrographNameOdd columns: run motion "
            "correction with 'Save images for denoising?' (even/odd sums) set to Yes"
        )
    return _train(ns, job, list(mics[need[0]]), list(mics[need[1]]))


def _run_tomo_train(ns, job: relionjob.Job) -> bool:
    path, _, tomos = _tomograms(ns)
    h1 = _column(tomos, "rlnTomoReconstructedTomogramHalf1", path)
    h2 = _column(tomos, "rlnTomoReconstructedTomogramHalf2", path)
    return _train(ns, job, h1, h2)


RUN = {
    "denoise": _run_denoise,
    "train": _run_train,
    "tomo-denoise": _run_tomo_denoise,
    "tomo-train": _run_tomo_train,
}
