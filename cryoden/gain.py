"""Gain references and defect maps for movie frames, in RELION's conventions.

Orientation. Files are read as RELION reads them: MRC in file order; TIFF flipped upside down
(RELION, IMOD, SerialEM and MotionCor2 flip the Y axis of every TIFF they read, because a TIFF's
first row is the top of the image and an MRC's the bottom); EPU's ``.gain`` files (TIFF) in file
order for EER movies (RELION's ``EERRenderer::loadEERGain`` reverts its TIFF flip for them) and
upside down, as any TIFF, for other movies. Then, as
RELION's ``MotioncorrRunner::prepareGainReference``, the gain is rotated ``rot`` times by 90°
clockwise as displayed with the first row at the top (relion_display; RELION ``--gain_rot``,
MotionCor2 ``-RotGain``; ``np.rot90(g, -rot)``), and then flipped: ``flip`` 1 upside down
(rows reversed, ``--gain_flip 1``, MotionCor2 ``-FlipGain 1``), 2 left to right (columns
reversed, ``--gain_flip 2``).

Application. A gain is multiplied into each frame (``frame = raw * gain``). For EER movies the
gain is prepared as RELION's ``loadEERGain`` does: a gain of the detector's size is repeated 2x2
for upsampling 2; a gain of twice the detector's size is summed over 2x2 blocks for upsampling 1;
and a gain that is not an EPU ``.gain`` file is inverted (``mean(gain) / gain`` where the gain is
not zero: Thermo Fisher's EER gain is the inverse of a multiplicative one), while ``.gain``
files are multiplied as they are.

Defects. A defect map is either a MotionCor2-style text file (``-DefectFile``), one box
``x y w h`` per line (column, row of the box's first pixel, 0-based, in the orientation of the
delivered frames; width and height in pixels; blank lines and ``#`` comments ignored; boxes are
clipped to the frame), or an MRC/TIFF image of the frame's size where nonzero pixels are
defects. For EER movies both are in detector pixels (scaled by the upsampling) or, for an image,
of the rendered frame's size. Gain pixels that are zero or not finite are defects too (RELION:
"0 means defect"). Each defect pixel is replaced by the mean of its good 8-neighbours; pixels
of a larger defect with no good neighbour are filled layer by layer from the outside in, each
layer from the mean of its good or already-filled 8-neighbours (:class:`DefectFill`).

Errors are one-line ``ValueError(f"{path}: <problem>")`` naming the gain or defect file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile

from cryoden import io

_IMAGE_SUFFIXES = (".mrc", ".mrcs", ".tif", ".tiff", ".gain")


def orient(g: np.ndarray, rot: int = 0, flip: int = 0) -> np.ndarray:
    """``(H, W)`` -> rotated ``rot`` x 90° clockwise, then flipped (1: upside down, 2: left to
    right), as RELION's ``--gain_rot`` / ``--gain_flip``; ``(W, H)`` for odd ``rot``."""
    if rot not in (0, 1, 2, 3):
        raise ValueError(f"gain rotation must be 0, 1, 2 or 3, not {rot}")
    if flip not in (0, 1, 2):
        raise ValueError(f"gain flip must be 0, 1 or 2, not {flip}")
    g = np.rot90(g, -rot)
    if flip == 1:
        g = g[::-1]
    elif flip == 2:
        g = g[:, ::-1]
    return np.ascontiguousarray(g)


def _read_image(path: Path, eer: bool) -> np.ndarray:
    """``(H, W)`` image of a gain or defect file, in RELION's orientation (module doc)."""
    suffix = path.suffix.lower()
    if suffix not in _IMAGE_SUFFIXES:
        raise ValueError(
            f"unsupported gain/defect image {suffix!r} (MRC, TIFF or EPU .gain; convert "
            f"DM4 gains with IMOD's dm2mrc)"
        )
    if suffix == ".gain":
        io.check_regular_file(path)
        with tifffile.TiffFile(path) as tif:
            io._check_tiff(tif, tif.series)
            data = tif.pages.first.asarray()
        if data.ndim != 2:
            raise ValueError(f"gain image is not 2D (shape {data.shape})")
        return data if eer else data[::-1]
    img = io.read(path, kind="2d")
    return img.data[::-1] if io.image_format(path) == "tiff" else img.data


def load_gain(
    path: str | os.PathLike,
    shape: tuple[int, int],
    rot: int = 0,
    flip: int = 0,
    *,
    eer_upsampling: int | None = None,
) -> np.ndarray:
    """Read a gain reference for frames of ``shape`` ``(H, W)``; -> ``(H, W)`` float32 to
    multiply into each frame (module doc). ``eer_upsampling``: 1 or 2 for EER movies (RELION's
    EER gain handling), None otherwise."""
    path = Path(path)
    try:
        g = orient(np.asarray(_read_image(path, eer_upsampling is not None), np.float32), rot, flip)
        if not np.isfinite(g).any():
            raise ValueError("gain reference has no finite value")
        if eer_upsampling is not None:
            g = _eer_gain(g, shape, eer_upsampling, path.suffix.lower() == ".gain")
        if g.shape != tuple(shape):
            raise ValueError(_shape_problem("gain reference", g.shape, shape, rot, flip))
        return np.ascontiguousarray(g, np.float32)
    except ValueError as e:
        raise ValueError(f"{path}: {str(e).removeprefix(f'{path}: ')}") from e
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from e


