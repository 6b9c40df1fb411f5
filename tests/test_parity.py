"""Numerical parity with Topaz-Denoise (PyTorch reference) for all seven pretrained models.

Whole image on both sides, float32 both sides; tolerance 1e-5 x the input's std.
Default mode at stride-multiple sizes equals Topaz; ``topaz_compat=True`` equals Topaz at odd sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import topaz_ref
from conftest import blob_volume

from cryoden.inference import Denoiser

pytestmark = pytest.mark.reference

MODELS_2D = ["unet", "unet-small", "fcnn", "affine", "unet-v0.2.1"]
MODELS_3D = ["unet-3d-10a", "unet-3d-20a"]
# fcnn (64 channels, 11x11 kernels, no down-sampling: each pixel's computation does not depend on
# the image size) is compared on a quarter of the area; it cost 4x the U-nets at full size.
QUARTER = {"fcnn"}


def _check(ours, ref, x):
    assert ours.dtype == np.float32 and ours.shape == x.shape
    err = float(np.max(np.abs(ours - ref)))
    assert err <= 1e-5 * float(x.std()), (err, float(x.std()))


@pytest.mark.parametrize("name", MODELS_2D)
def test_2d_default_mode_at_stride_multiple(name, micrograph):
    x = micrograph[:160, :224].copy() if name in QUARTER else micrograph[:320, :480].copy()
    _check(Denoiser(name, ndim=2)(x), topaz_ref.topaz_denoise_2d(x, name), x)


@pytest.mark.parametrize("name", MODELS_2D)
def test_2d_topaz_compat_at_odd_size(name, micrograph):
    x = micrograph[100:433, 200:717].copy()  # 333 x 517
    if name in QUARTER:
        x = x[:167, :259].copy()  # odd sizes still
    _check(Denoiser(name, ndim=2)(x, topaz_compat=True), topaz_ref.topaz_denoise_2d(x, name), x)


@pytest.mark.parametrize("name", MODELS_3D)
def test_3d_default_mode_at_stride_multiple(name):
    x = blob_volume((64, 96, 96), seed=1)
    d = Denoiser(name, ndim=3)
    assert len(d.plan(x.shape, None, None)[1]) == 1  # the default fits: whole volume
    _check(d(x), topaz_ref.topaz_denoise_3d(x, name), x)


@pytest.mark.parametrize("name", MODELS_3D)
def test_3d_topaz_compat_at_odd_size(name):
    x = blob_volume((37, 45, 53), seed=2)
    _check(Denoiser(name, ndim=3)(x, topaz_compat=True), topaz_ref.topaz_denoise_3d(x, name), x)


def test_odd_size_default_differs_from_topaz_but_compat_matches(micrograph):
    """Documents docs/inference.md: at odd sizes the padded default is not Topaz's number."""
    x = micrograph[:333, :517].copy()
    d = Denoiser("unet", ndim=2)
    ref = topaz_ref.topaz_denoise_2d(x, "unet")
    assert np.max(np.abs(d(x) - ref)) > 1e-3 * x.std()
    assert np.max(np.abs(d(x, topaz_compat=True) - ref)) <= 1e-5 * x.std()
