"""Motion correction: shifts against simulated truth, aligned sums, dose weights, STAR files."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import new_mrc

from cryoden import align, motionstar
from cryoden.movie import open_movie
from cryoden.simulate_movie import local_displacement, simulate_movie

SHAPE, N, DOSE = (256, 256), 20, 2.0


def rms(err: np.ndarray) -> float:
    """Root mean square length of (N, 2) vectors."""
    return float(np.sqrt((np.asarray(err) ** 2).sum(axis=1).mean()))


def band_snr_db(total: np.ndarray, clean: np.ndarray, n: int, crop=24, kmax=0.25) -> float:
    """SNR of ``total / n`` against ``clean``, both low-passed to ``kmax`` cycles/pixel, borders
    (where the periodic shifts wrap) cropped: ``10 log10(var(clean) / var(estimate - clean))``."""

    def lowpass(x):
        ky = np.fft.fftfreq(x.shape[0])[:, None]
        kx = np.fft.rfftfreq(x.shape[1])[None]
        out = np.fft.irfft2(np.fft.rfft2(x) * (kx**2 + ky**2 <= kmax**2), s=x.shape)
        return out[crop:-crop, crop:-crop]

    c, e = lowpass(clean), lowpass(total / n)
    return float(10 * np.log10(c.var() / (e - c).var()))


@pytest.fixture(scope="module")
def drifting(tmp_path_factory):
    """A simulated drifting movie stored as an int8 MRC stack with a gain reference, aligned
    through :func:`cryoden.movie.open_movie` (frames read from disk, gain applied by the reader)."""
    movie = simulate_movie(SHAPE, N, seed=5, dose_per_frame=DOSE, drift=16.0)
    folder = tmp_path_factory.mktemp("movie")
    new_mrc(folder / "movie.mrcs", movie.frames.astype(np.int8))
    new_mrc(folder / "gain.mrc", movie.gain)
    with open_movie(folder / "movie.mrcs", gain=folder / "gain.mrc") as m:
        a = align.estimate_shifts(m, pixel_size=movie.pixel_size)
        frames = [m.frame(i) for i in range(N)]
    np.testing.assert_allclose(frames[3], movie.corrected(3), rtol=1e-6)
    return movie, frames, a


def test_shifts_match_truth(drifting):
    movie, _, a = drifting
    assert a.shifts.shape == (N, 2) and a.shifts.dtype == np.float64
    assert np.all(a.shifts[0] == 0)
    assert np.ptp(movie.shifts, axis=0).max() > 10  # the movie really drifts
    print("rms shift error", rms(a.shifts - movie.shifts))
    assert rms(a.shifts - movie.shifts) <= 0.5


def test_grouped_frames_follow_the_trajectory(drifting):
    """group=2 correlates pairs of frames; frame 0 (before the first centre) extrapolated."""
    movie, frames, _ = drifting
    a = align.estimate_shifts(frames, group=2)
    assert np.all(a.shifts[0] == 0)
    assert rms(a.shifts - movie.shifts) <= 0.6


def test_aligned_sum_reaches_drift_free_snr(drifting):
    movie, frames, a = drifting
    still = simulate_movie(SHAPE, N, seed=5, dose_per_frame=DOSE, drift=0.0)
    assert np.array_equal(still.clean, movie.clean)  # same signal, same dose, no drift
    still_frames = [still.corrected(i) for i in range(N)]
    reference = band_snr_db(
        align.aligned_sum(still_frames, align.Alignment(np.zeros((N, 2)))), still.clean, N
    )
    ours = band_snr_db(align.aligned_sum(frames, a), movie.clean, N)
    unaligned = band_snr_db(np.sum(frames, axis=0), movie.clean, N)
    print(f"band SNR: drift-free {reference:.2f} dB, aligned {ours:.2f}, raw {unaligned:.2f}")
    assert unaligned < reference - 3  # drift matters
    assert ours >= reference - 0.35


def test_even_plus_odd_equals_full(drifting):
    _, frames, a = drifting
    for dose in (None, align.DoseWeighting(pixel_size=1.5, dose_per_frame=1.0)):
        halves = [None, range(0, N, 2), range(1, N, 2)]
        full, even, odd = align.aligned_sums(frames, a, halves, dose)
        scale = np.abs(full).max()
        np.testing.assert_allclose(even + odd, full, atol=1e-5 * scale)
        np.testing.assert_allclose(align.aligned_sum(frames, a, range(1, N, 2), dose), odd,
                                   atol=1e-6 * scale)  # fmt: skip


def test_relion_sign_convention():
    """Frame content moved by +d (np.roll) gets shift -d; the aligned sum undoes the motion."""
    base = simulate_movie(SHAPE, 1, seed=2, drift=0.0, snr_db=20).expected(0)
    moves = [(k, -k) for k in range(N)]  # (dx, dy) pixels: a linear (smooth) drift
    frames = [np.roll(base, (dy, dx), axis=(0, 1)) for dx, dy in moves]
    a = align.estimate_shifts(frames)
    np.testing.assert_allclose(a.shifts, -np.array(moves, float), atol=0.05)
    exact = align.Alignment(-np.array(moves, float))
    total = align.aligned_sum(frames, exact)
    np.testing.assert_allclose(total, N * base, atol=1e-3 * N * base.max())


def test_dose_weights_follow_relion():
    n, shape, ps, dose = 12, (64, 48), 1.2, 1.5
    w = align.dose_weights(n, shape, ps, dose, pre_exposure=2.0)
    assert w.shape == (n, 64, 25) and w.dtype == np.float32
    np.testing.assert_allclose((w.astype(np.float64) ** 2).sum(axis=0), n, rtol=1e-5)
    np.testing.assert_allclose(w[:, 0, 0], 1.0, rtol=1e-6)  # the mean is not weighted
    # RELION's formula at one frequency: exp(-D_i / (2 (0.245 k^-1.665 + 2.81))), D_i at frame end.
    k = np.hypot(5 / 64, 7 / 48) / ps
    raw = np.exp(-(2.0 + dose * np.arange(1, n + 1)) / (2 * (0.245 * k**-1.665 + 2.81)))
    np.testing.assert_allclose(w[:, 5, 7], raw * np.sqrt(n / (raw**2).sum()), rtol=1e-4)
    assert np.all(np.diff(w[:, 20, 20]) < 0)  # later frames count less at high resolution
    w200 = align.dose_weights(n, shape, ps, dose, voltage=200)
    assert w200[-1, 20, 20] < w[-1, 20, 20]
    with pytest.raises(ValueError, match="kV"):
        align.dose_weights(n, shape, ps, dose, voltage=120)


def test_motion_star_round_trip(tmp_path):
    shifts = np.array([[0.0, 0.0], [1.25, -0.5], [2.125, -1.0]])
    path = tmp_path / "movie.star"
    motionstar.write(
        path, shifts, movie_name="movies/m.tif", shape=(4092, 5760), n_frames=3,
        gain_name="gain.mrc", pixel_size=0.83, dose_per_frame=1.2, voltage=300,
    )  # fmt: skip
    back = motionstar.read(path)
    np.testing.assert_allclose(back.shifts, shifts, atol=1e-6)
    assert back.frame_numbers.tolist() == [1, 2, 3]
    g = back.general
    assert (g["rlnImageSizeX"], g["rlnImageSizeY"], g["rlnImageSizeZ"]) == (5760, 4092, 3)
    assert g["rlnMicrographMovieName"] == "movies/m.tif"
    assert g["rlnMicrographGainName"] == "gain.mrc"
    assert g["rlnMicrographOriginalPixelSize"] == pytest.approx(0.83)
    assert g["rlnMicrographStartFrame"] == 1 and g["rlnMotionModelVersion"] == 0
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, no temporary left
    np.testing.assert_allclose(back.alignment().shifts, shifts, atol=1e-6)


RELION_STAR = """
# version 30001

