"""RELION's External-job protocol (RELION 4 and 5): job folder, output nodes, exit markers.

RELION runs an External job as ``EXECUTABLE --o JOBDIR [--in_movies STAR] [--in_mics STAR]
[--in_parts STAR] [--in_coords STAR] [--in_3dref MRC] [--in_mask MRC] [--LABEL VALUE ...]
--j THREADS [other arguments]`` from the project folder (paths are relative to it), appends
``>> JOBDIR/run.out 2>> JOBDIR/run.err``, and adds ``--pipeline_control JOBDIR`` when the
command line contains ``relion_`` (src/pipeline_jobs.cpp). The job writes everything in
JOBDIR, lists what it made in ``JOBDIR/RELION_OUTPUT_NODES.star`` (``data_output_nodes``:
``_rlnPipeLineNodeName``, ``_rlnPipeLineNodeTypeLabel``; read by src/pipeliner.cpp), and ends
by creating ``RELION_JOB_EXIT_SUCCESS`` or ``RELION_JOB_EXIT_FAILURE``. A user's "abort"
creates ``RELION_JOB_ABORT_NOW``; the job answers with ``RELION_JOB_EXIT_ABORTED`` alone
(src/pipeline_control.cpp: ``pipeline_control_relion_exit(2)``).

"Continue" runs the same command on the same JOBDIR again: the markers of the previous run are
removed at the start, and the commands skip what is already done.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryoden import io

SUCCESS = "RELION_JOB_EXIT_SUCCESS"
FAILURE = "RELION_JOB_EXIT_FAILURE"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
ABORTED = "RELION_JOB_EXIT_ABORTED"
NODES = "RELION_OUTPUT_NODES.star"

# node type labels (src/pipeline_jobs.h); the model label is ours, in RELION's format
MICROGRAPHS = "MicrographGroupMetadata.star.relion"
TOMOGRAMS_DENOISED = "TomogramGroupMetadata.star.relion.tomo.denoise"
MODEL = "ParamsData.npz.cryoden.model"


class Aborted(Exception):
    """The user asked RELION to abort the job (``RELION_JOB_ABORT_NOW``)."""


class Job:
    """The job folder ``jobdir`` (relative to the project folder, as RELION gives it)."""

    def __init__(self, jobdir: str | os.PathLike):
        self.dir = Path(jobdir)
        self.name = os.path.normpath(jobdir)  # node names: 'External/job003/...'

    def start(self, clear_markers: bool = True) -> None:
        """Create the folder, remove stale temporaries and (``clear_markers``) the exit markers
        of an earlier run, as RELION does before it starts a job."""
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"--o {self.dir}: exists and is not a folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        if clear_markers:
            for marker in (SUCCESS, FAILURE, ABORTED):
                (self.dir / marker).unlink(missing_ok=True)
        io.remove_stale_temporaries(self.dir)

    def node(self, relative: str) -> str:
        """RELION's name of the job's output ``relative``: ``External/job003/relative``."""
        return f"{self.name}/{relative}"

    def check_abort(self) -> None:
        """Raise :class:`Aborted` when RELION asked the job to stop."""
        if (self.dir / ABORT_NOW).exists():
            raise Aborted("aborted by the user (RELION_JOB_ABORT_NOW)")

    def write_nodes(self, nodes: list[tuple[str, str]]) -> None:
        """``RELION_OUTPUT_NODES.star`` listing ``nodes``: ``(relative path, type label)``."""
        import pandas as pd

        from cryoden import star

        table = pd.DataFrame(
            {
                "rlnPipeLineNodeName": [self.node(p) for p, _ in nodes],
                "rlnPipeLineNodeTypeLabel": [t for _, t in nodes],
            }
        )
        star.write(self.dir / NODES, {"output_nodes": table})

    def finish(self, ok: bool, aborted: bool = False) -> None:
        """Create the exit marker RELION waits for: success, failure, or (``aborted``, as
        RELION's own programs do) ``RELION_JOB_EXIT_ABORTED`` alone."""
        name = SUCCESS if ok else ABORTED if aborted else FAILURE
        # the latest outcome wins: a marker of an earlier share or run is stale
        for stale in {SUCCESS, FAILURE, ABORTED} - {name}:
            (self.dir / stale).unlink(missing_ok=True)
        with io.atomic(self.dir / name):
            pass

    # ------------------------------------------------------------------ job record

    def check_record(self, settings: dict) -> None:
        """Refuse a folder whose earlier run used other ``settings`` (a "continue" must not mix
        results of two models); record ``settings`` otherwise."""
        path = self.dir / "cryoden-relion.json"
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: unreadable ({e}); use a new job") from None
            diff = [
                k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)
            ]
            if diff:
                k = diff[0]
                raise ValueError(
                    f"{self.dir} holds results made with {k} = {saved.get(k)!r}, not "
                    f"{settings.get(k)!r}: continue with the same settings, or start a new job"
                )
            return
        with io.atomic(path) as tmp:
            tmp.write_text(json.dumps(settings, indent=2) + "\n")


def mirrored(jobdir: Path, name: str) -> Path:
    """Where the output for the input ``name`` (relative to the project folder) goes: the same
    relative path under ``jobdir``, so same-named files of different folders never collide.

    Names leaving the project folder (absolute, or with ``..``) go under
    ``jobdir/_absolute/`` + their absolute path: an output is never written outside ``jobdir``.
    """
    norm = os.path.normpath(name)
    if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
        norm = os.path.join("_absolute", os.path.abspath(name).lstrip(os.sep))
    return jobdir / norm


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file (by identity when both exist, else by path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def link_halves(evens: list[str], odds: list[str], folder: Path) -> tuple[Path, Path]:
    """Two folders ``folder/even``, ``folder/odd`` of symbolic links, pair ``i`` named
    ``pairNNNN.<ext>`` in both, so that ``cryoden train`` pairs the listed halves in order.

    The halves are checked first (:func:`cryoden.train.pairs.find_pairs`: errors name the real
    files); links of an earlier run are replaced, nothing else in ``folder`` is touched.
    """
    from cryoden.train import pairs

    pairs.find_pairs([Path(p) for p in evens], [Path(p) for p in odds])
    dirs = folder / "even", folder / "odd"
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            if old.is_symlink():
                old.unlink()
    for i, (e, o) in enumerate(zip(evens, odds, strict=True)):
        name = f"pair{i:04d}{Path(e).suffix}"
        for d, target in zip(dirs, (e, o), strict=True):
            os.symlink(os.path.abspath(target), d / name)
    return dirs


def train_halves(
    evens: list[str], odds: list[str], run: Path, links: Path, flags: list[str]
) -> int:
    """Train (or resume) the ``cryoden train`` run ``run`` on the pairs ``evens[i], odds[i]``,
    with extra ``cryoden train`` flags; -> its exit code (0: ``run/model.npz`` is written)."""
    import argparse

    from cryoden.train import __main__ as train_cli

    even, odd = link_halves(evens, odds, links)
    parser = argparse.ArgumentParser(prog="cryoden train")
    train_cli.add_args(parser)
    argv = ["--even", str(even), "--odd", str(odd), "--out", str(run), "--quiet", *flags]
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return train_cli.main(args)
