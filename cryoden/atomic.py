"""Atomic file writing and the temporaries it leaves behind.

Every file cryoden writes for a user (images, weights, run records, training logs, the
compiled-memory cache) goes through :func:`atomic` or :func:`write_text`: the content is written to
a new temporary file beside the target, fsynced, and renamed over the target with ``os.replace``,
so a failed or interrupted write never leaves partial output and never harms an existing file.

Temporaries are named ``.<name>.cryoden-<host>-<pid>-<8 hex>.tmp``: ``<host>`` is a hash of the host
name (a folder shared between machines is safe) and ``<pid>`` the writing process, so that
:func:`remove_stale_temporaries` can tell a killed writer's leftovers from a live writer's file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

_TMP = re.compile(r"^\.(.+)\.cryoden-([0-9a-f]{8})-([0-9]+)-[0-9a-f]{8}\.tmp$")
_OLD_TMP = re.compile(r"^\.(.+)\.[0-9a-f]{8}\.tmp$")  # older cryodens: no writer named
STALE_AGE = 24 * 3600.0  # s: a temporary not written to for this long is abandoned


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


@contextlib.contextmanager
def atomic(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary path beside ``path``; on success fsync it and rename it to ``path``.

    On any exception (KeyboardInterrupt included) the temporary is removed; one left by a killed
    process is recognised by :func:`remove_stale_temporaries`.
    """
    path = Path(path)
    tmp = new_temporary(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic`)."""
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def new_temporary(path: str | os.PathLike) -> Path:
    """Create an empty temporary file beside ``path``, named as cryoden's own; -> its path."""
    path = Path(path)
    writer = f"cryoden-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp = path.with_name(f".{path.name}.{writer}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # honours the umask
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid we cannot test): keep its files
    return True


def remove_stale_temporaries(
    folder: str | os.PathLike, keep: Iterable[str | os.PathLike] = ()
) -> list[Path]:
    """Remove the temporaries that killed cryoden processes left in ``folder``; -> removed paths.

    A temporary (regular file, named as :func:`atomic` names them) is stale when the process that
    wrote it, on this host, is gone, or when it has not been modified for ``STALE_AGE`` seconds
    (other hosts, old-style ``.<name>.<8 hex>.tmp`` names). Live writers' temporaries and the
    paths in ``keep`` stay. Files that vanish or cannot be removed meanwhile are left alone.
    """
    folder, host, now = Path(folder), _host_tag(), time.time()
    keep = {os.path.abspath(k) for k in keep}
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TMP.match(e.name)
        if not (m or _OLD_TMP.match(e.name)) or os.path.abspath(e.path) in keep:
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue
            dead = m is not None and m[2] == host and not _alive(int(m[3]))
            if dead or now - st.st_mtime > STALE_AGE:
                os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:
            continue
    return removed
