"""``cryoden movies``: aligned sums and even/odd halves of tiny simulated movies, end to end."""

from __future__ import annotations

import hashlib
import json

import mrcfile
import numpy as np
import pytest
import tifffile

from cryoden import motionstar
from cryoden.__main__ import main as cli
from cryoden.simulate_movie import simulate_movie
from cryoden.train import pairs

SIZE, FRAMES, PIXEL = 64, 8, 1.5


def digests(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def movie_dir(tmp_path_factory):
    """Two simulated movies (uint16 MRC stack with pixel size, LZW TIFF without) and the gain
    of the first; returns (folder, gain path, simulations)."""
    root = tmp_path_factory.mktemp("in")
    folder = root / "movies"
    folder.mkdir()
    sims = [simulate_movie((SIZE, SIZE), FRAMES, seed=k, drift=6.0, margin=16) for k in (0, 1)]
    with mrcfile.new(folder / "a.mrcs") as m:
        m.set_data(sims[0].frames.astype(np.uint16))
        m.voxel_size = PIXEL
    tifffile.imwrite(folder / "b.tif", sims[1].frames[:, ::-1], compression="lzw")
    gain = root / "gain.mrc"
    with mrcfile.new(gain) as m:
        m.set_data(sims[0].gain)
    return folder, gain, sims


@pytest.fixture(scope="module")
def done(movie_dir, tmp_path_factory):
    """One run over both movies with the gain and --pixel-size: (outdir, exit code)."""
    folder, gain, _ = movie_dir
    out = tmp_path_factory.mktemp("out") / "aligned"
    before = digests(folder)
    rc = cli(["movies", str(folder), "-o", str(out), "--gain", str(gain), "--pixel-size", "1.5"])
    assert digests(folder) == before  # inputs untouched
    return out, rc


def test_writes_sums_halves_and_shifts_that_add_up(movie_dir, done):
    _, _, sims = movie_dir
    out, rc = done
    assert rc == 0
    for name, sim in (("a", sims[0]), ("b", sims[1])):
        imgs = {}
        for d in ("sums", "even", "odd"):
            with mrcfile.open(out / d / f"{name}.mrc") as m:
                imgs[d] = np.asarray(m.data, np.float64)
                assert m.voxel_size.x == pytest.approx(PIXEL)
        np.testing.assert_allclose(imgs["even"] + imgs["odd"], imgs["sums"], atol=1e-2)
        # the full sum holds all the dose: about FRAMES * dose_per_frame counts per pixel
        assert imgs["sums"].mean() == pytest.approx(FRAMES * sim.dose_per_frame, rel=0.1)
        est = motionstar.read(out / "shifts" / f"{name}.star")
        assert est.shifts.shape == (FRAMES, 2)
        assert est.general["rlnMicrographOriginalPixelSize"] == pytest.approx(PIXEL)
    rec = json.loads((out / "cryoden-movies.json").read_text())
    assert [e["status"] for e in rec["movies"]] == ["done", "done"]
    assert rec["movies"][0]["frames"] == FRAMES and rec["movies"][0]["drift_px"] > 0


def test_halves_pair_for_training_without_renaming(done):
    out, _ = done
    found = pairs.find_pairs(out / "even", out / "odd")
    assert [(e.name, o.name) for e, o in found] == [("a.mrc", "a.mrc"), ("b.mrc", "b.mrc")]


def test_bad_movie_costs_one_line_and_the_others_are_done(movie_dir, tmp_path, capsys):
    folder, gain, _ = movie_dir
    bad = tmp_path / "in" / "bad.mrcs"
    bad.parent.mkdir()
    bad.write_bytes((folder / "a.mrcs").read_bytes()[:3000])  # truncated
    out = tmp_path / "out"
    args = [str(bad), str(folder / "a.mrcs"), "-o", str(out), "--gain", str(gain), "-q"]
    rc = cli(["movies", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith(f"cryoden: error: {bad}:"), err
    assert (out / "sums" / "a.mrc").is_file()
    assert not any((out / d / "bad.mrc").exists() for d in ("sums", "even", "odd"))
    assert not (out / "shifts" / "bad.star").exists()
    rec = json.loads((out / "cryoden-movies.json").read_text())
    assert [e["status"] for e in rec["movies"]] == ["error", "done"]


def test_skip_existing_and_shifts_from(movie_dir, done, tmp_path, capsys):
    folder, gain, _ = movie_dir
    out, _ = done
    before = digests(out / "sums")
    rc = cli(["movies", str(folder), "-o", str(out), "--skip-existing", "--gain", str(gain)])
    assert rc == 0 and digests(out / "sums") == before
    rec = json.loads((out / "cryoden-movies.json").read_text())
    assert [e["status"] for e in rec["movies"]] == ["skipped", "skipped"]
    # shifts read from the STAR files give the same sums as the run that estimated them
    again = tmp_path / "again"
    rc = cli(
        ["movies", str(folder / "a.mrcs"), "-o", str(again), "--gain", str(gain)]
        + ["--shifts-from", str(out / "shifts"), "-q"]
    )
    assert rc == 0
    with mrcfile.open(out / "sums" / "a.mrc") as m1, mrcfile.open(again / "sums" / "a.mrc") as m2:
        np.testing.assert_allclose(m2.data, m1.data, rtol=1e-5, atol=1e-3)


def test_outputs_never_replace_inputs(movie_dir, tmp_path, capsys):
    folder, gain, _ = movie_dir
    # a movie inside OUTDIR/sums named like its own output: refused before anything is done
    out = tmp_path / "out"
    (out / "sums").mkdir(parents=True)
    victim = out / "sums" / "a.mrc"
    victim.write_bytes((folder / "a.mrcs").read_bytes())
    before = victim.read_bytes()
    rc = cli(["movies", str(victim), "-o", str(out), "--gain", str(gain)])
    err = capsys.readouterr().err
    assert rc == 2 and "would replace" in err and len(err.strip().splitlines()) == 1
    assert victim.read_bytes() == before
    assert not (out / "even").exists() and not (out / "cryoden-movies.json").exists()
    # two movies of one name would overwrite each other's outputs
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "a.tif").write_bytes((folder / "b.tif").read_bytes())
    rc = cli(["movies", str(folder / "a.mrcs"), str(twin / "a.tif"), "-o", str(tmp_path / "o2")])
    assert rc == 2 and "would both be written" in capsys.readouterr().err


def test_bad_options_are_one_line(movie_dir, tmp_path, capsys):
    folder, _, _ = movie_dir
    rc = cli(["movies", str(folder), "-o", str(tmp_path / "o"), "--dose-weighting"])
    assert rc == 2 and "--dose-per-frame" in capsys.readouterr().err
    rc = cli(["movies", str(folder / "b.tif"), "-o", str(tmp_path / "o"), "-q"])  # no pixel size
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--pixel-size" in err[0]


def test_dose_weighting_applies_to_both_halves_and_frame_range(movie_dir, done, tmp_path):
    folder, gain, _ = movie_dir
    plain, _ = done
    out = tmp_path / "dw"
    rc = cli(
        ["movies", str(folder / "a.mrcs"), "-o", str(out), "--gain", str(gain), "-q"]
        + ["--dose-per-frame", "3", "--dose-weighting", "--first", "2", "--last", "7"]
        + ["--shifts-from", str(plain / "shifts")]  # frames 2..7 of its STAR (no compilation)
    )
    assert rc == 0
    imgs = {}
    for d in ("sums", "even", "odd"):
        with mrcfile.open(out / d / "a.mrc") as m:
            imgs[d] = np.asarray(m.data, np.float64)
    np.testing.assert_allclose(imgs["even"] + imgs["odd"], imgs["sums"], atol=1e-2)
    with mrcfile.open(plain / "sums" / "a.mrc") as m:
        assert not np.allclose(imgs["sums"], m.data, atol=1.0)
    star = motionstar.read(out / "shifts" / "a.star")
    assert star.frame_numbers.tolist() == [2, 3, 4, 5, 6, 7]
    np.testing.assert_allclose(
        star.shifts, motionstar.read(plain / "shifts" / "a.star").shifts[1:7]
    )
    assert star.general["rlnMicrographDoseRate"] == 3.0
    entry = json.loads((out / "cryoden-movies.json").read_text())["movies"][0]
    assert entry["status"] == "done" and entry["frames"] == 6


def test_shards_split_the_movies_without_overlap(movie_dir, tmp_path, done):
    folder, gain, _ = movie_dir
    out = tmp_path / "sharded"
    seen = []
    for i in (1, 2):
        argv = ["movies", str(folder), "-o", str(out), "--pixel-size", "1.5", "--shard", f"{i}/2"]
        assert cli(argv) == 0
        rec = json.loads((out / f"cryoden-movies.shard-{i}-of-2.json").read_text())
        seen += [e["movie"] for e in rec["movies"] if e["status"] == "done"]
    assert sorted(p.rsplit("/", 1)[-1] for p in seen) == ["a.mrcs", "b.tif"]  # each once
    assert sorted(p.name for p in (out / "odd").iterdir()) == ["a.mrc", "b.mrc"]
    assert not (out / "cryoden-movies.json").exists()


def test_watch_processes_each_movie_once_across_restarts(movie_dir, tmp_path, capsys):
    folder, _, _ = movie_dir
    inbox, out = tmp_path / "inbox", tmp_path / "aligned"
    inbox.mkdir()
    (inbox / "a.mrcs").write_bytes((folder / "a.mrcs").read_bytes())
    argv = ["movies", str(inbox), "-o", str(out), "--watch", "--settle", "0", "--idle", "0.5"]
    assert cli(argv) == 0
    first = (out / "even" / "a.mrc").stat().st_mtime_ns
    (inbox / "b.tif").write_bytes((folder / "b.tif").read_bytes())
    assert cli([*argv, "--pixel-size", "1.5"]) == 0
    assert "1 movie(s) already done" in capsys.readouterr().err
    assert (out / "even" / "a.mrc").stat().st_mtime_ns == first  # not redone
    lines = (out / "cryoden-movies-watch.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["input"].rsplit("/", 1)[-1] for x in lines) == ["a.mrcs", "b.tif"]
    # an output folder that is watched is refused before any work
    assert cli(["movies", str(out / "sums"), "-o", str(out), "--watch", "--idle", "0"]) == 2
    assert "watched" in capsys.readouterr().err
    assert cli(["movies", str(inbox), "-o", str(out), "--settle", "1"]) == 2
    assert "--settle applies to --watch only" in capsys.readouterr().err


def test_patches_write_local_motion_to_the_star_file(movie_dir, done, tmp_path):
    """--patches: the STAR file adds every patch's local shifts and RELION's polynomial model
    of the local model the sums used; the global shifts are those of a run without patches."""
    folder, gain, _ = movie_dir
    out = tmp_path / "local"
    argv = ["movies", str(folder / "a.mrcs"), "-o", str(out), "--gain", str(gain), "-q"]
    assert cli([*argv, "--pixel-size", "1.5", "--patches", "2x2"]) == 0
    star = motionstar.read(out / "shifts" / "a.star")
    plain = motionstar.read(done[0] / "shifts" / "a.star")
    np.testing.assert_allclose(star.shifts, plain.shifts, atol=1e-6)
    assert star.general["rlnMotionModelVersion"] == 1 and star.model is not None
    rows = star.local_shifts
    assert rows.shape == (4 * FRAMES, 5)
    assert sorted({(x, y) for x, y in rows[:, 1:3]}) == [
        (15.5, 15.5), (15.5, 47.5), (47.5, 15.5), (47.5, 47.5)
    ]  # fmt: skip
    np.testing.assert_array_equal(rows[:FRAMES, 0], np.arange(1, FRAMES + 1))
    assert np.abs(rows[:, 3:]).max() > 0
