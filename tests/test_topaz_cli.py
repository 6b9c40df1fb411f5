"""``cryoden-topaz``: Topaz 0.3's command line on cryoden, checked against Topaz's own functions
(topaz-em 0.3.20 run in-process on the same small odd-sized inputs), its output names, the
filters it defines, training under its model names, and one-line refusals."""

from __future__ import annotations

import contextlib
import io as bytesio
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mrcfile
import numpy as np
import pytest
import tifffile
import topaz_ref
import torch
from conftest import ROOT, new_mrc
from PIL import Image
from topaz import denoise as tdn
from topaz import filters as tfl
from topaz.utils.image import quantize

from cryoden import filters, topaz_cli, weights
from cryoden import topaz_filters as tf
from cryoden.inference import Denoiser

pytestmark = pytest.mark.reference

# The command RELION's External job wrapper of Topaz (relion_run_topaz/run_topaz_denoise.py)
# runs, for its default parameters, minus the micrographs and --output.
RELION = (
    "denoise --model unet --device 0 --format mrc --patch-size 1280 --patch-padding 384 "
    "--normalize --lowpass 1 --gaussian 0 --inv-gaussian 0 --deconv-patch 1 --pixel-cutoff 0"
).split()


@pytest.fixture(autouse=True)
def _compile_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CRYODEN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax-cache"))


@pytest.fixture
def mic(micrograph) -> np.ndarray:
    """Odd-sized real micrograph crop, (157, 203) float32: no size a multiple of any stride."""
    return micrograph[300:457, 400:603].copy()


@pytest.fixture
def small(micrograph) -> np.ndarray:
    """A smaller odd-sized crop, (67, 89) float32, for the fast models."""
    return micrograph[300:367, 400:489].copy()


def run(*argv, capsys=None) -> tuple[int, list[str]]:
    """topaz_cli.main in-process -> (exit status, stderr lines when capsys is given)."""
    try:
        rc = topaz_cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors
        rc = e.code
    lines = capsys.readouterr().err.splitlines() if capsys is not None else []
    return rc, lines


def ref_2d(x, names, **kw) -> np.ndarray:
    """Topaz's denoise_image with its pretrained nets ``names`` (averaged)."""
    with torch.no_grad():
        return tdn.denoise_image(x.copy(), [topaz_ref.denoiser(n) for n in names], **kw)


def read_mrc(path) -> np.ndarray:
    with mrcfile.open(path, permissive=True) as m:
        return np.asarray(m.data, np.float32)


def close(ours, ref, tol=1e-5, scale=None):
    """Agreement within ``tol`` x ``scale`` (default: the reference's std; give the input's
    std for outputs restored to the input's counts, as test_parity does)."""
    assert ours.shape == ref.shape
    err = float(np.max(np.abs(ours - ref)))
    scale = float(ref.std()) if scale is None else float(scale)
    assert err <= tol * scale, (err, scale)


# ----------------------------------------------------------------------------- Topaz's numbers


def test_relion_wrapper_command_gives_topaz_numbers(tmp_path, mic, capsys):
    (tmp_path / "mics").mkdir()
    src = new_mrc(tmp_path / "mics" / "mic_001.mrc", mic, voxel_size=1.06)
    out = tmp_path / "External" / "job007" / "Denoised"
    rc, err = run(*RELION, src, "--output", out, capsys=capsys)
    assert rc == 0, err
    # only the denoised micrograph: the wrapper lists this folder to build its STAR file
    assert sorted(os.listdir(out)) == ["mic_001.mrc"]
    ours = read_mrc(out / "mic_001.mrc")
    ref = ref_2d(mic, ["unet"], patch_size=1280, padding=384, normalize=True)
    close(ours, ref)
    assert abs(ours.mean()) < 1e-5 and abs(ours.std() - 1) < 1e-5  # Topaz's --normalize
    with mrcfile.open(out / "mic_001.mrc") as m:
        assert np.allclose(m.voxel_size.x, 1.06)


