"""Reading and writing micrographs, stacks and tomograms (MRC, TIFF, PNG).

:func:`read` returns an :class:`Image`; :func:`write` writes one atomically (temporary file in the
target directory, fsync, ``os.replace``; :mod:`cryoden.atomic`), so a failed write never leaves
partial output.

Kinds (``Image.kind``) and the data shape each implies:

- ``'2d'``: one image, ``(H, W)``;
- ``'stack'``: ``(N, H, W)``, N independent 2D images (denoised slice by slice with a 2D model);
- ``'volume'``: ``(D, H, W)``, one 3D image (tomogram, map; denoised with a 3D model).

Automatic kind, for files holding more than one section (``read(..., kind=...)`` overrides it):

- MRC: the extension decides where it is telling (``.mrcs``, ``.st``, ``.ali`` are stacks;
  ``.rec``, ``.map`` are volumes); for ``.mrc`` the space group does (MRC2014: ``ispg == 0`` is an
  image stack, ``1..230`` a volume, ``401..630`` a volume stack, of which only one volume is read).
- TIFF: a ``Z`` axis (ImageJ ``slices``) makes a volume; any other multi-page file is a stack.
- A single section is always ``'2d'``.

``Image.kind_cue`` says what decided (``'extension .rec'``, ``'MRC space group 0, mz 1'``,
``'ImageJ Z axis'``, ``'requested kind'``...), and ``Image.kind_weak`` is True when that cue is
weak, i.e. the file may well mean the other kind. For a ``.mrc`` file MRC2014 labels an image
stack ``ispg 0, mz 1`` and a volume ``ispg 1..230, mz == nz``; the cue is weak when the space
group and ``mz`` disagree (old writers put ``ispg 0`` on tomograms), when the space group is
outside both ranges, and when the header is mrcfile's default (``ispg 1``, only the label
``Created by mrcfile.py``): ``mrcfile.new`` labels every 3D array a volume, stacks included.
A TIFF without an ImageJ ``Z`` or ``T`` axis (plain multi-page) is a stack on a weak cue.

Formats: MRC modes 0 (int8; IMOD's unsigned bytes are recognised), 1 (int16), 2 (float32),
6 (uint16), 12 (float16) are read, and written as float32 (mode 2) with voxel size, origin, axis
order, cell angles, labels and extended header (with ``exttyp``/``nversion``) copied from the
source, the space group set from the kind, and dmin/dmax/dmean/rms recomputed. TIFF is written
float32 with ImageJ metadata (axes ``YX``/``TYX``/``ZYX``, voxel size in nm). PNG is written as
8-bit grayscale, 2D only: the image is normalised by its own mean and standard deviation and
``[-3, 3]`` std is mapped linearly to ``0..255`` (clipped), as Topaz does. Colour PNG or TIFF
input (RGB, RGBA, palette) is converted to luminance ``0.299 R + 0.587 G + 0.114 B`` (alpha
dropped).

Untrusted files cost little: only regular files are opened (a FIFO or device is refused before
it could block); an MRC header is checked against the file's size before anything is allocated
(dimensions >= 1, a supported mode, nsymbt >= 0, header + extended header + data <= file size;
trailing bytes are ignored), and the data are read once; a TIFF's list of pages must end within
the file (:func:`check_tiff_pages`: a truncated stack is not read as fewer pages), uncompressed
TIFF pixel data must fit in the file; compressed TIFF and PNG may decode to at most
``DECODE_FLOOR`` bytes or ``DECODE_RATIO`` times the file's size, whichever is larger. Complex
data and empty images are refused. Written MRC statistics are computed in float64, so finite
data give finite dmin, dmax, dmean and rms.

Every error is a one-line ``ValueError(f"{path}: <problem>")``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import NamedTuple

import mrcfile
import mrcfile.utils
import numpy as np
import tifffile
from PIL import Image as PILImage

from cryoden.atomic import (  # noqa: F401  (re-exported: io.atomic etc. are public API)
    _TMP,
    STALE_AGE,
    atomic,
    new_temporary,
    remove_stale_temporaries,
)

KINDS = ("2d", "stack", "volume")
FORMATS = {
    **dict.fromkeys((".mrc", ".mrcs", ".map", ".rec", ".st", ".ali"), "mrc"),
    **{".tif": "tiff", ".tiff": "tiff", ".png": "png"},
}
_MRC_STACK_EXT, _MRC_VOLUME_EXT = (".mrcs", ".st", ".ali"), (".rec", ".map")
_MRC_MODES = (0, 1, 2, 6, 12)
_MRC_MODE_NAMES = {3: "complex int16", 4: "complex float32", 101: "4-bit"}
_MRC_HEADER_BYTES = 1024
# A compressed TIFF or PNG may decode to at most this many bytes or this many times its size,
# whichever is larger (real micrographs compress less than 10x; a decompression bomb, far more).
DECODE_FLOOR, DECODE_RATIO = 64 << 20, 100
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # colour type -> samples per decoded pixel
_IMOD_STAMP = 1146047817
_TIFF_UNITS = {  # ImageJ unit -> Å
    **dict.fromkeys(("nm", "nanometer"), 10.0),
    **dict.fromkeys(("micron", "um", "\u00b5m", "\\u00b5m"), 1e4),
    **dict.fromkeys(("angstrom", "a", "\u00c5"), 1.0),
}
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass
class Image:
    """An image and the metadata needed to write a result like it.

    data: ``(H, W)``, ``(N, H, W)`` or ``(D, H, W)`` as ``kind`` says; the file's own dtype.
    voxel_size, origin: ``(x, y, z)`` in Å, or None where the file does not say.
    extended_header, exttyp, nversion: the MRC extended header's raw bytes and how to read them.
    header: the source MRC header (a numpy record), None for TIFF and PNG.
    kind_cue, kind_weak: what decided ``kind``, and whether that is a weak cue (module doc).
    """

    data: np.ndarray
    kind: str
    voxel_size: tuple[float, float, float] | None = None
    origin: tuple[float, float, float] | None = None
    extended_header: bytes = b""
    exttyp: bytes = b""
    nversion: int = 0
    header: np.record | None = None
    kind_cue: str = ""
    kind_weak: bool = False


def image_format(path: str | os.PathLike) -> str:
    """'mrc' | 'tiff' | 'png' from the extension; ValueError for anything else."""
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise ValueError(
            f"{path}: unsupported extension {ext!r} (expected one of {', '.join(FORMATS)})"
        )
    return FORMATS[ext]


def _sniff(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(212)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return "tiff"
    return "mrc" if head[208:212] == b"MAP " else None


def read(path: str | os.PathLike, kind: str | None = None) -> Image:
    """Read an MRC, TIFF or PNG file; ``kind`` (one of KINDS) overrides the automatic kind."""
    path = Path(path)
    fmt = image_format(path)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"{path}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    try:
        check_regular_file(path)
        found = _sniff(path)
        if found is not None and found != fmt:
            raise ValueError(
                f"file content is {found.upper()}, but the extension says {fmt.upper()}"
            )
        img = {"mrc": _read_mrc, "tiff": _read_tiff, "png": _read_png}[fmt](path)
        return _with_kind(img, kind or img.kind)
    except (ValueError, OSError, tifffile.TiffFileError, PILImage.UnidentifiedImageError) as e:
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        msg = " ".join(msg.split()).removeprefix(f"{path}: ")
        raise ValueError(f"{path}: {msg}") from e
    except ImportError as e:  # a codec whose module is missing (e.g. TIFF zstd before 3.14)
        raise ValueError(f"{path}: cannot decode, a codec is missing: {e}") from e
    except RuntimeError as e:  # imagecodecs' errors: corrupt LZW, deflate, ... data
        raise ValueError(f"{path}: cannot decode the compressed data: {e}") from e


def check_regular_file(path: str | os.PathLike) -> None:
    """Refuse anything but a regular file (opening a FIFO would block; a device never ends).

    Raises ValueError (without the path) naming what ``path`` is; OSError if it cannot be stat'ed.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        what = next(
            (name for test, name in _FILE_TYPES if test(mode)), f"file type {stat.S_IFMT(mode):o}"
        )
        raise ValueError(f"not a regular file but {what}")


