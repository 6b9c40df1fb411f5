"""Training straight from movies (``cryoden train --movies``): a source of half-sum crops.

Each movie is aligned once; its shifts are cached in ``RUN/movies/<name>.star`` (a RELION
motion-correction STAR file) and read back on resume. Frames are read through a memory map in
their stored dtype: MRC stacks directly, other formats (compressed TIFF, EER) from a decoded
copy ``RUN/movies/<name>.npy`` written once. A gain reference (oriented as asked) is kept as
``RUN/movies/gain.npy``.

A defect map (``--defects``, as ``cryoden movies --defects``) and the gain's zero or non-finite
pixels make the movie's defect mask (:attr:`cryoden.movie.Movie.defects`), kept as
``RUN/movies/defects-<H>x<W>.npy``.

A training sample is a window of two half sums: the frames are partitioned into two halves by
:func:`cryoden.halfsums.sample_partition` (a pure function of ``(seed, epoch, sample)``, fresh
every epoch), and each half's window is the sum of its frames' windows, each gain-multiplied,
defect-filled and moved by the frame's subpixel shift (:func:`cryoden.halfsums.window_sum`):
the same frames, to a windowed-sinc interpolation, as the halves ``cryoden movies`` writes.
Windows are drawn inside the region every frame, shifted by whole pixels, covers. Validation
always uses the even/odd partition. Both halves are normalised by the mean and std of the
movie's even/odd half sums of the same number of frames (computed once, when the run starts,
over at most :data:`STATS_STRIPS` strips of rows spread over the movie).

:class:`MovieSource` has the interface of the half-file source of :mod:`cryoden.train.data`
(``pairs``, ``shapes``, ``stats``, ``crop``) and is picklable for grain worker processes.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryoden import halfsums, io

log = logging.getLogger("cryoden.train")
SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".eer")
CACHE = "movies"  # RUN/movies/
STATS_ROWS = 256  # rows of a half sum computed at a time for its statistics
STATS_STRIPS = 8  # at most this many strips of STATS_ROWS rows, evenly spread, give the statistics


def find_movies(spec: str) -> list[Path]:
    """``--movies DIR|GLOB`` -> sorted movie files; ValueError when there are none."""
    p = Path(spec).expanduser()
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES]
        files = [f for f in files if not f.name.startswith(".")]
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in glob.glob(os.path.expanduser(spec)) if Path(f).is_file()]
    if not files:
        raise ValueError(f"--movies {spec}: no movies ({', '.join(SUFFIXES)}) found")
    files = sorted(files)
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise ValueError(f"{f} and {stems[f.stem]} have the same name {f.stem!r}: rename one")
        stems[f.stem] = f
    return files


@dataclasses.dataclass(frozen=True)
class GainSpec:
    """The gain options of ``--movies``: file (or None), RELION rotation and flip codes, and
    the defect file (map or boxes, :func:`cryoden.gain.load_defects`) or None."""

    path: str | None = None
    rot: int = 0
    flip: int = 0
    defects: str | None = None

    def open_kwargs(self) -> dict[str, Any]:
        return dict(gain=self.path, gain_rot=self.rot, gain_flip=self.flip, defects=self.defects)


def check_movies(paths: Sequence[Path], gain: GainSpec, crop: int) -> list[Any]:
    """Open every movie (headers, gain shape) and check it gives two halves of ``crop``
    pixels; writes nothing. Returns their ``MovieInfo``; raises ValueError naming the file."""
    from cryoden.movie import open_movie

    infos = []
    for p in paths:
        try:
            with open_movie(p, **gain.open_kwargs()) as m:
                info = m.info
        except (OSError, ValueError) as e:
            raise ValueError(_named(p, e)) from None
        if info.n_frames < 2:
            raise ValueError(f"{p}: {info.n_frames} frame: two halves need at least 2 frames")
        if min(info.shape) < crop:
            raise ValueError(f"crop {crop} is larger than the frames of {p} ({info.shape})")
        infos.append(info)
    return infos


def describe(paths: Sequence[Path], gain: GainSpec) -> list[dict[str, Any]]:
    """The data record of a movie run (``RUN/data.json``): name, size and fingerprint of every
    movie in order, then of the gain reference and the defect file; see
    :mod:`cryoden.train.datarecord`."""
    from cryoden.train.pairs import fingerprint

    files = [("movie", Path(p)) for p in paths]
    if gain.path:
        files.append(("gain", Path(gain.path)))
    if gain.defects:
        files.append(("defects", Path(gain.defects)))
    return [
        {kind: p.name, "size": os.stat(p).st_size, "fingerprint": fingerprint(p)}
        for kind, p in files
    ]


def _named(path: Path, e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if str(path) in text else f"{path}: {text}"


# ----------------------------------------------------------------------------- the source


@dataclasses.dataclass
class _Movie:
    """One prepared movie: where its frames are, how to shift them, where windows may lie."""

    name: str
    frames: str  # .npy or MRC path
    mrc: tuple[tuple[int, ...], str, int] | None  # (shape, dtype, offset) of an MRC stack
    offsets: np.ndarray  # (N, 2) float (x, y): subpixel window displacement per frame (-shifts)
    origin: tuple[int, int]  # (row, column) of the valid region's corner in frame coordinates
    shape: tuple[int, int]  # valid region (rows, columns)
    defects: str | None = None  # .npy (H, W) bool defect mask, or None
    depth: int = 0  # layers of its defect filling (halfsums.defect_depth)


class MovieSource:
    """Picklable view of prepared movies for the grain pipeline (see the module docstring).

    pairs: one entry per movie (its name); shapes: valid ``(H, W)`` region per movie;
    stats: ``(mean_a, std_a, mean_b, std_b)`` per movie for halves of the sizes of
    :func:`cryoden.halfsums.half_sizes` of the even/odd split.
    """

    def __init__(self, movies: list[_Movie], gain: str | None, split: str, seed: int):
        self.movies, self.gain_path, self.split, self.seed = movies, gain, split, seed
        self.pairs = [m.name for m in movies]
        self.shapes = [m.shape for m in movies]
        self._maps: dict[int, np.ndarray] = {}
        self._gain: np.ndarray | None = None
        self._defects: dict[str, np.ndarray] = {}
        self.stats = [self._stats(j) for j in range(len(movies))]

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}, "_gain": None, "_defects": {}}

    def __len__(self) -> int:
        return len(self.movies)

    def _frames(self, j: int) -> np.ndarray:
        if j not in self._maps:
            m = self.movies[j]
            if m.mrc is None:
                self._maps[j] = np.load(m.frames, mmap_mode="r")
            else:
                shape, dtype, offset = m.mrc
                self._maps[j] = np.memmap(m.frames, np.dtype(dtype), "r", offset, shape)
        return self._maps[j]

    def gain(self) -> np.ndarray | None:
        if self._gain is None and self.gain_path is not None:
            self._gain = np.load(self.gain_path, mmap_mode="r")
        return self._gain

    def defects(self, j: int) -> np.ndarray | None:
        """Movie ``j``'s ``(H, W)`` bool defect mask (memory-mapped), or None."""
        path = self.movies[j].defects
        if path is None:
            return None
        if path not in self._defects:
            self._defects[path] = np.load(path, mmap_mode="r")
        return self._defects[path]

    def half_window(self, j: int, indices, origin: Sequence[int], size) -> np.ndarray:
        """Sum of frames ``indices`` of movie ``j`` over a window of the valid region:
        ``origin`` (row, column) in that region, ``size`` an int or (rows, columns);
        ``(rows, columns)`` float64."""
        m = self.movies[j]
        at = (m.origin[0] + int(origin[0]), m.origin[1] + int(origin[1]))
        return halfsums.window_sum(
            self._frames(j), indices, m.offsets, at, size, self.gain(), self.defects(j), m.depth
        )

    def _stats(self, j: int) -> tuple[float, float, float, float]:
        n = len(self.movies[j].offsets)
        h, w = self.shapes[j]
        rows = list(range(0, h, STATS_ROWS))
        if len(rows) > STATS_STRIPS:  # evenly spread strips, the first and the last included
            rows = [
                rows[round(k * (len(rows) - 1) / (STATS_STRIPS - 1))] for k in range(STATS_STRIPS)
            ]
        out = []
        for idx in halfsums.partition(n, "even-odd"):
            s, s2, count = 0.0, 0.0, 0
            for r in rows:
                x = self.half_window(j, idx, (r, 0), (min(STATS_ROWS, h - r), w))
                s, s2, count = s + float(x.sum()), s2 + float(np.square(x).sum()), count + x.size
            mean = s / count
            std = max(s2 / count - mean * mean, 0.0) ** 0.5
            if not (np.isfinite(mean) and np.isfinite(std)) or std == 0.0:
                raise ValueError(f"movie {self.pairs[j]}: its half sums are constant or not finite")
            out += [mean, std]
        return tuple(out)

    def crop(
        self, j: int, origin: Sequence[int], crop: int, sample: tuple[int, int, int] | None = None
    ) -> np.ndarray:
        """Normalised windows of two half sums of movie ``j``: ``(2, crop, crop)`` float32.

        sample: ``(seed, epoch, k)`` of a training sample, whose partition is drawn with
        :func:`cryoden.halfsums.sample_partition` in the run's split mode; None: the even/odd
        partition (validation).
        """
        n = len(self.movies[j].offsets)
        if sample is None:
            a, b = halfsums.partition(n, "even-odd")
        else:
            a, b = halfsums.sample_partition(n, self.split, *sample)
        me, se, mo, so = self.stats[j]
        if sample is not None and self.split == "random":
            me, se = mo, so  # two halves of n // 2 frames: the odd half's size
        out = np.empty((2, crop, crop), np.float32)
        out[0] = (self.half_window(j, a, origin, crop) - me) / se
        out[1] = (self.half_window(j, b, origin, crop) - mo) / so
        return out