def test_models_averaged_without_normalize_restore_the_input_scale(tmp_path, small):
    src = new_mrc(tmp_path / "a.mrc", small)
    rc, _ = run(
        "denoise",
        src,
        "-m",
        "affine",
        "fcnn",
        "-d",
        "-1",
        "--format",
        "tiff",
        "-o",
        tmp_path / "out",
        "--suffix",
        "_dn",
    )
    assert rc == 0
    ours = tifffile.imread(tmp_path / "out" / "a_dn.tiff")
    close(ours, ref_2d(small, ["affine", "fcnn"]), scale=small.std())
    assert abs(ours.mean() - small.mean()) < 0.05 * small.mean()  # counts, not standardised


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # in Topaz's lowpass
def test_lowpass_pixel_cutoff_and_gaussian_as_topaz(tmp_path, small):
    """Topaz's order: low-pass, standardise, outliers to the mean, Gaussian, net. (Its own
    --lowpass > 1 cannot run: the argument shadows its lowpass function, a TypeError; the
    reference applies that function first.)"""
    hot = small.copy()
    hot[10, 20], hot[60, 80], hot[50, 5] = 40 * small.std(), -30 * small.std(), 25 * small.std()
    src = new_mrc(tmp_path / "hot.mrc", hot)
    argv = ["--lowpass", 2, "--pixel-cutoff", 2.5, "--gaussian", 1.5, "--normalize"]
    rc, _ = run("denoise", src, "-m", "affine", "-d", -1, "-o", tmp_path, "--suffix", "_f", *argv)
    assert rc == 0
    with pytest.raises(TypeError):
        ref_2d(hot, ["affine"], lowpass=2)
    low = tdn.lowpass(hot, 2)
    gaus = tfl.GaussianDenoise(1.5)
    ref = ref_2d(low, ["affine"], cutoff=2.5, gaus=gaus, normalize=True)
    close(read_mrc(tmp_path / "hot_f.mrc"), ref)
    assert np.max(np.abs(ref_2d(low, ["affine"], gaus=gaus, normalize=True) - ref)) > 0.1


def _topaz_inv_gaussian(sigma):
    """Topaz's InvGaussianFilter as its code defines it (its constructor cannot run: it calls
    GaussianDenoise.__init__ without sigma), built from its own gaussian and inverse filters."""
    with pytest.raises(TypeError):
        tfl.InvGaussianFilter(sigma)
    width = 1 + 2 * int(np.ceil(sigma * 5))
    f = tfl.gaussian_filter(sigma, s=width)
    obj = tfl.GaussianDenoise(sigma)  # same width, then the inverse kernel in place
    obj.filter.weight.data[:] = torch.from_numpy(tfl.inverse_filter(f / f.sum())).float()
    return obj


def test_inv_gaussian_as_topaz_defines_it(tmp_path, small):
    x = ((small - small.mean()) / small.std()).astype(np.float32)
    inv = _topaz_inv_gaussian(0.8)
    close(tf.inv_gaussian(x, 0.8), inv.apply(x.copy()), tol=1e-5)
    src = new_mrc(tmp_path / "m.mrc", small)
    rc, _ = run(
        "denoise",
        src,
        "-m",
        "affine",
        "-d",
        -1,
        "--inv-gaussian",
        0.8,
        "-o",
        tmp_path,
        "--suffix",
        "_i",
    )
    assert rc == 0
    close(read_mrc(tmp_path / "m_i.mrc"), ref_2d(small, ["affine"], inv_gaus=inv), tol=1e-4)