data_general

_rlnImageSizeX                                     4096
_rlnImageSizeY                                     4096
_rlnImageSizeZ                                        4
_rlnMicrographMovieName                    Movies/20170629_00021_frameImage.tiff
_rlnMicrographGainName                     Movies/gain.mrc
_rlnMicrographBinning                          1.000000
_rlnMicrographOriginalPixelSize                0.885000
_rlnMicrographDoseRate                         1.277000
_rlnMicrographPreExposure                      0.000000
_rlnVoltage                                  300.000000
_rlnMicrographStartFrame                              1
_rlnMotionModelVersion                                1


# version 30001

data_global_shift

loop_
_rlnMicrographFrameNumber #1
_rlnMicrographShiftX #2
_rlnMicrographShiftY #3
           1     0.000000     0.000000
           2    -1.351000     0.824000
           3    -2.417000     1.502000
           4    -3.180000     2.090000


# version 30001

data_local_motion_model

loop_
_rlnMotionModelCoeffsIdx #1
_rlnMotionModelCoeff #2
           0     1.040508
           1    -3.279160
          18     0.381520
"""


def test_reads_relion_motion_star(tmp_path):
    path = tmp_path / "20170629_00021_frameImage.star"
    path.write_text(RELION_STAR)
    star = motionstar.read(path)
    expected = [[0, 0], [-1.351, 0.824], [-2.417, 1.502], [-3.18, 2.09]]
    np.testing.assert_allclose(star.shifts, expected)
    assert star.general["rlnMicrographOriginalPixelSize"] == pytest.approx(0.885)
    assert star.alignment().local is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("data_general\n\n_rlnImageSizeX 10\n", "no data_global_shift"),
        ("data_global_shift\n\nloop_\n_rlnMicrographFrameNumber #1\n_rlnMicrographShiftX #2\n"
         "1 0.0\n", "lacks rlnMicrographShiftY"),
        ("data_global_shift\n\nloop_\n_rlnMicrographFrameNumber #1\n_rlnMicrographShiftX #2\n"
         "_rlnMicrographShiftY #3\n1 0 0\n3 1 1\n", "not consecutive"),
    ],
)  # fmt: skip
def test_bad_motion_star_one_line_error(tmp_path, text, problem):
    path = tmp_path / "bad.star"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem) as e:
        motionstar.read(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_local_patches_reduce_error_of_spatially_varying_drift():
    n, size = N, SHAPE[0]
    movie = simulate_movie((size, size), n, seed=4, dose_per_frame=DOSE, drift=12.0, local=8.0)
    frames = [movie.corrected(i) for i in range(n)]
    local = align.estimate_shifts(frames, patches=(2, 2))
    assert local.local is not None
    ys, xs = np.mgrid[16:size:32, 16:size:32]

    def field_error(a):
        """rms over a pixel grid and all frames of the total shift against the truth."""
        err = []
        for i in range(n):
            true = movie.shifts[i][:, None, None] - local_displacement((size, size), 8.0, i, n)
            est = a.shifts[i][:, None, None] + (
                0 if a.local is None else np.moveaxis(a.local.at(xs, ys, i), -1, 0)
            )
            err.append(((est - true[:, ys, xs]) ** 2).sum(axis=0))
        return float(np.sqrt(np.mean(err)))

    global_only = field_error(align.Alignment(local.shifts))
    with_patches = field_error(local)
    print(f"shift field error: global only {global_only:.2f} px, with patches {with_patches:.2f}")
    assert global_only > 2.0  # the drift really varies across the frame
    assert with_patches < 0.5 * global_only
    full, even, odd = align.aligned_sums(frames, local, [None, range(0, n, 2), range(1, n, 2)])
    np.testing.assert_allclose(even + odd, full, atol=1e-5 * np.abs(full).max())
    assert (
        np.corrcoef(full.ravel(), movie.clean.ravel())[0, 1]
        > np.corrcoef(np.sum(frames, axis=0).ravel(), movie.clean.ravel())[0, 1]
    )  # the locally aligned sum resembles the signal more than the raw sum


def reference_sum(frames, shifts, indices, weights=None) -> np.ndarray:
    """Float64 NumPy aligned sum by the definition: ``sum_i irfft2(F_i(k) w_i(k) exp(-2 pi i
    (kx sx_i + ky sy_i)))`` over ``indices`` (a frame listed twice counts twice)."""
    h, w = frames[0].shape
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    total = np.zeros((h, w // 2 + 1), complex)
    for i in indices:
        ramp = np.exp(-2j * np.pi * (kx * shifts[i][0] + ky * shifts[i][1]))
        total += (
            np.fft.rfft2(np.asarray(frames[i], np.float64))
            * ramp
            * (1 if weights is None else weights[i])
        )
    return np.fft.irfft2(total, s=(h, w))


@pytest.mark.parametrize(
    "subsets",
    [
        [None, range(0, 9, 2), range(1, 9, 2)],  # a partition: two atoms for three sums
        [None, range(0, 9, 3)],  # not a partition: atoms {0, 3, 6} and the rest
        [[0, 1, 2], [0, 1], [0], [5, 5, 6]],  # nested prefixes, and a frame listed twice
        [[0, 1], [1, 2], [2, 3], [0, 3]],  # more atoms than sums: accumulated per sum
        [[], [4]],  # an empty subset sums to zero
    ],
)
def test_sum_plan_reproduces_membership(subsets):
    n = 9
    members = np.zeros((len(subsets), n), np.float32)
    for s, idx in enumerate(subsets):
        for i in range(n) if idx is None else idx:
            members[s, i] += 1
    coef, combine = align.sum_plan(members)
    np.testing.assert_array_equal(combine @ coef, members)
    assert coef.shape[0] <= len(subsets)
    assert np.all((coef > 0).sum(axis=0) <= 1) or np.array_equal(combine, np.eye(len(subsets)))


@pytest.mark.parametrize("dose", [False, True])
@pytest.mark.parametrize(
    "subsets",
    [
        [None, range(0, 9, 2), range(1, 9, 2)],
        [None, range(0, 9, 3)],
        [[0, 1, 2], [0, 1], [0], [5, 5, 6]],
        [[0, 1], [1, 2], [2, 3], [0, 3]],
    ],
)
def test_aligned_sums_match_the_definition(subsets, dose):
    """Every sum (accumulated as atoms or per subset, host or device path) equals a float64
    NumPy sum of the Fourier-shifted frames, with and without dose weighting."""
    n, shape = 9, (48, 40)
    rng = np.random.default_rng(3)
    frames = [rng.poisson(2.0, shape).astype(np.float32) for _ in range(n)]
    shifts = np.concatenate([[[0.0, 0.0]], rng.uniform(-6, 6, (n - 1, 2))])
    dw = align.DoseWeighting(pixel_size=1.1, dose_per_frame=1.3) if dose else None
    weights = align.dose_weights(n, shape, 1.1, 1.3) if dose else None
    for on_host in (True, False):
        got = align.aligned_sums(frames, align.Alignment(shifts), subsets, dw, on_host=on_host)
        for idx, image in zip(subsets, got, strict=True):
            ref = reference_sum(frames, shifts, range(n) if idx is None else idx, weights)
            assert image.shape == shape and image.dtype == np.float32
            np.testing.assert_allclose(image, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_aligned_sums_partition_adds_up_exactly():
    """full = even + odd bit for bit: the full sum is formed from the two half sums."""
    rng = np.random.default_rng(4)
    frames = [rng.poisson(2.0, (64, 64)).astype(np.float32) for _ in range(7)]
    a = align.Alignment(np.concatenate([[[0, 0]], rng.uniform(-3, 3, (6, 2))]))
    full, even, odd = align.aligned_sums(frames, a, [None, range(0, 7, 2), range(1, 7, 2)])
    np.testing.assert_array_equal(even + odd, full)


def test_aligned_sums_do_not_depend_on_threads(monkeypatch):
    """Frames are transformed in worker threads but added in frame order: identical results for
    any number of threads; a bad frame in a worker is reported as the error of that frame."""
    rng = np.random.default_rng(5)
    frames = [rng.poisson(2.0, (64, 48)).astype(np.float32) for _ in range(6)]
    a = align.Alignment(np.concatenate([[[0, 0]], rng.uniform(-3, 3, (5, 2))]))
    results = []
    for k in (1, 2, 3):
        monkeypatch.setattr(align, "threads", lambda *_, k=k: k)
        results.append(
            align.aligned_sums(frames, a, [None, [0, 2, 4]]) + [align.read_binned(frames, 2)]
        )
    for other in results[1:]:
        for x, y in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(x, y)
    monkeypatch.undo()
    assert align.threads(2**40) == 1  # frames too large for several in memory: one thread
    frames[4] = frames[4][:32]
    with pytest.raises(ValueError, match="frame 4 has shape"):
        align.aligned_sums(frames, a, [None])


def test_alignment_compiles_few_kernels():
    """Start-up cost: aligning a movie of a new size compiles one kernel per kind (spectra, one
    for plain and windowed iterations), no per-operation kernels; the sums compile nothing on
    the CPU (NumPy/SciPy path)."""
    import jax

    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    movie = simulate_movie((520, 528), 7, seed=1, dose_per_frame=2.0, drift=10.0)
    frames = [movie.corrected(i) for i in range(7)]
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        a = align.estimate_shifts(frames)
        assert len(compiled) <= 3, compiled
        compiled.clear()
        align.aligned_sums(frames, a, [None, range(0, 7, 2)])
        if jax.default_backend() == "cpu":
            assert compiled == []
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert rms(a.shifts - movie.shifts) <= 0.5


def test_bin_frame_is_the_block_mean():
    """Block mean over b x b pixels, ragged edges cropped, against a float64 reference."""
    frame = np.random.default_rng(6).normal(5, 2, (67, 45)).astype(np.float32)
    for b in (1, 2, 3, 8):
        h, w = 67 // b, 45 // b
        ref = frame[: h * b, : w * b].astype(np.float64).reshape(h, b, w, b).mean(axis=(1, 3))
        got = align.bin_frame(frame, b)
        assert got.shape == (h, w) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-6)