# ----------------------------------------------------------------------------- preparation


def prepare(
    train: Sequence[Path],
    val: Sequence[Path],
    gain: GainSpec,
    run: Path,
    *,
    split: str,
    seed: int,
) -> tuple[MovieSource, MovieSource | list]:
    """Align (or read cached shifts), cache undecodable frames and the gain in ``run/movies``;
    -> the :class:`MovieSource` of the ``train`` movies and of the ``val`` movies (``[]`` when
    there are none). Raises ValueError naming a bad movie."""
    from cryoden.movie import open_movie

    cache = run / CACHE
    cache.mkdir(parents=True, exist_ok=True)
    io.remove_stale_temporaries(cache)
    gain_file = None
    masks: dict[tuple[int, int], tuple[str, int]] = {}  # frame shape -> (mask file, depth)
    movies = []
    for p in [*train, *val]:
        try:
            with open_movie(p, **gain.open_kwargs()) as m:
                shifts = _shifts(m, cache / f"{p.stem}.star")
                frames, mrc = _frames(m, p, cache / f"{p.stem}.npy")
                if gain.path and gain_file is None:
                    gain_file = _cache_gain(m, gain, cache / "gain.npy")
                shape = tuple(m.info.shape)
                movie = _layout(p.stem, frames, mrc, shifts, shape)
                if m.defects is not None:
                    if shape not in masks:
                        masks[shape] = _cache_defects(m.defects, cache, shape)
                    movie.defects, movie.depth = masks[shape]
                movies.append(movie)
        except (OSError, ValueError) as e:
            raise ValueError(_named(p, e)) from None
    n = len(train)
    val_source = MovieSource(movies[n:], gain_file, split, seed) if val else []
    return MovieSource(movies[:n], gain_file, split, seed), val_source


