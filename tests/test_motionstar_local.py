"""Local motion in motion STAR files: RELION's data_local_shift and polynomial model."""

from __future__ import annotations

import numpy as np
import pytest

from cryoden import motionstar
from cryoden.align_local import LocalModel


def _model(n=9, shape=(300, 400), seed=0) -> LocalModel:
    rng = np.random.default_rng(seed)
    coeffs = rng.normal(0, 1.5, (2, 6, 3))
    centres = np.array([[99.5, 74.5], [299.5, 74.5], [99.5, 224.5], [299.5, 224.5]])
    patch_shifts = rng.normal(0, 1.0, (4, n, 2))
    patch_shifts -= patch_shifts[:, :1]
    return LocalModel(coeffs, shape, n, centres, patch_shifts)


def test_local_motion_round_trips_and_leaves_the_global_part_alone(tmp_path):
    local = _model()
    n, (h, w) = local.n_frames, local.shape
    shifts = np.cumsum(np.random.default_rng(1).normal(0, 1, (n, 2)), axis=0)
    shifts -= shifts[0]
    kw = dict(movie_name="m.tif", shape=(h, w), pixel_size=1.1, start_frame=3)
    motionstar.write(tmp_path / "global.star", shifts, **kw)
    motionstar.write(tmp_path / "local.star", shifts, local=local, **kw)
    plain, back = (
        motionstar.read(tmp_path / "global.star"),
        motionstar.read(tmp_path / "local.star"),
    )
    np.testing.assert_array_equal(back.shifts, plain.shifts)  # the global part is unchanged
    np.testing.assert_array_equal(back.frame_numbers, plain.frame_numbers)
    assert {k: v for k, v in back.general.items() if k != "rlnMotionModelVersion"} == {
        k: v for k, v in plain.general.items() if k != "rlnMotionModelVersion"
    }
    assert plain.general["rlnMotionModelVersion"] == 0 and plain.local_shifts is None
    assert back.general["rlnMotionModelVersion"] == 1 and back.model is not None
    assert plain.model is None
    # data_local_shift: every patch in every frame, frame numbers from the start frame
    rows = back.local_shifts
    assert rows.shape == (4 * n, 5)
    np.testing.assert_array_equal(rows[:n, 0], np.arange(3, 3 + n))
    np.testing.assert_allclose(rows[:, 1:3], np.repeat(local.centres, n, axis=0), atol=1e-6)
    np.testing.assert_allclose(rows[:, 3:], local.patch_shifts.reshape(-1, 2), atol=1e-6)
    # RELION's model, evaluated as RELION does, is ours: anywhere, any frame
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, w - 1, 50), rng.uniform(0, h - 1, 50)
    for t in range(n):
        np.testing.assert_allclose(back.local_at(3 + t, x, y), local.at(x, y, t), atol=1e-6)
    assert np.abs(local.at(x, y, n - 1)).max() > 1  # a model that moves


def test_local_model_of_fewer_terms_and_mismatch(tmp_path):
    local = _model(n=3)
    small = LocalModel(local.coeffs[:, :3, :2], local.shape, 3, local.centres, local.patch_shifts)
    motionstar.write(tmp_path / "s.star", np.zeros((3, 2)), movie_name="m", shape=(300, 400),
                     local=small)  # fmt: skip
    back = motionstar.read(tmp_path / "s.star")
    x, y = np.array([0.0, 200.0, 399.0]), np.array([0.0, 150.0, 299.0])
    for t in range(3):
        np.testing.assert_allclose(back.local_at(1 + t, x, y), small.at(x, y, t), atol=1e-6)
    with pytest.raises(ValueError, match="local model is of 3 frames") as e:
        motionstar.write(tmp_path / "x.star", np.zeros((4, 2)), movie_name="m", shape=(300, 400),
                         local=small)  # fmt: skip
    assert "x.star" in str(e.value) and not (tmp_path / "x.star").exists()


def test_bad_local_shift_block_is_one_line(tmp_path):
    path = tmp_path / "bad.star"
    motionstar.write(path, np.zeros((9, 2)), movie_name="m", shape=(300, 400), local=_model())
    text = path.read_text().replace("_rlnCoordinateY", "_rlnSomethingElse")
    path.write_text(text)
    with pytest.raises(ValueError, match="data_local_shift lacks rlnCoordinateY") as e:
        motionstar.read(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