def _eer_gain(g: np.ndarray, shape, up: int, multiplicative: bool) -> np.ndarray:
    """RELION's ``EERRenderer::loadEERGain`` (resizing, inversion) for a rendered ``shape``."""
    det = (shape[0] // up, shape[1] // up)
    if up == 2 and g.shape == det:
        g = np.repeat(np.repeat(g, 2, 0), 2, 1)
    elif up == 1 and g.shape == (2 * det[0], 2 * det[1]):
        g = g.reshape(det[0], 2, det[1], 2).sum((1, 3), dtype=np.float64).astype(np.float32)
    elif g.shape != tuple(shape):
        raise ValueError(
            f"EER gain reference is {_hw(g.shape)}; for upsampling {up} it must be "
            f"{_hw(det)} or {_hw((2 * det[0], 2 * det[1]))}"
        )
    if not multiplicative:
        good = np.isfinite(g)
        mean = np.float32(g[good].mean(dtype=np.float64))
        nz = good & (g != 0)
        g = np.where(nz, mean / np.where(nz, g, 1), np.where(good, 0, g)).astype(np.float32)
    return g


def load_defects(
    path: str | os.PathLike | None,
    shape: tuple[int, int],
    *,
    eer_upsampling: int | None = None,
) -> np.ndarray:
    """Read a defect map for frames of ``shape`` ``(H, W)``; -> ``(H, W)`` bool, True = defect
    (all False for None). Text files hold ``x y w h`` boxes, images mark defects nonzero."""
    if path is None:
        return np.zeros(shape, bool)
    path = Path(path)
    up = eer_upsampling or 1
    try:
        if path.suffix.lower() in _IMAGE_SUFFIXES:
            m = _read_image(path, eer_upsampling is not None) != 0
            if up == 2 and m.shape == (shape[0] // 2, shape[1] // 2):
                m = np.repeat(np.repeat(m, 2, 0), 2, 1)
            if m.shape != tuple(shape):
                raise ValueError(_shape_problem("defect map", m.shape, shape, 0, 0))
            return np.ascontiguousarray(m)
        return _defect_boxes(path, shape, up)
    except ValueError as e:
        raise ValueError(f"{path}: {str(e).removeprefix(f'{path}: ')}") from e
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from e


def _defect_boxes(path: Path, shape, up: int) -> np.ndarray:
    io.check_regular_file(path)
    if os.path.getsize(path) > 64 << 20:
        raise ValueError("defect text file larger than 64 MiB")
    mask = np.zeros(shape, bool)
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                x, y, w, h = (int(round(float(v))) for v in text.split())
            except ValueError:
                raise ValueError(
                    f"line {number}: expected 4 numbers 'x y w h', got {text[:40]!r}"
                ) from None
            if w < 1 or h < 1 or x < 0 or y < 0:
                raise ValueError(
                    f"line {number}: box {x} {y} {w} {h} has a negative corner or size"
                )
            mask[y * up : (y + h) * up, x * up : (x + w) * up] = True
    return mask


def _shape_problem(what: str, got, want, rot: int, flip: int) -> str:
    hint = ""
    if tuple(got) == tuple(want)[::-1]:
        hint = " (transposed: check the gain rotation)"
    return (
        f"{what} is {_hw(got)} after rotation {rot} and flip {flip}, but the movie's frames "
        f"are {_hw(want)}{hint}"
    )


def _hw(shape) -> str:
    return "x".join(map(str, shape)) + " (H x W)"


def correct(raw: np.ndarray, gain: np.ndarray | None, fill: DefectFill | None) -> np.ndarray:
    """``(H, W)`` raw frame -> new ``(H, W)`` float32 ``raw * gain`` (gain None: 1) with the
    defects of ``fill`` (None: none) replaced; ``raw`` is left alone."""
    frame = np.asarray(raw).astype(np.float32)
    if gain is not None:
        frame *= gain
    if fill is not None:
        fill.apply(frame)
    return frame


_NEIGHBOURS = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])


class DefectFill:
    """Replace the pixels of a defect mask by the mean of their good 8-neighbours.

    mask: ``(H, W)`` bool, True = defect. The plan is made once, layer by layer from the outside
    in (a pixel is filled once one of its neighbours is good or filled), and applied to each
    frame in O(number of defects).
    """

    def __init__(self, mask: np.ndarray):
        mask = np.asarray(mask, bool)
        if mask.all():
            raise ValueError("every pixel is a defect")
        self.shape = mask.shape
        h, w = mask.shape
        known = ~mask.reshape(-1)
        remaining = np.flatnonzero(mask)
        self.layers = []
        while remaining.size:
            ys, xs = np.divmod(remaining, w)
            ny, nx = ys[:, None] + _NEIGHBOURS[:, 0], xs[:, None] + _NEIGHBOURS[:, 1]
            inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
            nb = np.where(inside, ny * w + nx, 0)
            good = inside & known[nb]
            ready = good.any(1)
            weights = good[ready].astype(np.float32)
            self.layers.append(
                (remaining[ready], nb[ready], weights / weights.sum(1, keepdims=True))
            )
            known[remaining[ready]] = True
            remaining = remaining[~ready]

    def apply(self, frame: np.ndarray) -> None:
        """Fill the defects of ``frame``, ``(H, W)`` float32 C-contiguous, in place."""
        flat = frame.reshape(-1)
        if not np.shares_memory(flat, frame):
            raise ValueError("frame must be C-contiguous")
        for idx, nb, wts in self.layers:
            flat[idx] = np.einsum("ij,ij->i", flat[nb], wts)
