"""Losses, optimisers and the pure train/eval steps (no sharding here: see mesh.py).

Training state is a plain dict pytree (what orbax saves)::

    {'step': int32[], 'params': {...}, 'opt_state': optax state, 'rng': uint32[2]}

Batches are dicts of ``source``/``target`` ``(B, *spatial, 1)`` float32 (and ``weight (B,)``
for validation, 0 marking padding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cryoden.models import build_model
from cryoden.train.config import Config, OptimConfig

# ----------------------------------------------------------------------------- losses


def per_example_loss(
    name: str,
    pred: jax.Array,
    target: jax.Array,
    gamma: float | jax.Array = 2.0,
    eps: float = 1e-8,
) -> jax.Array:
    """Loss of each example, averaged over its pixels: ``(B, ...)`` pairs -> ``(B,)``.

    L2 = mean squared error (mean-seeking), L1 = mean absolute error (median-seeking),
    L0 = mean of ``(|d| + eps) ** gamma`` (mode-seeking as gamma -> 0; Topaz's L0Loss).
    """
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    axes = tuple(range(1, d.ndim))
    if name == "L2":
        return jnp.mean(d * d, axis=axes)
    if name == "L1":
        return jnp.mean(jnp.abs(d), axis=axes)
    if name == "L0":
        return jnp.mean((jnp.abs(d) + eps) ** gamma, axis=axes)
    raise ValueError(f"unknown loss {name!r}")


def l0_gamma(step: jax.Array | int, steps_per_epoch: int, epochs: int) -> jax.Array:
    """L0 exponent for the epoch containing ``step``: 2 at epoch 0, ``2 (1 - e / epochs)`` after.

    Topaz anneals per epoch as ``2 - (e - 1) * 2 / epochs`` (its first epoch uses 2 + 2/epochs,
    an off-by-one); both end at O(1/epochs).
    """
    epoch = jnp.asarray(step) // steps_per_epoch
    return jnp.maximum(2.0 * (1.0 - epoch / epochs), 0.0).astype(jnp.float32)


# ----------------------------------------------------------------------------- optimisers


class TorchAdagradState(NamedTuple):
    sum_of_squares: optax.Updates


def scale_by_torch_adagrad(eps: float = 1e-10) -> optax.GradientTransformation:
    """torch.optim.Adagrad's scaling: ``acc += g**2; u = g / (sqrt(acc) + eps)``, acc from 0.

    optax.adagrad differs (accumulator starts at 0.1, eps inside the root); this matches torch
    operation for operation, so one step agrees with torch bit for bit on CPU.
    """

    def init(params):
        return TorchAdagradState(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        acc = jax.tree.map(lambda a, g: a + g * g, state.sum_of_squares, updates)
        updates = jax.tree.map(lambda g, a: g / (jnp.sqrt(a) + eps), updates, acc)
        return updates, TorchAdagradState(acc)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """adagrad | adam | sgd with torch semantics: weight decay is added to the gradient
    (``g += wd * p``) before the optimiser, as in torch (and Topaz)."""
    parts = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay else []
    if cfg.name == "adagrad":
        if cfg.adagrad == "optax":
            parts.append(optax.scale_by_rss(initial_accumulator_value=0.1, eps=1e-7))
        else:
            parts.append(scale_by_torch_adagrad())
    elif cfg.name == "adam":
        parts.append(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8))
    elif cfg.name == "sgd":
        parts.append(optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov))
    else:
        raise ValueError(f"unknown optimiser {cfg.name!r}")
    parts.append(optax.scale(-cfg.lr))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------- steps


def make_forward(cfg: Config) -> Callable[[Any, jax.Array], jax.Array]:
    """``forward(params, x (B, *s, 1)) -> (B, *s, 1)`` of the configured model (compute dtype
    ``cfg.model.dtype``; U-net decoders in polyphase form, see ``models.UpConv``)."""
    model = build_model(cfg.model.spec, dtype=jnp.dtype(cfg.model.dtype))
    return lambda params, x: model.apply({"params": params}, x)


def init_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> dict:
    """Fresh training state around ``params``; ``rng`` is a typed key or raw ``uint32[2]``."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return dict(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng
    )


def make_train_step(
    cfg: Config, optimizer: optax.GradientTransformation, steps_per_epoch: int, epochs: int
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Pure ``train_step(state, batch) -> (state, {'loss': f32[], 'gamma': f32[]})``.

    ``loss`` is the mean over every pixel of the global batch (torch's reduction='mean').
    ``gamma`` is L0's exponent; other losses ignore it and get a constant 2, so that their
    compiled step does not depend on the run length (a longer resumed run hits the persistent
    compilation cache).
    """
    forward = make_forward(cfg)
    name, eps = cfg.optim.loss, cfg.optim.l0_eps

    def train_step(state, batch):
        if name == "L0":
            gamma = l0_gamma(state["step"], steps_per_epoch, epochs)
        else:
            gamma = jnp.float32(2.0)

        def loss_fn(params):
            pred = forward(params, batch["source"])
            return jnp.mean(per_example_loss(name, pred, batch["target"], gamma, eps))

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new = dict(
            step=state["step"] + 1,
            params=optax.apply_updates(state["params"], updates),
            opt_state=opt_state,
            rng=state["rng"],
        )
        return new, dict(loss=loss, gamma=gamma)

    return train_step


def val_loss_name(loss: str) -> str:
    """Validation criterion: the training loss, except L1 for L0 (whose gamma moves each
    epoch, so its values are not comparable across epochs for picking the best model)."""
    return "L1" if loss == "L0" else loss


def make_eval_step(cfg: Config) -> Callable[[dict, dict], tuple[jax.Array, jax.Array]]:
    """Pure ``eval_step(params, batch) -> (sum_loss, sum_weight)``, f32 scalars.

    ``sum_loss = sum_i weight_i * loss_i`` over the batch's examples; summing both over every
    batch of the split and dividing gives the true mean loss over the split.
    """
    forward = make_forward(cfg)
    name = val_loss_name(cfg.optim.loss)

    def eval_step(params, batch):
        pred = forward(params, batch["source"])
        w = batch["weight"].astype(jnp.float32)
        return jnp.sum(w * per_example_loss(name, pred, batch["target"])), jnp.sum(w)

    return eval_step
