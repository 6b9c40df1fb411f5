"""Synthetic even/odd halves with a known clean signal, for tests and examples.

Model. A density of particle-like blobs (each particle a cluster of 3-8 Gaussians; in 3D
optionally vesicle membranes, bilayer shells), filtered by a CTF-like transfer function
``-(sqrt(1 - A^2) sin chi + A cos chi) * exp(-B k^2 / 4)`` with
``chi = pi lambda df k^2 - pi/2 Cs lambda^3 k^4`` (300 kV, k in 1/Å), is the clean signal. In 3D
the same radially symmetric filter is applied to the volume (a stand-in for a tomogram's
per-tilt CTF; no missing wedge). Each half is the clean signal plus an independent noise
realisation, so even and odd are independent given the clean signal:

* ``noise="gaussian"``: ``clean`` has zero mean and unit std; ``half = clean + N(0, sigma^2)``.
* ``noise="poisson"``: ``clean`` is the expected count per pixel of one half,
  ``dose / 2 * (1 + c * s)`` for a zero-mean, unit-std signal ``s`` (``dose`` is the total
  electrons per pixel of the exposure, each half receives half of it); ``half ~ Poisson(clean)``.

SNR (per half, see docs/snr.md): ``SNR = var(clean) / var(half - clean)``,
``SNR_dB = 10 log10 SNR``. ``sigma`` (Gaussian) or the contrast ``c`` (Poisson) is set from
``snr_db``. The split method recovers it: ``CCC(even, odd) = SNR / (1 + SNR)``. Raw cryo-EM
micrographs are about -10 to -12 dB.

All arrays are float32: micrographs ``(H, W)``, volumes ``(D, H, W)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

WAVELENGTH_300KV = 0.019687  # Å, relativistic electron wavelength at 300 kV
Seed = int | Sequence[int]


def _freq2(shape: Sequence[int]) -> np.ndarray:
    """Squared spatial frequency (cycles/pixel)^2 on the ``rfftn`` grid of ``shape``."""
    axes = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    return sum(g * g for g in grids)


def _fast_len(n: int) -> int:
    """Smallest 2-3-5-smooth integer >= n (fast FFT size)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _particles(shape, rng, n_particles, radius) -> np.ndarray:
    """``rfftn`` spectrum of ``n_particles`` clusters of Gaussian blobs (periodic), peak about 1."""
    ndim = len(shape)
    n_blobs = rng.integers(3, 9, size=n_particles)
    centre = rng.uniform(0, shape, size=(n_particles, ndim))
    r = rng.uniform(*radius, size=n_particles)
    owner = np.repeat(np.arange(n_particles), n_blobs)
    pos = centre[owner] + rng.normal(size=(owner.size, ndim)) * (r[owner, None] / 2.5)
    sigma = r[owner] / 3 * rng.uniform(0.7, 1.3, size=owner.size)
    weight = rng.uniform(0.5, 1.0, size=owner.size) * (2 * np.pi * sigma**2) ** (ndim / 2)
    # Blobs share a few widths: splat each width class as deltas, blur it in Fourier space.
    classes = np.geomspace(sigma.min(), sigma.max() + 1e-6, 6)
    cls = np.abs(np.log(sigma[:, None] / classes[None])).argmin(axis=1)
    idx = tuple(np.round(pos).astype(np.int64).T % np.array(shape)[:, None])
    f2 = _freq2(shape)
    spectrum = 0
    for c, s in enumerate(classes):
        deltas = np.zeros(shape, np.float32)
        np.add.at(deltas, tuple(i[cls == c] for i in idx), weight[cls == c])
        spectrum = spectrum + np.fft.rfftn(deltas) * np.exp(-2 * np.pi**2 * s**2 * f2)
    return spectrum