_FILE_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _with_kind(img: Image, kind: str) -> Image:
    data = img.data
    if data.ndim == 3 and data.shape[0] == 1 and kind == "2d":
        data = data[0]
    elif data.ndim == 2 and kind != "2d":
        data = data[None]
    if data.ndim != (2 if kind == "2d" else 3):
        raise ValueError(f"kind {kind!r} does not fit data of shape {img.data.shape}")
    if kind == img.kind:
        return dataclasses.replace(img, data=data)
    cue = dict(kind_cue="requested kind", kind_weak=False)
    return dataclasses.replace(img, data=data, kind=kind, **cue)


def _read_mrc(path: Path) -> Image:
    h, ext, data = _load_mrc(path)
    vs = _voxel_size(h)
    data = data.astype(data.dtype.newbyteorder("="), copy=False)
    if int(h.mode) == 0:  # IMOD writes unsigned bytes unless flag bit 0 is set
        stamp, flags = np.frombuffer(h.tobytes()[152:160], h.nx.dtype)
        if stamp == _IMOD_STAMP and not flags & 1:
            data = data.view(np.uint8)
    ispg, ext_name = int(h.ispg), path.suffix.lower()
    if data.ndim == 4:
        if data.shape[0] != 1:
            raise ValueError(
                f"volume stacks (ispg {ispg}, {data.shape[0]} volumes) are not "
                f"supported; split the file into single volumes"
            )
        data = data[0]
    kind, cue, weak = _mrc_kind(h, data.shape, ext_name)
    return Image(
        data,
        kind,
        kind_cue=cue,
        kind_weak=weak,
        voxel_size=(float(vs.x), float(vs.y), float(vs.z)),
        origin=tuple(float(v) for v in h.origin.item()),
        extended_header=ext,
        exttyp=bytes(h.exttyp),
        nversion=int(h.nversion),
        header=h,
    )


