"""Reading cryo-EM movies frame by frame: MRC stacks, TIFF (multi-page) and EER.

:func:`open_movie` returns a :class:`Movie`, a context manager whose frames are read lazily,
one at a time, from the file (nothing holds the whole movie): ``movie.frame(i)`` is frame ``i``
as ``(H, W)`` float32, gain-multiplied and defect-corrected; ``movie.raw(i)`` is the same frame
in its stored dtype without gain or defect correction (for caches and memory maps), and
``movie.correct(raw)`` turns such a raw frame into what ``frame`` returns.

Formats (``MovieInfo.format``):

- ``'mrc'`` (``.mrc``, ``.mrcs``): a stack of ``nz`` frames; modes 0 (int8, uint8 when IMOD's
  header flags say so, as :func:`cryoden.io.read` does), 1 (int16), 2 (float32), 6 (uint16),
  12 (float16). The header is checked against the file size before anything is read
  (:func:`cryoden.io.mrc_layout`); each frame is read with one ``pread``.
- ``'tiff'`` (``.tif``, ``.tiff``): one frame per page, uncompressed, LZW or deflate, 8/16-bit
  integers or float32, decoded page by page; each page may decode to at most
  ``io.DECODE_FLOOR`` bytes or ``io.DECODE_RATIO`` times the file's size. As RELION, IMOD,
  SerialEM and MotionCor2 do, TIFF frames are flipped upside down on reading (a TIFF's first row
  is the top of the image, an MRC's the bottom), so a gain reference and a defect map relate to
  the frames exactly as in RELION.
- ``'eer'`` (``.eer``): Thermo Fisher's Electron Event Representation (TIFF pages compressed
  with schemes 65000, 65001 or 65002), decoded by imagecodecs. ``eer_grouping`` raw frames are
  summed into one frame while streaming; leftover raw frames at the end are dropped, as RELION's
  ``--eer_grouping`` does. ``eer_upsampling`` 1 renders events on the physical (4K) grid, 2 on
  the 2x super-resolution grid using the events' sub-pixel bits (RELION's ``--eer_upsampling``).
  EER frames are not flipped (RELION renders them in file order). Grouped counts are stored as
  uint8 (grouping <= 255: a raw frame holds at most one event per rendered pixel) or uint16.

``first`` and ``last`` select frames ``first .. last - 1`` (0-based, Python slice semantics;
``last=None`` reads to the end), counted after EER grouping, like RELION's
``--first_frame_sum``/``--last_frame_sum`` (which are 1-based and inclusive: RELION's
``--first_frame_sum F --last_frame_sum L`` is ``first=F - 1, last=L``).

Gain references and defect maps: see :mod:`cryoden.gain` (RELION's ``--gain_rot``/``--gain_flip``
conventions, EER gains, defect filling).

Every error is a :class:`MovieError` with a one-line message that starts with the movie's path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from cryoden import gain as gainmod
from cryoden import io

SUFFIXES = {".mrc": "mrc", ".mrcs": "mrc", ".tif": "tiff", ".tiff": "tiff", ".eer": "eer"}
EER_COMPRESSION = {65000: (8, 2, 2), 65001: (7, 2, 2)}  # scheme -> (skip, horz, vert) bits
EER_DEFAULT_GROUPING = 1  # raw frames per frame when eer_grouping is None


class MovieError(ValueError):
    """A movie (or its gain/defect file) cannot be read; the message is one line naming the file."""


@dataclass(frozen=True)
class MovieInfo:
    """What a :class:`Movie` delivers.

    path: the movie file. format: ``'mrc'`` | ``'tiff'`` | ``'eer'``.
    n_frames: frames delivered, after ``first``/``last`` and EER grouping.
    shape: ``(H, W)`` of a delivered frame (after EER upsampling).
    stored_dtype: dtype of :meth:`Movie.raw` frames: the file's sample type for MRC and TIFF;
    uint8 or uint16 counts for EER (see the module doc).
    stored_bytes: ``n_frames * H * W * stored_dtype.itemsize``, the memory that all delivered
    frames take in their stored dtype (for memory accounting; the on-disk size for MRC).
    pixel_size: Å per delivered pixel from the header (MRC voxel size, ImageJ TIFF resolution),
    None when unknown (always for EER: pass the pixel size explicitly).
    raw_frames_per_frame: EER grouping (1 for MRC and TIFF).
    """

    path: Path
    format: str
    n_frames: int
    shape: tuple[int, int]
    stored_dtype: np.dtype
    stored_bytes: int
    pixel_size: float | None
    raw_frames_per_frame: int


def is_movie(path: str | os.PathLike) -> bool:
    """True for a regular file with a movie suffix (``.mrc .mrcs .tif .tiff .eer``) whose
    content is of that kind (MRC stamp or TIFF magic). Never raises, never blocks (a FIFO is
    not opened)."""
    path = Path(path)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        return False
    try:
        io.check_regular_file(path)
        with open(path, "rb") as f:
            head = f.read(212)
    except (OSError, ValueError):
        return False
    tiff = head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
    return tiff if fmt in ("tiff", "eer") else head[208:211] == b"MAP"


# ----------------------------------------------------------------------------- frame sources


class _MrcFrames:
    """Frames of an MRC stack, read one at a time with ``pread``: ``(H, W)`` in stored dtype."""

    format = "mrc"

    def __init__(self, path: Path):
        lay = io.mrc_layout(path)
        if len(lay.shape) == 4:
            raise ValueError(f"volume stack (space group {int(lay.header.ispg)}) is not a movie")
        self.shape = tuple(lay.shape[-2:])
        self.n_raw = lay.shape[0] if len(lay.shape) == 3 else 1
        self.dtype = np.dtype(np.uint8) if lay.imod_unsigned else lay.dtype.newbyteorder("=")
        self._file_dtype = lay.dtype
        self._offset, self._frame_bytes = (
            lay.offset,
            self.shape[0] * self.shape[1] * lay.dtype.itemsize,
        )
        vs = io._voxel_size(lay.header).x
        self.pixel_size = vs if vs > 0 else None
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, i: int) -> np.ndarray:
        buf = np.empty(self._frame_bytes, np.uint8)
        got = os.preadv(self._fd, [memoryview(buf)], self._offset + i * self._frame_bytes)
        if got < self._frame_bytes:
            raise ValueError(f"file is truncated: frame {i} ends beyond the end of the file")
        frame = buf.view(self._file_dtype).reshape(self.shape)
        if not self._file_dtype.isnative:
            frame = frame.byteswap().view(self._file_dtype.newbyteorder("="))
        return frame.view(self.dtype)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _TiffFrames:
    """Pages of a multi-page TIFF, decoded one at a time and flipped upside down (RELION)."""

    format = "tiff"

    def __init__(self, path: Path):
        self._tif = tifffile.TiffFile(path)
        try:
            self._open(path)
        except BaseException:
            self._tif.close()
            raise

    def _open(self, path: Path) -> None:
        tif = self._tif
        pages = tif.pages
        pages.useframes = False
        first = pages.first
        if first.compression in EER_COMPRESSION or first.compression == 65002:
            raise ValueError("TIFF holds EER-compressed frames; name the file .eer")
        self._pages = [pages[k] for k in range(len(pages))]
        shapes = {(p.shape, p.dtype) for p in self._pages}
        if len(shapes) > 1:
            raise ValueError(f"TIFF pages differ in shape or type: {sorted(map(str, shapes))}")
        if len(first.shape) != 2:
            raise ValueError(f"TIFF pages are not single-channel images (shape {first.shape})")
        io._check_tiff(tif, tif.series)  # the page list is complete (io.check_tiff_pages)
        self.shape, self.n_raw = tuple(first.shape), len(pages)
        self.dtype = np.dtype(first.dtype).newbyteorder("=")
        size = tif.filehandle.size
        for k, p in enumerate(self._pages):
            end = max(
                (o + n for o, n in zip(p.dataoffsets, p.databytecounts, strict=True)), default=0
            )
            if end > size:
                raise ValueError(
                    f"file is truncated: page {k} claims bytes up to {end}, file has {size}"
                )
            if p.compression != tifffile.COMPRESSION.NONE:
                io._check_decoded(f"TIFF page {k} of shape {p.shape}", p.nbytes, size)
        ij = tif.imagej_metadata or {}
        scale = io._TIFF_UNITS.get(str(ij.get("unit", "")).lower())
        res = first.resolution if ij else None
        self.pixel_size = scale / res[0] if scale and res and res[0] else None

    def read(self, i: int) -> np.ndarray:
        frame = self._pages[i].asarray()
        return np.ascontiguousarray(frame[::-1]).astype(frame.dtype.newbyteorder("="), copy=False)

    def close(self) -> None:
        self._tif.close()


class _EerFrames:
    """Raw EER frames (TIFF pages), decoded into a count image by imagecodecs."""

    format = "eer"

    def __init__(self, path: Path, upsampling: int):
        import imagecodecs

        self._decode = imagecodecs.eer_decode
        self._tif = tifffile.TiffFile(path)
        try:
            self._open(upsampling)
        except BaseException:
            self._tif.close()
            raise

    def _open(self, upsampling: int) -> None:
        pages = self._tif.pages
        pages.useframes = False  # every page parsed: each frame's size is checked
        first = pages.first
        start = 0
        if first.compression == tifffile.COMPRESSION.NONE and len(pages) > 1:
            start = 1  # TIA can write an integrated image first (tifffile's 'integrated')
            first = pages[1]
        if first.compression == 65002:
            tags = first.tags
            self._bits = tuple(
                int(tags.valueof(c, d)) for c, d in ((65007, 7), (65008, 2), (65009, 2))
            )
        elif first.compression in EER_COMPRESSION:
            self._bits = EER_COMPRESSION[first.compression]
        else:
            raise ValueError(f"not an EER file (TIFF compression {int(first.compression)})")
        skip, hb, vb = self._bits
        if not (1 < skip < 15 and 0 < hb < 5 and 0 < vb < 5 and 8 < skip + hb + vb < 17):
            raise ValueError(
                f"unsupported EER code: {skip} skip bits, {hb}+{vb} sub-pixel bits (tags "
                f"65007-65009)"
            )
        self._superres = upsampling - 1
        self.detector_shape = (int(first.imagelength), int(first.imagewidth))
        self.shape = (self.detector_shape[0] * upsampling, self.detector_shape[1] * upsampling)
        self._frames = [(k, pages[k]) for k in range(start, len(pages))]
        io.check_tiff_pages(self._tif)
        size = self._tif.filehandle.size
        self._segments = []
        for k, p in self._frames:
            if (int(p.imagelength), int(p.imagewidth)) != self.detector_shape:
                raise ValueError(f"EER frame {k} is {p.shape}, not {self.detector_shape}")
            segs = list(zip(p.dataoffsets, p.databytecounts, strict=True))
            end = max((o + n for o, n in segs), default=0)
            if end > size or not segs:
                raise ValueError(
                    f"file is truncated: EER frame {k} claims bytes up to {end}, file has {size}"
                )
            self._segments.append(segs)
        self.n_raw = len(self._frames)
        self.pixel_size = None
        self.dtype = np.dtype(np.uint16)

    def add(self, i: int, out: np.ndarray) -> None:
        """Add the events of raw frame ``i`` into ``out``, ``(H, W)`` uint16 (rendered grid).

        A frame's strips are one bit stream (as RELION reads them), decoded as a whole.
        """
        fh = self._tif.filehandle
        parts = []
        for offset, count in self._segments[i]:
            fh.seek(offset)
            parts.append(fh.read(count))
        data = b"".join(parts)
        if len(data) < sum(n for _, n in self._segments[i]):
            raise ValueError(f"file is truncated: EER frame {i} is cut short")
        if len(data) % 2:  # the decoder reads 16-bit words
            data += b"\0"
        self._decode(data, self.shape, *self._bits, superres=self._superres, out=out)

    def close(self) -> None:
        self._tif.close()


# ----------------------------------------------------------------------------- the movie


class Movie:
    """A movie opened by :func:`open_movie`; a context manager. Frames are read lazily."""

    def __init__(self, source, info: MovieInfo, start: int, gain, mask):
        self._src, self.info, self._start = source, info, start
        self._gain, self._mask = gain, mask
        self._fill = gainmod.DefectFill(mask) if mask is not None else None
        self._lock = threading.Lock()  # TIFF and EER sources seek a shared file handle

    def __len__(self) -> int:
        return self.info.n_frames

    @property
    def gain(self) -> np.ndarray | None:
        """``(H, W)`` float32 multiplied into each frame (0 at defects), or None."""
        return self._gain

    @property
    def fill(self) -> gainmod.DefectFill | None:
        """The defect filling plan (for :func:`cryoden.gain.correct` outside the Movie), or None."""
        return self._fill

    @property
    def defects(self) -> np.ndarray | None:
        """``(H, W)`` bool, True where pixels are replaced (defect map and bad gain), or None."""
        return self._mask

    def __enter__(self) -> Movie:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.info.n_frames:
            raise IndexError(
                f"{self.info.path}: frame {i} out of range 0..{self.info.n_frames - 1}"
            )
        return i

    def raw(self, i: int) -> np.ndarray:
        """Frame ``i`` as stored, ``(H, W)`` in ``info.stored_dtype``: no gain, no defect fill."""
        i = self._index(i)
        try:
            with self._lock:
                return self._read(i)
        except (ValueError, OSError) as e:
            raise _error(self.info.path, e) from e
        except RuntimeError as e:  # imagecodecs' errors: corrupt EER, LZW, deflate data
            raise _error(self.info.path, f"cannot decode frame {i}: {e}") from e

    def _read(self, i: int) -> np.ndarray:
        if self.info.format != "eer":
            return self._src.read(self._start + i)
        g = self.info.raw_frames_per_frame
        acc = np.zeros(self.info.shape, np.uint16)  # counts <= g <= 65535 (module doc)
        for k in range((self._start + i) * g, (self._start + i + 1) * g):
            self._src.add(k, acc)
        return acc.astype(self.info.stored_dtype, copy=False)

    def correct(self, raw: np.ndarray) -> np.ndarray:
        """``(H, W)`` raw frame -> ``(H, W)`` float32, multiplied by the gain, defects filled."""
        raw = np.asarray(raw)
        if raw.shape != self.info.shape:
            raise ValueError(f"raw frame of shape {raw.shape}, movie frames are {self.info.shape}")
        return gainmod.correct(raw, self._gain, self._fill)

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i``: ``(H, W)`` float32, gain-multiplied and defect-corrected."""
        return self.correct(self.raw(i))

    def close(self) -> None:
        self._src.close()


