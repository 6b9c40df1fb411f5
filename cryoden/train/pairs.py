"""Even/odd half pairs on disk: pairing by name, validation, memory-mapped reading, statistics.

A *pair* is ``(even_path, odd_path)``: two independent halves of the same exposure (sums of the
even and odd movie frames, or half tomograms). Files are MRC (``.mrc .mrcs .map .rec .st .ali``)
or NumPy ``.npy``; both are read through a memory map, never loaded whole.

Pairing rule for directories (:func:`find_pairs`):

* Each file gets a *key*: its name with the last even/odd token removed, together with one
  separator before it. Tokens are ``EVN``, ``EVEN``, ``HALF1`` on the even side and ``ODD``,
  ``HALF2`` on the odd side, in any case, delimited by ``_``, ``-``, ``.`` or the name's ends.
  A name without a token is its own key.
  ``even/mic_001.mrc``  <->  ``odd/mic_001.mrc``        (same basename, e.g. Warp)
  ``mic_001_EVN.mrc``   <->  ``mic_001_ODD.mrc``        (key ``mic_001.mrc``)
  ``tomo_half1.rec``    <->  ``tomo_half2.rec``         (key ``tomo.rec``)
* Even and odd files with equal keys are paired. Every file must find its partner.
* When ``even`` and ``odd`` are the same directory, only names carrying a token take part.

The two halves of a pair must be different files with different contents (the same file as
both halves trains an identity map): :func:`check_distinct` refuses the same path, a link to
it, and a copy of it.
"""

from __future__ import annotations

import filecmp
import functools
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cryoden import io

SUFFIXES = (".mrc", ".mrcs", ".map", ".rec", ".st", ".ali", ".npy")
_SEP = r"[_.\-]"
_EVEN_RE = re.compile(rf"(^|{_SEP})(evn|even|half1)(?=$|{_SEP})", re.IGNORECASE)
_ODD_RE = re.compile(rf"(^|{_SEP})(odd|half2)(?=$|{_SEP})", re.IGNORECASE)