@dataclasses.dataclass(frozen=True)
class MrcLayout:
    """Where an MRC file's data lies, from its header checked against the file (:func:`mrc_layout`).

    header: the 1024-byte main header, a 0-d numpy record array in the file's byte order.
    shape: the data shape as mrcfile gives it: ``(ny, nx)`` for a single image with space group 0,
    ``(nz, ny, nx)``, or ``(nz // mz, mz, ny, nx)`` for a volume stack (space group 401..630).
    dtype: the mode's element type in the file's byte order (mode 0 is int8 here, whatever IMOD's
    flags say). offset: the data's first byte (1024 + nsymbt).
    """

    header: np.recarray
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def imod_unsigned(self) -> bool:
        """Mode 0 written by IMOD without flag bit 0: the bytes are uint8, not int8."""
        stamp, flags = np.frombuffer(self.header.tobytes()[152:160], self.header.nx.dtype)
        return bool(int(self.header.mode) == 0 and stamp == _IMOD_STAMP and not flags & 1)


def mrc_layout(path: str | os.PathLike) -> MrcLayout:
    """Read and check an MRC file's header without reading (or allocating for) its data.

    Raises ValueError (without the path) when ``path`` is not a regular file, its header is not
    one cryoden can read, or it claims more bytes than the file holds; a file longer than the
    header claims is accepted (trailing bytes are ignored, as mrcfile does).
    """
    check_regular_file(path)
    with open(path, "rb") as f:
        return _mrc_layout(f)


