"""cryoden.conv: the CPU forms (depth slices, blockwise kernel gradients) equal XLA's native
convolution and its autodiff, at odd sizes, asymmetric pads and every blocking regime."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryoden import conv as C

CASES = [
    # (spatial shape incl. batch, in, out, kernel, pads)
    ((3, 13, 11), 5, 4, 3, ((1, 1), (1, 1))),
    ((2, 9, 17), 3, 2, 5, ((1, 2), (0, 1))),  # polyphase-style asymmetric pads
    ((1, 20, 7), 1, 6, 7, ((3, 3), (3, 3))),
    ((2, 7, 9, 8), 3, 4, 3, ((1, 1), (1, 1), (1, 1))),
    ((1, 6, 5, 7), 2, 3, 3, ((1, 0), (0, 1), (1, 1))),
    ((2, 5, 6, 7), 1, 3, 5, ((2, 2), (2, 2), (2, 2))),
    # one output channel (matrix product + shifted sum; swapped kernel gradient)
    ((2, 11, 9), 16, 1, 5, ((2, 2), (1, 3))),
    ((1, 5, 6, 7), 16, 1, 3, ((1, 1), (0, 2), (1, 1))),
    ((2, 9, 8), 5, 2, 3, ((1, 1), (2, 0))),  # few outputs: swapped kernel gradient only
    ((2, 4, 5, 6), 8, 16, 3, ((1, 1), (1, 1), (0, 2))),
]


def _native(h, w, pads):
    return C._xla_conv(h, w, tuple(pads))


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("shape,c_in,c_out,k,pads", CASES)
@pytest.mark.parametrize("block_pixels,max_blocks", [(10**9, 32), (40, 3), (40, 32), (7, 1000)])
def test_conv_and_grads_equal_native(
    monkeypatch, shape, c_in, c_out, k, pads, block_pixels, max_blocks
):
    """Forward, data gradient and kernel gradient equal XLA's native convolution's."""
    monkeypatch.setattr(C, "BLOCK_PIXELS", block_pixels)
    monkeypatch.setattr(C, "MAX_BLOCKS", max_blocks)
    rng = np.random.default_rng(len(shape) * 100 + k)
    nd = len(shape) - 1
    h = jnp.asarray(rng.normal(size=shape + (c_in,)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k,) * nd + (c_in, c_out)), jnp.float32)

    def loss(fn):  # a non-linear function of the output, so the cotangent is not constant
        return lambda h, w: jnp.sum(jnp.sin(fn(h, w, pads)))

    assert jax.default_backend() == "cpu"
    y, y_ref = C.conv(h, w, pads), _native(h, w, pads)
    assert y.shape == y_ref.shape
    assert _rel(y, y_ref) < 1e-6
    grads = jax.jit(jax.grad(loss(C.conv), argnums=(0, 1)))(h, w)
    grads_ref = jax.grad(loss(_native), argnums=(0, 1))(h, w)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype
        assert _rel(g, g_ref) < 1e-5


def test_one_output_forward_is_a_matrix_product():
    """The 1-output form is really taken (no convolution in the forward HLO) when taps are few
    next to the input channels, and not for a 1->1 filter (whose taps would outnumber them)."""
    pads = ((2, 2), (2, 2))
    few_taps = jax.jit(C.conv, static_argnums=2).lower(
        jnp.ones((1, 8, 8, 16)), jnp.ones((5, 5, 16, 1)), pads
    )
    assert "convolution" not in few_taps.as_text()
    affine = jax.jit(C.conv, static_argnums=2).lower(
        jnp.ones((1, 8, 8, 1)), jnp.ones((5, 5, 1, 1)), pads
    )
    assert "convolution" in affine.as_text()


def test_kernel_grad_is_blockwise_when_asked(monkeypatch):
    """The blocked path really is taken: with small blocks the jitted gradient holds one
    kernel-gradient convolution per block (and the result still equals the native one)."""
    monkeypatch.setattr(C, "BLOCK_PIXELS", 64)
    monkeypatch.setattr(C, "MAX_BLOCKS", 8)
    h = jnp.ones((2, 16, 16, 3), jnp.float32)
    w = jnp.ones((3, 3, 3, 2), jnp.float32)
    pads = ((1, 1), (1, 1))
    f = jax.jit(jax.grad(lambda w: jnp.sum(C.conv(h, w, pads) ** 2)))
    hlo = f.lower(w).as_text()
    n_blocks = len(C.blocks(1, 2, 16, 16))
    assert n_blocks == 8
    # one forward conv + data-gradient conv (unused, may be pruned) + one per block
    assert hlo.count("stablehlo.convolution") >= n_blocks + 1
    ref = jax.grad(lambda w: jnp.sum(_native(h, w, pads) ** 2))(w)
    assert _rel(f(w), ref) < 1e-6


@pytest.mark.parametrize(
    "b,d,rows,cols",
    [
        (1, 4, 256, 256),
        (4, 1, 256, 256),
        (2, 64, 64, 64),
        (3, 5, 7, 9),
        (1, 1, 1, 1),
        (5, 1, 3, 100000),
    ],
)
@pytest.mark.parametrize("block_pixels,max_blocks", [(8192, 32), (10, 4), (1, 1000)])
def test_blocks_tile_the_output_once(monkeypatch, b, d, rows, cols, block_pixels, max_blocks):
    monkeypatch.setattr(C, "BLOCK_PIXELS", block_pixels)
    monkeypatch.setattr(C, "MAX_BLOCKS", max_blocks)
    seen = np.zeros((b, d, rows), np.int32)
    blocks = C.blocks(b, d, rows, cols)
    for i, d0, d1, r0, r1 in blocks:
        assert 0 <= i < b and 0 <= d0 < d1 <= d and 0 <= r0 < r1 <= rows
        seen[i, d0:d1, r0:r1] += 1
    assert (seen == 1).all()
    assert len(blocks) <= max(max_blocks, b)


def test_bfloat16_gradients_keep_dtype_and_agree():
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(2, 6, 7, 9, 4)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5)) * 0.2, jnp.bfloat16)
    pads = ((1, 1),) * 3
    loss = lambda fn: lambda h, w: jnp.sum(fn(h, w, pads).astype(jnp.float32) ** 2)  # noqa: E731
    g = jax.grad(loss(C.conv), argnums=(0, 1))(h, w)
    g_ref = jax.grad(loss(_native), argnums=(0, 1))(h.astype(jnp.float32), w.astype(jnp.float32))
    for a, b in zip(g, g_ref, strict=True):
        assert a.dtype == jnp.bfloat16
        assert _rel(a.astype(jnp.float32), b) < 0.05


def test_model_training_gradient_matches_float64(monkeypatch):
    """End to end: a 3D U-net's parameter gradient through the CPU forms equals the float64
    gradient of the same network computed with XLA's native convolutions (ground truth) to
    float32 rounding. (XLA:CPU's own float32 3D gradient is ~1e-3 off here.)"""
    from cryoden.models import ModelSpec, build_model, init_params

    spec = ModelSpec("unet-small", 3, 3, 3)
    params = init_params(spec, jax.random.key(0))
    # Seed 11: no pre-activation lies within float32 rounding of LeakyReLU's kink (min |pre|
    # 1.5e-6; with seed 0 one lies at 6e-8, and float32 and float64 then take different slopes
    # there, a 1.6e-3 change of one bias gradient that no float32 arithmetic can avoid).
    x = np.random.default_rng(11).normal(size=(2, 16, 8, 24, 1)).astype(np.float32)

    def grads(p, x, dtype):
        model = build_model(spec, dtype=dtype)  # a float64 model computes in float64
        loss = lambda p: jnp.mean((model.apply({"params": p}, x) - x) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(p)

    monkeypatch.setattr(C, "BLOCK_PIXELS", 300)
    ours = grads(params, jnp.asarray(x), jnp.float32)
    monkeypatch.setattr("cryoden.models.conv", _native)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        ref = jax.tree.map(np.asarray, grads(p64, jnp.asarray(x, jnp.float64), jnp.float64))
    flat = jax.tree_util.tree_leaves_with_path(ours)
    ref_flat = dict(jax.tree_util.tree_leaves_with_path(ref))
    assert len(flat) == len(ref_flat) > 10
    for path, g in flat:
        r = ref_flat[path]
        assert r.dtype == np.float64
        assert np.max(np.abs(np.asarray(g) - r)) / np.max(np.abs(r)) < 1e-5, jax.tree_util.keystr(
            path
        )


def test_every_block_kind_appears():
    """The three regimes of ``blocks`` (whole volumes, slice runs, row runs) all occur for
    realistic training shapes at the default settings."""
    kinds = set()
    for b, d, rows, cols in itertools.product((1, 4), (1, 96), (8, 96, 800), (8, 800)):
        for _, d0, d1, r0, r1 in C.blocks(b, d, rows, cols):
            kinds.add(
                "volume"
                if (d0, d1, r0, r1) == (0, d, 0, rows)
                else "slices"
                if (r0, r1) == (0, rows)
                else "rows"
            )
    assert kinds == {"volume", "slices", "rows"}


@pytest.mark.parametrize("k,c_in,c_out", [(7, 1, 48), (3, 16, 16)])
def test_3d_forward_memory_is_one_depth_tap_at_a_time(k, c_in, c_out):
    """The 3D CPU forward sums its depth taps one at a time (``lax.scan``): XLA's temporary
    memory stays under twice the input plus output bytes. Unrolled, every depth shift and its
    2D convolution were live at once: 8.6x (the 7x7x7 ``enc1`` form) and 2.2x (3x3x3)."""
    shape, pads = (1, 16, 24, 24), ((k // 2, k // 2),) * 3
    h = jax.ShapeDtypeStruct(shape + (c_in,), jnp.float32)
    w = jax.ShapeDtypeStruct((k, k, k, c_in, c_out), jnp.float32)
    compiled = jax.jit(lambda h, w: C.conv(h, w, pads)).lower(h, w).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    io_bytes = 4 * np.prod(shape) * (c_in + c_out)
    assert temp < 2 * io_bytes, temp / io_bytes


def test_3d_scan_sum_is_the_unrolled_sum_and_training_stays_unrolled():
    """The scanned depth-tap sum is bitwise the unrolled one (same order); inference
    (``conv`` not differentiated) takes it, the gradient (training) keeps the unrolled form,
    which XLA:CPU runs ~15% faster."""
    rng = np.random.default_rng(5)
    h = jnp.asarray(rng.normal(size=(2, 7, 9, 8, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 4)), jnp.float32)
    pads = ((1, 2), (1, 1), (0, 2))
    unrolled = C._conv3d_as_slices(h, w, pads, scan=False)
    assert jnp.array_equal(jax.jit(lambda h, w: C.conv(h, w, pads))(h, w), unrolled)
    infer = jax.jit(lambda h, w: C.conv(h, w, pads)).lower(h, w).as_text()
    train = jax.jit(jax.grad(lambda h, w: jnp.sum(C.conv(h, w, pads) ** 2), argnums=(0, 1)))
    assert "stablehlo.while" in infer
    assert "stablehlo.while" not in train.lower(h, w).as_text()
