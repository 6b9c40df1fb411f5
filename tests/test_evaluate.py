"""cryoden evaluate: acceptance on simulated halves (split SNR ranks methods as the true SNR does,
equals the paper's definition), the command's tables, report and failure handling."""

import json
import math

import numpy as np
import pytest
from browser import check_pages
from conftest import new_mrc
from PIL import Image

from cryoden import evalreport, evaluation, metrics, simulate, weights
from cryoden.__main__ import main
from cryoden.inference import Denoiser


def test_split_snr_ranks_methods_like_the_true_snr():
    """Acceptance (cheaper subset of docs/evaluate.md's table): raw, low-pass, affine, unet."""
    h = simulate.micrograph_halves((192, 192), seed=11, snr_db=-10.0)
    methods = [evaluation.raw_method(), evaluation.baseline_method("lowpass-2")]
    methods += [evaluation.model_method(m, Denoiser(m)) for m in ("affine", "unet")]
    kept = {}
    res = evaluation.evaluate_pair(
        "sim", h["even"], h["odd"], methods, view=lambda name, d: kept.setdefault(name, d)
    )
    split = {r["method"]: r["split_snr_db"] for r in res.rows}
    true = {m: metrics.true_snr_db(kept[m], h["clean"]) for m in split}
    assert sorted(split, key=split.get) == sorted(true, key=true.get)
    ranked = sorted(true.values())  # distinct enough for a ranking to mean something
    assert min(np.diff(ranked)) > 0.2 and split["raw"] < min(split.values()) + 1e-9
    # each model's split SNR equals the paper's definition computed independently
    for m in methods[2:]:
        d_odd = m.run(h["odd"])
        p1 = np.corrcoef(d_odd.ravel().astype(float), h["even"].ravel().astype(float))[0, 1]
        p2 = np.corrcoef(kept[m.name].ravel().astype(float), h["odd"].ravel().astype(float))[0, 1]
        paper = (10 * np.log10(p1 / (1 - p1)) + 10 * np.log10(p2 / (1 - p2))) / 2
        assert abs(split[m.name] - paper) < 0.05


def write_pairs(root, n, shape=(64, 64), seed=0):
    even, odd = root / "even", root / "odd"
    even.mkdir(parents=True)
    odd.mkdir(parents=True)
    for k in range(n):
        h = simulate.micrograph_halves(shape, seed=(seed, k))
        new_mrc(even / f"mic_{k}.mrc", h["even"])
        new_mrc(odd / f"mic_{k}.mrc", h["odd"])
    return even, odd