def _mrc_layout(f) -> MrcLayout:
    size = os.fstat(f.fileno()).st_size
    raw = f.read(_MRC_HEADER_BYTES)
    if len(raw) < _MRC_HEADER_BYTES:
        raise ValueError(
            f"not enough bytes for MRC header: file has {size}, the header alone takes "
            f"{_MRC_HEADER_BYTES}"
        )
    h = np.frombuffer(bytearray(raw), mrcfile.dtypes.HEADER_DTYPE).reshape(()).view(np.recarray)
    if bytes(h.map)[:3] != b"MAP":
        raise ValueError("not an MRC file (no 'MAP' stamp at byte 208)")
    h = h.view(h.dtype.newbyteorder(mrcfile.utils.byte_order_from_machine_stamp(h.machst)))
    mode = int(h.mode)
    if mode not in _MRC_MODES:
        what = f"{_MRC_MODE_NAMES[mode]} data is not an image; " if mode in _MRC_MODE_NAMES else ""
        raise ValueError(
            f"unsupported MRC mode {mode} ({what}supported: {', '.join(map(str, _MRC_MODES))})"
        )
    nx, ny, nz, nsymbt = int(h.nx), int(h.ny), int(h.nz), int(h.nsymbt)
    if min(nx, ny, nz) < 1:
        raise ValueError(f"empty or invalid dimensions (nx, ny, nz = {nx}, {ny}, {nz})")
    if mrcfile.utils.spacegroup_is_volume_stack(h.ispg) and not (
        int(h.mz) >= 1 and nz % int(h.mz) == 0
    ):
        raise ValueError(
            f"invalid volume stack: nz = {nz} is not a multiple of mz = {int(h.mz)} "
            f"(space group {int(h.ispg)})"
        )
    if nsymbt < 0:
        raise ValueError(f"invalid extended header size (nsymbt = {nsymbt})")
    dtype = mrcfile.utils.data_dtype_from_header(h)
    layout = MrcLayout(
        h, mrcfile.utils.data_shape_from_header(h), dtype, _MRC_HEADER_BYTES + nsymbt
    )
    need = layout.offset + layout.nbytes
    if size < need:
        raise ValueError(
            f"file is truncated: header claims {need} bytes (extended header {nsymbt}, data "
            f"{nx}x{ny}x{nz} {dtype.name}), file has {size}"
        )
    return layout


def _load_mrc(path: Path) -> tuple[np.recarray, bytes, np.ndarray]:
    """(header copy, extended header bytes, data in native byte order) of a checked MRC file.

    Header, extended header and data are read from one open file, the data once, into memory
    (no memory map is left pointing at a file that a later write may replace).
    """
    with open(path, "rb") as f:
        lay = _mrc_layout(f)
        ext = f.read(lay.offset - _MRC_HEADER_BYTES)
        buf = np.empty(lay.nbytes, np.uint8)
        got = f.readinto(memoryview(buf))
    if len(ext) + _MRC_HEADER_BYTES < lay.offset or got < lay.nbytes:
        raise ValueError("file is truncated: it shrank while being read")
    data = buf.view(lay.dtype).reshape(lay.shape)
    if not lay.dtype.isnative:
        data = data.byteswap(inplace=True).view(lay.dtype.newbyteorder("="))
    return lay.header.copy(), ext, data


class _VoxelSize(NamedTuple):
    x: float
    y: float
    z: float


def _voxel_size(h: np.recarray) -> _VoxelSize:
    """``(x, y, z)`` in Å: ``cella / (mx, my, mz)`` in float32 as mrcfile computes it; 0 where a
    sampling count is not positive or the result is not finite (unknown, not NaN)."""
    out = []
    for length, m in zip(h.cella.item(), (int(h.mx), int(h.my), int(h.mz)), strict=True):
        v = float(np.float32(length / m)) if m > 0 else 0.0
        out.append(v if np.isfinite(v) else 0.0)
    return _VoxelSize(*out)


