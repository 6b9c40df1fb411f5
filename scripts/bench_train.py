#!/usr/bin/env python
"""Training-step benchmark: cryoden (JAX) vs Topaz-Denoise (PyTorch) on the same machine, one run.

One Noise2Noise step = forward, L2 loss, backward, Adagrad (lr 1e-3) update, on the same random
batch for both. cryoden runs its real training step (``cryoden.train.step.make_train_step``,
jitted with the shardings and buffer donation the training loop uses); Topaz runs its own
``UDenoiseNet`` / ``UDenoiseNet3D`` with ``torch.optim.Adagrad`` and ``nn.MSELoss`` as in
``topaz.denoising.models.__epoch``. Each side runs in its own process, as each tool runs:
cryoden with its host-memory policy (``cryoden.runtime.keep_host_memory``, applied by
``cryoden train``: freed memory is reused instead of page-faulted in again every step), Topaz
with glibc's defaults; a second Topaz process with cryoden's policy gives the like-for-like
ratio too. Each process's peak resident memory is reported as well. All
warm up, then timed steps alternate (cryoden, Topaz, Topaz', cryoden, ...) so background load
hits them alike; the median of ``--steps`` steps of each is reported (data loading excluded).

Usage::

    python scripts/bench_train.py               # CPU defaults: 2D 256² batch 4, 3D 64³ batch 2
    python scripts/bench_train.py --crop2d 384 --steps 7
    python scripts/bench_train.py --paper       # paper sizes: 2D 800² b4, 3D 96³ b10 (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def setup_cryoden(ndim: int, crop: int, batch: int):
    """cryoden's training step on this machine's devices -> (step(), info)."""
    import jax

    from cryoden.models import init_params
    from cryoden.train import config as C
    from cryoden.train import mesh, step

    arch = "unet" if ndim == 2 else "unet-3d"
    cfg = C.merge(C.Config(), {"model": C.arch_fields(arch), "optim": {"name": "adagrad"}})
    tx = step.make_optimizer(cfg.optim)
    m = mesh.make_mesh()
    state = mesh.create_replicated(
        lambda: step.init_state(
            init_params(cfg.model.spec, jax.random.key(0)), tx, jax.random.key(1)
        ),
        m,
    )
    sh = jax.tree.map(lambda x: x.sharding, state)
    rng = np.random.default_rng(0)
    shape = (batch,) + (crop,) * ndim + (1,)
    data = {k: rng.normal(size=shape).astype(np.float32) for k in ("source", "target")}
    batch_ = mesh.global_batch(data, m)
    fn = jax.jit(
        step.make_train_step(cfg, tx, 1000, 1),
        in_shardings=(sh, mesh.batch_sharding(m)),
        out_shardings=(sh, mesh.replicated(m)),
        donate_argnums=0,
    )
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch_).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    box = [state]

    def run():
        box[0], metrics = compiled(box[0], batch_)
        jax.block_until_ready(metrics["loss"])

    info = dict(
        flops=float(cost.get("flops", 0.0)),
        compile_s=compile_s,
        device=str(jax.devices()[0].device_kind),
    )
    return run, info


def setup_topaz(ndim: int, crop: int, batch: int):
    """Topaz's model, torch Adagrad and MSELoss on the same data -> (step(), info)."""
    import torch
    from topaz.denoising import models as tm

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    if ndim == 2:
        net = tm.UDenoiseNet(base_width=11, top_width=5)
    else:
        net = tm.UDenoiseNet3D(base_width=7, top_width=3)
    dev = torch.device("cuda" if cuda else "cpu")
    net = net.to(dev).train()
    opt = torch.optim.Adagrad(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.MSELoss()
    rng = np.random.default_rng(0)
    shape = (batch, 1) + (crop,) * ndim
    src, tgt = (
        torch.tensor(rng.normal(size=shape).astype(np.float32), device=dev) for _ in range(2)
    )

    def run():  # topaz.denoising.models.__epoch, one minibatch
        loss = loss_fn(net(src), tgt)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss.item()
        if cuda:
            torch.cuda.synchronize()

    return run, dict(threads=torch.get_num_threads())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker(impl: str, ndim: int, crop: int, batch: int, warmup: int, keep_memory: bool) -> None:
    """One side in its own process: set up, warm up, then one timed step per ``step`` line on
    stdin, each answered with ``@@ seconds``. ``keep_memory`` applies cryoden's host-memory
    policy (:func:`cryoden.runtime.keep_host_memory`) before anything allocates."""
    from cryoden import runtime

    runtime.keep_host_memory(default=keep_memory)  # Worker clears the env override
    setup = setup_cryoden if impl == "cryoden" else setup_topaz
    run, info = setup(ndim, crop, batch)
    for _ in range(warmup):
        run()
    print("@@", json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print("@@", timed(run), flush=True)
    print("@@", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)


class Worker:
    """A worker process driven over pipes (see :func:`worker`)."""

    def __init__(self, impl, ndim, crop, batch, warmup, keep_memory):
        cmd = [sys.executable, __file__, "--worker", impl, "--worker-case"]
        cmd += [str(v) for v in (ndim, crop, batch, warmup, int(keep_memory))]
        # the flags decide each side's policy: an exported CRYODEN_KEEP_HOST_MEMORY would
        # otherwise override all three alike
        env = {k: v for k, v in os.environ.items() if k != "CRYODEN_KEEP_HOST_MEMORY"}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.info = json.loads(self._answer())

    def _answer(self) -> str:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return line[3:]
        raise RuntimeError(f"benchmark worker {self.proc.args} exited ({self.proc.wait()})")

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._answer())

    def close(self) -> None:
        """End the worker; its peak resident memory goes to ``info['maxrss']`` (bytes)."""
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.info["maxrss"] = int(self._answer())
        self.proc.stdin.close()
        self.proc.wait()


def bench(ndim, crop, batch, steps, warmup, keep_ours) -> tuple[dict, dict, dict]:
    """Each side in its own process, set up one after the other: cryoden as `cryoden train` runs it
    (host-memory policy on unless ``keep_ours`` is False), Topaz as it runs (glibc defaults), and
    Topaz again with cryoden's host-memory policy, for a like-for-like allocator. Then timed
    steps alternate (ours, Topaz, Topaz', ours, ...) so a fluctuating background load hits all
    alike, and only one computes at a time. Median seconds of each."""
    sides = [
        Worker("cryoden", ndim, crop, batch, warmup, keep_ours),
        Worker("topaz", ndim, crop, batch, warmup, False),
        Worker("topaz", ndim, crop, batch, warmup, True),
    ]
    times = [[] for _ in sides]
    for _ in range(steps):
        for side, t in zip(sides, times, strict=True):
            t.append(side.step())
    for side, t in zip(sides, times, strict=True):
        side.close()
        side.info["seconds"] = statistics.median(t)
    return tuple(side.info for side in sides)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--crop2d", type=int, default=256)
    p.add_argument("--batch2d", type=int, default=4)
    p.add_argument("--crop3d", type=int, default=64)
    p.add_argument("--batch3d", type=int, default=2)
    p.add_argument("--paper", action="store_true", help="2D 800² batch 4, 3D 96³ batch 10")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", choices=["2d", "3d"])
    p.add_argument(
        "--no-keep-memory",
        action="store_true",
        help="run cryoden with glibc's default allocator policy, as CRYODEN_KEEP_HOST_MEMORY=0 "
        "does for cryoden train",
    )
    p.add_argument("--worker", choices=["cryoden", "topaz"], help=argparse.SUPPRESS)
    p.add_argument("--worker-case", type=int, nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        ndim, crop, batch, warmup, keep = args.worker_case
        return worker(args.worker, ndim, crop, batch, warmup, bool(keep))
    if args.paper:
        args.crop2d, args.batch2d, args.crop3d, args.batch3d = 800, 4, 96, 10
    cases = [(2, args.crop2d, args.batch2d), (3, args.crop3d, args.batch3d)]
    if args.only:
        cases = [c for c in cases if f"{c[0]}d" == args.only]

    rows = []
    for ndim, crop, batch in cases:
        ours, ref, ref_kept = bench(
            ndim, crop, batch, args.steps, args.warmup, not args.no_keep_memory
        )
        rows.append((ndim, crop, batch, ours, ref, ref_kept))
        print(
            f"# {ndim}D done: cryoden {ours['seconds']:.3f} s/step "
            f"(compile {ours['compile_s']:.1f} s), Topaz {ref['seconds']:.3f} s/step, "
            f"Topaz with cryoden's allocator policy {ref_kept['seconds']:.3f} s/step",
            flush=True,
        )

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\ndevice: {rows[0][3]['device']}, {os.cpu_count()} CPU cores, torch threads "
        f"{rows[0][4]['threads']}, load average {load:.2f}; median of {args.steps} steps "
        f"after {args.warmup} warm-up; cryoden host-memory policy "
        f"{'off' if args.no_keep_memory else 'on (as cryoden train runs)'}\n"
    )
    print(
        "| model | batch | cryoden steps/s | Topaz steps/s | ratio | Topaz, same allocator "
        "policy, steps/s | ratio | cryoden GFLOP/s | peak RSS GiB: cryoden, Topaz, Topaz' |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for ndim, crop, batch, ours, ref, ref_kept in rows:
        name = f"{'U-net 2D' if ndim == 2 else 'U-net 3D'} {'x'.join([str(crop)] * ndim)}"
        rate = ours["flops"] / ours["seconds"] / 1e9
        print(
            f"| {name} | {batch} | {1 / ours['seconds']:.3f} | {1 / ref['seconds']:.3f} | "
            f"{ref['seconds'] / ours['seconds']:.2f}x | {1 / ref_kept['seconds']:.3f} | "
            f"{ref_kept['seconds'] / ours['seconds']:.2f}x | {rate:.0f} | "
            + ", ".join(f"{i['maxrss'] / 2**30:.1f}" for i in (ours, ref, ref_kept))
            + " |"
        )


if __name__ == "__main__":
    main()
