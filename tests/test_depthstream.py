"""3D blocks streamed over depth slabs (cryoden/depthstream.py) equal the whole block: line
buffers, the zero padding at both ends and the slab windows of the up-convolution are exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryoden import depthstream
from cryoden.models import ConvBlock, max_pool2


def _params(features, kernels, c_in, seed):
    blk = ConvBlock(features, kernels, 3)
    rng = np.random.default_rng(seed)
    params, c = {}, c_in
    for i, (f, k) in enumerate(zip(features, kernels, strict=True)):
        params[f"conv{2 * i}"] = {
            "kernel": jnp.asarray(rng.normal(0, 0.3, (k, k, k, c, f)), jnp.float32),
            "bias": jnp.asarray(rng.normal(0, 0.3, (f,)), jnp.float32),
        }
        c = f
    return blk, params


@pytest.mark.parametrize(
    "slab,features,kernels,last_activation",
    [
        (8, (6, 5, 1), (3, 3, 3), False),  # dec1 of unet-3d
        (2, (6, 4, 2), (5, 5, 5), True),
        (2, (4, 3), (1, 3), True),
    ],
)
def test_streamed_up_block_equals_whole_block(
    monkeypatch, slab, features, kernels, last_activation
):
    """A decoder block (polyphase up-convolution of a coarse map ++ skip, then line-buffered
    convs): with 2-slice slabs the delays (up to 4 slices) exceed the slab, with 8 there are
    two slabs of 6 (D = 12)."""
    monkeypatch.setattr(depthstream, "SLAB", slab)
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 6, 5, 7, 5)), jnp.float32)  # coarse (B, D/2, H/2, W/2, C)
    skip = jnp.asarray(rng.normal(size=(2, 12, 10, 14, 2)), jnp.float32)
    features = tuple(features)
    blk = ConvBlock(features, kernels, 3, last_activation)
    _, params = _params(features, kernels, 7, seed=2)
    want = jax.jit(lambda p, h, s: blk.apply({"params": p}, h, s))(params, h, skip)
    assert depthstream.streamable(h, skip, False, len(kernels))
    got = jax.jit(
        lambda p, h, s: depthstream.block(p, kernels, h, s, last_activation, jnp.float32)
    )(params, h, skip)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("slab", [2, 8])
def test_streamed_pooled_encoder_equals_whole_block(monkeypatch, slab):
    monkeypatch.setattr(depthstream, "SLAB", slab)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 12, 10, 6, 1)), jnp.float32)
    blk, params = _params((4,), (7,), 1, seed=4)
    want = jax.jit(lambda p, x: max_pool2(blk.apply({"params": p}, x)))(params, x)
    got = depthstream.block(params, (7,), x, None, True, jnp.float32, pool=True)
    assert got.shape == want.shape == (1, 6, 5, 3, 4)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(jnp.abs(want).max()))


def test_slab_depth_divides_the_depth():
    assert [depthstream.slab_depth(d) for d in (2, 4, 12, 20, 28, 64, 100)] == [2, 4, 6, 4, 4, 8, 4]
