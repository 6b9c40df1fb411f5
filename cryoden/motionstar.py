"""RELION motion-correction STAR files: one per movie, written and read with ``starfile``.

Layout (as RELION's ``Micrograph::write``): a ``data_general`` key-value block (``rlnImageSizeX``,
``rlnImageSizeY``, ``rlnImageSizeZ``, ``rlnMicrographMovieName``, ``rlnMicrographGainName``,
``rlnMicrographBinning``, ``rlnMicrographOriginalPixelSize``, ``rlnMicrographDoseRate``,
``rlnMicrographPreExposure``, ``rlnVoltage``, ``rlnMicrographStartFrame`` (1-based),
``rlnMotionModelVersion``) and a ``data_global_shift`` loop (``rlnMicrographFrameNumber`` 1-based,
``rlnMicrographShiftX``, ``rlnMicrographShiftY``: pixels of the unbinned movie, RELION's sign
convention, see :mod:`cryoden.align`).

Local motion (``cryoden movies --patches``, a :class:`cryoden.align_local.LocalModel`) adds, as
RELION's ``MotioncorrRunner`` writes them:

* ``data_local_shift``: one row per patch and frame, ``rlnMicrographFrameNumber`` (1-based, from
  ``rlnMicrographStartFrame``), ``rlnCoordinateX/Y`` (the patch centre, pixels of the movie) and
  ``rlnMicrographShiftX/Y``: the patch's measured shift on top of the global one (the smoothed
  trajectory, relative to the first frame). Model-independent.
* ``data_local_motion_model`` with ``rlnMotionModelVersion`` 1 (RELION's third-order polynomial):
  ``rlnMotionModelCoeffsIdx`` 0..35 and ``rlnMotionModelCoeff``, 18 coefficients for x then 18
  for y of ``l(z, x, y) = sum_s sum_{b=1..3} c[3 s + b - 1] z^b m_s(x, y)`` with
  ``m = (1, x, x^2, y, y^2, x y)``, ``x = X / width - 0.5``, ``y = Y / height - 0.5`` (``X, Y``
  pixels) and ``z`` the frame index from the first frame (0-based). Our model (quadratic in
  space, powers 1..3 of the normalised time) is exactly such a polynomial: its coefficients are
  converted, not refitted (:func:`relion_coefficients`).

Reading returns the global shifts, and the local shifts and model coefficients when present
(``data_hot_pixels`` is ignored; an incomplete model table is ignored, as before).
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
MOTION_MODEL_POLY3 = 1  # RELION's ThirdOrderPolynomialModel
POLY3_TERMS = 18  # coefficients per axis: 6 spatial monomials x 3 powers of z


@dataclass(frozen=True)
class MotionStar:
    """Contents of a motion STAR file: ``shifts`` (N, 2) float64 ``(x, y)`` pixels of frames
    ``frame_numbers`` (N,) (1-based), and the ``general`` block as a dict.

    ``local_shifts``: ``data_local_shift`` as ``(M, 5)`` float64 rows ``(frame number, X, Y,
    shift x, shift y)``, or None; ``model``: RELION's local motion model coefficients ``(2, 18)``
    float64 (x, y; see the module docstring), or None.
    """

    shifts: np.ndarray
    frame_numbers: np.ndarray
    general: dict = field(default_factory=dict)
    local_shifts: np.ndarray | None = None
    model: np.ndarray | None = None

    def local_at(self, frame_number, x, y) -> np.ndarray:
        """Local shift of RELION's model at pixels ``x, y`` (arrays) of frame ``frame_number``
        (1-based): ``(..., 2)`` float64; zeros without a model."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if self.model is None:
            return np.zeros((*np.broadcast(x, y).shape, 2))
        w, h = float(self.general["rlnImageSizeX"]), float(self.general["rlnImageSizeY"])
        z = float(frame_number) - float(self.general.get("rlnMicrographStartFrame", 1))
        basis = _monomials(x / w - 0.5, y / h - 0.5)  # (6, ...)
        powers = np.array([z, z * z, z**3])
        c = self.model.reshape(2, 6, 3)
        return np.einsum("ksb,s...,b->...k", c, basis, powers)

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
    local=None,
) -> None:
    """Write ``shifts`` (N, 2) (frames ``start_frame .. start_frame + N - 1``) atomically.

    shape: (H, W) of the movie frames; n_frames: frames in the movie (default ``N``); pixel_size:
    of the movie (Å); dose_per_frame: e/Å^2; voltage: kV. Unknown values are left out, as RELION
    does for the optional ones. local: a :class:`cryoden.align_local.LocalModel` of the same
    frames (adds ``data_local_motion_model`` and ``data_local_shift``), or None.
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
    general["rlnMotionModelVersion"] = MOTION_MODEL_NULL if local is None else MOTION_MODEL_POLY3
    table = pd.DataFrame(
        {
            "rlnMicrographFrameNumber": np.arange(n) + int(start_frame),
            "rlnMicrographShiftX": shifts[:, 0],
            "rlnMicrographShiftY": shifts[:, 1],
        }
    )
    blocks = {"general": general, "global_shift": table}
    if local is not None:
        if local.n_frames != n or tuple(local.shape) != (int(shape[0]), int(shape[1])):
            raise ValueError(
                f"{path}: the local model is of {local.n_frames} frames of {tuple(local.shape)}, "
                f"the shifts of {n} frames of {tuple(shape)}"
            )
        coeffs = relion_coefficients(local)
        blocks["local_motion_model"] = pd.DataFrame(
            {
                "rlnMotionModelCoeffsIdx": np.arange(2 * POLY3_TERMS),
                # 10 significant digits: the z^3 terms are small numbers in pixels
                "rlnMotionModelCoeff": [f"{c:.9e}" for c in coeffs.reshape(-1)],
            }
        )
        blocks["local_shift"] = _local_table(local, int(start_frame))
    path = Path(path)
    with io.atomic(path) as tmp:
        import starfile

        starfile.write(blocks, tmp, float_format="%.6f")


def _monomials(x, y) -> np.ndarray:
    """RELION's spatial terms ``(1, x, x^2, y, y^2, x y)`` at normalised ``x, y``: (6, ...)."""
    return np.stack([np.ones_like(x), x, x * x, y, y * y, x * y])