def _membranes(shape, rng, n) -> np.ndarray:
    """``n`` vesicles: bilayer shells (two Gaussian leaflets 4 px apart) of random radius."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    out = np.zeros(shape)
    for _ in range(n):
        centre = rng.uniform(0, shape)
        radius = rng.uniform(0.25, 0.45) * min(shape)
        d = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))) - radius
        out += 0.8 * (np.exp(-((d - 2) ** 2) / 2) + np.exp(-((d + 2) ** 2) / 2))
    return out


def ctf_filter(shape, *, pixel_size, defocus_um, bfactor, amplitude=0.07, cs_mm=2.7):
    """CTF-like transfer function on the ``rfftn`` grid of ``shape`` (see module docstring)."""
    k2 = _freq2(shape) / pixel_size**2
    lam = WAVELENGTH_300KV
    chi = np.pi * lam * defocus_um * 1e4 * k2 - np.pi / 2 * cs_mm * 1e7 * lam**3 * k2**2
    ctf = -(np.sqrt(1 - amplitude**2) * np.sin(chi) + amplitude * np.cos(chi))
    return ctf * np.exp(-bfactor * k2 / 4)


def _simulate(shape, rng, *, n_particles, radius, n_membranes, ctf, snr_db, noise, dose):
    """Density -> CTF -> standardised signal -> two independent noisy halves.

    Computed on a periodic grid padded to fast FFT sizes, then cropped to ``shape``. ``ctf``: the
    keyword arguments of :func:`ctf_filter`, or None for no filter.
    """
    grid = tuple(_fast_len(n) for n in shape)
    spectrum = _particles(grid, rng, n_particles, radius)
    if n_membranes:
        spectrum = spectrum + np.fft.rfftn(_membranes(grid, rng, n_membranes))
    if ctf is not None:
        spectrum = spectrum * ctf_filter(grid, **ctf)
    signal = np.fft.irfftn(spectrum, s=grid, axes=range(len(grid)))[
        tuple(slice(0, n) for n in shape)
    ]
    signal = (signal - signal.mean()) / signal.std()
    snr = 10.0 ** (snr_db / 10.0)
    if noise == "gaussian":
        clean = signal
        even, odd = (clean + rng.standard_normal(shape, np.float32) / snr**0.5 for _ in range(2))
    elif noise == "poisson":
        counts = dose / 2
        clean = counts * (1 + (snr / counts) ** 0.5 * signal)
        if clean.min() <= 0:
            raise ValueError(f"dose {dose} too low for SNR {snr_db} dB (negative expected counts)")
        even, odd = (rng.poisson(clean) for _ in range(2))
    else:
        raise ValueError(f"noise must be 'gaussian' or 'poisson', got {noise!r}")
    return {
        k: np.asarray(v, np.float32) for k, v in (("clean", clean), ("even", even), ("odd", odd))
    }


def _check_shape(shape, ndim, name) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != ndim or min(shape) < 1:
        raise ValueError(f"{name} shape must have {ndim} positive sizes, got {shape}")
    return shape


def micrograph_halves(
    shape: Sequence[int] = (512, 512),
    *,
    seed: Seed = 0,
    n_particles: int | None = None,
    radius: tuple[float, float] = (6.0, 16.0),
    snr_db: float = -10.0,
    noise: str = "gaussian",
    dose: float = 90.0,
    ctf: bool = True,
    pixel_size: float = 1.5,
    defocus_um: float = 1.5,
    bfactor: float = 60.0,
) -> dict[str, np.ndarray]:
    """Simulated micrograph halves: ``dict(clean, even, odd)``, each ``(H, W)`` float32.

    n_particles: default one per 3000 pixels; radius: particle radius range in pixels; snr_db,
    noise, dose: see the module docstring (default dose: 40 e/Å^2 at 1.5 Å/px); ctf: apply the
    CTF-like filter (pixel size in Å, defocus in µm, B-factor in Å^2). ``seed``: an int or a
    sequence of ints.
    """
    shape = _check_shape(shape, 2, "micrograph")
    n = max(1, round(np.prod(shape) / 3000)) if n_particles is None else n_particles
    c = dict(pixel_size=pixel_size, defocus_um=defocus_um, bfactor=bfactor) if ctf else None
    return _simulate(
        shape, np.random.default_rng(seed), n_particles=n, radius=radius, n_membranes=0,
        ctf=c, snr_db=snr_db, noise=noise, dose=dose,
    )  # fmt: skip


def volume_halves(
    shape: Sequence[int] = (64, 96, 96),
    *,
    seed: Seed = 0,
    n_particles: int | None = None,
    radius: tuple[float, float] = (3.0, 8.0),
    n_membranes: int = 1,
    snr_db: float = -10.0,
    noise: str = "gaussian",
    dose: float = 1000.0,
    ctf: bool = True,
    pixel_size: float = 10.0,
    defocus_um: float = 4.0,
    bfactor: float = 400.0,
) -> dict[str, np.ndarray]:
    """Simulated half tomograms: ``dict(clean, even, odd)``, each ``(D, H, W)`` float32.

    Like :func:`micrograph_halves` (default one particle per 20000 voxels), plus
    ``n_membranes`` vesicle bilayers. The default ``dose`` (for ``noise="poisson"``) is the
    effective count per voxel of a reconstructed tomogram, summed over the tilt series.
    """
    shape = _check_shape(shape, 3, "volume")
    n = max(1, round(np.prod(shape) / 20000)) if n_particles is None else n_particles
    c = dict(pixel_size=pixel_size, defocus_um=defocus_um, bfactor=bfactor) if ctf else None
    return _simulate(
        shape, np.random.default_rng(seed), n_particles=n, radius=radius,
        n_membranes=n_membranes, ctf=c, snr_db=snr_db, noise=noise, dose=dose,
    )  # fmt: skip


def write_halves(
    dirpath: str | os.PathLike, n: int, shape: Sequence[int], ndim: int, seed: int, **kwargs
) -> tuple[Path, Path]:
    """Write ``n`` simulated pairs as float32 MRC files; returns ``(even_dir, odd_dir)``.

    Files: ``dirpath/{even,odd,clean}/{mic,tomo}_{k:03d}.mrc`` (same basename in each folder;
    ``clean`` holds the truth). Pair ``k`` uses seed ``(seed, k)``; ``kwargs`` go to
    :func:`micrograph_halves` (``ndim=2``) or :func:`volume_halves` (``ndim=3``).
    """
    import mrcfile

    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    make, stem = (micrograph_halves, "mic") if ndim == 2 else (volume_halves, "tomo")
    dirs = {name: Path(dirpath) / name for name in ("even", "odd", "clean")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        halves = make(shape, seed=(seed, k), **kwargs)
        for name, d in dirs.items():
            with mrcfile.new(d / f"{stem}_{k:03d}.mrc", halves[name], overwrite=True) as m:
                if ndim == 3:
                    m.set_volume()
    return dirs["even"], dirs["odd"]
