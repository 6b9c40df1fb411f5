"""``cryoden relion ...`` run as RELION runs an External job (src/pipeline_jobs.cpp,
getCommandsExternalJob: ``EXE --o External/jobNNN/ --in_mics STAR [--LABEL VALUE] --j N``, from
the project folder), on STAR files laid out as RELION 5 writes them."""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryoden import star
from cryoden.__main__ import main
from tests.conftest import new_mrc

# RELION 5 motion correction (src/motioncorr_runner.cpp): optics table, then the micrographs
# with every per-micrograph column; "Save images for denoising?" adds the Even/Odd sums
# (rlnMicrographNameEven/Odd, src/metadata_label.h). Two optics groups, and two micrographs named
# alike in two folders.
CORRECTED = """
# version 50001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographOriginalPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnMicrographPixelSize #7
opticsGroup1            1     0.885000   300.000000     2.700000     0.100000     0.885000
opticsGroup2            2     1.062000   200.000000     2.700000     0.100000     1.062000


# version 50001

data_micrographs

loop_
_rlnCtfPowerSpectrum #1
_rlnMicrographName #2
_rlnMicrographMetadata #3
_rlnOpticsGroup #4
_rlnAccumMotionTotal #5
_rlnMicrographNameEven #6
_rlnMicrographNameOdd #7
MotionCorr/job002/A/mic_PS.mrc MotionCorr/job002/A/mic.mrc MotionCorr/job002/A/mic.star 1 16.420495 MotionCorr/job002/A/mic_EVN.mrc MotionCorr/job002/A/mic_ODD.mrc
MotionCorr/job002/B/mic_PS.mrc MotionCorr/job002/B/mic.mrc MotionCorr/job002/B/mic.star 2 1.0e-07 MotionCorr/job002/B/mic_EVN.mrc MotionCorr/job002/B/mic_ODD.mrc
"""  # noqa: E501

JOB = "External/job003/"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A RELION project folder (the cwd) with two 64x64 micrographs of the same name."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for i, folder in enumerate(("A", "B")):
        d = tmp_path / "MotionCorr/job002" / folder
        d.mkdir(parents=True)
        new_mrc(
            d / "mic.mrc", (rng.normal(size=(64, 64)) + 10 * i).astype(np.float32), voxel_size=0.885
        )
    (tmp_path / "MotionCorr/job002/corrected_micrographs.star").write_text(CORRECTED)
    return tmp_path


def _relion(*args: str) -> int:
    return main(["relion", *args])


def _denoise(*extra: str) -> int:
    star_in = "MotionCorr/job002/corrected_micrographs.star"
    return _relion(
        "denoise", "--o", JOB, "--in_mics", star_in, "--model", "affine", *extra, "--j", "4"
    )


def test_denoise_job_keeps_every_column_and_mirrors_paths(project):
    from cryoden.inference import Denoiser

    assert _denoise() == 0
    job = project / JOB
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not (job / "RELION_JOB_EXIT_FAILURE").exists()
    before = star.read("MotionCorr/job002/corrected_micrographs.star")
    after = star.read(job / "denoised_micrographs.star")
    assert list(after) == ["optics", "micrographs"]
    assert after["optics"].equals(before["optics"])  # both groups, values as written
    mics = after["micrographs"]
    assert list(mics.columns) == list(before["micrographs"].columns)
    other = [c for c in mics.columns if c != "rlnMicrographName"]
    assert mics[other].equals(before["micrographs"][other])  # 1.0e-07 stays 1.0e-07
    assert list(mics["rlnMicrographName"]) == [
        "External/job003/MotionCorr/job002/A/mic.mrc",
        "External/job003/MotionCorr/job002/B/mic.mrc",
    ]
    den = Denoiser("affine")
    for src, out in zip(
        before["micrographs"]["rlnMicrographName"], mics["rlnMicrographName"], strict=True
    ):
        with mrcfile.open(src) as a, mrcfile.open(out) as b:
            np.testing.assert_allclose(b.data, den(a.data), rtol=1e-5, atol=1e-4)
            assert b.voxel_size.x == pytest.approx(0.885)
    nodes = star.read(job / "RELION_OUTPUT_NODES.star")["output_nodes"]
    assert nodes.to_dict("list") == {
        "rlnPipeLineNodeName": ["External/job003/denoised_micrographs.star"],
        "rlnPipeLineNodeTypeLabel": ["MicrographGroupMetadata.star.relion"],
    }


