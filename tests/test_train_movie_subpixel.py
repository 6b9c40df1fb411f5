"""Training halves from movies: subpixel shifts as ``cryoden movies`` applies them, defects."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from cryoden import align, halfsums
from cryoden.movie import open_movie
from cryoden.train import config as C
from cryoden.train import moviedata
from tests.conftest import new_mrc


def _band_limited(shape, seed, sigma=0.15):
    """Periodic Gaussian-filtered white noise ``(H, W)`` float64, unit std (``sigma``: the
    filter's width in cycles per pixel: a micrograph's signal, not its shot noise)."""
    rng = np.random.default_rng(seed)
    f = np.fft.rfft2(rng.normal(size=shape))
    k2 = np.fft.fftfreq(shape[0])[:, None] ** 2 + np.fft.rfftfreq(shape[1])[None, :] ** 2
    img = np.fft.irfft2(f * np.exp(-k2 / (2 * sigma**2)), s=shape)
    return img / img.std()


def _moved(img, shift):
    """``img`` as a frame whose alignment shift is ``shift`` (x, y): exactly (periodically)
    what :func:`cryoden.align.aligned_sum` moves back."""
    h, w = img.shape
    ramp = np.exp(
        2j
        * np.pi
        * (np.fft.rfftfreq(w)[None, :] * shift[0] + np.fft.fftfreq(h)[:, None] * shift[1])
    )
    return np.fft.irfft2(np.fft.rfft2(img) * ramp, s=(h, w))


def test_window_sum_applies_subpixel_shifts_as_aligned_sum():
    """Crops of a half sum equal the same region of ``align.aligned_sum`` (whole-frame Fourier
    shifts) to 1% of the signal's std; the whole-pixel sum used before misses that by far."""
    size, n = 96, 7
    base = _band_limited((size, size), 0)
    rng = np.random.default_rng(1)
    shifts = np.cumsum(rng.uniform(-1.6, 1.6, (n, 2)), axis=0)
    shifts -= shifts[0]
    assert np.abs(shifts - np.rint(shifts)).max() > 0.3  # non-integer shifts
    frames = np.stack([_moved(base, s) for s in shifts]).astype(np.float32)
    gain = rng.uniform(0.9, 1.1, (size, size)).astype(np.float32)
    raw = frames / gain  # the gain reference restores the frames
    half = [0, 2, 3, 6]
    ref = align.aligned_sum(list(frames), align.Alignment(shifts), indices=half)
    np.testing.assert_allclose(ref, len(half) * base, atol=0.01)  # the true aligned sum
    scale = ref.std()
    for origin, crop in [((20, 24), 40), ((30, 14), (24, 50))]:
        y, x = origin
        h, w = (crop, crop) if np.ndim(crop) == 0 else crop
        want = ref[y : y + h, x : x + w]
        got = halfsums.window_sum(raw, half, -shifts, origin, crop, gain)
        assert got.shape == (h, w)
        err = got - want
        assert np.sqrt(np.mean(err**2)) < 0.01 * scale and np.abs(err).max() < 0.03 * scale
        whole = halfsums.window_sum(raw, half, -np.rint(shifts), origin, crop, gain)
        assert np.sqrt(np.mean((whole - want) ** 2)) > 0.05 * scale  # misregistered by < 0.5 px
    edge = halfsums.window_sum(raw, half, -shifts, (6, 5), 80, gain)  # margins mirrored
    assert edge.shape == (80, 80) and np.isfinite(edge).all()
    with pytest.raises(ValueError, match="outside"):
        halfsums.window_sum(raw, half, -shifts, (0, 0), 80, gain)  # frames moved out of it


def test_window_sum_fills_defects_as_the_whole_frame():
    """Defect-filled windows equal the windows of whole frames filled by ``DefectFill``, also
    for a defect block several layers deep and a window that cuts through it."""
    from cryoden.gain import DefectFill

    rng = np.random.default_rng(2)
    frames = rng.poisson(4.0, (4, 64, 64)).astype(np.float32)
    mask = np.zeros((64, 64), bool)
    mask[:, 30] = True  # a hot column
    mask[10:17, 40:47] = True  # a 7x7 block: four layers
    frames[:, mask] = 255
    fill = DefectFill(mask)
    filled = frames.copy()
    for f in filled:
        fill.apply(f)
    shifts = np.array([[0, 0], [1.3, -0.4], [2.6, -0.7], [3.2, -1.5]])
    for origin in [(4, 22), (12, 8)]:
        got = halfsums.window_sum(frames, [1, 2, 3], -shifts, origin, 32, defects=mask)
        want = halfsums.window_sum(filled, [1, 2, 3], -shifts, origin, 32)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        assert got.max() < 3 * 255 * 0.5  # no hot pixel left


