"""cryoden.infer end to end through ``add_args`` -> ``parse_args`` -> ``main`` on tiny images.

I/O tests use tiny random-weight models written to tmp (a 3x3 affine filter in 2D, a narrow
3D small U-net): they exercise every path of the command quickly; the pretrained models get one
smoke test each when their weights are present.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import mrcfile
import numpy as np
import pytest
import tifffile
from conftest import new_mrc as mrc
from PIL import Image as PILImage

import cryoden.inference
from cryoden import infer, io, weights
from cryoden.__main__ import main as cryoden_main
from cryoden.models import ModelSpec, init_params

REAL = Path(__file__).resolve().parents[1] / "examples" / "k2_micrograph_crop.mrc"
rng = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _compile_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CRYODEN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax-cache"))


def random_model(path, spec):
    """Write a random-weight model for ``spec`` (shapes by eval_shape: nothing compiles)."""
    shapes = jax.eval_shape(lambda: init_params(spec, jax.random.key(0)))
    params = jax.tree.map(
        lambda s: rng.normal(scale=np.prod(s.shape[:-1]) ** -0.5, size=s.shape), shapes
    )
    weights.save(path, params, spec)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Paths of tiny random-weight models: {'2d': affine 3x3, '3d': small 3D U-net}."""
    d = tmp_path_factory.mktemp("models")
    return {
        "2d": random_model(d / "2d.npz", ModelSpec("affine", 2, 3, 5)),
        "3d": random_model(d / "3d.npz", ModelSpec("unet-small", 3, 3, 3)),
    }


def run(*argv) -> int:
    parser = argparse.ArgumentParser()
    infer.add_args(parser)
    return infer.main(parser.parse_args([str(a) for a in argv]))


def test_mrc_2d(tmp_path, models, capsys):
    x = rng.normal(size=(50, 60)).astype(np.float32)
    src = mrc(tmp_path / "a.mrc", x, voxel_size=2.5)
    assert run(src, "-o", tmp_path / "out", "-m", models["2d"]) == 0
    out = io.read(tmp_path / "out" / "a.mrc")
    assert out.kind == "2d" and out.data.dtype == np.float32 and out.voxel_size[0] == 2.5
    expected = cryoden.inference.denoise(x, models["2d"])
    np.testing.assert_allclose(out.data, expected, rtol=1e-6, atol=1e-6)
    assert "1 written, 0 skipped, 0 failed" in capsys.readouterr().err
    record = json.loads((tmp_path / "out" / infer.RECORD).read_text())
    assert record["files"] == [
        {"input": str(src), "output": str(tmp_path / "out" / "a.mrc"), "kind": "2d", "status": "ok"}
    ]
    # tiling options reach the denoiser: small exact tiles give the same image
    assert run(src, "-o", tmp_path / "tiled", "-m", models["2d"], "--patch-size", 16, "-q") == 0
    np.testing.assert_allclose(io.read(tmp_path / "tiled" / "a.mrc").data, out.data, atol=1e-5)


def test_options_reach_the_denoiser(tmp_path, models):
    x = (rng.normal(size=(32, 40)) * 3 + 50).astype(np.float32)
    src = mrc(tmp_path / "a.mrc", x)
    den = cryoden.inference.Denoiser(models["2d"], ndim=2)
    cases = {
        "plain": ([], {}),
        "norm": (["--normalize", "--lowpass", "2", "--gaussian", "1"],
                 dict(normalize=True, lowpass=2.0, gaussian=1.0)),
        "compat": (["--topaz-compat"], dict(topaz_compat=True)),
        "bf16": (["--dtype", "bfloat16"], {}),
    }  # fmt: skip
    for name, (flags, kw) in cases.items():
        assert run(src, "-o", tmp_path / name, "-m", models["2d"], "-q", *flags) == 0
        y = io.read(tmp_path / name / "a.mrc").data
        tol = 0.05 * x.std() if name == "bf16" else 1e-4
        np.testing.assert_allclose(y, den(x, **kw), atol=tol, err_msg=name)


def test_mrc_stack_slice_by_slice(tmp_path, models):
    x = rng.integers(0, 1000, size=(3, 40, 30)).astype(np.uint16)
    x[1] *= 7  # slices normalised independently
    mrc(tmp_path / "s.mrcs", x)
    assert run(tmp_path / "s.mrcs", "-o", tmp_path / "out", "-m", models["2d"], "-q") == 0
    with mrcfile.open(tmp_path / "out" / "s.mrcs", permissive=False) as m:
        assert m.header.ispg == 0 and m.header.mode == 2 and m.data.shape == (3, 40, 30)
        den = cryoden.inference.Denoiser(models["2d"], ndim=2)
        for i in range(3):
            np.testing.assert_allclose(m.data[i], den(x[i].astype(np.float32)), rtol=1e-5)


