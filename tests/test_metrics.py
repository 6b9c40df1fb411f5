"""Measures of cryoden.metrics against independent computations, known clean signals and
invariants; baselines; dose titration on simulated frames."""

import math

import numpy as np
import pytest

from cryoden import baselines, evaluation, filters, metrics, simulate
from cryoden.inference import Denoiser


@pytest.fixture(scope="module")
def halves():
    return simulate.micrograph_halves((192, 192), seed=3, snr_db=-10.0)


def paper_split_snr_db(d_even, d_odd, even, odd):
    """The paper's split SNR written out independently: np.corrcoef, 10 log10(p / (1 - p)) per
    direction, the two directions' dB averaged."""
    out = []
    for d, raw in ((d_odd, even), (d_even, odd)):
        p = np.corrcoef(d.astype(np.float64).ravel(), raw.astype(np.float64).ravel())[0, 1]
        out.append(10 * np.log10(p / (1 - p)))
    return float(np.mean(out))


@pytest.mark.parametrize("name", ["raw", "affine"])  # unet too: tests/test_evaluate.py
def test_split_snr_equals_the_papers_definition(halves, name):
    even, odd = halves["even"], halves["odd"]
    if name == "raw":
        d_even, d_odd = even, odd
    else:
        den = Denoiser(name)
        d_even, d_odd = den(even), den(odd)
    got = metrics.split_snr(d_even, d_odd, even, odd)["snr_db"]
    assert abs(got - paper_split_snr_db(d_even, d_odd, even, odd)) < 0.05
    if name == "raw":  # raw: CCC(even, odd) both ways, the per-half SNR (simulated at -10 dB)
        assert got == pytest.approx(metrics.snr_db(np.corrcoef(even.ravel(), odd.ravel())[0, 1]))
        assert abs(got - metrics.true_snr_db(even, halves["clean"])) < 0.3


def test_snr_db_edges():
    assert metrics.snr_db(0.5) == 0.0
    assert metrics.snr_db(0.0) == -math.inf and metrics.snr_db(-0.2) == -math.inf
    assert metrics.snr_db(1.0) == math.inf and math.isnan(metrics.snr_db(math.nan))


