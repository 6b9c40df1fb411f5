"""RELION STAR files read and written with the ``starfile`` package, keeping every block and
column.

Every value is read as text (``parse_as_string`` for all columns), so a file written back
carries each untouched value exactly as RELION wrote it: no float reformatting, no integer
columns turned into floats. Blocks keep their order; loop blocks are ``pandas.DataFrame`` (one
row per item, one str column per label without the leading underscore), simple blocks are
``dict``. Writes are atomic (:func:`cryoden.io.atomic`).

Usage::

    blocks = star.read("MotionCorr/job002/corrected_micrographs.star")
    mics = star.loop(blocks, "micrographs", path, ["rlnMicrographName"])
    star.write("External/job003/denoised_micrographs.star", blocks)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from cryoden import io

Blocks = dict  # block name -> pandas.DataFrame (loop) or dict (simple block)


def read(path: str | os.PathLike) -> Blocks:
    """All data blocks of the STAR file ``path``, values as text.

    Raises ValueError (one line naming the file) when it is missing, not a regular file, or holds
    no data block.
    """
    import starfile

    path = Path(path)
    try:
        io.check_regular_file(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = starfile.read(path, always_dict=True)
            columns = sorted(
                {c for b in first.values() if hasattr(b, "columns") for c in b.columns}
            )
            blocks = starfile.read(path, always_dict=True, parse_as_string=columns)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    except Exception as e:  # the parser's own errors (pandas, UnicodeDecodeError, ...)
        raise ValueError(f"{path}: not a readable STAR file ({' '.join(str(e).split())})") from None
    if not blocks:
        raise ValueError(f"{path}: not a STAR file (no data_ block)")
    return dict(blocks)


def loop(blocks: Blocks, name: str, path: str | os.PathLike, need: list[str] = ()):
    """The loop block ``name`` (a DataFrame) holding the labels ``need``.

    ``name`` '' is the unnamed block ``data_``. Raises ValueError naming ``path`` when the block
    is missing, is not a loop, is empty, or lacks a label.
    """
    block = blocks.get(name)
    if block is None:
        have = ", ".join(f"data_{b}" for b in blocks) or "none"
        raise ValueError(f"{path}: no data_{name} block (blocks: {have})")
    if not hasattr(block, "columns"):
        raise ValueError(f"{path}: data_{name} is not a loop_ block")
    missing = [c for c in need if c not in block.columns]
    if missing:
        raise ValueError(f"{path}: data_{name} has no column {', '.join('_' + c for c in missing)}")
    if len(block) == 0:
        raise ValueError(f"{path}: data_{name} is empty")
    return block


def write(path: str | os.PathLike, blocks: Blocks) -> None:
    """Write ``blocks`` (as :func:`read` returns them) to ``path`` atomically."""
    import starfile

    path = Path(path)
    try:
        with io.atomic(path) as tmp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                starfile.write(blocks, tmp, quote_all_strings=False)
    except OSError as e:
        raise ValueError(f"{path}: cannot write: {e.strerror or e}") from None