def test_mrc_volume_3d_model(tmp_path, models):
    x = rng.normal(size=(40, 48, 40)).astype(np.float32)
    mrc(tmp_path / "v.mrc", x, ispg=1, voxel_size=10.0)
    assert run(tmp_path / "v.mrc", "-o", tmp_path / "out", "-m", models["3d"], "-q") == 0
    with mrcfile.open(tmp_path / "out" / "v.mrc", permissive=False) as m:
        assert m.header.ispg == 1 and m.data.shape == x.shape and m.voxel_size.z == 10.0
    # the same file forced to a stack goes slice by slice through a 2D model
    args = ["-o", tmp_path / "as-stack", "-m", models["2d"], "--kind", "stack", "-q"]
    assert run(tmp_path / "v.mrc", *args) == 0
    with mrcfile.open(tmp_path / "as-stack" / "v.mrc") as m:
        assert m.header.ispg == 0 and m.data.shape == x.shape


def test_tiff_in_tiff_and_png_out(tmp_path, models):
    x = rng.normal(size=(32, 48)).astype(np.float32)
    tifffile.imwrite(tmp_path / "t.tif", x)
    mrc(tmp_path / "m.mrc", x)
    assert run(tmp_path / "t.tif", "-o", tmp_path / "out", "-m", models["2d"], "-q") == 0
    assert io.read(tmp_path / "out" / "t.tif").data.dtype == np.float32
    args = ["-o", tmp_path / "png", "-m", models["2d"], "--format", "png", "--suffix", "_dn", "-q"]
    assert run(tmp_path / "m.mrc", tmp_path / "t.tif", *args) == 0
    for name in ("m_dn.png", "t_dn.png"):
        q = np.asarray(PILImage.open(tmp_path / "png" / name))
        assert q.dtype == np.uint8 and q.shape == (32, 48) and q.min() < 50 and q.max() > 200


def test_batch_with_bad_files(tmp_path, models, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a.mrc", "c.mrc"):
        mrc(inp / name, rng.normal(size=(20, 24)).astype(np.float32))
    good = (inp / "a.mrc").read_bytes()
    (inp / "b.mrc").write_bytes(good[:-64])  # truncated
    (inp / "d.mrc").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))  # mislabelled
    (inp / "notes.txt").write_text("not an image")  # ignored in a directory
    mrc(inp / "stack.mrcs", rng.normal(size=(2, 8, 8)).astype(np.float32))
    out = tmp_path / "out"
    argv = [inp, tmp_path / "missing.mrc", "-o", out, "-m", models["2d"], "--format", "png"]
    assert run(*argv) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("cryoden: error:")]
    assert len(lines) == 4, err
    assert f"cryoden: error: {inp / 'b.mrc'}: file is truncated" in err
    assert f"cryoden: error: {inp / 'd.mrc'}: file content is PNG" in err
    assert f"cryoden: error: {tmp_path / 'missing.mrc'}: No such file or directory" in err
    assert f"cryoden: error: {inp / 'stack.mrcs'}: " in err and "PNG output holds one 2D" in err
    assert "2 written, 0 skipped, 4 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png", infer.RECORD]


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_input(tmp_path, models, capsys):
    x = np.ones((16, 16), np.float32)
    x[3, 4] = np.nan
    mrc(tmp_path / "nan.mrc", x)
    assert run(tmp_path / "nan.mrc", "-o", tmp_path / "out", "-m", models["2d"], "-q") == 1
    assert "nan.mrc: image contains 1 NaN/Inf pixel(s)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "nan.mrc").exists()


def test_missing_model_and_bad_options_fail_early(tmp_path, capsys):
    src = mrc(tmp_path / "a.mrc", np.ones((8, 8), np.float32))
    assert run(src, "-o", tmp_path / "out", "-m", tmp_path / "nope.npz") == 2
    assert "cryoden: error: --model:" in capsys.readouterr().err
    assert run(src, "-o", tmp_path / "out2", "--patch-size", 0) == 2
    assert "--patch-size must be >= 1" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mrc", "out"]
    assert list((tmp_path / "out").iterdir()) == []


def test_wrong_dimensionality_model_is_a_per_file_error(tmp_path, models, capsys):
    mrc(tmp_path / "v.mrc", np.ones((4, 8, 8), np.float32), ispg=1)
    assert run(tmp_path / "v.mrc", "-o", tmp_path / "out", "-m", models["2d"], "-q") == 1
    assert "a 2D model cannot denoise 3D data" in capsys.readouterr().err


def test_unwritable_output_dir(tmp_path, models, capsys):
    src = mrc(tmp_path / "a.mrc", np.ones((8, 8), np.float32))
    (tmp_path / "file").write_text("")
    assert run(src, "-o", tmp_path / "file" / "out", "-m", models["2d"]) == 2
    assert "cannot write to the output directory" in capsys.readouterr().err


@pytest.mark.skipif(any(d.platform == "gpu" for d in jax.devices()), reason="has a GPU")
def test_missing_device(tmp_path, models, capsys):
    src = mrc(tmp_path / "a.mrc", np.ones((8, 8), np.float32))
    assert run(src, "-o", tmp_path / "out", "-m", models["2d"], "--device", "gpu") == 2
    assert "cryoden: error: --device: no gpu device visible to JAX" in capsys.readouterr().err


