"""Training straight from movies: partitions, half-sum crops, end to end, exact resume."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import tifffile

from cryoden import align, halfsums, motionstar
from cryoden.simulate_movie import simulate_movie
from cryoden.train import checkpoint, loop, moviedata
from cryoden.train import config as C

SIZE, FRAMES = 64, 8


def write_movies(root, n=3, size=SIZE, frames=FRAMES, tiff=1):
    """``n`` simulated movies (raw counts, gain-varying detector) in ``root/movies``: the first
    ``tiff`` as LZW TIFF, the rest as uint16 MRC stacks; their common gain as ``root/gain.mrc``.
    Returns (movies folder, gain path, simulations)."""
    folder = root / "movies"
    folder.mkdir(parents=True)
    sims = []
    for k in range(n):
        sim = simulate_movie((size, size), frames, seed=k, drift=6.0, snr_db=0.0, margin=16)
        sims.append(sim)
        raw = sim.frames
        if k < tiff:  # TIFF movies are stored upside down (RELION's orientation)
            tifffile.imwrite(folder / f"mov{k}.tif", raw[:, ::-1], compression="lzw")
        else:
            with mrcfile.new(folder / f"mov{k}.mrcs") as m:
                m.set_data(raw.astype(np.uint16))
                m.voxel_size = sim.pixel_size
    gain = root / "gain.mrc"
    with mrcfile.new(gain) as m:  # each simulation has its own detector: movie 0's serves all
        m.set_data(sims[0].gain)
    return folder, gain, sims


# ----------------------------------------------------------------------------- partitions


def test_partitions_are_disjoint_equal_reproducible_and_fresh_each_epoch():
    a, b = halfsums.partition(9, "even-odd")
    assert a.tolist() == [0, 2, 4, 6, 8] and b.tolist() == [1, 3, 5, 7]
    seen = set()
    for epoch in range(4):
        for k in range(3):
            a, b = halfsums.sample_partition(9, "random", 7, epoch, k)
            assert len(a) == len(b) == 4 and not set(a) & set(b)
            a2, b2 = halfsums.sample_partition(9, "random", 7, epoch, k)
            assert a.tolist() == a2.tolist() and b.tolist() == b2.tolist()  # pure function
            seen.add(tuple(a))
    assert len(seen) >= 10  # 12 draws of C(9, 4) = 126 halves: fresh between epochs/samples
    other = halfsums.sample_partition(9, "random", 8, 0, 0)[0]
    first = halfsums.sample_partition(9, "random", 7, 0, 0)[0]
    assert other.tolist() != first.tolist()  # the seed matters
    with pytest.raises(ValueError, match="at least 2 frames"):
        halfsums.partition(1, "random", np.random.default_rng(0))


def test_window_sum_follows_alignments_shift_convention():
    """A half-sum window cut with whole-pixel shifts equals the same window of
    :func:`cryoden.align.aligned_sum` (Fourier shifts) with those shifts, gain included."""
    rng = np.random.default_rng(0)
    frames = rng.poisson(3.0, (6, 48, 40)).astype(np.uint8)
    gain = rng.uniform(0.8, 1.2, (48, 40)).astype(np.float32)
    shifts = np.array([[0, 0], [2, -1], [3, -3], [5, -2], [-1, 4], [0, 2]], np.float64)
    corrected = [f.astype(np.float32) * gain for f in frames]
    full = align.aligned_sum(corrected, align.Alignment(shifts), indices=[0, 2, 4])
    offsets = moviedata.offsets_of(shifts)
    got = halfsums.window_sum(frames, [0, 2, 4], offsets, (10, 12), (20, 16), gain)
    np.testing.assert_allclose(got, full[10:30, 12:28], rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- training


def movie_cfg(folder, gain, out, **data) -> C.Config:
    cfg = C.merge(C.Config(), C.load_preset("train-2d-test"))
    return C.merge(
        cfg,
        {
            "model": {"arch": "affine", "base_width": 31},
            "data": {
                "movies": str(folder),
                "gain": str(gain),
                "crop": 32,
                "samples_per_pair": 4,
                "holdout": 0.34,
                **data,
            },
            "run": {"out": str(out), "epochs": 2},
        },
    )


@pytest.fixture(scope="module")
def movies(tmp_path_factory):
    return write_movies(tmp_path_factory.mktemp("movies"))


@pytest.fixture(scope="module")
def reference(movies, tmp_path_factory):
    folder, gain, _ = movies
    out = tmp_path_factory.mktemp("ref") / "run"
    cfg = C.merge(movie_cfg(folder, gain, out), {"run": {"preview": True}})
    result = loop.train(cfg)
    assert result["step"] == 4 and not result["interrupted"]  # 2 movies x 4 crops / 4, 2 epochs
    return out, result


def test_train_movies_caches_shifts_and_frames(movies, reference):
    folder, _, sims = movies
    out, result = reference
    cache = out / "movies"
    val = [p.name for p in cache.glob("*.even.npy")]  # the preview's image
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        ["gain.npy", "mov0.npy", "mov0.star", "mov1.star", "mov2.star", *val]
    )  # the LZW TIFF is decoded once; MRC stacks are mapped where they lie
    assert len(val) == 1
    for k in range(3):
        assert motionstar.read(cache / f"mov{k}.star").shifts.shape == (FRAMES, 2)
    est = motionstar.read(cache / "mov0.star").shifts  # the movie whose gain was given
    assert np.sqrt(np.mean((est - sims[0].shifts) ** 2)) < 1.0
    cached = np.load(cache / "mov0.npy")
    assert cached.dtype == np.uint8 and cached.shape == (FRAMES, SIZE, SIZE)
    record = json.loads((out / "data.json").read_text())["pairs"]
    assert [r.get("movie", r.get("gain")) for r in record] == [
        "mov0.tif",
        "mov1.mrcs",
        "mov2.mrcs",
        "gain.mrc",
    ]
    assert np.isfinite(result["best_val_loss"]) and (out / "model.npz").is_file()
    # previews show the held-out movie's even half sum, as they show a pair's even half
    assert sorted(p.name for p in (out / "previews").iterdir()) == [
        "epoch001.png",
        "epoch002.png",
    ]
    assert "held-out" in (out / "report.html").read_text()


def test_movie_source_crops_are_half_sums_of_fresh_partitions(movies, tmp_path):
    folder, gain, sims = movies
    paths = moviedata.find_movies(str(folder))
    spec = moviedata.GainSpec(str(gain))
    src, val = moviedata.prepare(paths[1:2], [], spec, tmp_path, split="random", seed=3)
    assert val == []
    m = src.movies[0]
    shifts = motionstar.read(tmp_path / "movies" / "mov1.star").shifts
    corrected = [sims[1].frame(i).astype(np.float32) * sims[0].gain for i in range(FRAMES)]
    x = src.crop(0, (2, 3), 16, sample=(3, 1, 5))
    a, b = halfsums.sample_partition(FRAMES, "random", 3, 1, 5)
    y, xx = m.origin[0] + 2, m.origin[1] + 3
    want = halfsums.window_sum(np.stack(corrected), a, -shifts, (y, xx), 16)  # gain applied
    _, _, mean, std = src.stats[0]
    np.testing.assert_allclose(x[0], (want - mean) / std, atol=1e-3)
    np.testing.assert_allclose(m.offsets, -shifts, atol=1e-9)  # the subpixel shifts
    y2 = src.crop(0, (2, 3), 16, sample=(3, 2, 5))  # another epoch: other halves
    assert not np.allclose(x, y2)
    np.testing.assert_array_equal(x, src.crop(0, (2, 3), 16, sample=(3, 1, 5)))


def test_train_movies_resumes_bitwise(movies, reference, tmp_path, monkeypatch):
    folder, gain, _ = movies
    ref_dir, ref = reference
    out = tmp_path / "run"
    cfg = movie_cfg(folder, gain, out)
    monkeypatch.setattr(loop._Stop, "requested", lambda self, ckpt, step: step == 3)
    first = loop.train(cfg)  # mid-epoch 2 (steps 3-4): saves step 3 and stops
    assert first["interrupted"] and first["step"] == 3
    monkeypatch.undo()
    stars = {p.name: p.stat().st_mtime_ns for p in (out / "movies").glob("*.star")}

    def no_alignment(*a, **k):
        raise AssertionError("a resumed run re-aligned a movie")

    monkeypatch.setattr(align, "estimate_shifts", no_alignment)
    second = loop.train(cfg)
    assert second["step"] == ref["step"] and not second["interrupted"]
    flat_a = {k: np.asarray(v) for k, v in _flat(second["params"]).items()}
    flat_b = {k: np.asarray(v) for k, v in _flat(ref["params"]).items()}
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "movies").glob("*.star")} == stars
    rows = [r.split("\t")[:-1] for r in (out / "log.tsv").read_text().splitlines()]
    assert rows == [r.split("\t")[:-1] for r in (ref_dir / "log.tsv").read_text().splitlines()]


def _flat(params):
    from cryoden import weights

    return weights.flatten(params)


def test_even_odd_split_differs_from_random_and_other_data_is_refused(movies, reference, tmp_path):
    folder, gain, _ = movies
    ref_dir, _ = reference
    with pytest.raises(ValueError, match="different config"):
        loop.train(movie_cfg(folder, gain, ref_dir, split="even-odd"))
    other = tmp_path / "other"
    other.mkdir()
    for p in sorted(folder.iterdir())[:2]:
        (other / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ValueError, match="other data"):
        loop.train(movie_cfg(other, gain, ref_dir))
    assert not (ref_dir / "checkpoints.corrupt").exists()
    ckpt = checkpoint.Checkpoints(ref_dir / "checkpoints", epoch_end_steps=[])
    try:
        assert max(ckpt.steps()) == 4  # refused runs touched nothing
    finally:
        ckpt.close()


def test_train_flags_for_movies(movies, tmp_path, capsys):
    import argparse

    from cryoden.train import __main__ as cli

    folder, gain, _ = movies

    def parse(*argv):
        return cli.add_args(argparse.ArgumentParser()).parse_args(list(argv))

    flags = ["--movies", str(folder), "--gain", str(gain), "--gain-rot", "1"]
    cfg = C.from_args(parse(*flags, "--split", "even-odd", "--out", "r"))
    assert cfg.data.movies == str(folder) and cfg.data.gain == str(gain)
    assert (cfg.data.gain_rot, cfg.data.split, cfg.model.ndim) == (1, "even-odd", 2)
    assert C.from_args(parse("--movies", str(folder), "--out", "r")).data.split == "random"
    run = tmp_path / "run"
    for argv, msg in [
        (["--movies", str(folder), "--even", str(folder), "--odd", str(folder)], "not both"),
        ([], "no training data"),
        (["--even", str(folder), "--odd", str(folder), "--gain", str(gain)], "--movies only"),
    ]:
        assert cli.main(parse(*argv, "--out", str(run))) == 2
        assert msg in capsys.readouterr().err
    assert not run.exists()
