"""Checkpoints of a training run (orbax), resume, and export of the best model.

``RUN/checkpoints/<step>/`` holds three items, saved together (asynchronously by default):

- ``state``: the training-state pytree (params, opt_state, step, rng), sharded arrays;
- ``data``: the grain iterator state, one JSON file per process (grain's orbax handler);
- ``meta``: JSON: epoch, running epoch-loss sums, best validation so far, a checksum of every
  state leaf (computed on device before the save), a BLAKE2b digest of each process's
  iterator-state file, and one of the meta item itself, all checked after every restore.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves no step directory that looks finished (leftovers are cleaned up on the
next start). A finished checkpoint damaged afterwards (truncated or garbled files) fails to
restore or fails its checksums; :meth:`Checkpoints.restore_latest` then moves it to
``RUN/checkpoints.corrupt/`` with one warning line and falls back to the previous valid step.
With several processes, a step any process cannot use is unusable for all of them.

A save that fails (disk full, permissions) raises :class:`SaveError` at the next step at the
latest (:meth:`Checkpoints.check`); the half-written step is a temporary directory that orbax
removes on the next start, and the previous checkpoints are untouched.

Kept: the latest ``keep_latest`` steps plus the ``keep_best`` steps with the lowest
validation loss (orbax ``LatestN`` + ``BestN`` preservation policies). Saved: at the end of
every epoch, every ``save_every_steps`` steps, and when forced (interrupt).
"""

from __future__ import annotations

import hashlib
import json
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

from cryoden.train import quiet

log = logging.getLogger(__name__)
METRIC = "select"  # metrics key ranking checkpoints (lower is better)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


class SaveError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions, ...)."""


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


class _IteratorState:
    """The grain iterator as grain's checkpoint handler sees it: its state as JSON bytes.

    Saving writes exactly :attr:`raw` (computed once, when the save is requested); restoring
    records the BLAKE2b :attr:`digest` of the bytes read back before handing the state on, so
    the file's bytes are checked, not a re-serialisation of the restored state.
    """

    def __init__(self, iterator: grain.DatasetIterator):
        self.iterator, self.raw, self.digest = iterator, b"", ""

    def snapshot(self) -> str:
        self.raw = json.dumps(self.iterator.get_state(), indent=4, sort_keys=True).encode()
        self.digest = _digest(self.raw)
        return self.digest

    def get_state(self) -> bytes:
        return self.raw

    def set_state(self, raw: bytes) -> None:
        self.digest = _digest(raw)
        self.iterator.set_state(json.loads(raw))

    def start_prefetch(self) -> None:
        start = getattr(self.iterator, "start_prefetch", None)
        if start is not None:
            start()


def _digest(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    """Digest of a meta dict (without its own checksum), canonical JSON."""
    return _digest(json.dumps(meta, sort_keys=True).encode())


def _all_processes(digest: str) -> list[str]:
    """Every process's ``digest`` (16 hex digits), in process order."""
    if jax.process_count() == 1:
        return [digest]
    from jax.experimental import multihost_utils

    words = np.frombuffer(bytes.fromhex(digest), np.uint32)
    every = np.asarray(multihost_utils.process_allgather(words))
    return [row.astype(np.uint32).tobytes().hex() for row in every.reshape(-1, words.size)]