def _read_tiff(path: Path) -> Image:
    with tifffile.TiffFile(path) as tif:
        series, page = tif.series, tif.pages[0]
        _check_tiff(tif, series)
        if len(series) > 1:  # e.g. pages written one by one: a stack if all are alike
            if len({(s.shape, s.dtype) for s in series}) > 1 or len(series[0].shape) != 2:
                raise ValueError(f"TIFF holds {len(series)} image series of different shapes")
            data, axes = np.stack([s.asarray() for s in series]), "I" + series[0].axes
        else:
            data, axes = series[0].asarray(), series[0].axes
        ij = tif.imagej_metadata or {}
        res = page.resolution if ij else None
        rgb = page.photometric == tifffile.PHOTOMETRIC.RGB
    keep = [i for i, a in enumerate(axes) if data.shape[i] > 1 or a in "YX"]
    data, axes = data.reshape([data.shape[i] for i in keep]), "".join(axes[i] for i in keep)
    if rgb and "S" in axes:  # chunky (YXS) or planar (SYX) colour
        data = _luminance(np.moveaxis(data, axes.index("S"), -1))
        axes = axes.replace("S", "")
    if axes not in ("YX", "ZYX") and not (len(axes) == 3 and axes[0] in "TIQ"):
        raise ValueError(f"unsupported TIFF axes {axes!r} (need YX, ZYX or a stack of YX pages)")
    scale = _TIFF_UNITS.get(str(ij.get("unit", "")).lower())
    vs = None
    if scale and res and all(res):
        vs = (scale / res[0], scale / res[1], scale * float(ij.get("spacing", 0.0)))
    kind = {"YX": "2d", "ZYX": "volume"}.get(axes, "stack")
    cue, weak = {
        "2d": ("one section", False),
        "volume": ("ImageJ Z axis", False),
    }.get(kind, ("ImageJ T axis", False) if axes[0] == "T" else ("pages without a Z axis", True))
    return Image(data, kind, voxel_size=vs, kind_cue=cue, kind_weak=weak)


def _mrc_kind(h: np.record, shape: tuple[int, ...], ext: str) -> tuple[str, str, bool]:
    """(kind, cue, weak) of MRC data of ``shape`` (after dropping a 4D file's volume axis)."""
    if len(shape) == 2 or shape[0] == 1:
        return "2d", "one section", False
    if ext in _MRC_STACK_EXT:
        return "stack", f"extension {ext}", False
    if ext in _MRC_VOLUME_EXT:
        return "volume", f"extension {ext}", False
    ispg, mz, nz = int(h.ispg), int(h.mz), shape[0]
    if ispg == 0:
        if mz == 1:
            return "stack", "MRC space group 0, mz 1", False
        return "stack", f"MRC space group 0 (a stack) but mz {mz} (a stack has mz 1)", True
    if 401 <= ispg <= 630:
        return "volume", f"MRC space group {ispg} (volume stack)", False
    if not 1 <= ispg <= 230:
        return "volume", f"MRC space group {ispg} (neither stack nor volume)", True
    labels = [bytes(lb).strip(b"\0 ") for lb in h.label[: max(0, min(int(h.nlabl), 10))]]
    if ispg == 1 and len(labels) == 1 and labels[0].startswith(b"Created by mrcfile.py"):
        return "volume", "MRC space group 1, mrcfile's default for any 3D array", True
    if mz != nz:
        return "volume", f"MRC space group {ispg} (a volume) but mz {mz} (not {nz})", True
    return "volume", f"MRC space group {ispg}, mz {mz}", False


def _read_png(path: Path) -> Image:
    _check_png(path)
    with warnings.catch_warnings():  # _check_png decides what is too large, not PIL's warning
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        try:
            im = PILImage.open(path)
        except PILImage.DecompressionBombError as e:
            raise ValueError(f"PNG too large to decode: {e}") from None
    with im:
        if im.mode in ("P", "RGB", "RGBA", "CMYK", "YCbCr"):
            data = _luminance(np.asarray(im.convert("RGB")))
        elif im.mode == "LA":
            data = np.asarray(im.convert("L"))
        else:
            data = np.asarray(im)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    return Image(data, "2d", kind_cue="PNG", kind_weak=False)


