"""What a run directory records about its training data (``RUN/data.json``), checked on resume.

A run resumed on other data would mix two trainings in one model and one ``log.tsv``. The record
lists every pair in pairing order as ``{"even": name, "odd": name, "even_size": bytes,
"odd_size": bytes, "even_fingerprint": hex, "odd_fingerprint": hex}`` (file *names* only, and
:func:`cryoden.train.pairs.fingerprint`, a hash of 64 KiB sampled from each file): moving or
copying the data to other storage keeps the record valid, while a different set of pairs,
order, renamed file, or changed content (size or sampled bytes) is refused. Absolute paths and
modification times are not compared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryoden.train.pairs import Pair, fingerprint

FILE = "data.json"


def describe(pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    """The record of ``pairs`` (see the module docstring); reads 64 KiB per file."""
    out = []
    for even, odd in pairs:
        entry: dict[str, Any] = {}
        for side, path in (("even", Path(even)), ("odd", Path(odd))):
            entry[side] = path.name
            entry[f"{side}_size"] = os.stat(path).st_size
            entry[f"{side}_fingerprint"] = fingerprint(path)
        out.append(entry)
    return out


def difference(saved: list[dict[str, Any]], now: list[dict[str, Any]]) -> str | None:
    """The first difference between two records, in words, or None when they are equal."""
    if len(saved) != len(now):
        return f"{len(saved)} pairs then, {len(now)} now"
    for i, (a, b) in enumerate(zip(saved, now, strict=True)):
        if a == b:
            continue
        if "even" not in a or "even" not in b:  # movie runs: {"movie" or "gain": name, ...}
            then, now = _item(a), _item(b)
            return f"{then} then, {now} now" if then != now else f"the contents of {now} changed"
        for side in ("even", "odd"):
            if a.get(side) != b.get(side):
                return f"pair {i + 1}: {side} half {a.get(side)} then, {b.get(side)} now"
            if a.get(f"{side}_size") != b.get(f"{side}_size"):
                return (
                    f"pair {i + 1}: {b[side]} was {a.get(f'{side}_size')} bytes, "
                    f"is {b[f'{side}_size']} now"
                )
        return f"pair {i + 1}: the contents of {b['even']} / {b['odd']} changed"
    return None


def _item(entry: dict[str, Any]) -> str:
    """``'movie m1.tif (123 bytes)'`` for an entry of a movie run's record."""
    kind = next((k for k in ("movie", "gain", "defects", "even") if k in entry), "?")
    return f"{kind} {entry.get(kind)} ({entry.get('size', entry.get('even_size'))} bytes)"


def check(run: Path, record: list[dict[str, Any]]) -> bool:
    """Raise ValueError (one line) when ``run`` recorded other data than ``record``.

    Returns whether a record exists (False for a new run, or one started before records).
    """
    path = run / FILE
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())["pairs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable data record ({e}); use another --out") from None
    diff = difference(saved, record)
    if diff is not None:
        raise ValueError(
            f"{run} was trained on other data ({diff}); give the run's own --even/--odd "
            "to resume it, or another --out to start a new run on this data"
        )
    return True


def to_json(record: list[dict[str, Any]]) -> str:
    return json.dumps({"pairs": record}, indent=1) + "\n"