def _reason(e: BaseException) -> str:
    """First line of an error, without tensorstore's spec dump, at most 200 characters."""
    text = (str(e).splitlines() or [""])[0].split(" [tensorstore_spec=")[0].strip()
    text = text or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _all_ok(ok: bool) -> bool:
    """True when ``ok`` on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([ok], np.int32))))


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
        quiet.install()
        self.directory = Path(directory).absolute()
        self.failed: SaveError | None = None
        self.last_saved: int | None = None  # newest step whose save was requested
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
        self.check()
        if not force and not self.should_save(step):
            return False
        it = _IteratorState(iterator)
        meta = dict(
            meta,
            step=int(step),
            checksums=checksums(state),
            data_checksums=_all_processes(it.snapshot()),
            time=time.time(),
        )
        meta["meta_checksum"] = _meta_digest(meta)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(it),
            meta=ocp.args.JsonSave(meta),
        )
        metrics = None if metric is None else {METRIC: float(metric)}
        try:  # orbax waits for the previous save anyway: do it here to name its failure
            self.mngr.wait_until_finished()
        except Exception as e:
            raise self._failure(self.last_saved, e) from None
        self.last_saved = int(step)
        try:
            return self.mngr.save(step, args=args, metrics=metrics, force=force)
        except Exception as e:
            raise self._failure(step, e) from None

    def check(self) -> None:
        """Raise :class:`SaveError` if a background save has failed (cheap; call every step)."""
        if self.failed is not None:
            raise self.failed
        try:
            self.mngr.check_for_errors()
        except Exception as e:
            raise self._failure(self.last_saved, e) from None

    def _failure(self, step: int | None, e: BaseException) -> SaveError:
        """Remember a failed save; the error names the newest complete checkpoint."""
        try:
            done = [s for s in self.steps() if s != step]
        except Exception:  # the listing itself may fail on a broken disk
            done = []
        last = f"step {max(done)}" if done else "none yet"
        reason = _reason(e)
        self.failed = SaveError(
            f"cannot save checkpoint step {step} in {self.directory}: {reason}; "
            f"the last complete checkpoint ({last}) is intact: fix the cause and run the "
            "same command to resume"
        )
        try:  # stop orbax's threads now; they only repeat the error
            self.mngr.close()
        except Exception:
            pass
        return self.failed

    def steps(self) -> list[int]:
        return list(self.mngr.all_steps())

    def restore(self, step: int, abstract_state: Any, iterator: grain.DatasetIterator):
        """Restore ``step`` into ``(state, meta)`` and set ``iterator``; raises on damage."""
        it = _IteratorState(iterator)
        r = self.mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(it),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state, meta = r["state"], dict(r["meta"])
        want_meta = meta.pop("meta_checksum", None)  # absent in checkpoints of older versions
        if want_meta is not None and want_meta != _meta_digest(meta):
            raise CheckpointError("meta checksum mismatch (edited or damaged)")
        want, got = meta.get("checksums"), checksums(state)
        if want != got:
            bad = sorted(k for k in (want or {}) if want[k] != got.get(k)) or ["(missing)"]
            raise CheckpointError(f"state checksum mismatch in {bad[:3]}")
        data_sums = meta.get("data_checksums")  # absent in checkpoints of older versions
        if data_sums is not None:
            i = jax.process_index()
            if len(data_sums) != jax.process_count() or data_sums[i] != it.digest:
                raise CheckpointError(f"data-iterator state checksum mismatch (process {i})")
        s = state["step"]
        if int(np.asarray(s.addressable_data(0) if isinstance(s, jax.Array) else s)) != step:
            raise CheckpointError(f"state holds a different step than {step}")
        return state, meta

    def restore_latest(self, abstract_state: Any, iterator: grain.DatasetIterator):
        """Newest checkpoint that restores and verifies -> ``(state, meta)``, or None if none.

        Damaged steps newer than the one restored are moved aside to ``<dir>.corrupt/`` (with a
        warning) so training goes on from it; if every step is damaged, nothing is moved and
        CheckpointError is raised.
        """
        errors = []
        for step in sorted(self.steps(), reverse=True):
            restored, why = None, "unusable on another process"
            try:
                restored = self.restore(step, abstract_state, iterator)
            except Exception as e:  # orbax/tensorstore/json errors all mean "unusable"
                why = _reason(e)
            if not _all_ok(restored is not None):
                errors.append((step, why))
                continue
            for bad, why in errors:
                self._quarantine(bad, why, step)
            return restored
        if errors:
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}: "
                + "; ".join(f"step {s} is unusable: {why}" for s, why in errors)
                + f". Move {self.directory} away to start afresh"
            )
        return None

    def _quarantine(self, step: int, why: str, using: int) -> None:
        log.warning(
            "checkpoint step %d in %s is unusable: %s; moved to %s.corrupt, resuming from step %d",
            step,
            self.directory,
            why,
            self.directory,
            using,
        )
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
        """Wait for pending saves and close; raises :class:`SaveError` if a save failed that was
        not reported yet (after a reported failure it closes quietly)."""
        if self.failed is not None:
            return
        try:
            self.mngr.wait_until_finished()
            self.mngr.close()
        except Exception as e:
            raise self._failure(self.last_saved, e) from None
