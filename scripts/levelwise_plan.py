#!/usr/bin/env python
"""Level-wise plans at real sizes (plan only: compiles the stage kernels, runs nothing).

For each case: per stage the output grid, tile, halo, tile count and estimated bytes, and the
total work (FLOPs executed / FLOPs of one whole pass, from XLA's cost analysis), next to the
work of today's whole-network tiles (``Denoiser.plan``) under the same budget. The excess over
one whole pass is split into its causes: ``structure`` (the stages run untiled: the recomputed
``enc1`` of S3) and, per stage, ``tiles`` (halos, alignment and padding tiles: executed tile
volume over the stage's grid volume).

Usage::

    python scripts/levelwise_plan.py                      # the cases of docs/levelwise.md
    python scripts/levelwise_plan.py --budget 8G --shape 300 928 960 --model unet-3d
    python scripts/levelwise_plan.py --model unet-3d --shape 64 160 160 --time 96M

``--time BUDGET`` runs the case (synthetic volume or image, one process, warm kernels: the
compiles are excluded): whole (budget ``--budget``) and level-wise under ``BUDGET`` (which
should force several stage tiles), alternating, ``--repeats`` times each; prints the plan,
the median seconds of each, their ratio and the largest difference of the outputs / input std.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

CASES = [
    ("unet", (4096, 4096)),
    ("unet", (5760, 4092)),
    ("unet-3d", (200, 512, 512)),
    ("unet-3d", (300, 928, 960)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="8G", help="memory budget (as CRYODEN_MEMORY_BUDGET)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--shape", type=int, nargs="+", default=None)
    ap.add_argument(
        "--unstreamed",
        action="store_true",
        help="3D: run every block whole, not over depth slabs (the plans before depthstream)",
    )
    ap.add_argument("--time", metavar="BUDGET", help="time whole vs level-wise under BUDGET")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ["CRYODEN_MEMORY_BUDGET"] = args.budget

    from cryoden import levelwise, tiling
    from cryoden.inference import Denoiser

    if args.unstreamed:
        levelwise.STREAMED = ()

    cases = [(args.model or "unet", tuple(args.shape))] if args.shape else CASES
    if args.time:
        return time_case(*cases[0], args.budget, args.time, args.repeats)
    for model, shape in cases:
        d = Denoiser(model, ndim=len(shape))
        net = d.nets[0]
        padded, tiles, _ = d.plan(shape, None, None)
        plan = d._levelwise_plan(net, padded)  # as a run plans it (host arrays counted on CPU)
        lw = net.levelwise
        print(f"{model} {'x'.join(map(str, shape))}, budget {args.budget}:")
        whole = lw.whole_flops_per_px(padded) * math.prod(padded)
        excess = []
        for sp in plan.stages:
            executed = sp.calls * sp.batch * math.prod(sp.tile)
            ideal = sp.flops * math.prod(sp.grid) / executed  # the stage run untiled
            excess.append((sp.stage.name, ideal, sp.flops - ideal))
            print(
                f"  {sp.stage.name}: grid {sp.grid} tile {sp.tile} halo {sp.halo} "
                f"x{len(sp.tiles)} tiles, ~{sp.bytes / 2**30:.2f} GiB + host "
                f"{sp.host / 2**30:.2f} GiB, "
                f"{sp.flops / 1e12:.2f} TFLOP ({sp.flops / whole:.3f} of a whole pass; "
                f"tiles x{executed / math.prod(sp.grid):.3f} of its grid)"
            )
        structure = sum(i for _, i, _ in excess) / whole - 1
        parts = ", ".join(f"{n} tiles +{e / whole:.3f}" for n, _, e in excess)
        print(f"  excess: structure (recomputed enc1) +{structure:.3f}, {parts}")
        print(
            f"  level-wise work {lw.work(plan):.3f}x one whole pass; today's tiles: "
            f"{len(tiles)} x {tiling.tile_shape(tiles)} = {tiling.waste(padded, tiles):.2f}x "
            f"(margins {'approximate' if len(shape) == 3 else 'exact'})",
            flush=True,
        )


def time_case(model: str, shape: tuple[int, ...], whole_budget: str, budget: str, repeats: int):
    """Whole vs level-wise wall time of one image (module doc, ``--time``)."""
    import numpy as np

    from cryoden.inference import Denoiser

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    d = Denoiser(model, ndim=len(shape))
    budgets = {"whole": whole_budget, "levelwise": budget}

    def run(kind):
        os.environ["CRYODEN_MEMORY_BUDGET"] = budgets[kind]
        t = time.perf_counter()
        y = d(x, levelwise=kind == "levelwise")
        return time.perf_counter() - t, y

    outs = {k: run(k)[1] for k in budgets}  # warm-up: plans and compiles
    net = d.nets[0]
    times = {k: [] for k in budgets}
    for _ in range(repeats):
        for k in budgets:
            dt, outs[k] = run(k)
            times[k].append(dt)
    diff = float(np.abs(outs["whole"] - outs["levelwise"]).max() / x.std())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{model} {'x'.join(map(str, shape))}: level-wise under {budget}:")
    for key, plan in net.lw_plans.items():
        if key[-1]:  # the verified plan that ran
            for sp in plan.stages:
                print(f"  {sp.stage.name}: {len(sp.tiles)} tiles of {sp.tile} (grid {sp.grid})")
            print(f"  work {net.levelwise.work(plan):.3f}x one whole pass")
    for k, v in times.items():
        print(f"  {k}: median {med[k]:.1f} s ({', '.join(f'{t:.1f}' for t in v)})")
    ratio = med["levelwise"] / med["whole"]
    print(f"  ratio {ratio:.2f}; max |whole - level-wise| / input std = {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
