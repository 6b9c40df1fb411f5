"""RELION motion-correction STAR files: one per movie, written and read with ``starfile``.

Layout (as RELION's ``Micrograph::write``): a ``data_general`` key-value block (``rlnImageSizeX``,
``rlnImageSizeY``, ``rlnImageSizeZ``, ``rlnMicrographMovieName``, ``rlnMicrographGainName``,
``rlnMicrographBinning``, ``rlnMicrographOriginalPixelSize``, ``rlnMicrographDoseRate``,
``rlnMicrographPreExposure``, ``rlnVoltage``, ``rlnMicrographStartFrame`` (1-based),
``rlnMotionModelVersion``) and a ``data_global_shift`` loop (``rlnMicrographFrameNumber`` 1-based,
``rlnMicrographShiftX``, ``rlnMicrographShiftY``: pixels of the unbinned movie, RELION's sign
convention, see :mod:`cryoden.align`). Files written by RELION may add ``data_local_motion_model``,
``data_local_shift`` and ``data_hot_pixels``; reading ignores them (global shifts only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cryoden import io
from cryoden.align import Alignment

MOTION_MODEL_NULL = 0  # RELION's rlnMotionModelVersion without a local model


@dataclass(frozen=True)
class MotionStar:
    """Contents of a motion STAR file: ``shifts`` (N, 2) float64 ``(x, y)`` pixels of frames
    ``frame_numbers`` (N,) (1-based), and the ``general`` block as a dict."""

    shifts: np.ndarray
    frame_numbers: np.ndarray
    general: dict = field(default_factory=dict)

    def alignment(self) -> Alignment:
        """The global shifts as an :class:`~cryoden.align.Alignment` (no local model)."""
        return Alignment(np.asarray(self.shifts, np.float64), None)


def write(
    path: str | os.PathLike,
    shifts: np.ndarray,
    *,
    movie_name: str,
    shape: tuple[int, int],
    n_frames: int | None = None,
    gain_name: str | None = None,
    binning: float = 1.0,
    pixel_size: float | None = None,
    dose_per_frame: float | None = None,
    pre_exposure: float = 0.0,
    voltage: float | None = None,
    start_frame: int = 1,
) -> None:
    """Write ``shifts`` (N, 2) (frames ``start_frame .. start_frame + N - 1``) atomically.

    shape: (H, W) of the movie frames; n_frames: frames in the movie (default ``N``); pixel_size:
    of the movie (Å); dose_per_frame: e/Å^2; voltage: kV. Unknown values are left out, as RELION
    does for the optional ones.
    """
    shifts = np.asarray(shifts, np.float64)
    if shifts.ndim != 2 or shifts.shape[1] != 2:
        raise ValueError(f"{path}: shifts must have shape (N, 2), got {shifts.shape}")
    n = shifts.shape[0]
    general = {
        "rlnImageSizeX": int(shape[1]),
        "rlnImageSizeY": int(shape[0]),
        "rlnImageSizeZ": int(n_frames if n_frames is not None else n),
        "rlnMicrographMovieName": str(movie_name),
    }
    if gain_name:
        general["rlnMicrographGainName"] = str(gain_name)
    general["rlnMicrographBinning"] = float(binning)
    if pixel_size:
        general["rlnMicrographOriginalPixelSize"] = float(pixel_size)
    if dose_per_frame is not None:
        general["rlnMicrographDoseRate"] = float(dose_per_frame)
    general["rlnMicrographPreExposure"] = float(pre_exposure)
    if voltage is not None:
        general["rlnVoltage"] = float(voltage)
    general["rlnMicrographStartFrame"] = int(start_frame)
    general["rlnMotionModelVersion"] = MOTION_MODEL_NULL
    table = pd.DataFrame(
        {
            "rlnMicrographFrameNumber": np.arange(n) + int(start_frame),
            "rlnMicrographShiftX": shifts[:, 0],
            "rlnMicrographShiftY": shifts[:, 1],
        }
    )
    path = Path(path)
    with io.atomic(path) as tmp:
        import starfile

        starfile.write({"general": general, "global_shift": table}, tmp, float_format="%.6f")


def read(path: str | os.PathLike) -> MotionStar:
    """Read a motion STAR file (ours or RELION's); one-line ``ValueError`` naming the problem."""
    import starfile

    path = Path(path)
    io.check_regular_file(path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as e:  # the parser's own messages are long and varied
        raise ValueError(f"{path}: not a readable STAR file ({type(e).__name__}: {e})") from None
    shift = blocks.get("global_shift")
    if not isinstance(shift, pd.DataFrame):
        raise ValueError(f"{path}: no data_global_shift loop (not a motion-correction STAR file)")
    need = ["rlnMicrographFrameNumber", "rlnMicrographShiftX", "rlnMicrographShiftY"]
    missing = [c for c in need if c not in shift.columns]
    if missing:
        raise ValueError(f"{path}: data_global_shift lacks {', '.join(missing)}")
    numbers = shift["rlnMicrographFrameNumber"].to_numpy()
    try:
        numbers = numbers.astype(np.int64)
        xy = shift[need[1:]].to_numpy(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: data_global_shift has non-numeric values") from None
    if numbers.size == 0:
        raise ValueError(f"{path}: data_global_shift is empty")
    if np.any(np.diff(numbers) != 1):
        raise ValueError(f"{path}: frame numbers are not consecutive ({numbers.tolist()[:8]}...)")
    if not np.all(np.isfinite(xy)):
        raise ValueError(f"{path}: data_global_shift has non-finite shifts")
    general = blocks.get("general")
    general = dict(general) if isinstance(general, dict) else {}
    return MotionStar(xy, numbers, general)
