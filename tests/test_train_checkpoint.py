"""Checkpoints: exact resume, SIGKILL mid-save, damaged checkpoints, keep policies, export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from train_subproc import write_pairs

from cryoden import weights
from cryoden.models import build_model
from cryoden.train import checkpoint, loop
from cryoden.train import config as C

HERE = Path(__file__).resolve().parent
STEPS_PER_EPOCH, EPOCHS = 3, 3  # 3 training pairs x 4 crops / batch 4


def make_cfg(data: Path, out: Path, **run) -> C.Config:
    cfg = C.merge(C.Config(), C.load_preset("train-2d-test"))
    return C.merge(
        cfg,
        {
            "model": {"arch": "affine", "base_width": 31},
            "data": {
                "even": str(data / "even"),
                "odd": str(data / "odd"),
                "crop": 32,
                "samples_per_pair": 4,
            },
            "run": {"out": str(out), "epochs": EPOCHS, **run},
        },
    )


def flat(params) -> dict[str, np.ndarray]:
    return weights.flatten(params)


def assert_same(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def tsv(run: Path) -> list[list[str]]:
    """log.tsv rows without the wall-time column."""
    return [r.split("\t")[:-1] for r in (run / "log.tsv").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_pairs(root, n=4, size=48)
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run: (run dir, result)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = loop.train(make_cfg(data, out))
    assert result["step"] == STEPS_PER_EPOCH * EPOCHS and not result["interrupted"]
    return out, result


def test_interrupted_run_resumes_bitwise(data, reference, tmp_path, monkeypatch):
    ref_dir, ref = reference
    out = tmp_path / "run"
    cfg = make_cfg(data, out)
    monkeypatch.setattr(loop._Stop, "requested", lambda self, ckpt, step: step == 4)
    first = loop.train(cfg)  # mid-epoch 2: saves step 4 and stops
    assert first["interrupted"] and first["step"] == 4
    assert 4 in _saved_steps(out / "checkpoints")
    monkeypatch.undo()
    second = loop.train(cfg)
    assert second["step"] == ref["step"] and not second["interrupted"]
    assert_same(second["params"], ref["params"])
    assert tsv(out) == tsv(ref_dir)  # epoch means include the steps before the interruption
    assert len(json.loads((out / "run.json").read_text())["invocations"]) == 2


def _saved_steps(ckdir: Path) -> list[int]:
    """Steps orbax lists in ``ckdir``; the manager is closed again, so that its clean-up of
    partial saves has finished before the next run opens the directory."""
    ckpt = checkpoint.Checkpoints(ckdir, epoch_end_steps=[])
    try:
        return ckpt.steps()
    finally:
        ckpt.close()


def test_sigkill_mid_save_leaves_no_bad_checkpoint(data, reference, tmp_path):
    _, ref = reference
    out = tmp_path / "run"
    cfg = make_cfg(data, out)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    )
    p = subprocess.run(
        [sys.executable, str(HERE / "train_subproc.py"), "kill", str(cfg_file), "6"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    ckdir = out / "checkpoints"
    assert any(".orbax-checkpoint-tmp" in d.name for d in ckdir.iterdir())  # the partial save
    assert _saved_steps(ckdir) == [3]
    result = loop.train(cfg)  # resumes from step 3
    assert_same(result["params"], ref["params"])
    assert not any(".orbax-checkpoint-tmp" in d.name for d in ckdir.iterdir())


def _damage(step_dir: Path, how: str) -> None:
    """Damage a finished checkpoint the way a disk or a careless copy would."""
    if how == "meta":
        (step_dir / "meta" / "metadata").write_text('{"step": 1')  # truncated JSON
        return
    if how == "iterator":  # other valid JSON: the grain iterator would skip or repeat batches
        f = step_dir / "data" / "process_0-of-1.json"
        state = json.loads(f.read_text())
        assert state["next_index"] > 0
        f.write_text(json.dumps(dict(state, next_index=state["next_index"] - 1), indent=4))
        return
    if how == "best":  # valid JSON, one value changed: the best loss so far
        f = step_dir / "meta" / "metadata"
        f.write_text(json.dumps(dict(json.loads(f.read_text()), best=0.0)))
        return
    if how == "index":  # OCDBT b-tree node: tensorstore checks its CRC
        node = next((step_dir / "state" / "d").iterdir())
        node.write_bytes(bytes(b ^ 0xFF for b in node.read_bytes()))
        return
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file()]
    big = max(files, key=lambda f: f.stat().st_size)  # the array data (kernel, accumulator)
    raw = bytearray(big.read_bytes())
    if how == "truncate":
        big.write_bytes(raw[: len(raw) // 2])
    else:  # garble: decodes fine to wrong values; only our checksum notices
        mid = len(raw) // 2
        raw[mid : mid + 64] = bytes((b ^ 0x5A) for b in raw[mid : mid + 64])
        big.write_bytes(raw)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore
@pytest.mark.parametrize(
    "how, why",
    [
        ("garble", "checksum mismatch"),
        ("truncate", "rror"),
        ("meta", "Expecting"),
        ("index", "DATA_LOSS"),
        ("iterator", "data-iterator state checksum mismatch"),
        ("best", "meta checksum mismatch"),
    ],
)
def test_damaged_latest_checkpoint_is_skipped(data, reference, tmp_path, how, why, caplog):
    ref_dir, ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref_dir, out)
    latest = max(int(d.name) for d in (out / "checkpoints").iterdir() if d.name.isdigit())
    _damage(out / "checkpoints" / str(latest), how)
    (out / "model.npz").unlink()
    result = loop.train(make_cfg(data, out))  # falls back to the previous step, retrains
    assert f"checkpoint step {latest}" in caplog.text and "unusable" in caplog.text
    assert why in caplog.text
    assert any(d.name.startswith(f"{latest}-") for d in (out / "checkpoints.corrupt").iterdir())
    assert_same(result["params"], ref["params"])


def test_all_checkpoints_damaged_is_an_error(data, reference, tmp_path):
    ref_dir, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_dir, out)
    for d in (out / "checkpoints").iterdir():
        if d.name.isdigit():
            _damage(d, "garble")
    with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint"):
        loop.train(make_cfg(data, out))
    assert not (out / "checkpoints.corrupt").exists()  # nothing moved: a rerun fails again


def test_keep_latest_and_best(reference):
    ref_dir, ref = reference
    rows = tsv(ref_dir)[1:]
    best_step = min(rows, key=lambda r: float(r[3]))[1]
    steps = {d.name for d in (ref_dir / "checkpoints").iterdir() if d.name.isdigit()}
    assert steps == {str(ref["step"]), str(ref["step"] - STEPS_PER_EPOCH), best_step}
    assert int(best_step) == ref["best_step"]


def test_exported_model_is_the_best_and_loads_by_run_dir(data, reference):
    ref_dir, ref = reference
    params, spec, meta = weights.load(ref_dir)
    assert spec == make_cfg(data, ref_dir).model.spec
    assert meta["step"] == ref["best_step"] and meta["val_loss"] == pytest.approx(
        ref["best_val_loss"]
    )
    assert meta["config"] == json.loads((ref_dir / "config.json").read_text())
    y = build_model(spec).apply({"params": params}, np.zeros((1, 40, 40, 1), np.float32))
    assert y.shape == (1, 40, 40, 1) and bool(jax.numpy.isfinite(y).all())
    import cryoden  # the inference API takes the run directory as a model

    x = np.random.default_rng(0).normal(size=(40, 40)).astype(np.float32)
    assert cryoden.denoise(x, model=ref_dir).shape == (40, 40)


def test_resume_with_changed_config_is_refused(data, reference, tmp_path):
    ref_dir, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_dir, out)
    cfg = C.merge(make_cfg(data, out), {"optim": {"lr": 0.5}})
    with pytest.raises(ValueError, match="optim.lr"):
        loop.train(cfg)
    longer = C.merge(make_cfg(data, out), {"run": {"epochs": EPOCHS + 1}})
    assert loop.train(longer)["step"] == STEPS_PER_EPOCH * (EPOCHS + 1)