def read_tsv(path):
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return header, [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def test_tables_json_and_report(tmp_path, capsys):
    even, odd = write_pairs(tmp_path, 2)
    wfile = str(weights.locate("affine")[0])
    out = tmp_path / "eval"
    rc = main(["evaluate", "--even", str(even), "--odd", str(odd), "-m", "affine",
               "-m", wfile, "-o", str(out), "-q"])  # fmt: skip
    assert rc == 0 and capsys.readouterr().err == ""
    header, rows = read_tsv(out / "metrics.tsv")
    assert header[:3] == ["file", "method", "split_snr_db"]
    assert {"n2n_loss", "seam_score", "region_snr_db"} <= set(header)
    methods = ["raw", "affine", wfile, "lowpass-2", "lowpass-4", "lowpass-8", "lowpass-16"]
    methods += ["gaussian-1", "gaussian-2", "gaussian-4"]
    files = [str(even / "mic_0.mrc"), str(even / "mic_1.mrc"), "mean"]
    assert [(r["file"], r["method"]) for r in rows] == [(f, m) for f in files for m in methods]
    by = {(r["file"], r["method"]): float(r["split_snr_db"]) for r in rows}
    for m in methods:  # the mean rows are the means
        assert by["mean", m] == pytest.approx((by[files[0], m] + by[files[1], m]) / 2, abs=1e-3)
    assert by[files[0], "affine"] == by[files[0], wfile]  # same weights, two names as given
    assert by["mean", "affine"] > by["mean", "raw"]

    def strict(c):
        raise ValueError(f"non-standard JSON constant {c}")

    record = json.loads((out / "metrics.json").read_text(), parse_constant=strict)
    pair = record["pairs"][0]
    assert len(pair["curves"]["freq"]) == len(pair["curves"]["affine"]["frc"]) == 32
    assert pair["rows"][0]["split_snr_db"] == pytest.approx(by[files[0], "raw"], abs=1e-4)

    html = (out / "report.html").read_text()
    srcs = [s.split('"')[0] for s in html.split('src="')[1:]]
    assert len(srcs) == 2 * 5 and "http" not in html
    for src in srcs:
        with Image.open(out / src) as im:
            im.load()
            assert im.size[0] > 50
    assert any(s.endswith("_crops.png") for s in srcs)
    (page,) = check_pages([out / "report.html"])  # real headless Chromium
    assert page.problems == [] and len(page.images) == len(srcs)


@pytest.mark.filterwarnings("ignore:Data array contains NaN values")
def test_a_failing_pair_is_one_line_and_the_others_go_on(tmp_path, capsys):
    even, odd = write_pairs(tmp_path, 2)
    bad = np.ones((64, 64), np.float32)
    bad[3, 4] = np.nan
    new_mrc(even / "mic_1.mrc", bad)
    out = tmp_path / "eval"
    argv = ["evaluate", "--even", str(even), "--odd", str(odd), "-m", "affine", "-o", str(out)]
    assert main([*argv, "--no-baselines", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(even / "mic_1.mrc") in err[0] and "NaN" in err[0]
    _, rows = read_tsv(out / "metrics.tsv")
    assert {r["file"] for r in rows} == {str(even / "mic_0.mrc"), "mean"}
    assert json.loads((out / "metrics.json").read_text())["failed"][0]["file"].endswith("mic_1.mrc")


def test_unpairable_inputs_and_bad_options_stop_before_any_output(tmp_path, capsys):
    even, odd = write_pairs(tmp_path, 2)
    (odd / "mic_1.mrc").unlink()
    out = tmp_path / "eval"
    assert main(["evaluate", "--even", str(even), "--odd", str(odd), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no odd half" in err[0] and "mic_1.mrc" in err[0]
    assert not out.exists()
    boxes = tmp_path / "boxes.txt"
    boxes.write_text("1 2 3 4 signal\n1 2 3 foo background\n")
    argv = ["evaluate", "--even", str(even / "mic_0.mrc"), "--odd", str(odd / "mic_0.mrc")]
    assert main([*argv, "--boxes", str(boxes), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{boxes}:2" in err[0] and not out.exists()
    assert main([*argv, "-m", "no-such-model", "-o", str(out)]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert not (out / "metrics.tsv").exists()


def test_an_output_never_replaces_an_input(tmp_path, capsys):
    even, odd = write_pairs(tmp_path, 1)
    out = tmp_path / "eval"
    out.mkdir()
    boxes = out / "metrics.tsv"  # the user keeps the box file where an output would go
    text = "x\ty\tw\th\tlabel\n20\t20\t8\t8\tsignal\n2\t2\t8\t8\tbackground\n"
    boxes.write_text(text)
    argv = ["evaluate", "--even", str(even), "--odd", str(odd), "--boxes", str(boxes)]
    assert main([*argv, "-o", str(out), "-m", "affine"]) == 2
    assert "is an input" in capsys.readouterr().err
    assert boxes.read_text() == text


def test_region_snr_from_boxes(tmp_path):
    even, odd = write_pairs(tmp_path, 1)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(
        "# x,y,w,h,label,file\n20,20,8,8,signal,mic_0.mrc\n2,2,8,8,background,mic_0.mrc\n"
    )
    out = tmp_path / "eval"
    argv = ["evaluate", "--even", str(even), "--odd", str(odd), "--boxes", str(boxes)]
    assert main([*argv, "-o", str(out), "-m", "affine", "--no-baselines", "-q"]) == 0
    _, rows = read_tsv(out / "metrics.tsv")
    e = simulate.micrograph_halves((64, 64), seed=(0, 0))
    raw = metrics.region_snr((e["even"] + e["odd"]) / 2, [((20, 20, 8, 8), (2, 2, 8, 8))])
    assert float(rows[0]["region_snr_db"]) == pytest.approx(raw, abs=1e-3)
    assert math.isfinite(float(rows[1]["region_snr_db"]))


def test_tomogram_pair_gives_central_slices(tmp_path):
    """Volumes through the engine and the report (a 3D U-net would take a minute on CPU here)."""
    h = simulate.volume_halves((32, 40, 48), seed=1)
    methods = [evaluation.raw_method(), evaluation.baseline_method("lowpass-2")]
    methods.append(evaluation.baseline_method("gaussian-1"))
    res = evaluation.evaluate_pair(
        "tomo_EVN.rec", h["even"], h["odd"], methods, view=evalreport.Views(h["even"])
    )
    assert res.views["raw"]["XZ"].shape == (32, 48) and res.views["raw"]["YZ"].shape == (32, 40)
    assert res.rows[0]["split_snr_db"] == pytest.approx(
        metrics.true_snr_db(h["even"], h["clean"]), abs=0.3
    )
    page = evalreport.write_report(tmp_path, [res], evaluation.summary(res.rows))
    slices = tmp_path / "pictures" / "000_tomo_EVN_slices.png"
    assert "pictures/000_tomo_EVN_slices.png" in page.read_text()
    with Image.open(slices) as im:  # rows XY, XZ, YZ of raw | best low-pass
        assert im.size[0] > 2 * 48 and im.size[1] > 40 + 32 + 32


def test_movies_dose_titration(tmp_path):
    import mrcfile

    from cryoden.simulate_movie import simulate_movie

    sim = simulate_movie((64, 64), 10, seed=0, drift=4.0, margin=16, snr_db=3.0)
    movie = tmp_path / "m.mrcs"
    with mrcfile.new(movie) as m:
        m.set_data(sim.frames.astype(np.uint16))
        m.voxel_size = 1.5
    out = tmp_path / "eval"
    argv = ["evaluate", "--movies", str(movie), "-m", "affine", "--dose-titration", "-q"]
    assert main([*argv, "--dose-per-frame", "1.5", "-o", str(out)]) == 0
    header, rows = read_tsv(out / "titration.tsv")
    assert header == ["file", "method", "frames", "dose", "p", "snr_db"]
    raw = [r for r in rows if r["method"] == "raw"]
    frames = [int(r["frames"]) for r in raw]
    assert frames[0] == 1 and frames[-1] == 5 and len(frames) >= 4
    assert [float(r["dose"]) for r in raw] == [1.5 * f for f in frames]
    snr = [float(r["snr_db"]) for r in raw]
    assert all(b > a for a, b in zip(snr, snr[1:], strict=False))  # more dose, more signal
    assert {r["method"] for r in rows} >= {"raw", "affine"} and len(
        {r["method"] for r in rows}
    ) == 3
    # all five even frames: CCC(even sum, odd sum), i.e. raw's split SNR
    _, metric_rows = read_tsv(out / "metrics.tsv")
    assert snr[-1] == pytest.approx(float(metric_rows[0]["split_snr_db"]), abs=1e-3)
    assert "pictures/000_m_titration.png" in (out / "report.html").read_text()


def test_dose_titration_needs_movies(tmp_path, capsys):
    even, odd = write_pairs(tmp_path, 1)
    argv = ["evaluate", "--even", str(even), "--odd", str(odd), "--dose-titration"]
    assert main([*argv, "-o", str(tmp_path / "eval")]) == 2
    assert "--dose-titration needs --movies" in capsys.readouterr().err


def test_movies_reading_options_are_those_of_cryoden_movies(tmp_path, capsys):
    """--defects, --gain-rot/--gain-flip act as in `cryoden movies`: a hot column shared by both
    halves inflates the raw split SNR until --defects fills it."""
    import mrcfile

    from cryoden.evalmovies import movie_halves
    from cryoden.simulate_movie import simulate_movie

    sim = simulate_movie((64, 64), 8, seed=1, drift=3.0, margin=16, snr_db=-3.0)
    frames = sim.frames.astype(np.float32)
    frames[:, :, 20] += 40.0  # a hot column in every frame
    movie = tmp_path / "m.mrcs"
    with mrcfile.new(movie) as m:
        m.set_data(frames.astype(np.uint16))
        m.voxel_size = 1.5
    boxes = tmp_path / "defects.txt"
    boxes.write_text("20 0 1 64\n")  # x y w h
    gain = new_mrc(
        tmp_path / "gain.mrc", np.linspace(0.9, 1.1, 64 * 64, dtype="f4").reshape(64, 64)
    )

    def raw_snr(*extra):
        out = tmp_path / f"eval{len(list(tmp_path.glob('eval*')))}"
        argv = ["evaluate", "--movies", str(movie), "-m", "affine", "--no-baselines", "-q"]
        argv += ["-o", str(out)]
        assert main([*argv, *extra]) == 0
        _, rows = read_tsv(out / "metrics.tsv")
        return float(next(r for r in rows if r["method"] == "raw")["split_snr_db"])

    hot, filled = raw_snr(), raw_snr("--defects", str(boxes))
    assert hot > filled + 1.0
    reading = dict(gain=str(gain), gain_rot=1, gain_flip=2, defects=str(boxes))
    mh = movie_halves(movie, reading=reading)
    want = metrics.split_snr(mh.even, mh.odd, mh.even, mh.odd)["snr_db"]
    got = raw_snr(
        "--defects", str(boxes), "--gain", str(gain), "--gain-rot", "1", "--gain-flip", "2"
    )
    assert got == pytest.approx(want, abs=1e-3) and got != pytest.approx(filled, abs=1e-4)
    assert main(["evaluate", "--even", str(movie), "--odd", str(movie), "--defects", str(boxes),
                 "-o", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "apply to --movies only" in capsys.readouterr().err