_QUIET = {"depth": 0, "level": logging.NOTSET, "lock": threading.Lock()}


@contextlib.contextmanager
def _quiet_tifffile():
    """Silence tifffile's log while opening (its warnings about a broken file would print
    beside our one-line error); nested and concurrent uses restore the level once."""
    log = logging.getLogger("tifffile")
    with _QUIET["lock"]:
        if _QUIET["depth"] == 0:
            _QUIET["level"] = log.level
            log.setLevel(logging.ERROR + 1)
        _QUIET["depth"] += 1
    try:
        yield
    finally:
        with _QUIET["lock"]:
            _QUIET["depth"] -= 1
            if _QUIET["depth"] == 0:
                log.setLevel(_QUIET["level"])


def _error(path: Path, e) -> MovieError:
    """A one-line MovieError ``"{path}: <problem>"`` from an exception or a message."""
    if isinstance(e, OSError) and e.strerror:
        msg = e.strerror
    else:
        msg = str(e)
    msg = " ".join(msg.split()).removeprefix(f"{path}: ")
    if isinstance(e, tifffile.TiffFileError):
        msg = f"file is truncated or corrupt (TIFF structure: {msg})"
    return MovieError(f"{path}: {msg}")


def open_movie(
    path: str | os.PathLike,
    *,
    gain=None,
    gain_rot: int = 0,
    gain_flip: int = 0,
    defects=None,
    eer_grouping: int | None = None,
    eer_upsampling: int = 1,
    first: int = 0,
    last: int | None = None,
) -> Movie:
    """Open a movie for frame-by-frame reading (see the module doc).

    gain: a gain reference file (MRC/TIFF/EPU ``.gain``; loaded with :func:`cryoden.gain.load_gain`
    and rotated/flipped by ``gain_rot`` 0..3 / ``gain_flip`` 0..2 as RELION does), or an ``(H, W)``
    array already in the frames' orientation (multiplied as is), or None.
    defects: a defect file (:func:`cryoden.gain.load_defects`), an ``(H, W)`` bool mask
    (True = defect), or None. Zero or non-finite gain pixels are defects too.
    eer_grouping: raw EER frames per frame (None: 1); eer_upsampling: 1 or 2.
    first, last: frames ``first .. last - 1`` after grouping (0-based; ``last=None``: to the end).

    Raises :class:`MovieError` (one line, starting with the movie's path).
    """
    path = Path(path)
    try:
        fmt = SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"not a movie file name (expected one of {', '.join(SUFFIXES)})")
        if eer_upsampling not in (1, 2):
            raise ValueError(f"EER upsampling must be 1 or 2, not {eer_upsampling}")
        if fmt == "eer" and eer_grouping is not None and int(eer_grouping) < 1:
            raise ValueError(f"EER grouping must be >= 1, not {eer_grouping}")
        io.check_regular_file(path)
        with open(path, "rb") as f:
            head = f.read(212)
        is_tiff = head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
        if fmt == "mrc" and is_tiff or fmt != "mrc" and not is_tiff:
            found = "TIFF" if is_tiff else "MRC" if head[208:211] == b"MAP" else "unknown"
            raise ValueError(f"file content is {found}, but the extension says {fmt.upper()}")
        with _quiet_tifffile():  # its warnings about broken files become our one-line errors
            src = {
                "mrc": lambda: _MrcFrames(path),
                "tiff": lambda: _TiffFrames(path),
                "eer": lambda: _EerFrames(path, eer_upsampling),
            }[fmt]()
    except MovieError:
        raise
    except (ValueError, OSError, tifffile.TiffFileError) as e:
        raise _error(path, e) from e
    try:
        return _build(
            path, src, gain, gain_rot, gain_flip, defects, eer_grouping, eer_upsampling, first, last
        )
    except BaseException as e:
        src.close()
        if isinstance(e, (ValueError, OSError)) and not isinstance(e, MovieError):
            raise _error(path, e) from e
        raise


