"""Collection-time mode: follow input folders and hand over each file once it is complete.

Microscope software (EPU, SerialEM) writes files in place, so a file that exists may still be
growing. :class:`Follower` polls folders (or glob patterns, re-evaluated at every poll, ``**``
for any depth) and yields a file when

* its size and modification time have not changed for ``settle`` seconds, and
* for an MRC file, the file is at least as long as its header says (header, extended header
  and data); for a TIFF, every page's data lies within the file; for a PNG, it ends with its
  IEND chunk. One that stays short for ``10 x settle`` seconds is handed over anyway, so that
  the caller reports it as truncated instead of waiting forever.

Each file is yielded once per process; :class:`Manifest`, an append-only JSON-lines file in
the output folder, carries "done" across restarts, so that a restarted watch never repeats a
file and never skips one that was not finished; a file that failed is tried again by a
restarted watch only when it has changed since (size or modification time). The follower stops
when no file has been yielded and none is pending for ``idle`` seconds (None: never; Ctrl-C
stops the caller).
"""

from __future__ import annotations

import fnmatch
import glob
import json
import math
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_MAGIC = set("*?[")
SETTLE = 5.0  # default seconds a file must stay unchanged to be complete


def add_args(group, noun: str, verb: str) -> None:
    """``--watch``, ``--settle``, ``--idle`` for a command that ``verb``s each ``noun``."""
    group.add_argument(
        "--watch",
        action="store_true",
        help=f"follow the input folders (or quoted glob patterns, ** for any depth) and {verb} "
        f"each {noun} once it is complete; a restart never repeats a {noun} (default: off)",
    )
    group.add_argument(
        "--settle",
        type=float,
        metavar="S",
        help=f"--watch: a {noun} is complete when unchanged for S seconds and as long as it "
        f"declares (MRC header, TIFF pages, PNG end) (default: {SETTLE:g})",
    )
    group.add_argument(
        "--idle",
        type=float,
        metavar="S",
        help=f"--watch: stop after S seconds without new {noun}s (default: run until Ctrl-C)",
    )


def option_problem(args) -> str | None:
    """The first problem with ``args.watch/settle/idle`` (see :func:`add_args`), or None."""
    checks = [
        (
            args.settle is None or (math.isfinite(args.settle) and args.settle >= 0),
            "--settle must be >= 0 seconds",
        ),
        (
            args.idle is None or (math.isfinite(args.idle) and args.idle >= 0),
            "--idle must be >= 0 seconds",
        ),
        (args.watch or args.idle is None, "--idle applies to --watch only"),
        (args.watch or args.settle is None, "--settle applies to --watch only"),
    ]
    return next((msg for ok, msg in checks if not ok), None)


def output_folder_problem(inputs: list[str], outdir: Path) -> str | None:
    """Why ``inputs`` (folders or glob patterns) cannot be watched into ``outdir``, or None.

    A watched folder may be neither the output folder nor inside it (``cryoden movies`` writes
    ``even/``, ``odd/``, ...; ``cryoden infer --preview`` writes ``previews/``): what a run
    writes would be taken as new inputs. Patterns are checked per file when they match.
    """
    out = os.path.realpath(outdir)
    for s in inputs:
        if is_pattern(s):
            continue
        if not os.path.isdir(s):
            return f"{s} is not a folder: --watch follows folders or quoted glob patterns"
        real = os.path.realpath(s)
        if os.path.commonpath([real, out]) == out:
            where = "is" if real == out else "contains"
            return (
                f"the output folder {outdir} {where} the watched folder {s}: outputs would be "
                "taken as new inputs; choose another -o"
            )
    return None


def follower(inputs, suffixes, args, share, done) -> Follower:
    """The :class:`Follower` of a command's ``--watch`` options, taking ``share``'s names."""
    from cryoden import shard

    settle = SETTLE if args.settle is None else args.settle
    return Follower(
        inputs,
        suffixes,
        settle=settle,
        poll=min(2.0, max(settle / 2, 0.05)),
        idle=args.idle,
        done=done,
        owns=lambda name: shard.owns(name, share),
    )


def is_pattern(s: str) -> bool:
    """Whether an input argument is a glob pattern (quoted on the command line)."""
    return bool(_MAGIC & set(s))


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # monotonic time at which (size, mtime_ns) was first seen