def test_continue_processes_only_what_is_missing(project, capsys):
    assert _denoise() == 0
    job = project / JOB
    done = job / "MotionCorr/job002/A/mic.mrc"
    missing = job / "MotionCorr/job002/B/mic.mrc"
    stamp = done.stat().st_mtime_ns
    missing.unlink()
    capsys.readouterr()
    assert _denoise() == 0  # RELION's "continue": the same command again
    err = capsys.readouterr().err
    assert "1 of 2 micrographs already done" in err and err.count(" -> ") == 1
    assert done.stat().st_mtime_ns == stamp and missing.is_file()
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    # another model on the same job would mix results: refused, failure marker
    star_in = "MotionCorr/job002/corrected_micrographs.star"
    assert _relion("denoise", "--o", JOB, "--in_mics", star_in, "--model", "fcnn") == 2
    assert "model" in capsys.readouterr().err
    assert (job / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (job / "RELION_JOB_EXIT_SUCCESS").exists()


def test_bad_micrograph_fails_the_job_but_not_the_others(project, capsys):
    Path("MotionCorr/job002/B/mic.mrc").write_bytes(b"not an MRC file" * 100)
    assert _denoise() == 1
    err = capsys.readouterr().err
    bad = [ln for ln in err.splitlines() if "error" in ln]
    assert len(bad) == 1 and "MotionCorr/job002/B/mic.mrc" in bad[0]
    job = project / JOB
    assert (job / "MotionCorr/job002/A/mic.mrc").is_file()  # the other one is done
    assert not (job / "denoised_micrographs.star").exists()  # no partial STAR file
    assert (job / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (job / "RELION_OUTPUT_NODES.star").exists()


def test_outputs_stay_inside_the_job_folder(project):
    text = CORRECTED.replace("MotionCorr/job002/B/mic.mrc", "../outside/mic.mrc")
    (project.parent / "outside").mkdir()
    new_mrc(
        project.parent / "outside/mic.mrc",
        np.ones((64, 64), np.float32) + np.eye(64, dtype=np.float32),
    )
    Path("odd.star").write_text(text)
    assert _relion("denoise", "--o", JOB, "--in_mics", "odd.star", "--model", "affine") == 0
    names = list(
        star.read(Path(JOB) / "denoised_micrographs.star")["micrographs"]["rlnMicrographName"]
    )
    for n in names:
        assert os.path.realpath(n).startswith(os.path.realpath(JOB))
    assert os.listdir(project.parent / "outside") == ["mic.mrc"]


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--in_mics", "missing.star"], "missing.star"),
        (
            ["--in_mics", "MotionCorr/job002/corrected_micrographs.star", "--in_parts", "p.star"],
            "--in_parts",
        ),
        (
            ["--in_mics", "MotionCorr/job002/corrected_micrographs.star", "--no-such-flag", "1"],
            "--no-such-flag",
        ),
        (
            ["--in_mics", "MotionCorr/job002/corrected_micrographs.star", "--model", "nonesuch"],
            "nonesuch",
        ),
    ],
)
def test_bad_input_is_one_line_and_a_failure_marker(project, capsys, args, problem):
    assert _relion("denoise", "--o", JOB, *args) != 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if problem in ln]
    assert err, "the error names the file or flag"
    assert (project / JOB / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (project / JOB / "RELION_JOB_EXIT_SUCCESS").exists()


def test_abort_request_stops_the_job(project):
    (project / JOB).mkdir(parents=True)
    (project / JOB / "RELION_JOB_ABORT_NOW").touch()
    assert _denoise() == 1
    # RELION's marker (src/pipeline_control.h), alone: with a failure marker beside it the GUI
    # would show the job as failed, not aborted
    assert (project / JOB / "RELION_JOB_EXIT_ABORTED").exists()
    assert not (project / JOB / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (project / JOB / "RELION_JOB_ABORTED").exists()
    assert not (project / JOB / "MotionCorr").exists()


def test_train_job_reads_even_odd_sums(project, monkeypatch):
    from cryoden import relionjob

    seen = {}

    def fake_train(evens, odds, run, links, flags):
        seen.update(evens=evens, odds=odds, run=run, flags=flags)
        return 0

    monkeypatch.setattr(relionjob, "train_halves", fake_train)
    star_in = "MotionCorr/job002/corrected_micrographs.star"
    assert _relion("train", "--o", "External/job004/", "--in_mics", star_in, "--epochs", "3") == 0
    assert seen["evens"] == ["MotionCorr/job002/A/mic_EVN.mrc", "MotionCorr/job002/B/mic_EVN.mrc"]
    assert seen["odds"] == ["MotionCorr/job002/A/mic_ODD.mrc", "MotionCorr/job002/B/mic_ODD.mrc"]
    assert seen["run"] == Path("External/job004/model") and seen["flags"] == ["--epochs", "3"]
    nodes = star.read("External/job004/RELION_OUTPUT_NODES.star")["output_nodes"]
    assert list(nodes["rlnPipeLineNodeName"]) == ["External/job004/model/model.npz"]
    # without even/odd sums: one line saying which RELION option makes them
    blocks = star.read(star_in)
    blocks["micrographs"] = blocks["micrographs"].drop(columns=["rlnMicrographNameEven"])
    star.write("plain.star", blocks)
    assert _relion("train", "--o", "External/job005/", "--in_mics", "plain.star") == 2
    assert (project / "External/job005/RELION_JOB_EXIT_FAILURE").exists()


def test_link_halves_pairs_in_order_and_checks_real_files(tmp_path):
    from cryoden import relionjob
    from cryoden.train import pairs

    rng = np.random.default_rng(1)
    files = []
    for name in ("b_half1.mrc", "a_half2.mrc", "c.mrc", "d.mrc"):
        files.append(new_mrc(tmp_path / name, rng.normal(size=(32, 32)).astype(np.float32)))
    even, odd = relionjob.link_halves(
        [str(files[0]), str(files[2])], [str(files[1]), str(files[3])], tmp_path / "l"
    )
    found = pairs.find_pairs(even, odd)
    assert [(os.path.realpath(e), os.path.realpath(o)) for e, o in found] == [
        (str(files[0]), str(files[1])),
        (str(files[2]), str(files[3])),
    ]
    new_mrc(tmp_path / "small.mrc", np.zeros((16, 16), np.float32))
    with pytest.raises(ValueError, match="small.mrc"):
        relionjob.link_halves([str(files[0])], [str(tmp_path / "small.mrc")], tmp_path / "m")


def test_train_job_trains_a_model_that_denoise_uses(project):
    """The real training (tiny preset, 2 steps) behind ``cryoden relion train``, then its model
    in ``cryoden relion denoise``: the chain a RELION user runs."""
    rng = np.random.default_rng(2)
    for folder in ("A", "B"):
        clean = rng.normal(size=(64, 64)).astype(np.float32)
        for half in ("EVN", "ODD"):
            noisy = clean + rng.normal(size=clean.shape).astype(np.float32)
            new_mrc(f"MotionCorr/job002/{folder}/mic_{half}.mrc", noisy, voxel_size=0.885)
    star_in = "MotionCorr/job002/corrected_micrographs.star"
    train = ["--o", "External/job004/", "--in_mics", star_in, "--config", "train-2d-test"]
    train += ["--arch", "affine"]  # compiles in a moment
    assert _relion("train", *train, "--steps", "2", "--crop", "32", "--j", "1") == 0
    model = project / "External/job004/model/model.npz"
    assert model.is_file() and (project / "External/job004/RELION_JOB_EXIT_SUCCESS").exists()
    job = ["--o", "External/job005/", "--in_mics", star_in, "--model", "External/job004/model"]
    assert _relion("denoise", *job) == 0
    assert Path("External/job005/MotionCorr/job002/B/mic.mrc").is_file()


def test_shards_split_the_list_and_the_last_one_finishes_the_job(project, monkeypatch, capsys):
    job = project / JOB
    # Slurm array task 1 of --array=1-2: the first micrograph only, and no STAR file or marker
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "2")
    assert _denoise() == 0
    assert (job / "MotionCorr/job002/A/mic.mrc").is_file()
    assert not (job / "MotionCorr/job002/B/mic.mrc").exists()
    assert not (job / "denoised_micrographs.star").exists()
    assert not any(p.name.startswith("RELION_JOB_EXIT") for p in job.iterdir())
    assert "1 micrograph(s) left to the other shards" in capsys.readouterr().err
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX"):
        monkeypatch.delenv(k)
    assert _denoise("--shard", "2/2") == 0  # the last share: completes the job
    assert (job / "MotionCorr/job002/B/mic.mrc").is_file()
    mics = star.read(job / "denoised_micrographs.star")["micrographs"]
    assert len(mics) == 2 and (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert _denoise("--shard", "3/2") == 2  # a bad share is a one-line error and a failure
    assert "--shard" in capsys.readouterr().err and (job / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (job / "RELION_JOB_EXIT_SUCCESS").exists()


def test_two_inputs_never_share_an_output(project, capsys):
    absolute = str(project / "MotionCorr/job002/A/mic.mrc")
    clash = "_absolute" + absolute  # mirrors to the same place as the absolute path
    Path(clash).parent.mkdir(parents=True)
    new_mrc(clash, np.ones((64, 64), np.float32))
    text = CORRECTED.replace("MotionCorr/job002/A/mic.mrc", absolute).replace(
        "MotionCorr/job002/B/mic.mrc", clash
    )
    Path("clash.star").write_text(text)
    assert _relion("denoise", "--o", JOB, "--in_mics", "clash.star", "--model", "affine") == 2
    assert "would both be written" in capsys.readouterr().err
    assert (project / JOB / "RELION_JOB_EXIT_FAILURE").exists()