def _check_decoded(what: str, decoded: int, size: int) -> None:
    """Refuse compressed data that would decode to more than DECODE_FLOOR or DECODE_RATIO x its
    file size, whichever is larger (bounded memory for decompression bombs)."""
    if decoded > max(DECODE_FLOOR, DECODE_RATIO * size):
        raise ValueError(
            f"{what} would decode to {_mb(decoded)} from a {_mb(size)} file (more than "
            f"{DECODE_RATIO}x its size and {_mb(DECODE_FLOOR)}): refusing a likely "
            f"decompression bomb"
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _check_tiff(tif: tifffile.TiffFile, series: list) -> None:
    """Check what the TIFF's series claim before any pixel data is read.

    Real, non-empty images only; uncompressed pixel data must fit in the file, compressed data
    must pass :func:`_check_decoded`.
    """
    if not series:
        raise ValueError("TIFF holds no image")
    check_tiff_pages(tif)
    for s in series:
        dtype = np.dtype(s.dtype) if s.dtype is not None else None
        if dtype is None or dtype.kind not in "buif":
            what = "complex data" if dtype is not None and dtype.kind == "c" else "samples"
            raise ValueError(f"{what} of type {dtype} are not an image (need integer or real)")
        if not s.shape or 0 in s.shape:
            raise ValueError(f"empty image (shape {tuple(s.shape)})")
    size = tif.filehandle.size
    decoded = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in series)
    if all(s.keyframe.compression == tifffile.COMPRESSION.NONE for s in series):
        stored = sum(math.prod(s.shape) * s.keyframe.bitspersample // 8 for s in series)
        if stored > size:
            raise ValueError(
                f"file is truncated: TIFF tags claim {stored} bytes of pixel data "
                f"({' + '.join(f'{s.shape} {np.dtype(s.dtype).name}' for s in series)}), "
                f"file has {size}"
            )
    else:
        _check_decoded(f"TIFF of shape {series[0].shape}", decoded, size)


def check_tiff_pages(tif: tifffile.TiffFile) -> None:
    """Refuse a TIFF whose list of pages does not end: tifffile stops, with only a warning, at a
    page beyond the end of a truncated file, and the stack would silently lose its last pages.

    Raises ValueError (without the path) when the last page's link to a next page is not 0.
    """
    fmt, fh = tif.tiff, tif.filehandle
    last = tif.pages[len(tif.pages) - 1].offset
    fh.seek(last)
    raw, link = fh.read(fmt.tagnosize), None
    if len(raw) == fmt.tagnosize:
        fh.seek(last + fmt.tagnosize + struct.unpack(fmt.tagnoformat, raw)[0] * fmt.tagsize)
        raw = fh.read(fmt.offsetsize)
        if len(raw) == fmt.offsetsize:
            link = struct.unpack(fmt.offsetformat, raw)[0]
    if link != 0:
        raise ValueError(
            f"file is truncated or corrupt: its list of pages breaks off after "
            f"{len(tif.pages)} pages"
        )


def _check_png(path: Path) -> None:
    """Check the PNG's IHDR (size, depth, colour type) before anything is decoded."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(29)
    if len(head) < 29 or head[12:16] != b"IHDR":
        raise ValueError("not a PNG file or corrupt (no IHDR chunk)")
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    depth, colour = head[24], head[25]
    if width < 1 or height < 1:
        raise ValueError(f"empty image ({width}x{height} pixels)")
    samples = _PNG_CHANNELS.get(colour, 4) * (2 if depth == 16 else 1)
    _check_decoded(f"PNG of {width}x{height} pixels", width * height * samples, size)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """``(..., C>=3)`` colour samples -> ``(...)`` float32 luminance."""
    return rgb[..., :3].astype(np.float32) @ _LUMA


# ----------------------------------------------------------------------------- writing


def write(path: str | os.PathLike, img: Image, label: str | None = None) -> None:
    """Write ``img`` atomically to ``path``; the format follows the extension.

    ``label`` (at most 80 characters) is appended to the MRC labels; other formats ignore it.
    """
    path = Path(path)
    fmt = image_format(path)
    data = np.asarray(img.data)
    if data.ndim != (2 if img.kind == "2d" else 3):
        raise ValueError(f"{path}: kind {img.kind!r} does not fit data of shape {data.shape}")
    if data.size == 0:
        raise ValueError(f"{path}: no data to write (shape {data.shape})")
    if fmt == "png" and img.kind != "2d":
        raise ValueError(
            f"{path}: PNG output holds one 2D image, not a {img.kind} "
            f"of shape {data.shape}; use --format mrc or tiff"
        )
    try:
        with atomic(path) as tmp:
            if fmt == "mrc":
                _write_mrc(tmp, img, data, label)
            elif fmt == "tiff":
                _write_tiff(tmp, img, data)
            else:
                PILImage.fromarray(to_uint8(data)).save(tmp, format="PNG")
    except OSError as e:
        raise ValueError(f"{path}: cannot write: {e.strerror or e}") from e


def to_uint8(x: np.ndarray, clip: float = 3.0) -> np.ndarray:
    """Normalise ``x`` by its mean and std and map ``[-clip, clip]`` std to ``0..255`` (uint8)."""
    x = np.asarray(x, np.float64)
    std = x.std()
    z = (x - x.mean()) / std if std > 0 else np.zeros_like(x)
    return np.clip(np.round((z + clip) * (255 / (2 * clip))), 0, 255).astype(np.uint8)


def _write_mrc(tmp: Path, img: Image, data: np.ndarray, label: str | None) -> None:
    src = img.header
    with mrcfile.new(tmp, overwrite=True) as mrc:
        with np.errstate(over="ignore", invalid="ignore"):  # its float32 stats are replaced
            mrc.set_data(np.asarray(data, np.float32))
        h = mrc.header
        if img.kind == "volume":
            mrc.set_volume()
            if src is not None and 1 <= int(src.ispg) <= 230:
                h.ispg = src.ispg
        elif img.kind == "stack":
            mrc.set_image_stack()
        n = min(max(int(src.nlabl), 0), 10) if src is not None else 0
        h.label = src.label if src is not None else b""  # the source's replace mrcfile's
        if label is not None:
            if n == 10:  # the oldest goes
                h.label[:9], n = h.label[1:].copy(), 9
            h.label[n] = label.encode("ascii", "replace")[:80]
            n += 1
        h.nlabl = n
        if src is not None:
            for field in ("nxstart", "nystart", "nzstart", "mapc", "mapr", "maps", "cellb"):
                h[field] = src[field]
        if img.voxel_size is not None:
            mrc.voxel_size = img.voxel_size
        if img.origin is not None:
            h.origin = img.origin
        if img.extended_header:
            mrc.set_extended_header(np.frombuffer(img.extended_header, dtype="V1"))
            h.exttyp = img.exttyp
        if img.nversion:
            h.nversion = img.nversion
        h.dmin, h.dmax, h.dmean, h.rms = header_stats(mrc.data)


def header_stats(data: np.ndarray, chunk: int = 1 << 22) -> tuple[float, float, float, float]:
    """``(dmin, dmax, dmean, rms)`` of ``data`` (any shape, real), summed in float64 in chunks.

    ``rms`` is the standard deviation from the mean (MRC2014). Finite float32 data gives finite
    values that fit float32 (float32 arithmetic overflows for values around 1e19 and above).
    """
    flat = np.asarray(data).reshape(-1)
    if flat.size == 0:
        raise ValueError("no data (empty array)")
    parts = [flat[i : i + chunk] for i in range(0, flat.size, chunk)]
    dmin = min(float(p.min()) for p in parts)
    dmax = max(float(p.max()) for p in parts)
    mean = math.fsum(float(p.sum(dtype=np.float64)) for p in parts) / flat.size
    ss = math.fsum(float(np.square(p.astype(np.float64) - mean).sum()) for p in parts)
    big = float(np.finfo(np.float32).max)
    return dmin, dmax, mean, min(math.sqrt(ss / flat.size), big)


def _write_tiff(tmp: Path, img: Image, data: np.ndarray) -> None:
    axes = {"2d": "YX", "stack": "TYX", "volume": "ZYX"}[img.kind]
    meta: dict = {"axes": axes}
    kw: dict = {}
    vs = img.voxel_size
    if vs is not None and vs[0] > 0 and vs[1] > 0:
        kw["resolution"] = (10.0 / vs[0], 10.0 / vs[1])  # pixels per nm
        meta["unit"] = "nm"
        if img.kind == "volume" and vs[2] > 0:
            meta["spacing"] = vs[2] / 10.0
    tifffile.imwrite(tmp, np.asarray(data, np.float32), imagej=True, metadata=meta, **kw)