Pair = tuple[Path, Path]
STATS_CHUNK = 1 << 24  # elements read at a time by image_stats
SAMPLE_WINDOWS, SAMPLE_BYTES = 4, 1 << 14  # fingerprint: 4 windows of 16 KiB


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _mrc_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an MRC file from its header, checked against its size
    before anything is allocated (:func:`cryoden.io.mrc_layout`); IMOD's unsigned bytes read
    as uint8."""
    lay = io.mrc_layout(path)
    shape = lay.shape
    if len(shape) == 4:  # volume stack: one volume only
        if shape[0] != 1:
            raise ValueError(f"volume stacks ({shape[0]} volumes) are not supported")
        shape = shape[1:]
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    dtype = np.dtype(np.uint8) if lay.imod_unsigned else lay.dtype
    return shape, dtype, lay.offset


def open_half(path: str | os.PathLike) -> np.memmap:
    """Memory-map one half: ``(H, W)`` for an image (MRC with nz = 1), ``(D, H, W)`` otherwise.

    Read-only and lazy: only the pages a crop touches are read. Raises ``ValueError`` naming the
    file when it cannot be read as a 2D or 3D image.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            io.check_regular_file(path)
            arr = np.load(path, mmap_mode="r")
            if not isinstance(arr, np.memmap):
                raise ValueError("not a memory-mappable .npy array")
            if arr.ndim == 3 and arr.shape[0] == 1:
                arr = arr[0]
            if arr.ndim not in (2, 3) or arr.size == 0 or arr.dtype.kind not in "iuf":
                raise ValueError(f"expected a non-empty real 2D or 3D array, got {arr.shape}")
            return arr
        shape, dtype, offset = _mrc_layout(path)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def half_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Shape of a half as :func:`open_half` returns it (header read only)."""
    return tuple(open_half(path).shape)


@functools.lru_cache(maxsize=4096)
def _stats_cached(path: str, mtime_ns: int, size: int) -> tuple[float, float]:
    arr = open_half(path)
    rows = max(1, STATS_CHUNK // max(1, arr[0].size))
    n, mean, m2 = 0, 0.0, 0.0
    for start in range(0, arr.shape[0], rows):
        chunk = np.asarray(arr[start : start + rows], dtype=np.float64)
        k, cm = chunk.size, float(chunk.mean())
        cm2 = float(np.square(chunk - cm).sum())
        delta = cm - mean  # Chan et al. parallel variance update
        m2 += cm2 + delta * delta * n * k / (n + k)
        mean += delta * k / (n + k)
        n += k
    std = (m2 / n) ** 0.5
    if not (np.isfinite(mean) and np.isfinite(std)):
        raise ValueError(f"{path} contains non-finite values")
    if std == 0.0:
        raise ValueError(f"{path} is constant (std 0): cannot normalise")
    return mean, std


def image_stats(path: str | os.PathLike) -> tuple[float, float]:
    """Whole-image ``(mean, std)`` of one half, read in chunks through the memory map.

    Cached per file (keyed by path, modification time and size), so repeated calls are free.
    """
    path = Path(path).resolve()
    st = path.stat()
    return _stats_cached(str(path), st.st_mtime_ns, st.st_size)


# ----------------------------------------------------------------------------------------------
# Pairing and validation
# ----------------------------------------------------------------------------------------------


def _key(name: str, token_re: re.Pattern) -> tuple[str, bool]:
    """Pairing key of a file name and whether it carried a token."""
    stem, suffix = os.path.splitext(name)
    matches = list(token_re.finditer(stem))
    if not matches:
        return name, False
    m = matches[-1]
    return stem[: m.start()] + stem[m.end() :] + suffix, True


def _keyed(directory: Path, token_re: re.Pattern, need_token: bool) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(directory.iterdir()):
        if not p.is_file() or p.suffix.lower() not in SUFFIXES:
            continue
        key, has_token = _key(p.name, token_re)
        if need_token and not has_token:
            continue
        if key in out:
            raise ValueError(f"{p} and {out[key]} both pair as {key!r}: rename one")
        out[key] = p
    return out


def _as_list(x) -> list[Path] | None:
    if isinstance(x, (str, os.PathLike)):
        return None
    return [Path(p) for p in x]


def find_pairs(
    even: str | os.PathLike | Sequence[str | os.PathLike],
    odd: str | os.PathLike | Sequence[str | os.PathLike],
) -> list[Pair]:
    """Pair even and odd halves and validate them (readable, 2D/3D, equal shapes).

    ``even``/``odd``: two directories (paired by name, see the module docstring), two files, or
    two equally long lists of files (paired in order). Returns pairs sorted by even path for
    directories, in the given order for lists. Raises ``ValueError`` (one line naming the file) on
    no inputs, unmatched files, unreadable files, or a shape mismatch between halves.
    """
    even_list, odd_list = _as_list(even), _as_list(odd)
    if even_list is None and odd_list is None and Path(even).is_dir() and Path(odd).is_dir():
        e_dir, o_dir = Path(even), Path(odd)
        same = e_dir.resolve() == o_dir.resolve()
        e_keys, o_keys = _keyed(e_dir, _EVEN_RE, same), _keyed(o_dir, _ODD_RE, same)
        if not e_keys and not o_keys:
            raise ValueError(f"no input files ({', '.join(SUFFIXES)}) in {e_dir} / {o_dir}")
        for keys, other, side in ((e_keys, o_keys, "odd"), (o_keys, e_keys, "even")):
            lost = [keys[k] for k in keys if k not in other]
            if lost:
                more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
                raise ValueError(f"no {side} half for {lost[0]}{more}")
        pairs = [(e_keys[k], o_keys[k]) for k in sorted(e_keys, key=lambda k: str(e_keys[k]))]
    else:
        if even_list is None:
            even_list = [Path(even)]
        if odd_list is None:
            odd_list = [Path(odd)]
        if not even_list and not odd_list:
            raise ValueError("no input files given")
        if len(even_list) != len(odd_list):
            raise ValueError(f"{len(even_list)} even files but {len(odd_list)} odd files")
        for p in even_list + odd_list:
            if p.is_dir():
                raise ValueError(f"{p} is a directory: give two directories or two file lists")
        pairs = list(zip(even_list, odd_list, strict=True))
    for e, o in pairs:
        check_distinct(e, o)
        se, so = half_shape(e), half_shape(o)
        if se != so:
            raise ValueError(f"shape mismatch: {e} is {se} but its odd half {o} is {so}")
    return pairs


def fingerprint(path: str | os.PathLike) -> str:
    """Cheap content fingerprint of a file: BLAKE2b (16 hex digits) of its size and of
    :data:`SAMPLE_WINDOWS` windows of :data:`SAMPLE_BYTES` spread evenly from its start to its
    end (64 KiB read at most). Independent of the file's name, path and times, so it survives
    copying the data to other storage; any edit to the sampled bytes or the size changes it.
    Cached per file (keyed by path, modification time and size)."""
    path = Path(path).resolve()
    st = path.stat()
    return _fingerprint_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4096)
def _fingerprint_cached(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.blake2b(str(size).encode(), digest_size=8)
    span = max(0, size - SAMPLE_BYTES)
    with open(path, "rb") as f:
        for k in range(SAMPLE_WINDOWS):
            f.seek(span * k // (SAMPLE_WINDOWS - 1))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def check_distinct(even: str | os.PathLike, odd: str | os.PathLike) -> None:
    """Raise ``ValueError`` if the two halves are one file (same path, hard or symbolic link)
    or two files with identical contents (fingerprints equal, then confirmed byte by byte)."""
    try:
        same = os.path.samefile(even, odd)
        copy = not same and fingerprint(even) == fingerprint(odd)
        copy = copy and filecmp.cmp(even, odd, shallow=False)
    except OSError as e:
        raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None
    if same or copy:
        what = "the same file" if same else "identical copies"
        raise ValueError(
            f"even half {even} and odd half {odd} are {what}: Noise2Noise needs two "
            "independent halves of each exposure (training on one would learn the identity)"
        )


def split_holdout(pairs: Sequence[Pair], fraction: float, seed: int) -> tuple[list, list]:
    """Split whole pairs into ``(train, val)``, deterministic in ``seed``.

    ``val`` gets ``round(fraction * n)`` pairs, at least 1 when ``fraction > 0`` and n >= 2, and
    never all of them. Both lists keep the input order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    n = len(pairs)
    n_val = round(fraction * n)
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = min(n_val, max(n - 1, 0))
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [p for i, p in enumerate(pairs) if i not in val_idx]
    val = [p for i, p in enumerate(pairs) if i in val_idx]
    return train, val


def check_crop(pairs: Sequence[Pair], crop: int, ndim: int) -> None:
    """Raise ``ValueError`` naming the file if a half is not ``ndim``-D or smaller than ``crop``."""
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if crop < 1:
        raise ValueError(f"crop must be positive, got {crop}")
    for pair in pairs:
        for p in pair:
            shape = half_shape(p)
            if len(shape) != ndim:
                raise ValueError(f"{p} has shape {shape}: expected a {ndim}D image")
            if min(shape) < crop:
                raise ValueError(f"crop {crop} is larger than {p} of shape {shape}")
