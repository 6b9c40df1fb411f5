"""Level-wise inference: stage halos are the true dependency reach, and the level-wise output
equals the whole (stride-padded) image's at odd sizes with several tiles per stage and axis."""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import new_mrc

from cryoden import infer, levelwise, memory, progress, tiling
from cryoden.inference import Denoiser


def _normalised(shape, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return x, (x - x.mean(dtype=np.float64)) / x.std(dtype=np.float64, ddof=1)


def _check_levelwise(d: Denoiser, shape, tiles, seed=0):
    x, xn = _normalised(shape, seed)
    whole = d(x, normalize=True)  # fits: the whole padded image in one kernel call
    net = d.nets[0]
    lw = levelwise.Levelwise(net.spec, net.params, d.dtype, d.mesh)
    padded = tuple(tiling.round_up(n, d.stride) for n in shape)
    plan = lw.plan(padded, 2**40, tiles=tiles)
    for sp in plan.stages:  # the requested tiling really splits every axis it can
        counts = [len({t.window[a].start for t in sp.tiles}) for a in range(len(shape))]
        assert all(
            c > 1 or n <= 2 * sp.halo + sp.stage.align for c, n in zip(counts, sp.grid, strict=True)
        )
    y = lw.run(xn.astype(np.float32), plan)
    assert y.shape == x.shape
    assert np.abs(y - whole).max() <= 1e-5 * x.std()
    return plan


@pytest.mark.parametrize("name", ["unet", "unet-v0.2.1", "unet-small"])
def test_levelwise_equals_whole_2d_odd_size(name):
    d = Denoiser(name, ndim=2)
    # padded 224x160 (unet) / 208x160 (unet-small); S2 of unet-small tiles too
    plan = _check_levelwise(d, (203, 157), {"s1": (16, 16), "s2": (16, 16), "s3": (48, 48)})
    assert [len(p.tiles) > 1 for p in plan.stages] == [True, name == "unet-small", True]


def test_levelwise_equals_whole_2d_coarse_stage_tiled():
    d = Denoiser("unet", ndim=2)
    # padded 384x352: the coarse grid 96x88 splits into 2x2 tiles with the 36-px coarse halo
    plan = _check_levelwise(d, (371, 333), {"s1": (64, 64), "s2": (80, 80), "s3": (160, 160)})
    assert len(plan.stages[1].tiles) > 1


def test_levelwise_equals_whole_3d_odd_size():
    d = Denoiser("unet-3d", ndim=3)
    plan = _check_levelwise(d, (29, 37, 27), {"s1": (6, 12, 6), "s3": (28, 40, 28)})
    assert [len(p.tiles) for p in plan.stages] == [8, 1, 12]


def test_stage_halos_equal_perturbation_reach():
    """Perturb one input column of each stage input (every phase): the output columns that change
    are exactly those whose computed dependency interval contains it, and each stage's halo is
    the largest distance (output-grid units) from a perturbed column to a changed output."""
    d = Denoiser("unet-v0.2.1", ndim=2)
    net = d.nets[0]
    lw = levelwise.Levelwise(net.spec, net.params, d.dtype, d.mesh)
    rows, n = 8, 256  # output grid 8 x 256; the reach is measured along the width
    rng = np.random.default_rng(1)
    for st in lw.stages:
        fn = lw._fn(st)
        deps = levelwise.dependencies(net.spec, st, n)
        shapes = [(1, *levelwise._scale_shape((rows, n), e), c) for _, c, e in st.inputs]
        inputs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        base = np.asarray(fn(net.params, *inputs))
        reach = 0
        for k, (name, _, e) in enumerate(st.inputs):
            for p in range(shapes[k][2] // 2, shapes[k][2] // 2 + 4):
                bumped = [a.copy() for a in inputs]
                bumped[k][0, :, p] += 100.0
                out = np.asarray(fn(net.params, *bumped))
                changed = np.abs(out - base).max(axis=(0, 1, 3)) > 0
                lo, hi = deps[name]
                np.testing.assert_array_equal(changed, (lo <= p) & (p <= hi))
                cols = np.flatnonzero(changed)
                first, last = levelwise._scale_shape((p, p + 1), -e)
                reach = max(reach, int(cols[-1] - first), int(last - 1 - cols[0]))
        assert reach == lw.halos[st.name], st.name


def test_denoiser_runs_levelwise_when_tiled_and_is_exact(monkeypatch):
    """Under a budget that forces tiles, the default path is level-wise (exact), both in 2D and
    (replacing the approximate 48-voxel margins) in 3D; the chosen tiles fit the budget."""
    x, _ = _normalised((203, 157), seed=3)
    d = Denoiser("unet-small", ndim=2)
    whole = d(x, normalize=True)
    monkeypatch.setenv("CRYODEN_MEMORY_BUDGET", "8M")
    tiled = d(x, normalize=True)
    lw = d.nets[0].levelwise
    plan = lw.plan((208, 160), 8 * 2**20)
    assert sum(len(p.tiles) for p in plan.stages) > 3
    for sp in plan.stages:
        assert memory.compiled_bytes(lw.compiled(sp.stage, sp.tile)) <= 8 * 2**20
    assert np.abs(tiled - whole).max() <= 1e-5 * x.std()
    forced = d(x, normalize=True, levelwise=True)
    assert np.abs(forced - whole).max() <= 1e-5 * x.std()


FOUR_DEVICES = """
import jax, numpy as np
from cryoden import levelwise
from cryoden.inference import Denoiser
assert len(jax.local_devices()) == 4
x = np.random.default_rng(5).normal(3.0, 2.0, (150, 170)).astype(np.float32)
whole = Denoiser("unet-small", ndim=2, devices=jax.local_devices()[:1])(x, normalize=True)
four = Denoiser("unet-small", ndim=2)
net = four.nets[0]
lw = levelwise.Levelwise(net.spec, net.params, four.dtype, four.mesh)
plan = lw.plan((152, 176), 0, tiles={"s1": (16, 16), "s2": (16, 16), "s3": (64, 64)})
assert all(sp.batch == 4 and len(sp.tiles) > 4 for sp in plan.stages), plan
xn = (x - x.mean(dtype=np.float64)) / x.std(dtype=np.float64, ddof=1)
y = lw.run(xn.astype(np.float32), plan)
assert np.abs(y - whole).max() <= 1e-5 * x.std(), np.abs(y - whole).max()
print("OK")
"""


def test_levelwise_on_four_devices_equals_one_device_whole():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    res = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("OK")


def test_3d_default_goes_levelwise_instead_of_approximate_tiles(monkeypatch):
    """A tomogram that needs tiles under the budget is planned and run level by level (exact),
    not in 48-voxel-margin tiles; with an explicit --padding the ordinary tiles remain."""
    calls = []
    monkeypatch.setattr(
        levelwise.Levelwise, "plan", lambda self, padded, budget, **kw: calls.append(padded)
    )
    monkeypatch.setattr(
        levelwise.Levelwise, "run", lambda self, xn, plan, *a, **kw: np.zeros_like(xn)
    )
    monkeypatch.setenv("CRYODEN_MEMORY_BUDGET", "64M")
    d = Denoiser("unet-3d", ndim=3)
    x, _ = _normalised((40, 150, 150))
    assert len(d.plan(x.shape, None, None)[1]) > 1  # ordinary tiles would be needed
    d(x)
    assert calls == [(64, 160, 160)]
    assert len(d.plan(x.shape, None, 16)[1]) > 1
    d.nets[0].kernel = lambda params, batch: np.zeros(batch.shape, np.float32)  # ordinary tiles
    d(x, padding=16)  # explicit margins: the ordinary tiled path, not level-wise
    assert calls == [(64, 160, 160)]


def test_levelwise_progress_counts_stage_calls(tmp_path, capsys, monkeypatch):
    """A level-wise file reports its progress in steps, the stage kernel calls done / total
    over all stages (not a single 'level by level' step), every call in order."""
    monkeypatch.setenv("CRYODEN_MEMORY_BUDGET", "8M")
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)  # a plain progress line for every step
    x, _ = _normalised((203, 157), seed=4)
    new_mrc(tmp_path / "a.mrc", x)
    parser = argparse.ArgumentParser()
    infer.add_args(parser)
    args = [str(tmp_path / "a.mrc"), "-o", str(tmp_path / "out"), "-m", "unet-small"]
    assert infer.main(parser.parse_args(args)) == 0
    steps = re.findall(r"cryoden: \[1/1\] \S+: (\d+)/(\d+) steps", capsys.readouterr().err)
    assert len(steps) > 3, steps  # before: one step, so no progress at all
    d = Denoiser("unet-small", ndim=2)
    route = d.route(d.nets[0], x.shape)
    total = sum(sp.calls for sp in route.levelwise.stages)
    assert route.kind == "levelwise" and route.calls == total > 3
    assert [(int(a), int(b)) for a, b in steps] == [(k, total) for k in range(1, total)]


def test_progress_of_several_models_adds_up():
    """Steps of an averaged run count on over models, also when each model's run reports one
    step (a whole image or a split: before, the second model's single step was lost)."""
    seen = []
    update = infer.Runner._batches(None, seen.append)
    for total in (1, 1):
        update(1, total)
    assert seen == [1, 2]
    seen.clear()
    update = infer.Runner._batches(None, seen.append)
    for _ in range(2):
        for k in range(1, 4):
            update(k, 3)
    assert seen == [1, 2, 3, 4, 5, 6]


def test_3d_stage_kernels_keep_only_slabs_of_full_resolution_maps():
    """S3 and S1 stream their full-resolution blocks over depth slabs (cryoden/depthstream.py):
    XLA's memory analysis of the compiled kernels, per image voxel, is a fraction of the
    unstreamed kernels' (1149 and 443 B per voxel at these tiles; 354 and 88 streamed)."""
    d = Denoiser("unet-3d", ndim=3)
    net = d.nets[0]
    lw = levelwise.Levelwise(net.spec, net.params, d.dtype, d.mesh)
    s1, _, s3 = lw.stages
    assert memory.compiled_bytes(lw.compiled(s3, (64, 32, 32))) / (64 * 32 * 32) < 500
    assert memory.compiled_bytes(lw.compiled(s1, (16, 8, 8))) / (64 * 32 * 32) < 200


def test_levelwise_work_counts_every_loop_iteration(monkeypatch):
    """Stage FLOPs are at least the multiply-adds of their convolutions, counted by hand (and
    a few percent more: biases, activations, poolings). XLA's cost analysis counts a loop body
    once, so they are counted on the stages traced without loops (depth slabs, scanned depth
    taps); counted on the compiled kernels, S1 came out at 0.48x of this (S3 ~0.76x)."""
    monkeypatch.setattr(levelwise, "_MEASURED", {})
    monkeypatch.setattr(levelwise, "MEASURE_SIDE", {3: {"s1": 4, "s2": 8, "s3": 16}})
    d = Denoiser("unet-3d", ndim=3)
    net = d.nets[0]
    lw = levelwise.Levelwise(net.spec, net.params, d.dtype, d.mesh)
    padded = (32, 64, 64)
    plan = lw.plan(padded, 2**40, verify=False)
    assert [len(sp.tiles) for sp in plan.stages] == [1, 1, 1]
    # 2 x taps x in x out per output voxel, per image voxel (1/8 at half resolution)
    enc1, enc2 = 2 * 343 * 1 * 48, 2 * 27 * 48 * 48 / 8
    dec2 = 2 * (8 * 96 * 96 + 27 * 48 * 96 + 27 * 96 * 96) / 8  # polyphase (2x2x2 taps), skip
    dec1 = 2 * (8 * 96 * 64 + 27 * 1 * 64 + 27 * 64 * 32 + 27 * 32 * 1)
    for sp, macs in zip(plan.stages[::2], (enc1 + enc2, enc1 + dec2 + dec1), strict=True):
        assert 1.0 <= sp.flops / math.prod(padded) / macs < 1.08, sp.stage.name