class Follower:
    """Yields complete files under ``inputs`` (folders, files or glob patterns), once each.

    ``suffixes``: lower-case file name suffixes to consider (others and hidden files are
    ignored); ``done``: names already finished (as listed, see :meth:`listing`); ``owns``: which
    names this process takes (see ``shard.owns``); ``poll``: seconds between listings.
    ``clock``/``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        inputs: Iterable[str],
        suffixes: Iterable[str],
        *,
        settle: float = 5.0,
        poll: float = 2.0,
        idle: float | None = None,
        done: Iterable[str] = (),
        owns: Callable[[str], bool] = lambda name: True,
        complete: Callable[[Path], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.inputs = list(inputs)
        self.suffixes = {s.lower() for s in suffixes}
        self.settle, self.poll, self.idle = settle, poll, idle
        self.done = set(done)
        self.owns = owns
        self.complete = complete or declared_complete
        self.clock, self.sleep = clock, sleep
        self.pending: dict[str, _Seen] = {}

    def listing(self) -> list[str]:
        """Candidate files now: regular, not hidden, with a wanted suffix; sorted, as paths
        written from the inputs (so that every process names a file alike)."""
        names = set()
        for s in self.inputs:
            if is_pattern(s):
                found = glob.glob(s, recursive=True)
            elif os.path.isdir(s):
                found = [os.path.join(s, n) for n in _names(s)]
            else:
                found = [s]
            for f in found:
                base = os.path.basename(f)
                if base.startswith(".") or os.path.splitext(base)[1].lower() not in self.suffixes:
                    continue
                names.add(f)
        return sorted(names)

    def would_take(self, path: str | os.PathLike) -> bool:
        """Whether a file at ``path`` (say, an output) would be taken as an input. Patterns
        are matched with ``fnmatch`` (its ``*`` also spans ``/``: errs towards yes)."""
        path = os.path.abspath(path)
        if os.path.splitext(path)[1].lower() not in self.suffixes:
            return False
        real = os.path.realpath(path)
        for s in self.inputs:
            if is_pattern(s):
                pat = os.path.abspath(s)
                if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(real, pat):
                    return True
            elif os.path.realpath(s) in (real, os.path.dirname(real)):
                return True
        return False

    def __iter__(self) -> Iterator[Path]:
        last_activity = self.clock()
        while True:
            ready, changed = self._poll()
            for name in ready:
                self.done.add(name)
                yield Path(name)
            now = self.clock()
            if ready or changed:
                last_activity = now
            elif self.idle is not None and not self.pending and now - last_activity >= self.idle:
                return
            self.sleep(self.poll)

    def _poll(self) -> tuple[list[str], bool]:
        """-> (files complete now, whether any file appeared or changed)."""
        now, ready, changed = self.clock(), [], False
        for name in self.listing():
            if name in self.done or not self.owns(name):
                continue
            try:
                st = os.stat(name)
            except OSError:  # vanished between listing and stat
                self.pending.pop(name, None)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            seen = self.pending.get(name)
            if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                self.pending[name] = _Seen(st.st_size, st.st_mtime_ns, now)
                changed = True
                continue
            quiet = now - seen.since
            if quiet < self.settle:
                continue
            if self.complete(Path(name)) or quiet >= 10 * self.settle:
                del self.pending[name]
                ready.append(name)
        return ready, changed


def _names(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk that ends every PNG


def declared_complete(path: Path) -> bool:
    """False for a file shorter than it declares: an MRC file shorter than its header says, a
    TIFF whose pages (or list of pages) reach beyond its end, a PNG without its final IEND
    chunk. True otherwise (stability alone decides)."""
    from cryoden import io

    ext = path.suffix.lower()
    try:
        if ext in {".mrc", ".mrcs", ".map", ".rec", ".st", ".ali"}:
            io.mrc_layout(path)
        elif ext in {".tif", ".tiff", ".eer"}:  # EER movies are TIFF files
            return _tiff_complete(path)
        elif ext == ".png":
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - len(PNG_END)))
                return f.read() == PNG_END
    except (ValueError, OSError):
        return False
    return True


def _tiff_complete(path: Path) -> bool:
    """Every page of the TIFF at ``path`` is listed and its data lies within the file."""
    import tifffile

    from cryoden import io

    try:
        with tifffile.TiffFile(path) as tif:
            io.check_tiff_pages(tif)
            size = tif.filehandle.size
            return all(
                o + n <= size
                for page in tif.pages
                for o, n in zip(page.dataoffsets, page.databytecounts, strict=False)
            )
    except Exception:  # an unreadable TIFF is not complete (yet)
        return False


class Manifest:
    """Append-only record of finished inputs: one JSON object per line, ``{"input": name,
    "status": ..., ...}``, flushed and fsynced per line. A torn last line (a crash mid-write) is
    ignored on reading."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def finished(self) -> dict[str, dict]:
        """input name -> its last entry."""
        out: dict[str, dict] = {}
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return out
        for ln in text.splitlines():
            try:
                entry = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("input"), str):
                out[entry["input"]] = entry
        return out

    def finished_unchanged(self) -> dict[str, dict]:
        """:meth:`finished`, less the failed inputs whose file has changed since (size or
        modification time): those are tried again by a restarted watch."""
        out = {}
        for name, e in self.finished().items():
            if e.get("status") == "failed" and _stamp(name) != (e.get("size"), e.get("mtime_ns")):
                continue
            out[name] = e
        return out

    def add(self, entry: dict) -> None:
        """Append ``entry`` (must have ``input``) durably, with the input's size and
        modification time."""
        size, mtime_ns = _stamp(entry["input"])
        line = json.dumps({**entry, "size": size, "mtime_ns": mtime_ns}, default=str) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            # a torn line left by a crash is completed by starting on a fresh line
            if os.fstat(fd).st_size and not _ends_with_newline(self.path):
                line = "\n" + line
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def _stamp(name: str) -> tuple[int | None, int | None]:
    try:
        st = os.stat(name)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