def relion_coefficients(local) -> np.ndarray:
    """The coefficients ``(2, 18)`` (x, y) of RELION's third-order polynomial model equal to a
    :class:`cryoden.align_local.LocalModel` (see the module docstring).

    Both models are polynomials of degree 2 in space and powers 1..3 of time, RELION's in
    ``x = X / W - 0.5`` and the frame index ``z``, ours in ``u = 2x + 1/W`` and
    ``tau = z / (N - 1)``: the same space of functions, so ours evaluated on a 3x3 grid of
    pixels in frames ``z = 1, 2, 3`` (:meth:`LocalModel.at`) determines RELION's coefficients
    exactly (a linear solve, no refit of the measurements).
    """
    h, w = local.shape
    g = np.array([-0.5, 0.0, 0.5])
    xr, yr = (a.ravel() for a in np.meshgrid(g, g))
    spatial = _monomials(xr, yr).T  # (9, 6)
    rows, values = [], []
    for z in (1.0, 2.0, 3.0):
        powers = np.array([z, z * z, z**3])
        rows.append(np.einsum("ps,b->psb", spatial, powers).reshape(len(xr), POLY3_TERMS))
        values.append(local.at((xr + 0.5) * w, (yr + 0.5) * h, z))  # (9, 2)
    design, values = np.concatenate(rows), np.concatenate(values)  # (27, 18), (27, 2)
    coeffs = np.linalg.lstsq(design, values, rcond=None)[0]  # (18, 2)
    return np.ascontiguousarray(coeffs.T)


def _local_table(local, start_frame: int) -> pd.DataFrame:
    """``data_local_shift``: every patch's measured shift in every frame (RELION's order:
    patch by patch, frames in order)."""
    n_patches, n = local.patch_shifts.shape[:2]
    centres = np.repeat(np.asarray(local.centres, np.float64), n, axis=0)
    shifts = np.asarray(local.patch_shifts, np.float64).reshape(n_patches * n, 2)
    return pd.DataFrame(
        {
            "rlnMicrographFrameNumber": np.tile(np.arange(n) + start_frame, n_patches),
            "rlnCoordinateX": centres[:, 0],
            "rlnCoordinateY": centres[:, 1],
            "rlnMicrographShiftX": shifts[:, 0],
            "rlnMicrographShiftY": shifts[:, 1],
        }
    )


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
    local = _read_local_shifts(path, blocks.get("local_shift"))
    model = _read_model(path, blocks.get("local_motion_model"), general)
    return MotionStar(xy, numbers, general, local, model)


def _read_local_shifts(path: Path, table) -> np.ndarray | None:
    """``data_local_shift`` -> ``(M, 5)`` float64, None when absent or empty."""
    if not isinstance(table, pd.DataFrame) or table.empty:
        return None
    need = [
        "rlnMicrographFrameNumber",
        "rlnCoordinateX",
        "rlnCoordinateY",
        "rlnMicrographShiftX",
        "rlnMicrographShiftY",
    ]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: data_local_shift lacks {', '.join(missing)}")
    try:
        rows = table[need].to_numpy(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: data_local_shift has non-numeric values") from None
    if not np.all(np.isfinite(rows)):
        raise ValueError(f"{path}: data_local_shift has non-finite values")
    return rows


def _read_model(path: Path, table, general: dict) -> np.ndarray | None:
    """RELION's third-order polynomial ``(2, 18)`` when the version says so and the table has
    all 36 coefficients; else None (no model, another version, or an incomplete table)."""
    if general.get("rlnMotionModelVersion") != MOTION_MODEL_POLY3:
        return None
    cols = ["rlnMotionModelCoeffsIdx", "rlnMotionModelCoeff"]
    if not isinstance(table, pd.DataFrame) or any(c not in table.columns for c in cols):
        return None
    try:
        idx = table[cols[0]].to_numpy().astype(np.int64)
        val = table[cols[1]].to_numpy(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: data_local_motion_model has non-numeric values") from None
    if sorted(idx.tolist()) != list(range(2 * POLY3_TERMS)):
        return None
    if not np.all(np.isfinite(val)):
        raise ValueError(f"{path}: data_local_motion_model has non-finite coefficients")
    out = np.zeros(2 * POLY3_TERMS)
    out[idx] = val
    return out.reshape(2, POLY3_TERMS)