def _layout(name, frames, mrc, shifts, shape) -> _Movie:
    """Subpixel offsets and the region covered by every frame shifted by whole pixels."""
    offsets = offsets_of(shifts)
    lo = np.minimum(offsets.min(0), 0)  # (x, y)
    hi = np.maximum(offsets.max(0), 0)
    valid = (shape[0] - int(hi[1] - lo[1]), shape[1] - int(hi[0] - lo[0]))
    if min(valid) < 1:
        raise ValueError(f"movie {name}: the frames drift by more than their size")
    exact = -np.asarray(shifts, np.float64)
    return _Movie(name, str(frames), mrc, exact, (-int(lo[1]), -int(lo[0])), valid)


def offsets_of(shifts: np.ndarray) -> np.ndarray:
    """``(N, 2)`` whole-pixel window displacements ``(x, y)`` of frames with ``shifts``
    ``(N, 2)`` (x, y px, RELION's convention, :mod:`cryoden.align`: the aligned frame is
    ``aligned(p) = frame(p - shift)``, so an aligned window at ``p`` reads the frame at
    ``p - round(shift)``)."""
    return -np.rint(np.asarray(shifts, np.float64)).astype(np.int64)


def _shifts(m, star: Path) -> np.ndarray:
    """The movie's ``(N, 2)`` shifts: read from the cached STAR file, else estimated and
    cached, and read back (a fresh run uses the shifts a resumed one reads, to the digit)."""
    from cryoden import motionstar

    if star.is_file():
        shifts = np.asarray(motionstar.read(star).shifts, np.float64)
        if shifts.shape != (len(m), 2):
            raise ValueError(f"{star}: {shifts.shape[0]} shifts for {len(m)} frames")
        return shifts
    from cryoden.align import estimate_shifts

    shifts = np.asarray(estimate_shifts(m, pixel_size=m.info.pixel_size or 1.0).shifts)
    motionstar.write(
        star,
        shifts,
        movie_name=str(m.info.path),
        shape=m.info.shape,
        pixel_size=m.info.pixel_size,
    )
    log.info("aligned %s: drift %.1f px", Path(m.info.path).name, drift(shifts))
    return _shifts(m, star)


