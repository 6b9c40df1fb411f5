"""Level-wise plans account for the whole run's memory, not only XLA's analysis of each stage
kernel: the host maps, the caller's arrays and XLA:CPU's convolution scratch (docs/levelwise.md).

Before: a K3 micrograph (5760x4092) under an 8 GiB budget peaked at 11.17 GiB RSS, its S3
kernel at 7.4 GiB by the analysis plus ~1 GiB of host arrays plus ~2.3 GiB that YNNPACK's
convolutions allocated outside the analysis."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cryoden import levelwise, memory, tiling, xla_scratch
from cryoden.inference import Denoiser

# Per padded image px (float32): x 4 (the caller's normalised, zero-padded image itself),
# p2 48 ch / 16 = 12, h2 96 ch / 16 = 24, y 4; the caller (Denoiser.__call__) also holds its
# input image: 4 (one model: no separate output sum).
HOST_MAPS = {"s1": 4 + 12, "s2": 4 + 12 + 24, "s3": 4 + 24 + 4}
CALLER = 4


def _largest_conv_input(stage: str, tile: tuple[int, ...]) -> int:
    """A lower bound of the stage kernel's largest convolution input (float32, batch 1),
    from the architecture: S1 enc2 reads p1 (48 ch at twice the grid), S2 dec3's second conv
    96 ch at the grid, S3 dec1's second conv 64 ch at full resolution."""
    px = math.prod(tile)
    return 4 * {"s1": 48 * 4 * px, "s2": 96 * px, "s3": 64 * px}[stage]


def test_k3_aspect_plan_keeps_kernels_host_maps_and_conv_scratch_within_budget(monkeypatch):
    budget = 128 * 2**20
    monkeypatch.setenv("CRYODEN_MEMORY_BUDGET", str(budget))
    d = Denoiser("unet", ndim=2)
    net = d.nets[0]
    shape = (500, 704)  # K3's aspect ratio (4092x5760), small
    route = d.route(net, shape)
    assert route.kind == "levelwise"
    padded = tuple(tiling.round_up(n, d.stride) for n in shape)
    for sp in route.levelwise.stages:
        name = sp.stage.name
        kernel = memory.compiled_bytes(net.levelwise.compiled(sp.stage, sp.tile))
        host = (HOST_MAPS[name] + CALLER) * math.prod(padded)
        total = kernel + _largest_conv_input(name, sp.tile) + host
        assert total <= budget, (name, sp.tile, kernel, host)
    for sp in route.levelwise.stages:  # what the planner accounted
        host = (HOST_MAPS[sp.stage.name] + CALLER) * math.prod(padded)
        assert sp.bytes + sp.host <= budget and sp.host == host
    assert len(route.levelwise.stages[2].tiles) > 1  # the budget does split S3


def test_real_size_level_wise_plans_stay_near_one_pass(monkeypatch):
    """K3 and Falcon under 8 GiB, all memory accounted for: still <= 1.15x one whole pass."""
    monkeypatch.setenv("CRYODEN_MEMORY_BUDGET", "8G")
    d = Denoiser("unet", ndim=2)
    net = d.nets[0]
    for shape in [(4092, 5760), (4096, 4096)]:
        padded = tuple(tiling.round_up(n, d.stride) for n in shape)
        plan = d._levelwise_plan(net, padded, verify=False)
        assert all(sp.bytes + sp.host <= 8 * 2**30 for sp in plan.stages)
        assert plan.stages[2].host >= (HOST_MAPS["s3"] + CALLER) * math.prod(padded)
        assert net.levelwise.work(plan) <= 1.15


def test_conv_scratch_is_the_largest_convolution_operand():
    def conv(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)

    x = jax.ShapeDtypeStruct((1, 64, 48, 24), jnp.float32)
    w = jax.ShapeDtypeStruct((5, 5, 24, 8), jnp.float32)
    c = jax.jit(conv).lower(x, w).compile()
    assert xla_scratch.conv_scratch_bytes(c) == 4 * 64 * 48 * 24
    none = jax.jit(lambda a: a * 2).lower(np.zeros((64, 64), np.float32)).compile()
    assert xla_scratch.conv_scratch_bytes(none) == 0

    d = Denoiser("unet", ndim=2)
    net = d.nets[0]
    lw = levelwise.Levelwise(net.spec, net.params, d.dtype, d.mesh)
    s3 = lw.stages[2]
    # S3's largest: dec1's 64-channel full-resolution map, the input of its 64 -> 32 conv
    assert xla_scratch.conv_scratch_bytes(lw.compiled(s3, (64, 96))) == 4 * 64 * 64 * 96


