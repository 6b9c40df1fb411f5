"""Losses, optimisers (against torch) and the pure train/eval steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cryoden.models import ModelSpec, init_params
from cryoden.train import config as C
from cryoden.train import step


def _cfg(**optim) -> C.Config:
    return C.merge(C.Config(), {"model": dict(arch="affine", base_width=7), "optim": optim})


def test_losses_match_definitions():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 3, 5, 5, 1)).astype(np.float32)
    d = x - y
    np.testing.assert_allclose(step.per_example_loss("L2", x, y), (d**2).mean((1, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(
        step.per_example_loss("L1", x, y), np.abs(d).mean((1, 2, 3)), rtol=1e-6
    )
    np.testing.assert_allclose(
        step.per_example_loss("L0", x, y, 0.5),
        ((np.abs(d) + 1e-8) ** 0.5).mean((1, 2, 3)),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="unknown loss"):
        step.per_example_loss("L3", x, y)


def test_l0_gamma_anneals_per_epoch():
    g = [float(step.l0_gamma(s, steps_per_epoch=10, epochs=4)) for s in (0, 9, 10, 25, 39)]
    assert g == [2.0, 2.0, 1.5, 1.0, 0.5]


@pytest.mark.parametrize("name", ["adagrad", "adam", "sgd"])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_optimiser_matches_torch(name, wd):
    """One step equals torch (Adagrad bit for bit); three steps agree to float32 rounding."""
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=(6, 7)).astype(np.float32)
    grads = rng.normal(size=(3, 6, 7)).astype(np.float32)
    t = torch.nn.Parameter(torch.tensor(p0))
    topt = {
        "adagrad": lambda: torch.optim.Adagrad([t], lr=1e-2, weight_decay=wd),
        "adam": lambda: torch.optim.Adam([t], lr=1e-2, weight_decay=wd),
        "sgd": lambda: torch.optim.SGD([t], lr=1e-2, momentum=0.9, nesterov=True, weight_decay=wd),
    }[name]()
    tx = step.make_optimizer(C.OptimConfig(name=name, lr=1e-2, weight_decay=wd))
    p, s = jnp.asarray(p0), tx.init(jnp.asarray(p0))
    update = jax.jit(tx.update)
    for i, g in enumerate(grads):
        t.grad = torch.tensor(g)
        topt.step()
        u, s = update(jnp.asarray(g), s, p)
        p = optax.apply_updates(p, u)
        if i == 0 and name == "adagrad":
            np.testing.assert_array_equal(np.asarray(p), t.detach().numpy())
        np.testing.assert_allclose(np.asarray(p), t.detach().numpy(), rtol=0, atol=1e-6)


def test_optax_adagrad_variant_differs_from_torch():
    g = {"w": jnp.ones(3)}
    torch_like = step.make_optimizer(C.OptimConfig(lr=0.1))
    optax_like = step.make_optimizer(C.OptimConfig(lr=0.1, adagrad="optax"))
    u1, _ = torch_like.update(g, torch_like.init(g), g)
    u2, _ = optax_like.update(g, optax_like.init(g), g)
    np.testing.assert_allclose(u1["w"], -0.1, rtol=1e-6)  # g / sqrt(g^2): exactly one lr
    assert not np.allclose(u2["w"], -0.1)


def test_train_step_matches_topaz_affine_step_in_torch():
    """A whole Noise2Noise step (affine model, MSE, torch Adagrad) equals torch's."""
    cfg = _cfg(name="adagrad", lr=1e-3)
    spec = cfg.model.spec
    params = init_params(spec, jax.random.key(0))
    tx = step.make_optimizer(cfg.optim)
    state = step.init_state(params, tx, jax.random.key(1))
    rng = np.random.default_rng(2)
    batch = {k: rng.normal(size=(2, 16, 16, 1)).astype(np.float32) for k in ("source", "target")}
    new, metrics = jax.jit(step.make_train_step(cfg, tx, 10, 1))(state, batch)

    conv = torch.nn.Conv2d(1, 1, 7, padding=3)
    with torch.no_grad():
        conv.weight.copy_(
            torch.tensor(np.asarray(params["filter"]["kernel"]).transpose(3, 2, 0, 1))
        )
        conv.bias.copy_(torch.tensor(np.asarray(params["filter"]["bias"])))
    opt = torch.optim.Adagrad(conv.parameters(), lr=1e-3)
    src, tgt = (torch.tensor(batch[k].transpose(0, 3, 1, 2)) for k in ("source", "target"))
    loss = torch.nn.functional.mse_loss(conv(src), tgt)
    loss.backward()
    opt.step()
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-6)
    got = np.asarray(new["params"]["filter"]["kernel"]).transpose(3, 2, 0, 1)
    np.testing.assert_allclose(got, conv.weight.detach().numpy(), atol=1e-6, rtol=0)
    assert int(new["step"]) == 1


def test_train_step_reduces_loss_and_eval_weights_padding():
    cfg = _cfg(name="adam", lr=1e-2)
    tx = step.make_optimizer(cfg.optim)
    state = step.init_state(init_params(cfg.model.spec, jax.random.key(0)), tx, jax.random.key(1))
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(4, 24, 24, 1)).astype(np.float32)
    batch = {
        "source": clean + 0.1 * rng.normal(size=clean.shape).astype(np.float32),
        "target": clean,
    }
    train = jax.jit(step.make_train_step(cfg, tx, 100, 1))
    losses = []
    for _ in range(20):
        state, m = train(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0]

    ev = jax.jit(step.make_eval_step(cfg))
    w = np.array([1, 1, 0, 0], np.float32)
    s, n = ev(state["params"], dict(batch, weight=w))
    half = {k: v[:2] for k, v in batch.items()}
    s2, n2 = ev(state["params"], dict(half, weight=np.ones(2, np.float32)))
    assert float(n) == 2.0 and float(n2) == 2.0
    np.testing.assert_allclose(float(s), float(s2), rtol=1e-6)


def test_l0_validates_with_l1():
    assert step.val_loss_name("L0") == "L1" and step.val_loss_name("L2") == "L2"


def test_model_spec_is_unchanged_by_config():
    assert _cfg().model.spec == ModelSpec("affine", 2, 7, 5)