def add_reading_args(group) -> None:
    """The options of how movies are read (``--gain``, ``--gain-rot``, ``--gain-flip``,
    ``--defects``, ``--eer-grouping``, ``--eer-upsampling``) on an argparse group; see
    :func:`reading_kwargs` and :func:`reading_problem`."""
    group.add_argument("--gain", metavar="F", help="gain reference (MRC, TIFF or EPU .gain)")
    group.add_argument(
        "--gain-rot",
        type=int,
        default=0,
        choices=range(4),
        help="rotate the gain 90 degrees clockwise this many times (RELION's --gain_rot)",
    )
    group.add_argument(
        "--gain-flip",
        type=int,
        default=0,
        choices=range(3),
        help="flip the gain: 1 upside down, 2 left to right (RELION's --gain_flip)",
    )
    group.add_argument("--defects", metavar="F", help="defect map (image) or defect list file")
    group.add_argument(
        "--eer-grouping", type=int, metavar="N", help="EER raw frames per frame; default: 1"
    )
    group.add_argument(
        "--eer-upsampling", type=int, default=1, choices=(1, 2), help="EER rendering grid"
    )


def reading_problem(args) -> str | None:
    """The problem with the options of :func:`add_reading_args`, or None."""
    if args.eer_grouping is not None and args.eer_grouping < 1:
        return "--eer-grouping must be >= 1"
    return None


