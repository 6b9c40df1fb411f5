"""Helpers of the training tests; run in subprocesses for fake CPU devices and SIGKILL.

Not a test module (no ``test_`` prefix); ``write_pairs`` is imported by the tests.

  python tests/train_subproc.py sharded OUT.npz      # 1-device vs 4-device step, params -> OUT
  python tests/train_subproc.py kill CONFIG.json STEP  # train; SIGKILL itself while saving STEP
  python tests/train_subproc.py enospc STEP ARGS...    # cryoden train ARGS; disk full at STEP
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np


def write_pairs(root: Path, n: int = 4, size: int = 48, seed: int = 0) -> tuple[Path, Path]:
    """n pairs of noisy halves of one smooth image each, as .npy: ``root/{even,odd}/m<i>.npy``."""
    rng = np.random.default_rng(seed)
    even, odd = root / "even", root / "odd"
    even.mkdir(parents=True)
    odd.mkdir(parents=True)
    for i in range(n):
        clean = np.cumsum(np.cumsum(rng.normal(size=(size, size)), 0), 1) / size
        for d in (even, odd):
            np.save(d / f"m{i}.npy", (clean + rng.normal(size=clean.shape)).astype(np.float32))
    return even, odd


def sharded(out: str) -> None:
    """Two train steps of unet-small on one device and on a 4-device mesh; save both params."""
    import jax

    jax.config.update("jax_num_cpu_devices", 4)

    from cryoden.models import init_params
    from cryoden.train import config as C
    from cryoden.train import mesh, step

    assert jax.device_count() == 4, jax.devices()
    cfg = C.merge(
        C.Config(), {"model": {"arch": "unet-small"}, "optim": {"name": "sgd", "lr": 0.05}}
    )
    tx = step.make_optimizer(cfg.optim)
    rng = np.random.default_rng(0)
    batches = [
        {k: rng.normal(size=(4, 32, 32, 1)).astype(np.float32) for k in ("source", "target")}
        for _ in range(2)
    ]  # two steps
    results = {}
    params = mesh.to_host(jax.jit(lambda: init_params(cfg.model.spec, jax.random.key(0)))())
    for n in (1, 4):
        m = mesh.make_mesh(jax.devices()[:n])
        mesh.check_batch_size(4, m)
        p = mesh.replicate_from_host(params, m)
        state = jax.jit(
            lambda p: step.init_state(p, tx, jax.random.key(1)), out_shardings=mesh.replicated(m)
        )(p)
        sh = jax.tree.map(lambda x: x.sharding, state)
        fn = jax.jit(
            step.make_train_step(cfg, tx, 10, 1),
            in_shardings=(sh, mesh.batch_sharding(m)),
            out_shardings=(sh, mesh.replicated(m)),
            donate_argnums=0,
        )
        for b in batches:
            gb = mesh.global_batch(b, m)
            assert len(gb["source"].sharding.device_set) == n
            state, metrics = fn(state, gb)
        assert fn._cache_size() == 1  # compiled once
        flat = jax.tree_util.tree_flatten_with_path(mesh.to_host(state["params"]))[0]
        for path, v in flat:
            results[f"{n}{jax.tree_util.keystr(path)}"] = v
        results[f"{n}/loss"] = np.asarray(mesh.to_host(metrics["loss"]))
    try:
        mesh.check_batch_size(6, mesh.make_mesh())
    except ValueError as e:
        results["error"] = np.array(str(e))
    np.savez(out, **results)


def kill(config_json: str, at_step: str) -> None:
    """Train with the config; SIGKILL this process just before orbax commits ``at_step``."""
    from orbax.checkpoint._src.path import atomicity

    from cryoden.train import config as C
    from cryoden.train import loop

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *a, **k):
        if self.get_final().name == at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, *a, **k)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    cfg = C.Config.from_dict(json.loads(open(config_json).read()))
    loop.train(cfg)
    sys.exit(3)  # not reached when the kill fires


def enospc(at_step: str, *argv: str) -> None:
    """``cryoden train ARGV`` on a disk that fills up when checkpoint ``at_step`` is written
    (the checkpoint's JSON item fails with ENOSPC, in orbax's background thread)."""
    import errno

    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    original = jch.JsonCheckpointHandler._save_fn

    async def save_fn(self, x, directory):
        if x.get("step", 0) >= int(at_step):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await original(self, x, directory)

    jch.JsonCheckpointHandler._save_fn = save_fn
    from cryoden.__main__ import main

    sys.exit(main(["train", *argv]))


if __name__ == "__main__":
    {"sharded": sharded, "kill": kill, "enospc": enospc}[sys.argv[1]](*sys.argv[2:])
