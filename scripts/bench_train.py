#!/usr/bin/env python
"""Training-step benchmark: cryoden (JAX) vs Topaz-Denoise (PyTorch) on the same machine, one run.

One Noise2Noise step = forward, L2 loss, backward, Adagrad (lr 1e-3) update, on the same random
batch for both. cryoden runs its real training step (``cryoden.train.step.make_train_step``,
jitted with the shardings and buffer donation the training loop uses); Topaz runs its own
``UDenoiseNet`` / ``UDenoiseNet3D`` with ``torch.optim.Adagrad`` and ``nn.MSELoss`` as in
``topaz.denoising.models.__epoch``. Both warm up, then timed steps alternate (cryoden, Topaz,
cryoden, ...) so background load hits both alike; the median of ``--steps`` steps of each is
reported (data loading excluded on both sides).

Usage::

    python scripts/bench_train.py               # CPU defaults: 2D 256² batch 4, 3D 64³ batch 2
    python scripts/bench_train.py --crop2d 384 --steps 7
    python scripts/bench_train.py --paper       # paper sizes: 2D 800² b4, 3D 96³ b10 (GPU)
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def bench(ndim: int, crop: int, batch: int, steps: int, warmup: int) -> tuple[dict, dict]:
    """Warm both up, then alternate timed steps (ours, theirs, ours, ...) so a fluctuating
    background load hits both alike; median seconds per step of each."""
    ours, ours_info = setup_cryoden(ndim, crop, batch)
    ref, ref_info = setup_topaz(ndim, crop, batch)
    for _ in range(warmup):
        ours()
        ref()
    t_ours, t_ref = [], []
    for _ in range(steps):
        t_ours.append(timed(ours))
        t_ref.append(timed(ref))
    ours_info["seconds"] = statistics.median(t_ours)
    ref_info["seconds"] = statistics.median(t_ref)
    return ours_info, ref_info


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
    args = p.parse_args()
    if args.paper:
        args.crop2d, args.batch2d, args.crop3d, args.batch3d = 800, 4, 96, 10
    cases = [(2, args.crop2d, args.batch2d), (3, args.crop3d, args.batch3d)]
    if args.only:
        cases = [c for c in cases if f"{c[0]}d" == args.only]

    rows = []
    for ndim, crop, batch in cases:
        ours, ref = bench(ndim, crop, batch, args.steps, args.warmup)
        rows.append((ndim, crop, batch, ours, ref))
        print(
            f"# {ndim}D done: cryoden {ours['seconds']:.3f} s/step "
            f"(compile {ours['compile_s']:.1f} s), Topaz {ref['seconds']:.3f} s/step",
            flush=True,
        )

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\ndevice: {rows[0][3]['device']}, {os.cpu_count()} CPU cores, torch threads "
        f"{rows[0][4]['threads']}, load average {load:.2f}; median of {args.steps} steps "
        f"after {args.warmup} warm-up\n"
    )
    print("| model | batch | cryoden steps/s | Topaz steps/s | ratio | cryoden GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for ndim, crop, batch, ours, ref in rows:
        name = f"{'U-net 2D' if ndim == 2 else 'U-net 3D'} {'x'.join([str(crop)] * ndim)}"
        rate = ours["flops"] / ours["seconds"] / 1e9
        print(
            f"| {name} | {batch} | {1 / ours['seconds']:.3f} | {1 / ref['seconds']:.3f} | "
            f"{ref['seconds'] / ours['seconds']:.2f}x | {rate:.0f} |"
        )


if __name__ == "__main__":
    main()