def reading_kwargs(args) -> dict:
    """The :func:`open_movie` keywords of the options of :func:`add_reading_args`."""
    return dict(
        gain=args.gain,
        gain_rot=args.gain_rot,
        gain_flip=args.gain_flip,
        defects=args.defects,
        eer_grouping=args.eer_grouping,
        eer_upsampling=args.eer_upsampling,
    )


def _build(
    path, src, gain, gain_rot, gain_flip, defects, eer_grouping, eer_upsampling, first, last
):
    group = 1
    if src.format == "eer":
        group = int(eer_grouping or EER_DEFAULT_GROUPING)
        if group > 65535:
            raise ValueError(f"EER grouping {group} is above 65535 raw frames per frame")
        if group > src.n_raw:
            raise ValueError(f"EER grouping {group} exceeds the {src.n_raw} raw frames")
    n_all = src.n_raw // group  # leftover raw frames are dropped (RELION)
    stop = n_all if last is None else int(last)
    if not (0 <= int(first) < stop <= n_all):
        raise ValueError(
            f"frame selection first={first}, last={last} is empty or outside the movie's "
            f"{n_all} frames (0-based, last exclusive)"
        )
    dtype = src.dtype
    if src.format == "eer":
        dtype = np.dtype(np.uint8 if group <= 255 else np.uint16)
    n = stop - int(first)
    h, w = src.shape
    info = MovieInfo(
        path=path,
        format=src.format,
        n_frames=n,
        shape=(h, w),
        stored_dtype=dtype,
        stored_bytes=n * h * w * dtype.itemsize,
        pixel_size=src.pixel_size,
        raw_frames_per_frame=group,
    )
    g = _gain(src, gain, gain_rot, gain_flip, eer_upsampling)
    mask = _defects(src, defects, eer_upsampling)
    if g is not None:
        bad = ~np.isfinite(g) | (g == 0)
        if bad.any():
            mask = bad if mask is None else mask | bad
            g = np.where(bad, np.float32(0), g)
    if mask is not None and not mask.any():
        mask = None
    return Movie(src, info, int(first), g, mask)


def _gain(src, gain, rot, flip, upsampling):
    if gain is None:
        if rot or flip:
            raise ValueError("gain rotation/flip given without a gain reference")
        return None
    if isinstance(gain, np.ndarray):
        if rot or flip:
            raise ValueError("gain rotation/flip apply to a gain file; an array is used as it is")
        g = np.asarray(gain, np.float32)
        if g.shape != src.shape:
            raise ValueError(f"gain array is {_hw(g.shape)}, frames are {_hw(src.shape)}")
        return g
    return gainmod.load_gain(
        gain, src.shape, rot, flip, eer_upsampling=upsampling if src.format == "eer" else None
    )


def _defects(src, defects, upsampling):
    if defects is None:
        return None
    if isinstance(defects, np.ndarray):
        m = np.asarray(defects, bool)
        if m.shape != src.shape:
            raise ValueError(f"defect mask is {_hw(m.shape)}, frames are {_hw(src.shape)}")
        return m
    return gainmod.load_defects(
        defects, src.shape, eer_upsampling=upsampling if src.format == "eer" else None
    )


def _hw(shape) -> str:
    return "x".join(map(str, shape)) + " (H x W)"
