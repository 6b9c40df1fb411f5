"""Tiling: plans partition the image with aligned windows; tiled output == whole-image output."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cryoden import tiling, weights
from cryoden.inference import Denoiser
from cryoden.models import ModelSpec, build_model, torch_nearest_index


@pytest.mark.parametrize("n", [32, 64, 96, 352, 544, 1024, 3840])
@pytest.mark.parametrize(
    "tile,margin,stride", [(416, 164, 32), (96, 32, 32), (64, 15, 1), (120, 44, 8)]
)
def test_plan_axis_partitions_with_margins(n, tile, margin, stride):
    n = tiling.round_up(n, stride)
    try:
        a = tiling.plan_axis(n, tile, margin, stride)
    except ValueError:
        assert tiling.round_up(tile, stride) < min(n, 2 * margin + stride)
        return
    assert a.starts[0] == 0 and a.stops[-1] == n
    assert all(s1 == s0 for s1, s0 in zip(a.stops[:-1], a.starts[1:], strict=False))  # abutting
    assert a.size % stride == 0 or a.size == n
    for o, s0, s1 in zip(a.origins, a.starts, a.stops, strict=False):
        assert o % stride == 0 and 0 <= o and o + a.size <= n
        assert s0 == 0 or s0 - o >= margin  # inner edges keep the margin
        assert s1 == n or o + a.size - s1 >= margin
        assert s1 > s0


def test_plan_covers_every_pixel_once():
    tiles = tiling.plan((96, 160, 128), (64, 64, 64), 16, 32)
    count = np.zeros((96, 160, 128), int)
    for t in tiles:
        count[t.keep] += 1
        assert tuple(s.stop - s.start for s in t.window) == (64, 64, 64)
    assert (count == 1).all()


def test_least_work_tile_whole_when_it_fits_and_cuts_long_axes_first():
    assert tiling.least_work_tile((512, 512), 164, 32, 10**6) == (512, 512)
    t = tiling.least_work_tile((64, 1024, 1024), 32, 32, 64 * 256 * 256)
    assert t[0] == 64 and 64 * t[1] * t[2] <= 64 * 256 * 256


def test_axis_options_are_the_smallest_tile_per_count():
    n, margin, stride = 4096, 164, 32
    options = tiling.axis_options(n, margin, stride)
    assert options[-1] == (n, 1)
    for t, count in options:
        assert len(tiling.plan_axis(n, t, margin, stride).origins) == count
        if t - stride >= 2 * margin + stride:  # one stride less needs more windows
            assert len(tiling.plan_axis(n, t - stride, margin, stride).origins) > count


def test_work_counts_margins_and_padding():
    tiles = tiling.plan((96, 160), (64, 96), 16, 32)
    assert tiling.work((90, 150), tiles) == len(tiles) * 64 * 96 / (90 * 150)


@pytest.mark.parametrize(
    "n_in,n_out",
    [
        (1, 3),
        (5, 11),
        (7, 15),
        (11, 23),
        (3, 7),
        (16, 33),
        (31, 63),
        (46, 93),
        (10, 20),
        (115, 231),
        (1000, 2001),
    ],
)
def test_torch_nearest_index_matches_torch(n_in, n_out):
    src = torch.arange(n_in, dtype=torch.float32)[None, None]
    ref = F.interpolate(src, size=n_out, mode="nearest")[0, 0].numpy().astype(int)
    np.testing.assert_array_equal(torch_nearest_index(n_in, n_out), ref)


@pytest.mark.parametrize(
    "spec,measured",
    [
        (ModelSpec("unet", 2, 11, 5), 162),
        (ModelSpec("unet", 2, 7, 3), 159),
        (ModelSpec("unet-small", 2, 11, 5), 42),
        (ModelSpec("fcnn", 2, 11, 5), 15),
        (ModelSpec("affine", 2, 31, 5), 15),
    ],
)
def test_halo_bounds_the_measured_receptive_field(spec, measured):
    # measured half-widths (docs/architecture.md); our exact bound is >= and within a few px.
    assert measured <= spec.halo <= measured + 4


@pytest.mark.parametrize("offset", [(128, 131), (133, 128)])
def test_halo_is_a_true_bound_on_a_perturbation(offset):
    params, spec, _ = weights.load("unet-small")
    apply = jax.jit(build_model(spec).apply)
    x = np.random.default_rng(0).normal(size=(1, 256, 256, 1)).astype(np.float32)
    x2 = x.copy()
    x2[(0, *offset, 0)] += 50.0
    diff = np.asarray(apply({"params": params}, x2) - apply({"params": params}, x))[0, ..., 0]
    reach = np.abs(np.argwhere(diff != 0) - offset).max()
    assert spec.halo - 8 <= reach <= spec.halo


@pytest.mark.parametrize("shape", [(333, 517), (20, 13), (31, 300), (64, 64)])
def test_tiled_equals_whole_2d(shape, micrograph):
    x = micrograph[: shape[0], : shape[1]].copy()
    d = Denoiser("unet", ndim=2)
    whole = d(x)
    for patch in (32, 100):
        tiled = d(x, patch_size=patch, batch_size=2)
        assert np.max(np.abs(tiled - whole)) <= 1e-5 * x.std()


def test_tiled_equals_whole_for_model_lists_and_small_strides(micrograph):
    x = micrograph[:150, :170].copy()
    d = Denoiser(["unet-small", "fcnn", "affine"], ndim=2)
    assert d.stride == 8
    whole = d(x)
    assert len(d.plan(x.shape, 24, None)[1]) > 4
    assert np.max(np.abs(d(x, patch_size=24) - whole)) <= 1e-5 * x.std()


def test_one_compile_per_tile_shape(micrograph):
    d = Denoiser("unet-small", ndim=2)
    x = micrograph[:300, :300].copy()
    n_tiles = len(d.plan(x.shape, 40, None, batch_size=2)[1])
    assert n_tiles >= 6
    d(x, patch_size=40, batch_size=2)
    assert d.compilations == 1
    d(x[::-1].copy(), patch_size=40, batch_size=2)  # same tile shape, new image: no recompile
    assert d.compilations == 1
    d(x, patch_size=64, batch_size=2)  # new tile shape: exactly one more
    assert d.compilations == 2


def test_constant_image_gives_constant_output():
    d = Denoiser("unet-small", ndim=2)
    y = d(np.full((50, 60), 7.5, np.float32))
    assert np.all(y == 7.5)
    assert np.all(d(np.full((50, 60), 7.5), normalize=True) == 0)


def test_nan_input_is_rejected():
    x = np.ones((40, 40), np.float32)
    x[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Denoiser("affine", ndim=2)(x)


def test_normalize_keeps_normalised_output(micrograph):
    x = micrograph[:128, :96].copy()
    d = Denoiser("unet-small", ndim=2)
    y, yn = d(x), d(x, normalize=True)
    mean, std = x.mean(dtype=np.float64), x.std(dtype=np.float64, ddof=1)
    np.testing.assert_allclose(y, yn * std + mean, rtol=1e-5, atol=1e-5 * std)


def test_bfloat16_close_to_float32(micrograph):
    x = micrograph[:128, :128].copy()
    y32 = Denoiser("unet", ndim=2)(x, normalize=True)
    y16 = Denoiser("unet", ndim=2, dtype="bfloat16")(x, normalize=True)
    assert y16.dtype == np.float32
    assert np.corrcoef(y32.ravel(), y16.ravel())[0, 1] > 0.99


def test_3d_tiles_are_close_and_whole_when_exact(micrograph):
    from conftest import blob_volume

    x = blob_volume((40, 72, 80), seed=3)
    d = Denoiser("unet-3d", ndim=3)
    whole = d(x)
    tiled_exact = d(x, patch_size=8, padding=d.halo)  # margins >= halo: exact
    assert np.max(np.abs(tiled_exact - whole)) <= 1e-5 * x.std()
