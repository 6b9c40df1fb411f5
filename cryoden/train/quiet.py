"""Silence the stderr noise that orbax, tensorstore and asyncio print for errors cryoden reports
itself (one line each, see :mod:`cryoden.train.checkpoint`).

A damaged checkpoint or a failed save makes orbax log every traceback of its background
threads, and the asyncio tasks it abandons print "Task exception was never retrieved" and
"Event loop is closed" tracebacks when collected. Each of these repeats an exception that
reaches cryoden, which reports it once. :func:`install` drops exactly those records:

- orbax log records (logger ``absl``, from an orbax source file) that carry a traceback;
- orbax's warning that a save without metrics cannot be ranked (every mid-epoch checkpoint);
- asyncio's "Task exception was never retrieved" for orbax coroutines;
- unraisable ``RuntimeError('Event loop is closed')`` from tensorstore callbacks.

Everything else passes through unchanged.
"""

from __future__ import annotations

import logging
import sys

_installed = False


class _OrbaxNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        if record.exc_info:
            return False
        return "did not provide metrics" not in str(record.msg)


class _AsyncioNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("exception was never retrieved" in text and "orbax" in text)


def _unraisable(previous):
    def hook(u) -> None:
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        previous(u)

    return hook


def install() -> None:
    """Install the filters (idempotent, process-wide)."""
    global _installed
    if _installed:
        return
    _installed = True
    logging.getLogger("absl").addFilter(_OrbaxNoise())
    logging.getLogger("asyncio").addFilter(_AsyncioNoise())
    sys.unraisablehook = _unraisable(sys.unraisablehook)
