"""Local (patch-based) motion on top of the global shifts of :mod:`cryoden.align`.

Method. The binned frames, shifted by their global shifts, are cut into ``nx x ny`` patches; each
patch stack is aligned like a whole movie (:func:`cryoden.align.align_binned`) and its trajectory
smoothed in frame number. The measured patch shifts ``l_p(t)`` (relative to frame 0) are fitted by
least squares with a smooth model in ``x, y, t`` (MotionCor2's form):

    l(x, y, t) = sum_{a, b} c_ab * phi_a(x, y) * tau^b,   tau = t / (N - 1),  b = 1 .. 3,
    phi = (1, u, v, u^2, u v, v^2)  (u, v: x, y scaled to [-1, 1] over the frame)

(fewer terms when there are too few patches or frames), so ``l(x, y, 0) = 0``. The total shift of
frame ``t`` at pixel ``(x, y)`` is ``global(t) + l(x, y, t)`` in RELION's sign convention
(``aligned(x) = frame(x - shift(x))``). Sums apply the global part in Fourier space and the local
part by bilinear interpolation of the globally shifted frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cryoden import align

TIME_POWERS = 3
LOCAL_RADIUS = 6.0  # binned pixels: local motion beyond the global shifts is small


@dataclass(frozen=True)
class LocalModel:
    """Smooth local motion: ``coeffs`` (2, A, B) float64 (x/y, spatial term, time power 1..B).

    ``shape``: (H, W) of the frames; ``n_frames``; ``centres`` (P, 2) patch centres (x, y) and
    ``patch_shifts`` (P, N, 2) the smoothed measured local shifts (pixels), for the records.
    """

    coeffs: np.ndarray
    shape: tuple[int, int]
    n_frames: int
    centres: np.ndarray
    patch_shifts: np.ndarray

    def at(self, x, y, t) -> np.ndarray:
        """Local shift at pixel coordinates ``x, y`` (arrays) of frame ``t``: (..., 2) float64."""
        basis = _basis(np.asarray(x, float), np.asarray(y, float), self.shape, self.coeffs.shape[1])
        tau = _powers(t, self.n_frames, self.coeffs.shape[2])
        return np.einsum("kab,a...,b->...k", self.coeffs, basis, tau)


def _basis(x, y, shape, terms):
    """Spatial basis (A, ...) at pixel coordinates x, y (numpy or jax arrays)."""
    h, w = shape
    xp = jnp if isinstance(x, jax.Array) else np
    u = (x - (w - 1) / 2) / (w / 2)
    v = (y - (h - 1) / 2) / (h / 2)
    one = xp.ones_like(u)
    return xp.stack([one, u, v, u * u, u * v, v * v][:terms])


def _powers(t, n_frames, powers):
    """``tau^1 .. tau^powers`` for frame ``t``: (B,)."""
    tau = t / max(n_frames - 1, 1)
    return np.array([tau**b for b in range(1, powers + 1)], np.float64)


def estimate(binned, global_binned, binning, patches, *, shape, bfactor, iterations, tolerance,
             group) -> LocalModel:  # fmt: skip
    """Fit a :class:`LocalModel` to patches of binned frames (N, h, w).

    global_binned: (N, 2) global shifts in binned pixels; binning: of the frames; patches:
    ``(nx, ny)``; shape: (H, W) of the unbinned frames. The model's shifts are unbinned pixels.
    """
    nx, ny = (int(p) for p in patches)
    if nx < 1 or ny < 1:
        raise ValueError(f"patches must be positive, got {patches}")
    n, h, w = binned.shape
    spectra = jnp.fft.rfft2(jnp.asarray(binned - binned.mean(axis=(1, 2), keepdims=True)))
    shifted = jnp.fft.irfft2(spectra * align.phase_ramp(global_binned, h, w), s=(h, w))
    shifted = np.asarray(shifted)
    ph, pw = h // ny, w // nx
    if min(ph, pw) < 32:
        raise ValueError(f"patches {nx}x{ny} are too small ({pw}x{ph} binned pixels)")
    centres, measured = [], []
    for j in range(ny):
        for i in range(nx):
            stack = shifted[:, j * ph : (j + 1) * ph, i * pw : (i + 1) * pw]
            raw = align.align_binned(
                stack, binning=binning, bfactor=bfactor, iterations=iterations,
                tolerance=tolerance, group=group, radius=LOCAL_RADIUS,
            )  # fmt: skip
            smooth = align.smooth_trajectory(raw)
            measured.append((smooth - smooth[0]) * binning)
            centres.append(((i + 0.5) * pw * binning - 0.5, (j + 0.5) * ph * binning - 0.5))
    centres, measured = np.array(centres), np.array(measured)  # (P, 2), (P, N, 2)
    shape = tuple(int(s) for s in shape)
    terms = 6 if len(centres) >= 9 else 3 if len(centres) >= 4 else 1
    powers = min(TIME_POWERS, max(n - 1, 1))
    basis = _basis(centres[:, 0], centres[:, 1], shape, terms)  # (A, P)
    tau = np.stack([_powers(t, n, powers) for t in range(n)])  # (N, B)
    design = np.einsum("ap,nb->pnab", basis, tau).reshape(len(centres) * n, terms * powers)
    coeffs = np.stack(
        [np.linalg.lstsq(design, measured[..., k].ravel(), rcond=None)[0] for k in range(2)]
    ).reshape(2, terms, powers)
    return LocalModel(coeffs, shape, n, centres, measured)


@partial(jax.jit, static_argnames=("w",), donate_argnums=(0,))
def _accumulate(acc, frame, shift, member, weight, coeffs, tau, *, w):
    """acc (S, H, W) += member[s] * frame shifted globally (Fourier) and locally (bilinear)."""
    h = frame.shape[0]
    spec = jnp.fft.rfft2(frame) * align.phase_ramp(shift, h, w) * weight
    g = jnp.fft.irfft2(spec, s=(h, w))
    y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")  # fmt: skip
    basis = _basis(x, y, (h, w), coeffs.shape[1])
    local = jnp.einsum("kab,ahw,b->khw", coeffs, basis, tau)
    warped = jax.scipy.ndimage.map_coordinates(g, [y - local[1], x - local[0]], order=1,
                                               mode="wrap")  # fmt: skip
    return acc + member[:, None, None] * warped[None]


def sums(frames, alignment, members, used, dose_weighting) -> list[np.ndarray]:
    """Aligned sums with a local model: see :func:`cryoden.align.aligned_sums`; (H, W) each."""
    model: LocalModel = alignment.local
    n = align.frame_count(frames)
    h, w = align.get_frame(frames, int(used[0]) if used.size else 0).shape
    if (h, w) != tuple(model.shape):
        raise ValueError(f"frames are {h}x{w}, the local model was fitted to {model.shape}")
    acc = jnp.zeros((members.shape[0], h, w), jnp.float32)
    weights = align._weights_fn(dose_weighting, n, h, w)
    coeffs = jnp.asarray(model.coeffs, jnp.float32)
    for i in used:
        frame = jnp.asarray(align.get_frame(frames, int(i)))
        tau = jnp.asarray(_powers(int(i), n, model.coeffs.shape[2]), jnp.float32)
        acc = _accumulate(
            acc, frame, jnp.asarray(alignment.shifts[i], jnp.float32),
            jnp.asarray(members[:, i]), weights(int(i)), coeffs, tau, w=w,
        )  # fmt: skip
    return [np.asarray(a, np.float32) for a in acc]
