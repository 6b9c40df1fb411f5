"""Simulated counting-mode movies with known drift, clean signal and detector gain.

Model. The signal ``s`` (zero mean, unit std; particles filtered by a CTF-like transfer function,
the model of :mod:`cryoden.simulate`) lives on a periodic grid ``margin`` pixels larger than the
frame on every side. During frame ``i`` the specimen has moved by ``d_i`` pixels (smooth
beam-induced drift: an exponentially decaying jump plus a slow quadratic creep, path length about
``drift`` pixels), optionally plus a spatially varying part ``local * t_i * r(x, y)`` (a rotation
about the frame centre, ``r`` up to 1 at the corners, ``t_i`` from 0 to 1). The expected count of
frame ``i`` is ``lam_i(x) = dose_per_frame * (1 + c * s(x - d_i(x)))``, and the detector records
``Poisson(g(x) * lam_i(x))`` with a fixed per-pixel sensitivity ``g`` (mean 1, std
``gain_sigma``). The contrast ``c`` sets the SNR of the whole exposure's sum,
``SNR = N dose c^2`` (``snr_db``).

Returned truth (RELION conventions, see :mod:`cryoden.align`): ``shifts`` (N, 2) ``(x, y)`` applied
to frames to align them, relative to frame 0 (``-(d_i - d_0)``); ``clean`` (H, W) the expected
count of one frame at frame 0's position, without gain; ``gain`` (H, W) the gain *reference*
``1 / g`` (multiply raw frames by it). Frames are generated on demand (deterministic per seed and
frame), raw counts as uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryoden import simulate


@dataclass(frozen=True)
class SimulatedMovie:
    """A simulated movie; ``frame(i)`` -> raw counts (H, W) uint8, ``len()`` frames."""

    clean: np.ndarray  # (H, W) float32 expected counts per frame at frame 0's position
    shifts: np.ndarray  # (N, 2) float64 true shifts (x, y), RELION convention, shifts[0] = 0
    gain: np.ndarray  # (H, W) float32 gain reference (multiply raw frames by it)
    drift: np.ndarray  # (N, 2) float64 global specimen displacement d_i (pixels)
    dose_per_frame: float
    pixel_size: float
    local: float
    seed: int
    contrast: float
    _spectrum: np.ndarray  # rfft2 of the standardised signal on the periodic grid
    _grid: tuple[int, int]
    _margin: int

    def __len__(self) -> int:
        return self.shifts.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.clean.shape

    def expected(self, i: int) -> np.ndarray:
        """Expected counts of frame ``i`` without gain: (H, W) float32."""
        return self.dose_per_frame * np.maximum(1 + self.contrast * self._signal(i), 0)

    def frame(self, i: int) -> np.ndarray:
        """Raw counts of frame ``i``: (H, W) uint8."""
        rng = np.random.default_rng((self.seed, 1, i))
        counts = rng.poisson(self.expected(i) / self.gain)
        return np.minimum(counts, 255).astype(np.uint8)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.frame(i)

    @property
    def frames(self) -> np.ndarray:
        """All raw frames: (N, H, W) uint8."""
        return np.stack([self.frame(i) for i in range(len(self))])

    def corrected(self, i: int) -> np.ndarray:
        """Gain-corrected frame ``i`` (what a movie reader delivers): (H, W) float32."""
        return self.frame(i).astype(np.float32) * self.gain

    def _signal(self, i: int) -> np.ndarray:
        """Standardised signal as seen in frame ``i``: (H, W) float32."""
        gh, gw = self._grid
        m = self._margin
        h, w = self.shape
        dx, dy = self.drift[i]
        ky = np.fft.fftfreq(gh)[:, None]
        kx = np.fft.rfftfreq(gw)[None, :]
        ramp = np.exp(-2j * np.pi * (kx * dx + ky * dy))
        s = np.fft.irfft2(self._spectrum * ramp, s=self._grid)
        if self.local:
            s = _warp(s, self._local_field(i), m, (h, w))
        else:
            s = s[m : m + h, m : m + w]
        return s.astype(np.float32)

    def _local_field(self, i: int) -> np.ndarray:
        """Spatially varying displacement of frame ``i``: (2, H, W) (x, y) pixels."""
        return local_displacement(self.shape, self.local, i, len(self))


def local_displacement(shape, amplitude: float, i: int, n: int) -> np.ndarray:
    """Rotation-like displacement field ``amplitude * t_i * r(x, y)``: (2, H, W) float64 (x, y)."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = (x - (w - 1) / 2) / (w / 2), (y - (h - 1) / 2) / (h / 2)
    t = i / max(n - 1, 1)
    return amplitude * t * np.stack([-v, u]) / np.sqrt(2)


