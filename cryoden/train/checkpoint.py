"""Checkpoints of a training run (orbax), resume, and export of the best model.

``RUN/checkpoints/<step>/`` holds three items, saved together (asynchronously by default):

- ``state``: the training-state pytree (params, opt_state, step, rng), sharded arrays;
- ``data``: the grain iterator state, one JSON file per process (grain's orbax handler);
- ``meta``: JSON: epoch, running epoch-loss sums, best validation so far, and a checksum of
  every state leaf (computed on device before the save, checked after every restore).

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves no step directory that looks finished (leftovers are cleaned up on the
next start). A finished checkpoint damaged afterwards (truncated or garbled files) fails to
restore or fails its checksum; :meth:`Checkpoints.restore_latest` then moves it to
``RUN/checkpoints.corrupt/`` with a warning and falls back to the previous valid step.

Kept: the latest ``keep_latest`` steps plus the ``keep_best`` steps with the lowest
validation loss (orbax ``LatestN`` + ``BestN`` preservation policies). Saved: at the end of
every epoch, every ``save_every_steps`` steps, and when forced (interrupt).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger(__name__)
METRIC = "select"  # metrics key ranking checkpoints (lower is better)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


# ----------------------------------------------------------------------------- checksums


@jax.jit
def _leaf_checksums(tree):
    """Per leaf: wrapping uint32 sum of the raw bits, and a position-weighted one."""

    def one(x):
        x = jnp.asarray(x)
        if x.dtype.itemsize != 4:
            x = x.astype(jnp.float32)
        u = jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
        w = jnp.arange(u.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * w, dtype=jnp.uint32)])

    return jax.tree.map(one, tree)


def checksums(state: Any) -> dict[str, str]:
    """``{'params/enc1/conv0/kernel': '1a2b3c4d:5e6f7a8b', ...}`` of a state pytree."""
    sums = _leaf_checksums(state)
    out = {}
    for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]:
        v = np.asarray(v.addressable_data(0) if isinstance(v, jax.Array) else v)
        out[jax.tree_util.keystr(path, simple=True, separator="/")] = f"{v[0]:08x}:{v[1]:08x}"
    return out


# ----------------------------------------------------------------------------- manager


class Checkpoints:
    """orbax ``CheckpointManager`` for one run directory; call every step, it decides.

    epoch_end_steps: steps at which an epoch (and so a validation) ends; always saved.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        epoch_end_steps: Iterable[int],
        keep_latest: int = 2,
        keep_best: int = 1,
        save_every_steps: int | None = None,
        async_save: bool = True,
    ):
        self.directory = Path(directory).absolute()
        save = [cm.SpecificStepsPolicy(frozenset(epoch_end_steps))]
        if save_every_steps:
            save.append(cm.FixedIntervalPolicy(save_every_steps))
        save.append(cm.PreemptionCheckpointingPolicy())
        keep = [cm.LatestN(n=keep_latest)]
        if keep_best:
            keep.append(
                cm.BestN(
                    get_metric_fn=lambda m: m[METRIC],
                    reverse=True,
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=cm.AnySavePolicy(save),
            preservation_policy=cm.AnyPreservationPolicy(keep),
            best_fn=lambda m: m[METRIC],  # makes orbax record metrics beside each step
            best_mode="min",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.mngr = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "meta"), options=options
        )

    def should_save(self, step: int) -> bool:
        return self.mngr.should_save(step)

    def save(
        self,
        step: int,
        state: Any,
        iterator: grain.DatasetIterator,
        meta: dict[str, Any],
        metric: float | None = None,
        force: bool = False,
    ) -> bool:
        """Save (asynchronously) if the policy says so or ``force``; True if a save started.

        ``iterator`` must have produced exactly the batches consumed up to ``step``.
        """
        if not force and not self.should_save(step):
            return False
        meta = dict(meta, step=int(step), checksums=checksums(state), time=time.time())
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta),
        )
        metrics = None if metric is None else {METRIC: float(metric)}
        return self.mngr.save(step, args=args, metrics=metrics, force=force)

    def steps(self) -> list[int]:
        return list(self.mngr.all_steps())

    def restore(self, step: int, abstract_state: Any, iterator: grain.DatasetIterator):
        """Restore ``step`` into ``(state, meta)`` and set ``iterator``; raises on damage."""
        r = self.mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(iterator),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state, meta = r["state"], dict(r["meta"])
        want, got = meta.get("checksums"), checksums(state)
        if want != got:
            bad = sorted(k for k in (want or {}) if want[k] != got.get(k)) or ["(missing)"]
            raise CheckpointError(f"checkpoint step {step}: state checksum mismatch in {bad[:3]}")
        s = state["step"]
        if int(np.asarray(s.addressable_data(0) if isinstance(s, jax.Array) else s)) != step:
            raise CheckpointError(f"checkpoint step {step}: state holds a different step")
        return state, meta

    def restore_latest(self, abstract_state: Any, iterator: grain.DatasetIterator):
        """Newest checkpoint that restores and verifies -> ``(state, meta)``, or None if none.

        Damaged steps newer than the one restored are moved aside to ``<dir>.corrupt/`` (with a
        warning) so training goes on from it; if every step is damaged, nothing is moved and
        CheckpointError is raised.
        """
        errors = []
        for step in sorted(self.steps(), reverse=True):
            try:
                restored = self.restore(step, abstract_state, iterator)
            except Exception as e:  # orbax/tensorstore/json errors all mean "unusable"
                errors.append(
                    (
                        step,
                        f"checkpoint step {step} in {self.directory} is unusable: "
                        f"{str(e).splitlines()[0][:300]}",
                    )
                )
                log.warning("%s; trying the previous one", errors[-1][1])
                continue
            for bad, _ in errors:
                self._quarantine(bad)
            return restored
        if errors:
            raise CheckpointError(
                "no usable checkpoint: "
                + "; ".join(m for _, m in errors)
                + f". Move {self.directory} away to start afresh."
            )
        return None

    def _quarantine(self, step: int) -> None:
        log.warning("moving damaged checkpoint step %d to %s.corrupt", step, self.directory)
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = Path(f"{self.directory}.corrupt") / f"{step}-{int(time.time())}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.exists():
                shutil.move(str(src), str(dst))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"cryoden-quarantine-{step}")
        self.mngr.reload()

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()
