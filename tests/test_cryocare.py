"""cryoCARE_extract_train_data.py / cryoCARE_train.py / cryoCARE_predict.py as RELION 5's
"Denoise tomograms" job calls them, and ``cryoden relion tomo-*`` on a RELION 5 tomograms.star.

The JSON files are literal copies of the structure RELION 5 writes
(src/tomography_python_programs/denoise/cryoCARE/_utils.py: generate_train_data_config_json,
generate_train_config_json, generate_predict_json; file names from constants.py; "overwrite" is
the string "True"), with sizes scaled down: patch 32 instead of 72, a few steps."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryoden import cryocare, relionjob, star, weights
from tests.conftest import blob_volume, new_mrc

SHAPE = (32, 32, 32)
TRAINING = "Denoise/job007/external/training"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Tomograms/job006 as RELION 5's Reconstruct job leaves it with "Generate tomograms for
    denoising?": rec_<name>_half1/2.mrc (even/odd frames) and rec_<name>.mrc."""
    monkeypatch.chdir(tmp_path)
    d = Path("Tomograms/job006/tomograms")
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, ts in enumerate(("TS_01", "TS_02")):
        clean = blob_volume(SHAPE, seed=i)
        for h in ("half1", "half2"):
            noisy = clean + rng.normal(0, 1, SHAPE).astype(np.float32)
            new_mrc(d / f"rec_{ts}_{h}.mrc", noisy, voxel_size=10.0)
        new_mrc(d / f"rec_{ts}.mrc", clean, voxel_size=10.0)
    return tmp_path


EVEN = [f"Tomograms/job006/tomograms/rec_{t}_half1.mrc" for t in ("TS_01", "TS_02")]
ODD = [f"Tomograms/job006/tomograms/rec_{t}_half2.mrc" for t in ("TS_01", "TS_02")]


def _conf(path: str, obj: dict) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=4))  # RELION: json.dump(..., indent=4)
    return path


def _train_data_config() -> str:
    # generate_train_data_config_json (num_slices 1200, patch 72 and 10% normalisation samples
    # in RELION's defaults)
    return _conf(
        f"{TRAINING}/train_data_config.json",
        {
            "even": EVEN,
            "odd": ODD,
            "patch_shape": [32, 32, 32],
            "num_slices": 10,
            "split": 0.9,
            "tilt_axis": "Y",
            "n_normalization_samples": 1,
            "path": TRAINING,
            "overwrite": "True",
        },
    )


def _train_config(**over) -> str:
    # generate_train_config_json (RELION: epochs 100, steps_per_epoch 200, batch_size 16)
    conf = {
        "train_data": TRAINING,
        "epochs": 2,
        "steps_per_epoch": 3,
        "batch_size": 4,
        "unet_kern_size": 3,
        "unet_n_depth": 3,
        "unet_n_first": 16,
        "learning_rate": 0.0004,
        "model_name": "denoising_model",
        "path": "Denoise/job007",
        "overwrite": "True",
        "gpu_id": [0],
    }
    return _conf(f"{TRAINING}/train_config.json", conf | over)