def _warp(periodic, field, margin, shape):
    """Sample the periodic image at ``x - field`` for the frame region: (H, W) float64."""
    from scipy import ndimage

    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    coords = np.stack([y + margin - field[1], x + margin - field[0]])
    return ndimage.map_coordinates(periodic, coords, order=3, mode="grid-wrap")


def trajectory(n_frames: int, drift: float, rng) -> np.ndarray:
    """Smooth beam-induced drift: (N, 2) displacements in pixels, path length about ``drift``."""
    t = np.arange(n_frames) / max(n_frames - 1, 1)
    theta = rng.uniform(0, 2 * np.pi)
    tau = 0.25
    jump = (1 - np.exp(-t / tau)) / (1 - np.exp(-1 / tau))
    main = np.array([np.cos(theta), np.sin(theta)])
    side = np.array([np.cos(theta + 1.2), np.sin(theta + 1.2)])
    return drift * (0.75 * jump[:, None] * main + 0.35 * (t * t)[:, None] * side)


def simulate_movie(
    shape=(256, 256),
    n_frames: int = 16,
    *,
    seed: int = 0,
    dose_per_frame: float = 1.5,
    drift: float = 15.0,
    local: float = 0.0,
    gain_sigma: float = 0.1,
    snr_db: float = -6.0,
    pixel_size: float = 1.5,
    defocus_um: float = 1.5,
    bfactor: float = 60.0,
    margin: int = 32,
) -> SimulatedMovie:
    """Simulate a movie of ``n_frames`` frames of ``shape`` (H, W); see the module docstring.

    drift: path length of the global drift (pixels); local: amplitude of the spatially varying
    part (pixels at the corners, reached in the last frame); snr_db: SNR of the full sum;
    margin: of the periodic grid beyond the frame (the same seed and margin give the same signal
    whatever the drift).
    """
    h, w = (int(s) for s in shape)
    rng = np.random.default_rng((seed, 0))
    d = trajectory(n_frames, drift, rng)
    if drift + local > margin - 4:
        raise ValueError(f"drift {drift} + local {local} needs margin > {drift + local + 4}")
    grid = (simulate._fast_len(h + 2 * margin), simulate._fast_len(w + 2 * margin))
    n_particles = max(1, round(grid[0] * grid[1] / 3000))
    spectrum = simulate._particles(grid, rng, n_particles, (6.0, 16.0))
    spectrum = spectrum * simulate.ctf_filter(
        grid, pixel_size=pixel_size, defocus_um=defocus_um, bfactor=bfactor
    )
    signal = np.fft.irfft2(spectrum, s=grid)
    spectrum[0, 0] = 0
    spectrum = (spectrum / signal.std()).astype(np.complex64)
    contrast = float(np.sqrt(10 ** (snr_db / 10) / (n_frames * dose_per_frame)))
    g = np.clip(1 + gain_sigma * rng.standard_normal((h, w)), 0.5, 1.5)
    movie = SimulatedMovie(
        clean=np.zeros((h, w), np.float32), shifts=-(d - d[0]), gain=(1 / g).astype(np.float32),
        drift=d, dose_per_frame=float(dose_per_frame), pixel_size=float(pixel_size),
        local=float(local), seed=int(seed), contrast=contrast, _spectrum=spectrum, _grid=grid,
        _margin=margin,
    )  # fmt: skip
    clean = movie.expected(0)
    movie.clean[...] = clean
    return movie