def test_skip_existing_and_never_overwrite_input(tmp_path, models, capsys):
    for name in ("a.mrc", "b.mrc"):
        mrc(tmp_path / name, rng.normal(size=(16, 16)).astype(np.float32))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.mrc").write_bytes(b"sentinel")
    argv = [tmp_path / "a.mrc", tmp_path / "b.mrc", "-o", out, "-m", models["2d"]]
    assert run(*argv, "--skip-existing") == 0
    assert (out / "a.mrc").read_bytes() == b"sentinel" and (out / "b.mrc").is_file()
    assert "1 written, 1 skipped, 0 failed" in capsys.readouterr().err
    before = (tmp_path / "a.mrc").read_bytes()
    assert run(tmp_path / "a.mrc", "-o", tmp_path, "-m", models["2d"], "-q") == 2
    err = capsys.readouterr().err
    assert f"the output of {tmp_path / 'a.mrc'} would replace {tmp_path / 'a.mrc'} itself" in err
    assert (tmp_path / "a.mrc").read_bytes() == before
    assert run(tmp_path / "a.mrc", "-o", tmp_path, "-m", models["2d"], "--suffix", "_dn") == 0


def test_one_denoiser_per_dimensionality(tmp_path, models, monkeypatch):
    made = []

    class Counting(cryoden.inference.Denoiser):
        def __init__(self, *a, **kw):
            made.append(kw["ndim"])
            super().__init__(*a, **kw)

    monkeypatch.setattr(cryoden.inference, "Denoiser", Counting)
    for i in range(3):
        mrc(tmp_path / f"m{i}.mrc", rng.normal(size=(16, 16)).astype(np.float32))
    mrc(tmp_path / "s.mrcs", rng.normal(size=(2, 16, 16)).astype(np.float32))
    assert run(tmp_path, "-o", tmp_path / "out", "-m", models["2d"], "-q") == 0
    assert made == [2]


def test_real_micrograph_keeps_extended_header(tmp_path, models):
    img = io.read(REAL)
    img.data = img.data[300:556, 400:656]
    io.write(tmp_path / "crop.mrc", img)
    assert run(tmp_path / "crop.mrc", "-o", tmp_path / "out", "-m", models["2d"], "-q") == 0
    out = io.read(tmp_path / "out" / "crop.mrc")
    assert out.exttyp == b"FEI1" and out.extended_header == img.extended_header
    assert out.voxel_size == pytest.approx(img.voxel_size) and out.data.shape == (256, 256)


def test_default_2d_model_on_real_micrograph(tmp_path):
    img = io.read(REAL)
    img.data = img.data[300:556, 400:656]
    io.write(tmp_path / "crop.mrc", img)
    assert run(tmp_path / "crop.mrc", "-o", tmp_path / "out", "-q") == 0
    y, x = io.read(tmp_path / "out" / "crop.mrc").data, img.data.astype(np.float32)
    assert np.isfinite(y).all() and y.std() < 0.5 * x.std()
    assert abs(y.mean() - x.mean()) < 0.1 * x.std()


def test_default_3d_model_on_tiny_volume(tmp_path):
    x = rng.normal(size=(20, 36, 28)).astype(np.float32)  # padded to 32 x 64 x 32
    mrc(tmp_path / "v.rec", x)
    assert run(tmp_path / "v.rec", "-o", tmp_path / "out", "-q") == 0
    y = io.read(tmp_path / "out" / "v.rec").data
    assert y.shape == x.shape and np.isfinite(y).all() and y.std() < x.std()


def test_console_entry_point(tmp_path, models, capsys):
    src = mrc(tmp_path / "a.mrc", np.ones((8, 8), np.float32))
    assert cryoden_main(["infer", str(src), "-o", str(tmp_path / "out"), "-m", models["2d"]]) == 0
    with pytest.raises(SystemExit) as e:
        cryoden_main(["--version"])
    assert e.value.code == 0 and "cryoden 0." in capsys.readouterr().out


def test_console_unavailable_command(monkeypatch, capsys):
    monkeypatch.setitem(cryoden.__main__.COMMANDS, "train", ("cryoden.no_such_module", "x"))
    with pytest.raises(SystemExit) as e:
        cryoden_main(["train", "-h"])
    assert e.value.code == 2 and "command 'train' is unavailable" in capsys.readouterr().err


def test_module_entry_point_fills_compile_cache(tmp_path):
    """``python -m cryoden.infer`` in a fresh process writes the persistent compilation cache."""
    random_model(tmp_path / "m.npz", ModelSpec("unet-small", 2, 3, 3))
    src = mrc(tmp_path / "a.mrc", rng.normal(size=(32, 32)).astype(np.float32))
    env = {**os.environ, "CRYODEN_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "cryoden.infer",
        src,
        "-o",
        tmp_path / "out",
        "-m",
        tmp_path / "m.npz",
        "-q",
    ]
    p = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "a.mrc").is_file()
    assert any((tmp_path / "cache").iterdir())
