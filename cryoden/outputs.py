"""Plan every path a ``cryoden infer`` run writes before it writes anything.

Each input file gets one :class:`Job`: its output path ``OUTDIR/<stem><suffix><ext>``, or the
problem that keeps it from being processed (missing, not a regular file, unsupported extension,
PNG output for a multi-section MRC), which is reported for that file alone. :func:`conflicts`
then checks the whole run: no output, and not the run record, may replace a file that is an input
of the run, and no two inputs may share an output. Files are compared by the path a rename would
replace (the output folder resolved, the name kept), by their resolved path (symlinks) and, for
files that exist, by ``(st_dev, st_ino)`` (hard links, case-insensitive file systems). Inputs that
do not exist are not protected: nothing of theirs can be lost.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

OUT_EXT = {"mrc": ".mrc", "tiff": ".tif", "png": ".png"}


@dataclasses.dataclass
class Job:
    """One input of the run. out: where it is written (None when ``problem`` says why not);
    skip: ``--skip-existing`` found ``out`` already there when the run was planned."""

    src: Path
    out: Path | None = None
    problem: str | None = None
    skip: bool = False


def expand(inputs: list[str]) -> list[tuple[Path, str | None]]:
    """Input arguments -> (file, None); a folder gives its (non-hidden) regular image files,
    sorted, or (folder, problem) when it cannot be listed."""
    from cryoden.io import FORMATS

    files = []
    for s in inputs:
        p = Path(s)
        if not p.is_dir():
            files.append((p, None))
            continue
        try:
            names = sorted(
                f
                for f in p.iterdir()
                if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in FORMATS
            )
        except OSError as e:
            files.append((p, f"cannot list the folder: {e.strerror or e}"))
            continue
        files += [(f, None) for f in names]
    return files


def output_path(src: Path, outdir: Path, fmt: str, suffix: str) -> Path:
    """Where ``src`` is written: ``outdir/<stem><suffix><ext>``; ValueError for unknown input."""
    from cryoden.io import image_format

    in_fmt = image_format(src)
    fmt = in_fmt if fmt == "auto" else fmt
    ext = src.suffix if fmt == in_fmt else OUT_EXT[fmt]
    return outdir / f"{src.stem}{suffix}{ext}"


def plan(inputs: list[str], outdir: Path, fmt: str, suffix: str, skip_existing: bool) -> list[Job]:
    """One Job per input file (directories expanded); a path named twice (say, alone and in
    its folder) gives one Job."""
    from cryoden import io

    jobs, seen = [], set()
    for src, problem in expand(inputs):
        entry = _entry(src)
        if entry in seen:
            continue
        seen.add(entry)
        job = Job(src, problem=problem)
        jobs.append(job)
        if problem:
            continue
        try:
            io.check_regular_file(src)
        except OSError as e:
            job.problem = e.strerror or str(e)
            continue
        except ValueError as e:  # a FIFO, device or folder: opening it could block
            job.problem = str(e)
            continue
        try:
            job.out = output_path(src, outdir, fmt, suffix)
        except ValueError as e:
            job.problem = str(e).removeprefix(f"{src}: ")
            continue
        n = _sections(src) if job.out.suffix == ".png" else 1
        if n > 1:
            job.out, job.problem = None, png_problem(f"{n} sections")
            continue
        job.skip = skip_existing and os.path.lexists(job.out)
    return jobs


def png_problem(what: str) -> str:
    """The error for PNG output of more than one section (``what``: '3 sections', 'a stack')."""
    return f"PNG output holds one 2D image, not {what}; use --format mrc or tiff"


def _sections(src: Path) -> int:
    """Sections of an MRC file from its checked header alone (1 when unknown: reading tells)."""
    from cryoden import io

    if io.image_format(src) != "mrc":
        return 1
    try:
        shape = io.mrc_layout(src).shape
    except ValueError:
        return 1
    return math.prod(shape[:-2])


def _entry(path: Path) -> Path:
    """The directory entry a rename to ``path`` replaces: its folder resolved, its name kept."""
    path = Path(os.path.abspath(path))
    try:
        return path.parent.resolve() / path.name
    except (OSError, RuntimeError):  # a symlink loop: the literal path is all there is
        return path


def identity(path: Path) -> set:
    """Keys naming the file at ``path``: the entry a rename would replace, the resolved path,
    and ``(st_dev, st_ino)`` when it exists. Two paths share a key when they share a file."""
    path = Path(os.path.abspath(path))
    keys: set = {("path", str(_entry(path)))}
    try:
        keys.add(("path", str(path.resolve())))
        st = os.stat(path)
        keys.add(("inode", st.st_dev, st.st_ino))
    except (OSError, RuntimeError):
        pass
    return keys


def conflicts(jobs: list[Job], record: Path) -> str | None:
    """One line naming what would be lost, or None when the plan is safe.

    Outputs (of jobs not skipped) and the run ``record`` may not replace an existing input; two
    jobs may not share an output.
    """
    inputs: dict = {}
    for job in jobs:
        if os.path.lexists(job.src):
            for key in identity(job.src):
                inputs.setdefault(key, job.src)
    others, shared, selves, outs = [], [], [], {}
    writes = [(j.out, j.src) for j in jobs if j.out is not None and not j.skip]
    for out, src in [*writes, (record, None)]:
        keys = identity(out)
        hit = next((inputs[k] for k in keys if k in inputs), None)
        if hit is None:
            pass
        elif src is None:
            others.append(f"the run record {out} would replace the input {hit}")
        elif hit == src:
            selves.append(f"the output of {src} would replace {src} itself")
        else:
            others.append(f"the output of {src}, {out}, would replace the input {hit}")
        other = next((outs[k] for k in keys if k in outs), None)
        if other is not None:
            shared.append(f"{other} and {src} would both be written to {out}")
        outs.update(dict.fromkeys(keys, src))
    problems = others + shared + selves  # the most surprising first
    if not problems:
        return None
    more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
    fix = "choose another -o or --suffix" + (" (or --format)" if shared else "")
    return f"{'; '.join(problems[:2])}{more}: nothing was done; {fix}"