def test_affine_of_a_cropped_view_equals_the_contiguous_result_bitwise():
    """The restore step reads the level-wise output as a cropped view of its padded map: slice
    by slice (no full-size copy), with the same numbers as from a contiguous array."""
    from cryoden.inference import _affine

    rng = np.random.default_rng(3)
    for shape in [(70, 90, 1), (9, 33, 40, 1)]:
        padded = rng.normal(size=shape).astype(np.float32)
        view = padded[(slice(0, shape[0] - 3), slice(1, shape[1] - 2)) + (Ellipsis, 0)]
        assert not view.flags.c_contiguous
        got = _affine(view, 3.7, -12.25)
        np.testing.assert_array_equal(got, _affine(np.ascontiguousarray(view), 3.7, -12.25))
        np.testing.assert_allclose(got, view.astype(np.float64) * 3.7 - 12.25, rtol=1e-6)


def test_one_model_needs_no_output_sum_and_returns_its_own_array(monkeypatch):
    """One model's output is the sum itself (4 B per px less held during the run), and the
    normalised image is written zero-padded once and read as the level-wise ``x`` map: a model
    averaged with itself gives the same numbers bitwise, and every result is a writable
    C-contiguous float32 array (also a level-wise run's, which is a view of a padded map)."""
    x = np.random.default_rng(4).normal(10, 2, size=(37, 45)).astype(np.float32)
    one, two = Denoiser("affine", ndim=2), Denoiser(["affine", "affine"], ndim=2)
    for kw in [{}, {"normalize": True}, {"topaz_compat": True, "normalize": True}]:
        y1, y2 = one(x, **kw), two(x, **kw)
        np.testing.assert_array_equal(y1, y2)
        for y in (y1, y2):
            assert y.flags.writeable and y.flags.c_contiguous and y.dtype == np.float32
    monkeypatch.setenv("CRYODEN_MEMORY_BUDGET", str(64 * 2**20))
    unet = Denoiser("unet", ndim=2)
    y = unet(x, normalize=True, levelwise=True)
    assert y.shape == x.shape and y.flags.writeable and y.flags.c_contiguous
    net = unet.nets[0]
    padded = tuple(tiling.round_up(n, unet.stride) for n in x.shape)
    plan = unet._levelwise_plan(net, padded)
    assert all(sp.host >= CALLER * math.prod(padded) for sp in plan.stages)


def test_level_wise_run_reads_the_callers_padded_image_without_copying_it():
    """``Levelwise.run(..., padded=xpad)`` uses the caller's zero-padded normalised image as its
    ``x`` map: the same output as padding a copy, and the caller's array is left unchanged."""
    d = Denoiser("unet", ndim=2)
    net = d.nets[0]
    xn = np.random.default_rng(5).normal(size=(45, 70)).astype(np.float32)
    padded = tuple(tiling.round_up(n, d.stride) for n in xn.shape)
    xpad = np.zeros(padded, np.float32)
    xpad[: xn.shape[0], : xn.shape[1]] = xn
    keep = xpad.copy()
    lw = levelwise.Levelwise(net.spec, net.params, d.dtype, d.mesh)
    plan = lw.plan(padded, 2**30, tiles={"s1": (16, 16), "s2": (16, 16), "s3": (32, 32)})
    seen = []
    real = lw._run_stage

    def spy(sp, maps, out, step):
        seen.append(np.shares_memory(maps["x"], xpad))
        return real(sp, maps, out, step)

    lw._run_stage = spy
    got = lw.run(xpad[: xn.shape[0], : xn.shape[1]], plan, padded=xpad)
    assert seen and all(seen)
    np.testing.assert_array_equal(xpad, keep)
    lw._run_stage = real
    np.testing.assert_array_equal(got, lw.run(xn, plan))