# ----------------------------------------------------------------------------- --defects


@pytest.fixture(scope="module")
def hot_movie(tmp_path_factory):
    """An MRC movie of 6 frames 64x64 whose column 21 is hot, and a defect list naming it."""
    root = tmp_path_factory.mktemp("hot")
    rng = np.random.default_rng(5)
    base = 20 + 4 * _band_limited((64, 64), 3)
    frames = np.stack(
        [rng.poisson(np.clip(_moved(base, (0.7 * i, -0.4 * i)), 0, None)) for i in range(6)]
    ).astype(np.uint16)
    frames[:, :, 21] = 4000
    (root / "movies").mkdir()
    new_mrc(root / "movies" / "hot.mrcs", frames, voxel_size=1.0)
    defects = root / "defects.txt"
    defects.write_text("# x y w h\n21 0 1 64\n")
    return root, defects


def test_train_movies_defects_remove_a_hot_column(hot_movie, tmp_path):
    root, defects = hot_movie
    paths = moviedata.find_movies(str(root / "movies"))
    spec = moviedata.GainSpec(defects=str(defects))
    src, _ = moviedata.prepare(paths, [], spec, tmp_path / "run", split="even-odd", seed=0)
    plain, _ = moviedata.prepare(paths, [], moviedata.GainSpec(), tmp_path / "p", split="even-odd",
                                 seed=0)  # fmt: skip
    m = src.movies[0]
    assert m.defects and m.depth == 1 and np.load(m.defects)[:, 21].all()
    got = src.crop(0, (2, 4), 32, sample=(0, 0, 0))
    bad = plain.crop(0, (2, 4), 32, sample=(0, 0, 0))
    column = 21 - plain.movies[0].origin[1] - 4  # the hot column in the crop at (2, 4)
    assert np.abs(bad[:, :, column]).min() > 20 * np.median(np.abs(bad))  # untreated: there
    assert np.abs(got).max() < 5 and np.abs(got[:, :, 21 - m.origin[1] - 4]).max() < 5
    # the training halves are the halves 'cryoden movies --defects' sums: filled frames
    with open_movie(paths[0], defects=str(defects)) as mv:
        frames = np.stack([mv.frame(i) for i in range(len(mv))])
    even, _ = moviedata.halfsums.partition(6, "even-odd")
    y, x = m.origin[0] + 2, m.origin[1] + 4
    want = halfsums.window_sum(frames, even, m.offsets, (y, x), 32) - src.stats[0][0]
    np.testing.assert_allclose(got[0], want / src.stats[0][1], atol=1e-4)


def test_train_defects_flag(hot_movie, tmp_path, capsys):
    from cryoden.train import __main__ as cli

    root, defects = hot_movie

    def parse(*argv):
        return cli.add_args(argparse.ArgumentParser()).parse_args(list(argv))

    cfg = C.from_args(parse("--movies", str(root / "movies"), "--defects", str(defects),
                            "--out", "r"))  # fmt: skip
    assert cfg.to_dict()["data"]["defects"] == str(defects.absolute())  # the resolved config
    paths = moviedata.find_movies(str(root / "movies"))
    record = moviedata.describe(paths, moviedata.GainSpec(defects=str(defects)))
    assert record[-1]["defects"] == "defects.txt" and record[-1]["size"] > 0  # RUN/data.json
    run = tmp_path / "run"
    assert cli.main(parse("--even", str(root), "--odd", str(root), "--defects", str(defects),
                          "--out", str(run))) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--defects applies to --movies only" in err[0]
    bad = tmp_path / "bad.txt"
    bad.write_text("21 0 one 64\n")
    assert cli.main(parse("--movies", str(root / "movies"), "--defects", str(bad),
                          "--out", str(run), "--crop", "32")) == 2  # fmt: skip
    err = [e for e in capsys.readouterr().err.splitlines() if "error" in e]
    assert len(err) == 1 and str(bad) in err[0] and "line 1" in err[0]
    assert not run.exists()