@pytest.mark.parametrize("patch", [1, 2])
def test_deconvolve_as_topaz_defines_it(tmp_path, small, patch):
    """--deconvolve --deconv-patch N is Topaz's correct_spatial_covariance (which its own
    command cannot run: it passes a NumPy array where the function needs a tensor). Its
    estimate divides by powers close to 0, so float32 (Topaz) and float64 (cryoden) sums
    agree to ~1e-4 of the std, not to the last bit."""
    x = ((small - small.mean()) / small.std()).astype(np.float32)
    with torch.no_grad():
        ref = tdn.correct_spatial_covariance(torch.from_numpy(x.copy()), patch=patch).numpy()
    close(tf.deconvolve(x, patch), ref, tol=2e-3)
    src = new_mrc(tmp_path / "m.mrc", small)
    rc, _ = run(
        "denoise",
        src,
        "-m",
        "none",
        "-d",
        -1,
        "--deconvolve",
        "--deconv-patch",
        patch,
        "-o",
        tmp_path,
        "--suffix",
        "_d",
    )
    assert rc == 0
    expect = ref * small.std(dtype=np.float64) + small.mean(dtype=np.float64)
    close(read_mrc(tmp_path / "m_d.mrc"), expect, tol=2e-3)
    assert np.max(np.abs(tf.deconvolve(x, patch) - x)) > 0.1  # it did something


def test_png_and_jpg_are_topaz_quantised_standardised_output(tmp_path, small):
    src = new_mrc(tmp_path / "m.mrc", small)
    want = quantize(ref_2d(small, ["affine"], normalize=True))  # always normalised for images
    for fmt in ("png", "jpg"):
        rc, _ = run("denoise", src, "-m", "affine", "-d", -1, "--format", fmt, "-o", tmp_path)
        assert rc == 0
        got = np.asarray(Image.open(tmp_path / f"m.{fmt}"))
        if fmt == "png":
            assert np.max(np.abs(got.astype(int) - want)) <= 1
            assert np.mean(got == want) > 0.999
        else:  # same pixels through the same JPEG encoder as Topaz's save_jpeg
            buf = bytesio.BytesIO()
            Image.fromarray(want).save(buf, "jpeg")
            topaz_jpg = np.asarray(Image.open(buf)).astype(int)
            assert np.mean(np.abs(got.astype(int) - topaz_jpg)) < 0.05


def test_patches_are_exact_tiles_not_topazs_seams(tmp_path, small):
    """An image larger than --patch-size + --patch-padding: Topaz re-normalises each patch
    (seams); cryoden-topaz tiles exactly, so the output is the whole-image one."""
    src = new_mrc(tmp_path / "m.mrc", small)
    rc, _ = run("denoise", src, "-m", "affine", "-d", -1, "-s", 16, "-p", 8, "-o", tmp_path / "o")
    assert rc == 0
    whole = ref_2d(small, ["affine"])
    close(read_mrc(tmp_path / "o" / "m.mrc"), whole, scale=small.std())
    patched = ref_2d(small, ["affine"], patch_size=16, padding=8)
    assert np.max(np.abs(patched - whole)) > 1e-2 * small.std()


def test_stack_denoises_each_section_into_the_output_file(tmp_path, small):
    stack = np.stack([small, small[::-1, ::-1].copy()])
    src = new_mrc(tmp_path / "s.mrcs", stack)
    rc, _ = run("denoise", "--stack", src, "-m", "affine", "-d", -1, "-o", tmp_path / "d.mrcs")
    assert rc == 0
    got = read_mrc(tmp_path / "d.mrcs")
    for k in range(2):
        close(got[k], ref_2d(stack[k], ["affine"]), scale=small.std())


# ----------------------------------------------------------------------------- names, safety


def test_output_names_are_topazs(tmp_path, small):
    (tmp_path / "in").mkdir()
    a = new_mrc(tmp_path / "in" / "a.mrc", small)
    b = new_mrc(tmp_path / "in" / "b.mrc", small[:64, :80].copy())
    (tmp_path / "list.txt").write_text(f"{a}\n{b}\n")  # Topaz 0.3 reads @FILE argument lists
    assert run("denoise", f"@{tmp_path / 'list.txt'}", "-m", "none", "-d", -1)[0] == 0
    assert sorted(os.listdir(tmp_path / "in")) == [
        "a.denoised.mrc",
        "a.mrc",
        "b.denoised.mrc",
        "b.mrc",
    ]
    assert run("denoise", a, "-m", "none", "-d", -1, "--suffix", "_x", "--format", "tif")[0] == 0
    assert (tmp_path / "in" / "a_x.tif").is_file()
    vol = new_mrc(tmp_path / "in" / "t.rec", np.stack([small[:40, :50]] * 6))
    assert run("denoise3d", vol, "-m", "none", "-d", -1)[0] == 0
    assert (tmp_path / "in" / "t.denoised.rec").is_file()
    assert run("denoise3d", vol, "-m", "none", "-d", -1, "-o", tmp_path / "o3")[0] == 0
    assert os.listdir(tmp_path / "o3") == ["t.rec"]


