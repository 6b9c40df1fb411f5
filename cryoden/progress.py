"""Progress of a batch run on stderr: tqdm bars on a terminal, plain timed lines otherwise.

On a terminal a file bar (two files or more) and, for work of more than one step (tiles of an
image, slices of a stack), a step bar. When stderr is not a terminal (a log file, a pipe) no
carriage return is ever written: messages are whole lines, and long work reports
``cryoden: <label>: <done>/<total> <unit>s, <seconds> s`` every ``PLAIN_EVERY`` seconds.
Quiet: errors only.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

PLAIN_EVERY = 30.0  # s between progress lines in a log


class StderrHandler(logging.StreamHandler):
    """Log to whatever ``sys.stderr`` is when a record is written (not when created), so that a
    command run twice in one process (tests, notebooks) never writes to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class Progress:
    """Reports for ``n_files`` files; ``quiet`` silences everything but :meth:`error`."""

    def __init__(self, n_files: int, quiet: bool, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        isatty = getattr(self.stream, "isatty", None)
        self.tty = not quiet and bool(isatty and isatty())
        show_files = self.tty and n_files > 1
        self.files = tqdm(total=n_files, unit="file", file=self.stream, disable=not show_files)
        self.step_position = 1 if show_files else 0
        self.bar: tqdm | None = None

    def say(self, text: str) -> None:
        """One line (above any bar), unless quiet."""
        if not self.quiet:
            self.error(text)

    def error(self, text: str) -> None:
        """One line (above any bar), even when quiet."""
        if self.tty:
            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def steps(self, label: str, total: int, unit: str) -> Callable[[int], None]:
        """Start ``total`` steps of work for one file; -> ``update(done)``."""
        self.end_steps()
        if self.quiet or total <= 1:
            return lambda done: None
        if self.tty:
            bar = tqdm(
                total=total,
                unit=unit,
                desc=label,
                leave=False,
                file=self.stream,
                position=self.step_position,
                dynamic_ncols=True,
            )
            self.bar = bar
            return lambda done: bar.update(done - bar.n)
        t0, last = time.monotonic(), [time.monotonic()]

        def plain(done: int) -> None:
            now = time.monotonic()
            if now - last[0] >= PLAIN_EVERY and done < total:
                last[0] = now
                self.error(f"cryoden: {label}: {done}/{total} {unit}s, {now - t0:.0f} s")

        return plain

    def end_steps(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def file_done(self) -> None:
        self.end_steps()
        self.files.update(1)

    def close(self) -> None:
        self.end_steps()
        self.files.close()