def _recording(monkeypatch) -> list:
    """Keep every Denoiser made, so a test reuses its compiled kernels for the reference."""
    from cryoden import inference

    made, real = [], inference.Denoiser

    class Recording(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(inference, "Denoiser", Recording)
    return made


def _fake_training(monkeypatch) -> dict:
    """Replace the (minutes-long on a CPU) 3D training by writing the pretrained unet-3d as
    the run's model; returns what the training was asked to do."""
    seen = {}

    def fake(evens, odds, run, links, flags):
        seen.update(evens=evens, odds=odds, run=run, flags=flags)
        run.mkdir(parents=True, exist_ok=True)
        shutil.copy(weights.locate("unet-3d")[0], run / weights.MODEL_FILE)
        (run / "config.json").write_text("{}")
        return 0

    monkeypatch.setattr(relionjob, "train_halves", fake)
    return seen


def test_relion5_calls_train_then_predict(project, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    seen = _fake_training(monkeypatch)
    # train.py: extract, then train, each as `EXE --conf FILE`
    assert cryocare.extract_train_data(["--conf", _train_data_config()]) == 0
    assert cryocare.train(["--conf", _train_config()]) == 0
    assert os.environ.pop("CUDA_VISIBLE_DEVICES") == "0"  # gpu_id [0]
    assert seen["evens"] == [os.path.abspath(e) for e in EVEN]
    assert seen["odds"] == [os.path.abspath(o) for o in ODD]
    assert seen["run"] == Path("Denoise/job007/denoising_model")
    flags = dict(zip(seen["flags"][::2], seen["flags"][1::2], strict=True))
    assert flags["--steps"] == "6" and flags["--batch-size"] == "4"  # epochs x steps_per_epoch
    assert flags["--crop"] == "32" and flags["--optim"] == "adam" and flags["--lr"] == "0.0004"
    assert flags["--holdout"] == "0.1"  # 1 - split
    archive = Path("Denoise/job007/denoising_model.tar.gz")  # where RELION looks for it
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [
            "denoising_model/config.json",
            "denoising_model/model.npz",
        ]

    # predict.py: generate_predict_json, then rename_predicted_tomograms expects the results
    # in output/ named after the even tomograms
    made = _recording(monkeypatch)
    conf = _conf(
        "Denoise/job008/external/training/predict_config.json",
        {
            "path": str(archive),
            "even": EVEN,
            "odd": ODD,
            "n_tiles": [2, 2, 2],
            "output": "Denoise/job008/tomograms",
            "overwrite": "True",
        },
    )
    assert cryocare.predict(["--conf", conf]) == 0
    (den,) = made
    for even, odd in zip(EVEN, ODD, strict=True):
        out = Path("Denoise/job008/tomograms") / Path(even).name
        with mrcfile.open(out) as y, mrcfile.open(even) as e, mrcfile.open(odd) as o:
            want = (den(np.asarray(e.data)) + den(np.asarray(o.data))) / 2  # cryoCARE's average
            np.testing.assert_allclose(y.data, want, rtol=1e-5, atol=1e-5)
            assert y.voxel_size.x == pytest.approx(10.0)
    assert sorted(os.listdir("Denoise/job008/tomograms")) == sorted(Path(e).name for e in EVEN)


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"epochs": "100"}, "'epochs'"),
        ({"train_data": "nowhere"}, "cryoCARE_extract_train_data.py first"),
        ({"model_name": "../x"}, "'model_name'"),
    ],
)
def test_bad_train_conf_is_one_line(project, monkeypatch, capsys, change, problem):
    _fake_training(monkeypatch)
    assert cryocare.extract_train_data(["--conf", _train_data_config()]) == 0
    capsys.readouterr()
    assert cryocare.train(["--conf", _train_config(**change)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and problem in err[0] and "train_config.json" in err[0]
    assert not Path("Denoise/job007/denoising_model.tar.gz").exists()


def test_extract_refuses_subvolumes_below_the_network_stride(project, capsys):
    conf = json.loads(Path(_train_data_config()).read_text())
    conf["patch_shape"] = [16, 16, 16]  # would fail deep inside the first training step
    assert cryocare.extract_train_data(["--conf", _conf("small.json", conf)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and "'patch_shape'" in err[0] and "small.json" in err[0]


def test_extract_refuses_mismatched_halves(project, capsys):
    new_mrc("small.mrc", np.zeros((32, 32, 16), np.float32))
    conf = json.loads(Path(_train_data_config()).read_text())
    conf["odd"] = [ODD[0], "small.mrc"]
    path = _conf("bad.json", conf)
    assert cryocare.extract_train_data(["--conf", path]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and "small.mrc" in err[0]
    assert not Path(TRAINING, cryocare.RECORD).exists()


def test_predict_refuses_a_tensorflow_archive(project, capsys):
    Path("tf").mkdir()
    Path("tf/saved_model.pb").write_bytes(b"x")
    with tarfile.open("cryocare_model.tar.gz", "w:gz") as tar:
        tar.add("tf", arcname="denoising_model")
    conf = _conf(
        "p.json",
        {
            "path": "cryocare_model.tar.gz",
            "even": EVEN,
            "odd": ODD,
            "n_tiles": [1, 1, 1],
            "output": "out",
            "overwrite": "True",
        },
    )
    assert cryocare.predict(["--conf", conf]) == 2
    assert "no model.npz" in capsys.readouterr().err
    assert not Path("out").exists()


# RELION 5 tomograms.star (src/jaz/tomography/programs/reconstruct_tomogram.cpp writes the
# reconstructed names into the global table; one data_global block)
TOMOGRAMS = """
# version 50001

data_global

loop_
_rlnTomoName #1
_rlnVoltage #2
_rlnSphericalAberration #3
_rlnAmplitudeContrast #4
_rlnMicrographOriginalPixelSize #5
_rlnTomoHand #6
_rlnOpticsGroupName #7
_rlnTomoTiltSeriesStarFile #8
_rlnTomoTomogramBinning #9
_rlnTomoReconstructedTomogram #10
_rlnTomoReconstructedTomogramHalf1 #11
_rlnTomoReconstructedTomogramHalf2 #12
TS_01 300.000000 2.700000 0.100000 1.350000 -1.000000 optics1 AlignTiltSeries/job005/tilt_series/TS_01.star 7.407407 Tomograms/job006/tomograms/rec_TS_01.mrc Tomograms/job006/tomograms/rec_TS_01_half1.mrc Tomograms/job006/tomograms/rec_TS_01_half2.mrc
TS_02 300.000000 2.700000 0.100000 1.350000 -1.000000 optics1 AlignTiltSeries/job005/tilt_series/TS_02.star 7.407407 Tomograms/job006/tomograms/rec_TS_02.mrc Tomograms/job006/tomograms/rec_TS_02_half1.mrc Tomograms/job006/tomograms/rec_TS_02_half2.mrc
"""  # noqa: E501


def test_tomo_jobs_read_and_write_tomograms_star(project, monkeypatch):
    from cryoden.__main__ import main

    made = _recording(monkeypatch)
    Path("Tomograms/job006/tomograms.star").write_text(TOMOGRAMS)
    seen = _fake_training(monkeypatch)
    args = ["--in_tomograms", "Tomograms/job006/tomograms.star", "--j", "1"]
    assert main(["relion", "tomo-train", "--o", "External/job009/", *args, "--steps", "5"]) == 0
    assert seen["evens"] == [
        f"Tomograms/job006/tomograms/rec_{t}_half1.mrc" for t in ("TS_01", "TS_02")
    ]
    assert seen["flags"] == ["--steps", "5"]
    assert Path("External/job009/RELION_JOB_EXIT_SUCCESS").exists()

    assert (
        main(
            [
                "relion",
                "tomo-denoise",
                "--o",
                "External/job010/",
                *args,
                "--model",
                "External/job009/model",
            ]
        )
        == 0
    )
    out = star.read("External/job010/tomograms.star")
    before = star.read("Tomograms/job006/tomograms.star")
    g = out["global"]
    assert list(g.columns) == list(before["global"].columns) + [
        "rlnTomoReconstructedTomogramDenoised"
    ]
    assert g.drop(columns="rlnTomoReconstructedTomogramDenoised").equals(before["global"])
    assert list(g["rlnTomoReconstructedTomogramDenoised"]) == [
        "External/job010/tomograms/rec_TS_01.mrc",
        "External/job010/tomograms/rec_TS_02.mrc",
    ]
    (den,) = made  # the model the fake training wrote (unet-3d), already compiled
    with mrcfile.open("External/job010/tomograms/rec_TS_01.mrc") as y:
        with mrcfile.open("Tomograms/job006/tomograms/rec_TS_01.mrc") as x:
            np.testing.assert_allclose(y.data, den(np.asarray(x.data)), rtol=1e-5, atol=1e-5)
    nodes = star.read("External/job010/RELION_OUTPUT_NODES.star")["output_nodes"]
    assert list(nodes["rlnPipeLineNodeTypeLabel"]) == [
        "TomogramGroupMetadata.star.relion.tomo.denoise"
    ]


def test_console_scripts_are_declared():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for name, func in (
        ("cryoCARE_extract_train_data.py", "extract_train_data"),
        ("cryoCARE_train.py", "train"),
        ("cryoCARE_predict.py", "predict"),
    ):
        assert f'"{name}" = "cryoden.cryocare:{func}"' in text
        assert callable(getattr(sys.modules["cryoden.cryocare"], func))
