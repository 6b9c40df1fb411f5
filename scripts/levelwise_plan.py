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
"""

from __future__ import annotations

import argparse
import math
import os

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
    args = ap.parse_args()
    os.environ["CRYODEN_MEMORY_BUDGET"] = args.budget

    from cryoden import levelwise, tiling
    from cryoden.inference import Denoiser, memory_budget

    if args.unstreamed:
        levelwise.STREAMED = ()

    cases = [(args.model or "unet", tuple(args.shape))] if args.shape else CASES
    for model, shape in cases:
        d = Denoiser(model, ndim=len(shape))
        net = d.nets[0]
        budget = memory_budget(d.devices[0])
        lw = levelwise.Levelwise(net.spec, net.params, d.dtype, d.mesh)
        padded, tiles, _ = d.plan(shape, None, None)
        plan = lw.plan(padded, budget)
        print(f"{model} {'x'.join(map(str, shape))}, budget {args.budget}:")
        whole = lw.whole_flops_per_px(padded) * math.prod(padded)
        excess = []
        for sp in plan.stages:
            executed = sp.calls * sp.batch * math.prod(sp.tile)
            ideal = sp.flops * math.prod(sp.grid) / executed  # the stage run untiled
            excess.append((sp.stage.name, ideal, sp.flops - ideal))
            print(
                f"  {sp.stage.name}: grid {sp.grid} tile {sp.tile} halo {sp.halo} "
                f"x{len(sp.tiles)} tiles, ~{sp.bytes / 2**30:.2f} GiB, "
                f"{sp.flops / 1e12:.2f} TFLOP ({sp.flops / whole:.3f} of a whole pass; "
                f"tiles x{executed / math.prod(sp.grid):.3f} of its grid)"
            )
        structure = sum(i for _, i, _ in excess) / whole - 1
        parts = ", ".join(f"{n} tiles +{e / whole:.3f}" for n, _, e in excess)
        print(f"  excess: structure (recomputed enc1) +{structure:.3f}, {parts}")
        print(
            f"  level-wise work {lw.work(plan):.3f}x one whole pass; today's tiles: "
            f"{len(tiles)} x {tiling.tile_shape(tiles)} = {tiling.waste(padded, tiles):.2f}x "
            f"(3D margins {'approximate' if len(shape) == 3 else 'exact'})",
            flush=True,
        )


if __name__ == "__main__":
    main()