def test_refuses_to_overwrite_inputs_or_merge_same_names(tmp_path, small, capsys):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        new_mrc(tmp_path / d / "m.mrc", small)
    before = (tmp_path / "x" / "m.mrc").read_bytes()
    rc, err = run(
        "denoise",
        tmp_path / "x" / "m.mrc",
        "-m",
        "none",
        "-d",
        -1,
        "-o",
        tmp_path / "x",
        capsys=capsys,
    )
    assert rc == 2 and len(err) == 1 and "would replace the input" in err[0]
    assert (tmp_path / "x" / "m.mrc").read_bytes() == before
    assert os.listdir(tmp_path / "x") == ["m.mrc"]
    # Topaz issue #56: two micrographs of one name into one folder
    rc, err = run(
        "denoise",
        tmp_path / "x" / "m.mrc",
        tmp_path / "y" / "m.mrc",
        "-m",
        "none",
        "-d",
        -1,
        "-o",
        tmp_path / "out",
        capsys=capsys,
    )
    assert rc == 2 and len(err) == 1 and "y/m.mrc" in err[0]
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_a_bad_file_does_not_stop_the_others(tmp_path, small, capsys):
    good = new_mrc(tmp_path / "good.mrc", small)
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"not an MRC file" * 100)
    rc, err = run("denoise", bad, good, "-m", "none", "-d", -1, "-o", tmp_path / "o", capsys=capsys)
    assert rc == 1
    errors = [e for e in err if "error" in e]
    assert len(errors) == 1 and str(bad) in errors[0]
    assert os.listdir(tmp_path / "o") == ["good.mrc"]


BAD_FLAGS = [
    (["denoise", "--bogus"], "--bogus"),
    (["denoise", "--hdf", "x.h5", "-a", "a", "-b", "b"], "--hdf"),
    (["denoise", "--format", "bmp", "x.mrc"], "--format"),
    (["denoise", "--gaussian", "1", "--inv-gaussian", "1", "x.mrc"], "--inv-gaussian"),
    (["denoise", "--deconv-patch", "2", "x.mrc"], "--deconv-patch"),
    (["denoise", "--method", "masked", "x.mrc"], "--method"),
    (["denoise", "-a", "a", "-b", "b", "--arch", "unet2", "--save-prefix", "p"], "--arch"),
    (["denoise", "-a", "a", "-b", "b"], "--save-prefix"),
    (["denoise", "-a", "a", "-b", "b", "--save-prefix", "p", "-m", "unet"], "--model"),
    (["denoise", "--device", "-3", "x.mrc"], "--device"),
    (["denoise", "-m", "no-such-model", "-d", "-1", "x.mrc"], "--model"),
    (["denoise3d", "--N-test", "5", "v.rec"], "--N-test"),
    (["extract", "x.mrc"], "extract"),
]


