"""Synthetic ground truth: independent halves, clean signal present, requested SNR achieved."""

import time

import numpy as np
import pytest

from cryoden import simulate
from cryoden.train import data


def corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def split_snr_db(even, odd):
    """Split method (docs/snr.md) on the raw halves: SNR = p / (1 - p), p = CCC(even, odd)."""
    p = corr(even, odd)
    return 10 * np.log10(p / (1 - p))


CASES = [
    (simulate.micrograph_halves, dict(shape=(256, 320)), -10.0, "gaussian"),
    (simulate.micrograph_halves, dict(shape=(256, 320)), -12.0, "poisson"),
    (simulate.volume_halves, dict(shape=(32, 48, 40)), -10.0, "gaussian"),
    (simulate.volume_halves, dict(shape=(32, 48, 40)), -8.0, "poisson"),
]


@pytest.mark.parametrize(("make", "kw", "snr_db", "noise"), CASES)
def test_halves_independent_signal_present_snr_achieved(make, kw, snr_db, noise):
    d = make(**kw, seed=3, snr_db=snr_db, noise=noise)
    clean, even, odd = d["clean"], d["even"], d["odd"]
    assert clean.shape == even.shape == odd.shape == kw["shape"]
    assert all(a.dtype == np.float32 for a in d.values())
    n = clean.size
    # Noise realisations are independent of each other (correlation within 4 sigma of 0).
    assert abs(corr(even - clean, odd - clean)) < 4 / np.sqrt(n)
    # Per-half SNR as defined in the module docstring, and as the split method measures it.
    assert 10 * np.log10(clean.var() / (even - clean).var()) == pytest.approx(snr_db, abs=0.1)
    assert 10 * np.log10(clean.var() / (odd - clean).var()) == pytest.approx(snr_db, abs=0.1)
    assert split_snr_db(even, odd) == pytest.approx(snr_db, abs=0.4)
    # The clean signal is in each half: corr(half, clean) = sqrt(SNR / (1 + SNR)).
    snr = 10 ** (snr_db / 10)
    assert corr(even, clean) == pytest.approx(np.sqrt(snr / (1 + snr)), abs=0.03)


def test_clean_signal_is_structured():
    """Particles: the clean image is smooth (band-limited) and sparse-ish, not white noise."""
    c = simulate.micrograph_halves((256, 256), seed=1, ctf=False)["clean"]
    assert corr(c[:, 1:], c[:, :-1]) > 0.9  # neighbours strongly correlated
    assert np.mean(c > c.mean() + 2 * c.std()) > 0.005  # bright blobs
    assert np.abs(np.median(c) - c.mean()) > 0.1 * c.std()  # skewed by particles
    with_ctf = simulate.micrograph_halves((256, 256), seed=1)["clean"]
    assert abs(corr(with_ctf, c)) < 0.9  # the CTF-like filter changes the image


def test_membrane_in_volume():
    plain = simulate.volume_halves((24, 32, 32), seed=0, n_membranes=0, ctf=False)["clean"]
    vesicle = simulate.volume_halves((24, 32, 32), seed=0, n_membranes=1, ctf=False)["clean"]
    assert abs(corr(plain, vesicle)) < 0.95


def test_reproducible_and_seed_dependent():
    a = simulate.micrograph_halves((64, 64), seed=5)
    b = simulate.micrograph_halves((64, 64), seed=5)
    c = simulate.micrograph_halves((64, 64), seed=(5, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["clean"], c["clean"])


def test_micrograph_is_fast():
    simulate.micrograph_halves((512, 512), seed=0)
    best = min(_timed(simulate.micrograph_halves, (512, 512), seed=k) for k in range(3))
    assert best < 1.0


def _timed(f, *args, **kwargs):
    t = time.perf_counter()
    f(*args, **kwargs)
    return time.perf_counter() - t


def test_errors():
    with pytest.raises(ValueError, match="noise"):
        simulate.micrograph_halves((32, 32), noise="uniform")
    with pytest.raises(ValueError, match="dose"):
        simulate.micrograph_halves((64, 64), noise="poisson", dose=0.5, snr_db=0.0)
    with pytest.raises(ValueError, match="shape"):
        simulate.volume_halves((32, 32))


@pytest.mark.parametrize(("ndim", "shape"), [(2, (48, 64)), (3, (16, 24, 20))])
def test_write_halves_pairs_and_reads_back(tmp_path, ndim, shape):
    even_dir, odd_dir = simulate.write_halves(tmp_path, 2, shape, ndim, seed=4)
    pairs = data.find_pairs(even_dir, odd_dir)
    assert len(pairs) == 2
    ref = (simulate.micrograph_halves if ndim == 2 else simulate.volume_halves)(shape, seed=(4, 1))
    e, o = (data.open_half(p) for p in pairs[1])
    assert e.shape == shape
    np.testing.assert_array_equal(e, ref["even"])
    np.testing.assert_array_equal(o, ref["odd"])
    np.testing.assert_array_equal(
        data.open_half(tmp_path / "clean" / pairs[1][0].name), ref["clean"]
    )