def drift(shifts: np.ndarray) -> float:
    """Total path length of a ``(N, 2)`` trajectory, in pixels."""
    return float(np.sum(np.hypot(*np.diff(np.asarray(shifts), axis=0).T)))


def _frames(m, path: Path, npy: Path):
    """``(file, mrc layout or None)``: an MRC stack is mapped where it lies; other formats
    are decoded once into ``npy`` (stored dtype, written atomically)."""
    if m.info.format == "mrc":
        lay = io.mrc_layout(path)
        dtype = np.dtype(np.uint8) if lay.imod_unsigned else lay.dtype
        return path, ((len(m), *m.info.shape), dtype.str, lay.offset)
    want = (len(m), *m.info.shape)
    if npy.is_file():
        arr = np.load(npy, mmap_mode="r")
        if arr.shape == want and arr.dtype == np.dtype(m.info.stored_dtype):
            return npy, None
    with io.atomic(npy) as tmp:
        arr = np.lib.format.open_memmap(tmp, "w+", np.dtype(m.info.stored_dtype), want)
        for i in range(len(m)):
            arr[i] = m.raw(i)
        arr.flush()
        del arr
    return npy, None


def _cache_gain(m, gain: GainSpec, npy: Path) -> str:
    """The oriented gain ``(H, W)`` float32 of ``m``'s frames as ``npy`` (zero where it is zero
    or not finite: such pixels are in the movie's defect mask and filled); -> its path."""
    from cryoden.gain import load_gain

    eer = 1 if m.info.format == "eer" else None
    g = load_gain(gain.path, m.info.shape, gain.rot, gain.flip, eer_upsampling=eer)
    g = np.where(np.isfinite(g), g, 0).astype(np.float32)
    with io.atomic(npy) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, g)
    return str(npy)


def _cache_defects(mask: np.ndarray, cache: Path, shape) -> tuple[str, int]:
    """Write the ``(H, W)`` bool defect ``mask`` as ``cache/defects-<H>x<W>.npy`` (atomically);
    -> its path and filling depth."""
    npy = cache / f"defects-{shape[0]}x{shape[1]}.npy"
    with io.atomic(npy) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(mask, bool))
    return str(npy), halfsums.defect_depth(mask)


def even_half_file(source: MovieSource, j: int, run: Path) -> Path:
    """The even/odd partition's first half of movie ``j`` over its whole valid region, as
    ``run/movies/<name>.even.npy`` ``(H, W)`` float32 (written atomically once; what the
    training previews show, as they show the even half of a pair of half files)."""
    path = run / CACHE / f"{source.pairs[j]}.even.npy"
    if not path.is_file():
        even, _ = halfsums.partition(len(source.movies[j].offsets), "even-odd")
        image = source.half_window(j, even, (0, 0), source.shapes[j]).astype(np.float32)
        with io.atomic(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, image)
    return path