@pytest.mark.parametrize(("argv", "flag"), BAD_FLAGS)
def test_bad_or_unsupported_flag_is_one_line(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = run(*argv, capsys=capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("cryoden-topaz: error:") and flag in err[0]
    assert os.listdir(tmp_path) == []


def test_version_is_what_topaz_wrappers_parse():
    """cryoSPARC runs ``<topaz> --version``: old releases split it on dots into ints, newer
    ones require a valid semantic version; Topaz 0.3.20 prints a bare 0.3.20."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "cryoden.topaz_cli", "--version"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert r.stdout == "0.3.20\n" and r.stderr == ""
    assert re.fullmatch(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)\n", r.stdout)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '\ncryoden-topaz = "cryoden.topaz_cli:main"\n' in pyproject  # the console script


# ----------------------------------------------------------------------------- 3D, training


def test_denoise3d_whole_volume_and_gaussian_after(tmp_path, small):
    """-s < 1 runs the whole volume unpadded (Topaz's numbers, see test_parity); --gaussian
    filters the output (Topaz 0.3 filters a copy of the input and throws it away)."""
    v = np.stack([small[:48, :56]] * 8).astype(np.float32)
    vol = new_mrc(tmp_path / "t.rec", v)
    assert run("denoise3d", vol, "-m", "none", "-d", -1, "-g", 1.0, "-o", tmp_path / "o")[0] == 0
    close(read_mrc(tmp_path / "o" / "t.rec"), filters.gaussian(v, 1.0))
    seen = []

    class Fake:
        stride = 32

        def __call__(self, x, **kw):
            seen.append(kw)
            return x

    args = topaz_cli.build_parser().parse_args(["denoise3d", "-s", "0", "-g", "2"])
    topaz_cli.denoise_3d(np.zeros((40, 40, 40), np.float32), Fake(), args)
    args = topaz_cli.build_parser().parse_args(["denoise3d"])
    topaz_cli.denoise_3d(np.zeros((40, 40, 40), np.float32), Fake(), args)
    assert seen == [dict(topaz_compat=True, gaussian=2.0), dict(padding=48, gaussian=0)]


def test_whole_image_when_topaz_would_not_cut_patches():
    den = SimpleNamespace(stride=32)
    a = topaz_cli.build_parser().parse_args(["denoise", "-s", "100", "-p", "50"])
    assert topaz_cli._whole_image(a, den, (150, 140))  # patch + padding covers it
    assert not topaz_cli._whole_image(a, den, (151, 140))  # Topaz cuts patches: exact tiles
    assert not topaz_cli._whole_image(a, den, (20, 140))  # below the stride: Topaz cannot run


def _halves(root: Path, n=3, size=64, seed=0):
    rng = np.random.default_rng(seed)
    for d in ("TrainOdd", "TrainEven"):
        (root / d).mkdir(parents=True)
    for i in range(n):
        clean = np.cumsum(np.cumsum(rng.normal(size=(size, size)), 0), 1) / size
        for d in ("TrainOdd", "TrainEven"):
            noisy = (clean + rng.normal(size=clean.shape)).astype(np.float32)
            new_mrc(root / d / f"m{i}.mrc", noisy)


def test_training_saves_topaz_names_that_model_reads(tmp_path, small, capsys, monkeypatch):
    """RELION's training wrapper command (run_topaz_train_denoise.py), tiny: models land in
    <prefix>_epoch<N>.sav in cryoden's format, and --model reads them."""
    monkeypatch.setattr(logging.getLogger("cryoden"), "handlers", [])  # as in a new process
    _halves(tmp_path)
    prefix = tmp_path / "job" / "denoise_model"
    (tmp_path / "job").mkdir()
    foreign = Path(f"{prefix}_epoch2.sav")
    foreign.write_bytes(b"someone's Topaz model")
    train = [
        "denoise",
        "--dir-a",
        f"{tmp_path}/TrainOdd/",
        "--dir-b",
        f"{tmp_path}/TrainEven/",
        "--criteria",
        "L2",
        "--preload",
        "--num-epochs",
        2,
        "--device",
        -1,
        "--num-workers",
        8,
        "--save-prefix",
        prefix,
        "--arch",
        "affine",
        "--crop",
        32,
        "--batch-size",
        2,
        "--holdout",
        0.34,
        "--save-interval",
        1,
    ]
    rc, err = run(*train, capsys=capsys)
    assert rc == 2 and "epoch2.sav" in err[-1]  # refused before any training
    assert foreign.read_bytes() == b"someone's Topaz model"
    foreign.unlink()
    assert run(*train)[0] == 0
    # its log goes to whatever sys.stderr is later, not to this call's captured (then closed)
    # stream: a later in-process run (cryoden train) would print "--- Logging error ---"
    with contextlib.redirect_stderr(bytesio.StringIO()) as later:
        logging.getLogger("cryoden").info("probe")
    assert later.getvalue() == f"{topaz_cli.PROG}: probe\n"
    savs = sorted(p.name for p in (tmp_path / "job").glob("*.sav"))
    assert savs == ["denoise_model_epoch1.sav", "denoise_model_epoch2.sav"]
    sav = Path(f"{prefix}_epoch2.sav")
    params, spec, meta = weights.read(sav)
    assert spec.arch == "affine" and meta["epoch"] == 2
    # --model PATH.sav: Topaz's pipeline with those weights in Topaz's own affine net
    src = new_mrc(tmp_path / "m.mrc", small)
    assert run("denoise", src, "-m", sav, "-d", -1, "-o", tmp_path / "o")[0] == 0
    net = tfl.AffineDenoise(max_size=31)
    k = np.asarray(params["filter"]["kernel"])[..., 0, 0]
    net.filter.weight.data[:] = torch.from_numpy(k.copy())
    net.filter.bias.data[:] = torch.from_numpy(np.array(params["filter"]["bias"]))
    topaz = tdn.Denoise.__new__(tdn.Denoise)
    topaz.model, topaz.device, topaz.dims, topaz.use_cuda = net.eval(), "cpu", 2, False
    with torch.no_grad():
        ref = tdn.denoise_image(small.copy(), [topaz])
    close(read_mrc(tmp_path / "o" / "m.mrc"), ref, scale=small.std())
    assert np.max(np.abs(ref - Denoiser("affine")(small))) > 1e-3 * small.std()  # it was trained


def test_denoise3d_training_flags_map_onto_cryoden_training(tmp_path):
    """Topaz 3D training fine-tunes -m (default unet-3d) on -a/-b with --N-train tiles per
    volume pair per epoch; the config cryoden.train receives says so."""
    argv = [
        "denoise3d",
        "-a",
        tmp_path / "even.rec",
        "-b",
        tmp_path / "odd.rec",
        "--N-train",
        7,
        "-c",
        64,
        "--batch-size",
        2,
        "--num-epochs",
        3,
        "--criteria",
        "L1",
        "--optim",
        "sgd",
        "--save-prefix",
        tmp_path / "m",
    ]
    args = topaz_cli.build_parser().parse_args([str(a) for a in argv])
    topaz_cli._check(args)
    cfg = topaz_cli.train_config(args)
    assert (cfg.model.init, cfg.model.ndim, cfg.model.base_width) == ("unet-3d", 3, 7)
    assert (cfg.data.samples_per_pair, cfg.data.crop, cfg.data.batch_size) == (7, 64, 2)
    assert (cfg.optim.name, cfg.optim.loss, cfg.optim.momentum) == ("sgd", "L1", 0.9)
    assert cfg.data.even == str(tmp_path / "even.rec") and cfg.run.epochs == 3
    assert cfg.run.out == str(tmp_path / "m_cryoden_run")
    assert topaz_cli.sav_path("p", 7, 1000).name == "p_epoch007.sav"
    assert topaz_cli.sav_path("p", 100, 100).name == "p_epoch100.sav"


@pytest.mark.parametrize("command", ["denoise", "denoise3d"])
def test_help_states_each_default_once_and_no_none(command, capsys):
    """`cryoden-topaz denoise --help` reads true: no "(default: None)" or "(default: )", and
    no option with its default given twice."""
    with pytest.raises(SystemExit) as e:
        topaz_cli.build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: )" not in text, text
    twice = re.findall(r"\(default[^)]*\)[^()]*\(default: [^)]*\)", text)
    twice = [t for t in twice if "--" not in t]  # within one option's help
    assert not twice, twice
    assert "(default: 0)" in text or "(default: -2)" in text  # defaults are still shown