def full_fft_frc(a, b):
    """FRC over the full complex spectrum (np.fft.fftn), shells of width 1/n, independently."""
    n = min(a.shape)
    A, B = np.fft.fftn(a - a.mean()), np.fft.fftn(b - b.mean())
    r = np.sqrt(
        sum(g**2 for g in np.meshgrid(*[np.fft.fftfreq(s) for s in a.shape], indexing="ij"))
    )
    k = np.floor(r * n).astype(int)
    out = []
    for i in range(n // 2):
        m = k == i
        out.append(
            np.sum((A[m] * B[m].conj()).real)
            / np.sqrt(np.sum(abs(A[m]) ** 2) * np.sum(abs(B[m]) ** 2))
        )
    return np.array(out)


@pytest.mark.parametrize("shape", [(48, 64), (15, 20, 17)])
def test_frc_matches_the_full_spectrum(shape):
    rng = np.random.default_rng(0)
    a = rng.normal(size=shape)
    b = a + rng.normal(size=shape)
    freq, curve = metrics.frc(a, b)
    np.testing.assert_allclose(curve, full_fft_frc(a, b), atol=1e-5)
    assert freq.shape == curve.shape and freq[0] > 0 and freq[-1] < 0.5
    np.testing.assert_allclose(metrics.frc(a, a)[1], 1.0, atol=1e-6)
    assert metrics.shell_counts(shape).sum() == pytest.approx(
        np.sum(np.floor(np.sqrt(sum(g**2 for g in np.meshgrid(
            *[np.fft.fftfreq(s) for s in shape], indexing="ij"))) * min(shape)) < min(shape) // 2)
    )  # fmt: skip


def test_signal_correlation_estimates_the_true_one(halves):
    """FRC(d, raw other) / sqrt(FRC(even, odd)) ~ FRC(d, clean) where the raw FRC is significant."""
    even, odd, clean = halves["even"], halves["odd"], halves["clean"]
    d = filters.lowpass(odd, 4)
    _, raw = metrics.frc(even, odd)
    _, f_d = metrics.frc(d, even)
    est = metrics.signal_correlation(f_d, raw, metrics.shell_counts(even.shape))
    _, truth = metrics.frc(d, clean)
    ok = np.isfinite(est)
    assert ok.sum() >= 5
    assert np.mean(np.abs(est[ok] - truth[ok])) < 0.1
    # the low-pass removed everything above 1/8 cycles/px: the estimate shows it (over-smoothing)
    freq = metrics.frc(d, clean)[0]
    assert np.all(np.abs(np.nan_to_num(est[freq > 0.13])) < 1e-3)


def test_n2n_loss_is_the_error_to_the_signal_plus_a_constant(halves):
    even, odd, clean = halves["even"], halves["odd"], halves["clean"]
    noise_var = np.var(even - clean)
    for d_even, d_odd in ((even, odd), (filters.lowpass(even, 4), filters.lowpass(odd, 4))):
        loss = metrics.n2n_loss(d_even, d_odd, even, odd)
        mse = (np.mean((d_even - clean) ** 2) + np.mean((d_odd - clean) ** 2)) / 2
        assert loss == pytest.approx((mse + noise_var) / np.var(even), rel=0.03)


def test_seam_score_is_zero_for_exact_tiles_and_positive_for_seams(halves):
    even, odd = halves["even"], halves["odd"]
    den = Denoiser("affine")
    exact = evaluation.model_method("affine", den, patch_size=48)
    naive = evaluation.model_method("affine", den, patch_size=48, padding=0)
    cuts = exact.cuts(even.shape)
    assert cuts and all(cuts)  # tiled along both axes
    y = exact.run(even)
    np.testing.assert_allclose(y, den(even), atol=1e-4)  # exact tiling
    assert abs(metrics.seam_score(y, cuts)) < 0.05
    assert metrics.seam_score(naive.run(odd), naive.cuts(odd.shape)) > 0.2
    assert math.isnan(metrics.seam_score(y, [[], []]))


def test_region_snr_by_hand():
    img = np.zeros((20, 30))
    img[2:6, 3:7] = 5.0  # signal box: mean 5
    img[10:14, 3:7] = np.array([[1.0, -1.0] * 2, [-1.0, 1.0] * 2] * 2)  # background: mean 0, var 1
    pairs = [((3, 2, 4, 4), (3, 10, 4, 4))]
    assert metrics.region_snr(img, pairs) == pytest.approx(10 * (np.log10(25) - np.log10(1)))
    with pytest.raises(ValueError, match="outside"):
        metrics.region_snr(img, [((28, 2, 4, 4), (3, 10, 4, 4))])


def test_baselines_are_the_filters():
    x = np.random.default_rng(1).normal(size=(32, 40)).astype(np.float32)
    np.testing.assert_array_equal(baselines.apply("lowpass-4", x), filters.lowpass(x, 4))
    np.testing.assert_array_equal(baselines.apply("gaussian-2", x), filters.gaussian(x, 2))
    assert set(baselines.DEFAULT) >= {"lowpass-2", "lowpass-4", "lowpass-8", "lowpass-16"}
    for bad in ("lowpass", "lowpass-0", "median-3", "gaussian-x", "unet"):
        assert not baselines.is_baseline(bad)


def test_dose_titration_follows_the_dose():
    """Frames of equal dose: the first k of n frames of one half have SNR k/n of the whole half,
    so the raw score against the other full half follows the closed form."""
    rng = np.random.default_rng(0)
    n, shape, snr_half = 8, (96, 96), 10 ** (-0.5)  # -5 dB per half
    clean = simulate.micrograph_halves(shape, seed=5, snr_db=0)["clean"]
    sigma = 1 / np.sqrt(snr_half)
    frames = clean / n + rng.normal(size=(n, *shape)) * sigma / np.sqrt(n)
    other = clean + rng.normal(size=shape) * sigma
    methods = [evaluation.raw_method(), evaluation.baseline_method("lowpass-4")]
    rows = evaluation.dose_titration(
        evaluation.frame_partial_sum(frames), other, [1, 2, 4, 8], methods
    )
    raw = [r for r in rows if r["method"] == "raw"]
    for r in raw:
        s = snr_half * r["dose"] / n
        p = np.sqrt(s / (1 + s) * snr_half / (1 + snr_half))
        assert r["snr_db"] == pytest.approx(metrics.snr_db(p), abs=0.4)
    assert [r["dose"] for r in raw] == [1, 2, 4, 8]
    assert np.all(np.diff([r["snr_db"] for r in raw]) > 0)
    lp = [r["snr_db"] for r in rows if r["method"] == "lowpass-4"]
    assert all(a > b for a, b in zip(lp, [r["snr_db"] for r in raw], strict=True))
    with pytest.raises(ValueError, match="outside"):
        evaluation.frame_partial_sum(frames)(9)
