"""Training shows itself (issue 11 item 4): per-epoch previews, RUN/report.html, --patience.

Tiny affine models on 48 px halves (as test_train_checkpoint); a learning rate of 1e-30 keeps
the parameters bit-identical, so the validation loss never improves after epoch 1 and the
patience arithmetic is exact.
"""

from __future__ import annotations

import argparse
import logging

import jax
import numpy as np
import pytest
from browser import check_pages
from train_subproc import write_pairs

from cryoden.models import ModelSpec, build_model, init_params
from cryoden.train import __main__ as cli
from cryoden.train import config as C
from cryoden.train import data, loop, report
from cryoden.train.pairs import image_stats


@pytest.fixture(autouse=True)
def _compile_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CRYODEN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax-cache"))


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("halves"), n=4, size=48)


def make_cfg(halves, out, **run) -> C.Config:
    even, odd = halves
    cfg = C.merge(C.Config(), C.load_preset("train-2d-test"))
    return C.merge(
        cfg,
        {
            "model": {"arch": "affine", "base_width": 3},
            "data": {"even": str(even), "odd": str(odd), "crop": 32, "samples_per_pair": 4},
            "optim": {"name": "sgd", "lr": 1e-30},
            "run": {"out": str(out), "epochs": 6, "async_save": False, "preview": True, **run},
        },
    )


def epochs_logged(run) -> list[int]:
    return [int(r["epoch"]) for r in report.read_log(run / "log.tsv")]


def test_previews_report_and_patience_stop_resume(halves, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cryoden.train")
    run = tmp_path / "run"
    first = loop.train(make_cfg(halves, run, patience=2))
    # epoch 1 is the best; epochs 2 and 3 do not improve: stop after epoch 3 of 6
    assert first["stopped_early"] and not first["interrupted"]
    assert epochs_logged(run) == [1, 2, 3] and first["best_step"] == 3  # 3 steps per epoch
    shots = sorted(p.name for p in (run / "previews").iterdir())
    assert shots == ["epoch001.png", "epoch002.png", "epoch003.png"]
    page = (run / "report.html").read_text()
    assert "Stopped early after epoch 3 of 6" in page and "--patience 2" in page
    _, val = data.split_holdout(data.find_pairs(*halves), 0.25, 0)
    assert f"Preview: {val[0][0].name}, a held-out (validation) pair" in page
    (check,) = check_pages([run / "report.html"])
    assert check.problems == [] and len(check.images) == 4  # loss curves + 3 previews
    assert "early stop: Stopped early after epoch 3" in caplog.text  # also in RUN/train.log

    again = loop.train(make_cfg(halves, run, patience=2))  # stays stopped
    assert again["stopped_early"] and again["step"] == 9 and epochs_logged(run) == [1, 2, 3]
    more = loop.train(make_cfg(halves, run, patience=3))  # a larger patience goes on
    assert more["stopped_early"] and epochs_logged(run) == [1, 2, 3, 4]
    assert (run / "previews" / "epoch004.png").is_file()
    assert more["best_step"] == 3  # the best model is still epoch 1's


def test_no_preview_and_flags(halves, tmp_path):
    run = tmp_path / "run"
    args = cli.add_args(argparse.ArgumentParser()).parse_args(
        ["--even", str(halves[0]), "--odd", str(halves[1]), "--out", str(run),
         "--config", "train-2d", "--patience", "4", "--no-preview"]
    )  # fmt: skip
    cfg = C.from_args(args)
    assert cfg.run.patience == 4 and cfg.run.preview is False
    assert C.from_args(cli.add_args(argparse.ArgumentParser()).parse_args(
        ["--even", str(halves[0]), "--odd", str(halves[1]), "--out", str(run)]
    )).run.preview is True  # fmt: skip
    with pytest.raises(ValueError, match="patience"):
        C.merge(cfg, {"run": {"patience": 0}}).validate()
    result = loop.train(make_cfg(halves, run, epochs=1, preview=False))
    assert result["step"] == 3 and not result["stopped_early"]
    assert not (run / "previews").exists() and not (run / "report.html").exists()


def test_preview_crop_is_the_whole_image_output(tmp_path):
    """The preview of a crop (with context) equals that crop of the whole image's output."""
    rng = np.random.default_rng(3)
    img = rng.normal(size=(300, 290)).astype(np.float32)
    yy, xx = np.mgrid[0:60, 0:60]
    img[200:260, 20:80] += 3 * np.sin(yy / 10) * np.sin(xx / 10)  # the content to find
    even, odd = tmp_path / "e.npy", tmp_path / "o.npy"
    np.save(even, img)
    np.save(odd, img)
    spec = ModelSpec("affine", 2, 3, 5)
    shown = report.Previewer((even, odd), spec, held_out=True)
    params = jax.tree.map(lambda a: a + 0.1, init_params(spec, jax.random.key(1)))
    mean, std = image_stats(even)
    norm = (img.astype(np.float64) - mean) / std
    y, x = shown.corner  # the 256 px crop holds the texture
    assert y <= 200 and 260 <= y + 256 and x <= 20 and 80 <= x + 256
    np.testing.assert_allclose(shown.raw(), norm[y : y + 256, x : x + 256], rtol=1e-6, atol=1e-6)
    whole = build_model(spec).apply({"params": params}, norm[None, ..., None].astype(np.float32))
    ref = np.asarray(whole)[0, ..., 0][y : y + 256, x : x + 256]
    np.testing.assert_allclose(shown.denoise(params), ref, rtol=1e-5, atol=1e-5)


def test_preview_of_a_volume_is_the_central_xy_slice_of_a_cube(tmp_path):
    rng = np.random.default_rng(4)
    vol = rng.normal(size=(20, 90, 80)).astype(np.float32)
    np.save(tmp_path / "e.npy", vol)
    shown = report.Previewer((tmp_path / "e.npy", tmp_path / "e.npy"), ModelSpec("unet", 3, 3, 3),
                             held_out=False)  # fmt: skip
    z, y, x = shown.corner
    assert (z, shown.raw().shape) == (0, (20, 20))  # a cube as deep as the volume allows
    mean, std = image_stats(tmp_path / "e.npy")
    np.testing.assert_allclose(
        shown.raw(), (vol[10, y : y + 20, x : x + 20] - mean) / std, rtol=1e-5, atol=1e-5
    )
    assert "training pair (no holdout)" in shown.describe()
