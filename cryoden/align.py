"""Motion correction of movie frames: global (and optional local) shifts, aligned sums.

Conventions
-----------
Frames are ``(H, W)`` float32 images, indexed ``0 .. N-1``. A shift ``s = (sx, sy)`` (pixels of the
delivered frames) is the translation *applied to a frame* to align it, RELION's sign convention for
``rlnMicrographShiftX/Y``: the aligned frame is ``aligned(x, y) = frame(x - sx, y - sy)``,
applied in Fourier space as ``F(k) * exp(-2 pi i (kx sx + ky sy))``. A particle that drifted by
``+d`` during the exposure therefore has shift ``-d``.
Shifts are relative to the first frame (``shifts[0] = 0``).

Global alignment (:func:`estimate_shifts`): frames are read once, binned (block mean) to at most
about 512 pixels on the long side, Fourier transformed, and kept on the device. Each iteration
correlates every frame (or a window of ``group`` neighbouring frames) with the sum of all the
others, after the current shifts, weighted by ``exp(-2 B k^2)`` (``B`` in pixel^2, ``k`` in cycles
per pixel, RELION's and MotionCor2's B-factor for alignment);
the correlation peak is located to subpixel precision by a parabola through its neighbours, and the
residual shifts are added until they all change by less than ``tolerance`` pixels. The per-frame
shifts are then smoothed in frame number by a penalised least-squares (Whittaker) smoother whose
strength is chosen by generalised cross-validation.

Local motion (``patches=(nx, ny)``): see :mod:`cryoden.align_local`.

Sums (:func:`aligned_sum`, :func:`aligned_sums`) stream the frames again at full size and apply
the subpixel shifts in Fourier space (no interpolation, noise stays white); the same shifts are used
for any subset of frames, so ``aligned_sum(even) + aligned_sum(odd) == aligned_sum(all)``.

Dose weighting (:func:`dose_weights`): Grant & Grigorieff (2015) critical exposure, as RELION
implements it (dose at the end of each frame; 200 kV and 100 kV doses divided by 0.8 and 0.64), with
the weights normalised so that ``sum_i w_i(k)^2 = N`` at every frequency (RELION's normalisation
times ``sqrt(N)``, which keeps the sum's mean equal to the plain sum's).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

MAX_BINNED = 512  # default binning keeps the long side of binned frames at or below this
COARSE = 4  # extra binning of the first, coarse alignment of large frames


@dataclass(frozen=True)
class Alignment:
    """Shifts of every frame: ``shifts`` (N, 2) float64 ``(x, y)`` pixels, RELION's sign convention.

    ``local``: a :class:`cryoden.align_local.LocalModel` when patches were requested, else None.
    """

    shifts: np.ndarray
    local: object | None = None


@dataclass(frozen=True)
class DoseWeighting:
    """Parameters of dose weighting: pixel size (Å), dose per frame (e/Å^2), pre-exposure, kV."""

    pixel_size: float
    dose_per_frame: float
    pre_exposure: float = 0.0
    voltage: float = 300.0


def frame_count(frames) -> int:
    """Number of frames of a Movie or a sequence."""
    return len(frames)


def get_frame(frames, i: int) -> np.ndarray:
    """Frame ``i`` of a Movie (``.frame(i)``) or of a sequence (``[i]``), as (H, W) float32."""
    f = frames.frame(i) if hasattr(frames, "frame") else frames[i]
    return np.asarray(f, dtype=np.float32)


def auto_binning(shape: Sequence[int]) -> int:
    """Integer binning that brings the long side of ``shape`` to at most ``MAX_BINNED`` pixels."""
    return max(1, math.ceil(max(shape) / MAX_BINNED))


def bin_frame(frame: np.ndarray, b: int) -> np.ndarray:
    """Block mean over ``b x b`` pixels: (H, W) -> (H // b, W // b) float32 (edges cropped).

    Rows are added first (whole contiguous rows at a time), then columns: several times faster
    than a mean over both axes of a (h, b, w, b) view.
    """
    if b == 1:
        return np.asarray(frame, np.float32)
    h, w = frame.shape[0] // b, frame.shape[1] // b
    rows = np.asarray(frame[: h * b, : w * b], np.float32).reshape(h, b, w * b).sum(axis=1)
    return rows.reshape(h, w, b).sum(axis=2) * np.float32(1 / (b * b))


def _freqs(h: int, w: int):
    """Spatial frequencies (cycles/pixel) of the ``rfft2`` grid: ky (h, 1), kx (1, w//2+1)."""
    ky = jnp.fft.fftfreq(h).astype(jnp.float32)[:, None]
    kx = jnp.fft.rfftfreq(w).astype(jnp.float32)[None, :]
    return ky, kx


def phase_ramp(shifts, h: int, w: int):
    """``exp(-2 pi i (kx sx + ky sy))`` for shifts (..., 2) -> (..., h, w//2+1) complex64, as the
    product of its separable factors (h + w//2+1 complex exponentials per shift, not h * w//2+1)."""
    ky, kx = _freqs(h, w)
    s = jnp.asarray(shifts, jnp.float32)
    ry = jnp.exp(-2j * jnp.pi * (ky * s[..., 1, None, None]))
    rx = jnp.exp(-2j * jnp.pi * (kx * s[..., 0, None, None]))
    return (ry * rx).astype(jnp.complex64)


def bfactor_weight(h: int, w: int, bfactor: float, binning: int):
    """``exp(-2 B k^2)`` on the rfft2 grid of binned frames, ``k`` in cycles per *unbinned* pixel.

    ``B`` in pixel^2 of the delivered frames, as RELION's ``--bfactor`` and MotionCor2's ``-Bft``
    (the 2: the weight ``exp(-B k^2)`` applies to both the frame and the reference).
    """
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    k2 = (kx * kx + ky * ky) / binning**2
    return np.exp(-2 * bfactor * k2).astype(np.float32)


def edge_taper(h: int, w: int, margin: float):
    """Separable raised-cosine window: 0 within ``margin`` pixels of the border, rising to 1 over
    the next ``margin`` (at least 4) pixels. (h, w) float32."""

    def ramp(n):
        m0 = min(int(np.ceil(margin)), n // 4)
        m = min(max(4, m0), n // 4)
        r = np.ones(n)
        r[:m0] = 0
        r[n - m0 :] = 0
        edge = 0.5 - 0.5 * np.cos(np.pi * (np.arange(m) + 0.5) / m)
        r[m0 : m0 + m] = edge
        r[n - m0 - m : n - m0] = edge[::-1]
        return r

    return np.outer(ramp(h), ramp(w)).astype(np.float32)


def _spectra(binned: np.ndarray) -> np.ndarray:
    """rfft2 of the periodic component of mean-subtracted binned frames: (N, h, w) float32 ->
    (N, h, w//2+1) complex64 (NumPy/SciPy: no kernel to compile).

    Moisan's periodic-plus-smooth decomposition removes the jump between opposite borders, which
    would otherwise correlate at zero shift in every frame (a pull towards no motion).
    """
    import scipy.fft

    _, h, w = binned.shape
    u = binned - binned.mean(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)
    v = np.zeros_like(u)
    dy = u[:, -1, :] - u[:, 0, :]
    v[:, 0, :] += dy
    v[:, -1, :] -= dy
    dx = u[:, :, -1] - u[:, :, 0]
    v[:, :, 0] += dx
    v[:, :, -1] -= dx
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    denom = 2 * np.cos(2 * np.pi * kx) + 2 * np.cos(2 * np.pi * ky) - 4
    denom[0, 0] = np.inf  # the smooth component has no mean
    smooth = scipy.fft.rfft2(v, workers=threads()) / denom.astype(np.float32)
    return scipy.fft.rfft2(u, workers=threads()) - smooth


def _group_sums(aligned, group: int):
    """Sums of consecutive, non-overlapping groups of ``group`` frames: (N, ..) -> (G, ..)."""
    n = aligned.shape[0]
    ids = jnp.arange(n) // group
    return jax.ops.segment_sum(aligned, ids, num_segments=-(-n // group))


def _peaks(cc, radius: float):
    """Subpixel argmax of each correlation map within ``radius`` of the origin (wrapped).

    cc: (N, h, w) float32 -> (N, 2) float32 ``(x, y)`` positions, signed (wrapped) coordinates.
    """
    n, h, w = cc.shape
    yy = jnp.fft.fftfreq(h, 1.0 / h)[:, None]
    xx = jnp.fft.fftfreq(w, 1.0 / w)[None, :]
    inside = (xx * xx + yy * yy) <= radius * radius
    masked = jnp.where(inside[None], cc, -jnp.inf)
    flat = jnp.argmax(masked.reshape(n, -1), axis=1)
    iy, ix = flat // w, flat % w
    frames = jnp.arange(n)

    def at(dy, dx):
        return cc[frames, (iy + dy) % h, (ix + dx) % w]

    c0 = at(0, 0)

    def vertex(vn, vp):
        den = vp + vn - 2 * c0
        off = jnp.where(jnp.abs(den) > 1e-30, -0.5 * (vp - vn) / jnp.where(den == 0, 1, den), 0)
        return jnp.clip(off, -0.5, 0.5)

    sx = jnp.where(ix > w // 2, ix - w, ix) + vertex(at(0, -1), at(0, 1))
    sy = jnp.where(iy > h // 2, iy - h, iy) + vertex(at(-1, 0), at(1, 0))
    return jnp.stack([sx, sy], axis=1).astype(jnp.float32)


@partial(jax.jit, static_argnames=("w", "group", "radius"))
def residual_shifts(spectra, weight, window, shifts, windowed, *, w, group, radius):
    """One alignment iteration: residual shift of each frame against the sum of the others.

    spectra: (N, h, w//2+1) complex64 of the binned frames; weight: (h, w//2+1) float32; shifts:
    (N, 2) current shifts (binned pixels). Returns (N, 2) residual shifts to add (binned pixels).
    ``windowed`` (a traced bool: one compiled kernel for both kinds of iteration): multiply the
    shifted frames by ``window`` (h, w), the same for all frames in the
    aligned coordinates; it hides the borders, where periodic shifts wrap and content enters and
    leaves, and cannot bias the residuals at convergence (the plain iteration is biased by up to
    about 1% of the motion; a window fixed to the unshifted frames would pull towards no motion).
    It costs two more FFTs per frame, so it is used for the last iterations only.
    With ``group > 1`` each group of consecutive frames is correlated as one and its residual is
    given to all of its frames.
    """
    h = spectra.shape[1]
    aligned = spectra * phase_ramp(shifts, h, w)
    aligned = jax.lax.cond(
        windowed,
        lambda a: jnp.fft.rfft2(jnp.fft.irfft2(a, s=(h, w)) * window),
        lambda a: a,
        aligned,
    )
    total = aligned.sum(axis=0)
    own = aligned if group <= 1 else _group_sums(aligned, group)
    cc = jnp.fft.irfft2((total[None] - own) * jnp.conj(own) * weight, s=(h, w))
    res = _peaks(cc, radius)
    return res if group <= 1 else res[jnp.arange(spectra.shape[0]) // group]


def smooth_trajectory(raw: np.ndarray) -> np.ndarray:
    """Whittaker smoother (third differences) along frames, strength by GCV: (N, 2) -> (N, 2).

    Minimises ``|y - z|^2 + lam |D3 z|^2`` (both axes share ``lam``; any quadratic trajectory
    passes unchanged); ``lam`` minimises the generalised
    cross-validation score ``N RSS / (N - tr H)^2`` over a log grid. Fewer than 8 frames: unchanged
    (too few to tell noise from motion).
    """
    raw = np.asarray(raw, np.float64)
    n = raw.shape[0]
    if n < 8:
        return raw.copy()
    d = np.diff(np.eye(n), 3, axis=0)
    p = d.T @ d
    best = None
    for lam in np.geomspace(1e-3, 1e6, 37):
        hat = np.linalg.solve(np.eye(n) + lam * p, np.eye(n))
        fit = hat @ raw
        rss = float(((raw - fit) ** 2).sum())
        dof = n - np.trace(hat)
        score = n * rss / max(dof, 1e-9) ** 2
        if best is None or score < best[0]:
            best = (score, fit)
    return best[1]


def read_binned(frames, b: int, first: np.ndarray | None = None) -> np.ndarray:
    """Read every frame once and bin it: -> (N, H // b, W // b) float32.

    ``first``: frame 0 when the caller has already read it (it is not read again).
    """
    n = frame_count(frames)
    first = bin_frame(get_frame(frames, 0) if first is None else first, b)
    out = np.empty((n,) + first.shape, np.float32)
    out[0] = first
    item_bytes = 2 * first.nbytes * b * b  # the frame and its float32 copy
    for i, binned in in_order(
        lambda i: bin_frame(get_frame(frames, i), b), range(1, n), item_bytes
    ):
        out[i] = binned
    return out


THREAD_MEMORY = 2**30  # bytes that the frames in flight in worker threads may take together


def threads(item_bytes: int = 0) -> int:
    """Worker threads for frame-by-frame host work: the usable cores, at most 4, and fewer when
    ``item_bytes`` (what one thread holds) times the threads would exceed ``THREAD_MEMORY``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        cores = os.cpu_count() or 1
    return max(1, min(4, cores, THREAD_MEMORY // max(1, item_bytes)))


def in_order(fn, items, item_bytes: int = 0):
    """Yield ``(item, fn(item))`` in the order of ``items``, computed by :func:`threads` worker
    threads a few items ahead (NumPy and SciPy release the GIL); ``item_bytes``: the memory that
    one call of ``fn`` holds. An exception in ``fn`` is raised here, for the first failing item
    in order; no further items are started."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    k = threads(item_bytes)
    items = iter(items)
    with ThreadPoolExecutor(k) as pool:
        pending = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) > k:
                    done, job = pending.popleft()
                    yield done, job.result()
            while pending:
                done, job = pending.popleft()
                yield done, job.result()
        finally:
            for _, job in pending:
                job.cancel()


def align_binned(binned, *, binning, bfactor, iterations, tolerance, group, radius=None):
    """Iterative global alignment of binned frames (N, h, w): -> (N, 2) raw shifts, binned pixels.

    ``binning``: of ``binned``; ``bfactor``: unbinned pixel^2; ``tolerance``: in binned pixels.
    Frames of 512 pixels or more are first aligned 4x coarser (recursively), so that the
    iterations at this size only refine.
    """
    n, h, w = binned.shape
    if radius is None:
        radius = float(min(h, w) // 4)
    shifts = np.zeros((n, 2), np.float32)
    if min(h, w) >= 512:
        coarse = np.stack([bin_frame(f, COARSE) for f in binned])
        start = align_binned(
            coarse, binning=binning * COARSE, bfactor=bfactor, iterations=iterations,
            tolerance=0.1, group=group, radius=radius / COARSE,
        )  # fmt: skip
        shifts = np.asarray(start * COARSE, np.float32)
    spectra = jnp.asarray(_spectra(binned))
    weight = bfactor_weight(h, w, bfactor, binning)
    window = np.ones((h, w), np.float32)
    done, windowed = 0, False
    while done < max(1, iterations):
        res = residual_shifts(
            spectra, weight, window, shifts, windowed, w=w, group=int(group), radius=radius,
        )  # fmt: skip
        res = np.asarray(res)
        res = res - res[0]
        shifts = shifts + res
        done += 1
        change = float(np.max(np.abs(res)))
        if os.environ.get("CRYODEN_ALIGN_DEBUG"):
            print(f"align {h}x{w} windowed={windowed} change={change:.4f}", flush=True)
        if windowed and change < tolerance:
            break
        if not windowed and (change < max(tolerance, 0.1) or done >= iterations - 2):
            windowed = True  # refine: at most 3 windowed iterations (two more FFTs per frame)
            done = max(done, iterations - 3)
        if windowed:
            window = edge_taper(h, w, float(np.max(np.abs(shifts))) + 2)
    shifts = np.asarray(shifts, np.float64)
    if group > 1:  # piecewise constant -> interpolated between group centres
        centres = np.arange(n) // group
        t = np.array([np.mean(np.flatnonzero(centres == g)) for g in range(centres[-1] + 1)])
        values = shifts[[int(np.flatnonzero(centres == g)[0]) for g in range(len(t))]]
        shifts = _interpolate(t, values, np.arange(n))
        shifts -= shifts[0]
    return shifts


def _interpolate(t, values, at):
    """Piecewise-linear interpolation of (G, 2) ``values`` at ``t``, extrapolated linearly beyond
    the first and last two points (frame 0 lies before the first group centre): -> (len(at), 2)."""
    if len(t) < 2:
        return np.repeat(values[:1], len(at), axis=0)
    out = np.stack([np.interp(at, t, values[:, k]) for k in range(2)], axis=1)
    for ends, sel in (((0, 1), at < t[0]), ((-2, -1), at > t[-1])):
        a, b = ends
        slope = (values[b] - values[a]) / (t[b] - t[a])
        out[sel] = values[a] + (at[sel, None] - t[a]) * slope
    return out


def estimate_shifts(
    frames,
    *,
    pixel_size=None,
    bfactor=150.0,
    binning=None,
    iterations=10,
    tolerance=0.01,
    patches=None,
    group=1,
) -> Alignment:
    """Estimate the shift of every frame (see the module docstring for the method).

    frames: a Movie (``len``, ``frame(i)``) or a sequence of (H, W) arrays; pixel_size: Å per pixel
    of the frames (accepted for symmetry with the other steps; the alignment works in pixels);
    bfactor: pixel^2 (RELION's ``--bfactor``); binning: integer (default: long
    side to at most 512 pixels); iterations: at most this many refinements, stopping once every
    shift changes by less than ``tolerance`` pixels; patches: ``(nx, ny)`` for local motion on
    top of the global shifts; group: correlate windows of this many consecutive frames (for
    low-dose frames). Returns an :class:`Alignment` with ``shifts`` (N, 2) float64 pixels.
    """
    n = frame_count(frames)
    if n < 2:
        return Alignment(np.zeros((n, 2)), None)
    first = get_frame(frames, 0)
    first_shape = first.shape
    b = int(binning) if binning else auto_binning(first_shape)
    binned = read_binned(frames, b, first)
    raw = align_binned(
        binned, binning=b, bfactor=bfactor, iterations=iterations,
        tolerance=tolerance / b, group=group,
    )  # fmt: skip
    smooth = smooth_trajectory(raw)
    smooth = (smooth - smooth[0]) * b
    local = None
    if patches is not None:
        from cryoden import align_local

        local = align_local.estimate(
            binned, smooth / b, b, patches, shape=first_shape, bfactor=bfactor,
            iterations=iterations, tolerance=tolerance / b, group=group,
        )  # fmt: skip
    return Alignment(smooth, local)


# ---------------------------------------------------------------------------------------------
# Dose weighting


def _doses(n_frames, dose_per_frame, pre_exposure, voltage) -> np.ndarray:
    """Equivalent 300 kV dose at the end of each frame (e/Å^2), as RELION: (N,) float64."""
    d = pre_exposure + dose_per_frame * (np.arange(n_frames) + 1.0)
    if abs(voltage - 200) <= 2:
        d = d / 0.8
    elif abs(voltage - 100) <= 2:
        d = d / 0.64
    elif abs(voltage - 300) > 2:
        raise ValueError(f"dose weighting supports 100, 200 or 300 kV, got {voltage}")
    return d


def _critical_exposure(h, w, pixel_size) -> np.ndarray:
    """``2 Ne(k)`` (Grant & Grigorieff Eq. 3, times 2 from Eq. 5) on the rfft2 grid: (h, w//2+1)."""
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    k = np.sqrt(kx * kx + ky * ky) / pixel_size
    ne = (0.245 * np.where(k > 0, k, 1.0) ** -1.665 + 2.81) * 2
    return np.where(k > 0, ne, np.inf)


def dose_weights(
    n_frames, shape, pixel_size, dose_per_frame, pre_exposure=0.0, voltage=300.0
) -> np.ndarray:
    """Dose weights of every frame: (N, H, W//2+1) float32 on the rfft2 grid of ``shape`` (H, W).

    ``w_i(k) = exp(-D_i / (2 Ne(k)))`` normalised so that ``sum_i w_i(k)^2 = N`` (module docstring).
    """
    h, w = shape
    ne2 = _critical_exposure(h, w, pixel_size)
    d = _doses(n_frames, dose_per_frame, pre_exposure, voltage)
    raw = np.exp(-d[:, None, None] / ne2[None])
    norm = np.sqrt(n_frames / np.sum(raw * raw, axis=0))
    return (raw * norm[None]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Sums
#
# Each frame is Fourier transformed once, shifted by the separable phase ramp
# ``exp(-2 pi i ky sy) * exp(-2 pi i kx sx)``, weighted, and added into K accumulators. When the
# subsets are built from few disjoint "atoms" (frames with the same membership in every subset,
# e.g. full = even + odd: two atoms for three subsets), only the atoms are accumulated and each
# subset is the sum of its atoms (:func:`sum_plan`). On the CPU the transforms run in NumPy/SciPy
# threads (faster than XLA's single-threaded FFT); on an accelerator in one jitted kernel.


def sum_plan(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How to accumulate the subsets of ``members`` (S, N) (frame multiplicity in each subset).

    Returns ``coef`` (K, N): frame ``i`` is added ``coef[k, i]`` times into accumulator ``k``, and
    ``combine`` (S, K): subset ``s`` is ``sum_k combine[s, k] * accumulator_k``. The
    accumulators are the atoms (groups of frames with equal membership columns) when there are at
    most ``S`` of them, else the subsets themselves (``combine`` = identity). Exact:
    ``combine @ coef == members``.
    """
    s, n = members.shape
    used = np.flatnonzero(members.any(axis=0))
    columns, atom = np.unique(members[:, used].T, axis=0, return_inverse=True)
    if len(columns) > s:
        return members.copy(), np.eye(s, dtype=members.dtype)
    coef = np.zeros((len(columns), n), members.dtype)
    coef[atom.reshape(-1), used] = 1
    return coef, np.ascontiguousarray(columns.T)


def _ramps(shift, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The phase ramp of ``shift`` (x, y) as two factors: (h, 1) and (1, w//2+1) complex64
    (phases in float64): ``ramp_y * ramp_x == phase_ramp(shift, h, w)`` to float32 rounding."""
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    ry = np.exp(-2j * np.pi * ky * float(shift[1])).astype(np.complex64)
    rx = np.exp(-2j * np.pi * kx * float(shift[0])).astype(np.complex64)
    return ry, rx


def _host_accumulate(frames, used, shifts, coef, weights, shape) -> np.ndarray:
    """Accumulate the shifted, weighted spectra of the frames ``used`` into (K, H, W//2+1)
    complex64 (NumPy/SciPy). Worker threads transform frames ahead; the spectra are added in frame
    order, so the result does not depend on the number of threads."""
    import scipy.fft

    h, w = shape
    acc = np.zeros((coef.shape[0], h, w // 2 + 1), np.complex64)

    def spectrum(i):
        frame = get_frame(frames, i)
        if frame.shape != (h, w):
            raise ValueError(f"frame {i} has shape {frame.shape}, frame 0 has {(h, w)}")
        spec = scipy.fft.rfft2(frame, workers=1)
        ry, rx = _ramps(shifts[i], h, w)
        spec *= ry
        spec *= rx
        weight = weights(i)
        if np.ndim(weight):
            spec *= weight
        return spec

    def add(i, spec):
        for k in np.flatnonzero(coef[:, i]):
            acc[k] += spec if coef[k, i] == 1 else np.complex64(coef[k, i]) * spec

    item_bytes = 2 * h * (w // 2 + 1) * 8  # a float32 frame and its complex64 spectrum
    for i, spec in in_order(spectrum, [int(i) for i in used], item_bytes):
        add(i, spec)
    return acc


@partial(jax.jit, donate_argnums=(0,))
def _device_add(acc, frame, ry, rx, coef, weight):
    """acc (K, H, W//2+1) += coef[k] * rfft2(frame) * ry (H, 1) * rx (1, W//2+1) * weight."""
    spec = jnp.fft.rfft2(frame) * ry * rx * weight
    return acc + coef[:, None, None].astype(acc.dtype) * spec[None]


def _device_accumulate(frames, used, shifts, coef, weights, shape):
    """As :func:`_host_accumulate`, one jitted kernel per frame (accelerators): (K, H, W//2+1)."""
    h, w = shape
    acc = jnp.zeros((coef.shape[0], h, w // 2 + 1), jnp.complex64)
    for i in used:
        frame = get_frame(frames, int(i))
        if frame.shape != (h, w):
            raise ValueError(f"frame {i} has shape {frame.shape}, frame 0 has {(h, w)}")
        ry, rx = _ramps(shifts[i], h, w)
        acc = _device_add(acc, frame, ry, rx, coef[:, i].astype(np.float32), weights(int(i)))
    return acc


def _inverse(acc, shape, on_host: bool) -> list[np.ndarray]:
    """irfft2 of each accumulator (K, H, W//2+1) -> K (H, W) float32 images."""
    if on_host:
        import scipy.fft

        return [scipy.fft.irfft2(a, s=shape, workers=threads()) for a in acc]
    return [np.asarray(jnp.fft.irfft2(a, s=shape), np.float32) for a in acc]


def _combine(images, combine: np.ndarray, shape) -> list[np.ndarray]:
    """Subset images ``sum_k combine[s, k] * images[k]`` in accumulator order: S (H, W) float32."""
    out = []
    for row in combine:
        total = np.zeros(shape, np.float32)
        for c, img in zip(row, images, strict=True):
            if c:
                total += img if c == 1 else np.float32(c) * img
        out.append(total)
    return out


def aligned_sums(
    frames, alignment: Alignment, subsets, dose_weighting=None, *, on_host=None
) -> list[np.ndarray]:
    """Several aligned sums in one pass over the frames: one (H, W) float32 array per subset.

    subsets: a sequence of frame-index collections (``None`` = all frames); each frame is read
    and Fourier transformed once. dose_weighting: None, a :class:`DoseWeighting`, or an array
    (N, H, W//2+1) of weights (e.g. from :func:`dose_weights`). With a local model the local
    part is applied by bilinear interpolation after the global Fourier shift. ``on_host``: run
    the transforms in NumPy/SciPy (default: when JAX runs on the CPU) or in JAX.
    """
    n = frame_count(frames)
    shifts = np.asarray(alignment.shifts, np.float64)
    if shifts.shape != (n, 2):
        raise ValueError(f"alignment has {shifts.shape[0]} shifts for {n} frames")
    members = np.zeros((len(subsets), n), np.float32)
    for s, idx in enumerate(subsets):
        idx = range(n) if idx is None else idx
        for i in idx:
            if not -n <= int(i) < n:
                raise ValueError(f"frame index {i} out of range for {n} frames")
            members[s, int(i)] += 1.0
    used = np.flatnonzero(members.any(axis=0))
    if alignment.local is not None:
        from cryoden import align_local

        return align_local.sums(frames, alignment, members, used, dose_weighting)
    shape = get_frame(frames, int(used[0]) if used.size else 0).shape
    if on_host is None:
        on_host = jax.default_backend() == "cpu"
    weights = _weights_fn(dose_weighting, n, *shape, device=not on_host)
    coef, combine = sum_plan(members)
    accumulate = _host_accumulate if on_host else _device_accumulate
    acc = accumulate(frames, used, shifts, coef, weights, shape)
    images = _inverse(acc, shape, on_host)
    del acc
    return _combine(images, combine, shape)


def _dose_norm(ne2, doses):
    """``sqrt(N / sum_i exp(-2 D_i / Ne2))``: (H, W//2+1) float32 (one frame at a time)."""
    total = np.zeros(ne2.shape)
    for d in doses:
        total += np.exp(-2 * float(d) / ne2)
    return np.sqrt(len(doses) / total).astype(np.float32)


@jax.jit
def _dose_row(inv, dose, norm):
    """``exp(-dose * inv) * norm``: one frame's dose weights computed on the device."""
    return jnp.exp(-dose * inv) * norm


def _weights_fn(dose_weighting, n, h, w, device=None):
    """Frame index -> (H, W//2+1) float32 weights (NumPy; with ``device`` and a
    :class:`DoseWeighting`, computed by JAX on the device; ``device=None``: when JAX does not run
    on the CPU), or the scalar 1.0 without dose weighting."""
    if dose_weighting is None:
        one = np.float32(1.0)
        return lambda i: one
    if isinstance(dose_weighting, DoseWeighting):
        dw = dose_weighting
        doses = _doses(n, dw.dose_per_frame, dw.pre_exposure, dw.voltage)
        ne2 = _critical_exposure(h, w, dw.pixel_size)
        norm = _dose_norm(ne2, doses)
        inv = (1 / ne2).astype(np.float32)  # 0 at k = 0 (Ne2 = inf): weight = norm
        if device is None:
            device = jax.default_backend() != "cpu"
        if device:
            inv_d, norm_d = jnp.asarray(inv), jnp.asarray(norm)
            return lambda i: _dose_row(inv_d, np.float32(doses[i]), norm_d)

        def row(i):
            out = np.multiply(inv, np.float32(-doses[i]))
            np.exp(out, out=out)
            out *= norm
            return out

        return row
    arr = np.asarray(dose_weighting)
    if arr.shape != (n, h, w // 2 + 1):
        raise ValueError(f"dose weights have shape {arr.shape}, expected {(n, h, w // 2 + 1)}")
    return lambda i: np.asarray(arr[i], np.float32)


def aligned_sum(frames, alignment: Alignment, indices=None, dose_weighting=None) -> np.ndarray:
    """Aligned sum of the frames ``indices`` (None = all): (H, W) float32.

    The same shifts are used for any subset, so sums of disjoint subsets add up to the full sum.
    See :func:`aligned_sums` for ``dose_weighting``.
    """
    return aligned_sums(frames, alignment, [indices], dose_weighting)[0]
