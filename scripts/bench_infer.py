#!/usr/bin/env python
"""Inference benchmark: cryoden vs Topaz-Denoise (PyTorch, same weights, same inputs, one run).

Each measurement runs in a fresh subprocess (so peak RSS is its own), repeated; the table shows
the median seconds, the ratio to cryoden, useful GFLOP/s (the model's FLOPs per output pixel from
XLA's cost analysis x the image size, over the time) against a matmul peak measured in the same
run, peak memory, and the max abs difference of each output from a reference output.

Usage::

    python scripts/bench_infer.py --k2 fei-extended.mrc   # everything (2D, 3D, real K2): ~1.5 h
    python scripts/bench_infer.py --only 2d
    python scripts/bench_infer.py --only 3d --repeats 1
    python scripts/bench_infer.py --only real                 # real sizes (below): ~1 h on 2 cores
    python scripts/bench_infer.py --only real --small         # the same cases, tiny: a smoke test
    CRYODEN_MEMORY_BUDGET=8G python scripts/bench_infer.py --case falcon-cryoden

Real sizes (group ``real``): a Falcon 4096x4096 micrograph and a K3 5760x4092 one (synthetic),
cryoden with the default memory budget and with 8 GiB (``falcon-tiles-8g``: ordinary tiles,
never level-wise), Topaz at its defaults (1024 + 500
tiles); tomograms of 200x512x512 (measured) and 300x928x960. The latter is measured where
``--measure-large`` is given, else estimated from its plan's work and the rate measured on the
200x512x512 one (marked "estimated"). Topaz's 3D defaults (96 + 48: 192³ tiles, ~59 s each
on 2 cores) would take ~1.8 h and ~6.5 h on these tomograms: skipped, and said so.

Results are cached in --work (default /tmp/cryoden-bench) so parts can run separately and the
table is printed from everything measured so far (``--table``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- inputs


def synthetic_micrograph(shape=(2048, 2048), seed=0) -> np.ndarray:
    """Particle-like blobs, CTF-like band-pass, Poisson-like noise: (H, W) float32."""
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float32)
    idx = rng.integers(0, shape, size=(400, 2))
    img[idx[:, 0], idx[:, 1]] = 1.0
    f = np.fft.rfft2(img)
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    k2 = kx**2 + ky**2
    f *= np.exp(-k2 / (2 * 0.02**2)) * np.sin(2e4 * k2 + 0.3)
    clean = np.fft.irfft2(f, s=shape)
    clean = clean / clean.std() * 0.3 + 10
    return rng.poisson(clean * 10).astype(np.float32)


def synthetic_volume(shape=(128, 256, 256), seed=0) -> np.ndarray:
    """Blobs and a membrane slab in Gaussian noise (input std ~1.5): (D, H, W) float32.

    Each blob is drawn within 6 sigma of its centre (3e-8 of its peak beyond), so large
    volumes are made in seconds."""
    rng = np.random.default_rng(seed)
    vol = np.zeros(shape, np.float32)
    for _ in range(60):
        c = rng.uniform(0, shape)
        r = rng.uniform(3, 9)
        lo = [max(int(ci - 6 * r), 0) for ci in c]
        hi = [min(int(ci + 6 * r) + 1, n) for ci, n in zip(c, shape, strict=True)]
        z, y, x = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        d2 = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2
        vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += np.exp(-0.5 * d2 / r**2)
    y, x = np.ogrid[: shape[1], : shape[2]]
    vol += np.exp(-0.5 * ((y - 0.3 * x - 60) / 3.0) ** 2).astype(np.float32)[None]
    return vol + rng.normal(0, 1.5, shape).astype(np.float32)


def real_micrograph() -> np.ndarray:
    """The full real micrograph given by ``--k2`` (passed to workers in env CRYODEN_BENCH_K2):
    e.g. ``fei-extended.mrc`` (3838x3710, mrcfile's test data; examples/ holds a crop of it)."""
    import mrcfile

    path = os.environ.get("CRYODEN_BENCH_K2")
    if not path:
        raise SystemExit("the k2 cases need --k2 PATH: a full-size real micrograph (MRC)")
    with mrcfile.open(path, permissive=True) as m:
        return np.asarray(m.data, np.float32)


# Real sizes; with --small (env CRYODEN_BENCH_SMALL=1) tiny stand-ins of the same kinds.
REAL_SHAPES = {
    "falcon": ((4096, 4096), (512, 512)),
    "k3": ((4092, 5760), (480, 736)),
    "tomo200": ((200, 512, 512), (40, 96, 96)),
    "tomo300": ((300, 928, 960), (48, 128, 128)),
}


def real_shape(name: str) -> tuple[int, ...]:
    return REAL_SHAPES[name][os.environ.get("CRYODEN_BENCH_SMALL") == "1"]


INPUTS = {
    "2d": synthetic_micrograph,
    "3d": synthetic_volume,
    "k2": real_micrograph,
    "falcon": lambda: synthetic_micrograph(real_shape("falcon")),
    "k3": lambda: synthetic_micrograph(real_shape("k3")),
    "tomo200": lambda: synthetic_volume(real_shape("tomo200")),
    "tomo300": lambda: synthetic_volume(real_shape("tomo300")),
}


# ---------------------------------------------------------------------------- workers


def worker(args) -> None:
    """One measurement in this process: prints a JSON line with times, maxrss, output file."""
    x = INPUTS[args.input]()
    times = []
    if args.impl == "cryoden":
        from cryoden import runtime
        from cryoden.inference import Denoiser

        runtime.keep_host_memory(default=False)  # as `cryoden infer` runs (runtime.setup)

        d = Denoiser(args.model, ndim=x.ndim)
        kw = {}
        if args.patch is not None:
            kw = dict(patch_size=args.patch, padding=args.padding)
        if os.environ.get("CRYODEN_BENCH_TILES") == "1":  # ordinary tiles, never level-wise
            kw["levelwise"] = False
        t = time.perf_counter()
        y = d(x, **kw)  # first call includes compilation
        first = time.perf_counter() - t
        for _ in range(args.repeats):
            t = time.perf_counter()
            y = d(x, **kw)
            times.append(time.perf_counter() - t)
        extra = {"first_call_s": first, **route_facts(d, x.shape, args.patch, args.padding)}
    else:
        import torch

        sys.path.insert(0, str(ROOT / "tests"))
        import topaz_ref

        torch.set_num_threads(os.cpu_count())
        for _ in range(args.repeats):
            t = time.perf_counter()
            if x.ndim == 2:
                y = topaz_ref.topaz_denoise_2d(x, args.model, args.patch or -1, args.padding or 0)
            else:
                y = topaz_ref.topaz_denoise_3d(x, args.model, args.patch or 0, args.padding or 0)
            times.append(time.perf_counter() - t)
        extra = {}
    out = Path(args.work) / f"{args.tag}.npy"
    np.save(out, np.asarray(y, np.float32))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"times": times, "maxrss": rss, "out": str(out), **extra}))


def matmul_peak() -> float:
    """Best of numpy and XLA float32 GEMM (2048^3), GFLOP/s, median of 5."""
    import jax
    import jax.numpy as jnp

    a = np.random.default_rng(0).normal(size=(2048, 2048)).astype(np.float32)
    best = 0.0
    for fn in (lambda: a @ a, lambda: jax.jit(jnp.matmul)(a, a).block_until_ready()):
        fn()
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        best = max(best, 2 * 2048**3 / np.median(ts) / 1e9)
    return best


def flops_per_pixel(model: str, polyphase: bool = True) -> float:
    """XLA's FLOP count per pixel of the forward; ``polyphase=False`` is the literal U-net (what
    Topaz executes), ``True`` what cryoden executes."""
    import jax

    from cryoden import weights
    from cryoden.models import build_model

    params, spec, _ = weights.load(model)
    size = (64,) * spec.ndim if spec.ndim == 3 else (512, 512)
    x = jax.ShapeDtypeStruct((1, *size, 1), np.float32)
    fn = jax.jit(build_model(spec, polyphase=polyphase).apply)
    c = fn.lower({"params": params}, x).compile()
    return c.cost_analysis()["flops"] / float(np.prod(size))


# ---------------------------------------------------------------------------- plan


# tag: (input, impl, model, patch, padding, reference tag for the diff column, timed runs)
# Topaz's 96 + 48 3D tiling is 18 tiles of 192^3 here (~18 min per run on 2 cores) and its
# 1024 + 500 tiling of the full K2 micrograph ~15 min: those run once; everything else 3 times.
CASES = {
    "2d": [
        ("2d-cryoden", "2d", "cryoden", "unet", None, None, None, 3),
        ("2d-topaz-whole", "2d", "topaz", "unet", None, None, "2d-cryoden", 3),
        ("2d-topaz-default", "2d", "topaz", "unet", 1024, 500, "2d-cryoden", 3),
    ],
    "3d": [
        ("3d-cryoden", "3d", "cryoden", "unet-3d", None, None, None, 3),
        ("3d-topaz-whole", "3d", "topaz", "unet-3d-10a", None, None, "3d-cryoden", 1),
        ("3d-cryoden-tiled", "3d", "cryoden", "unet-3d", 96, 48, "3d-cryoden", 1),
        ("3d-topaz-default", "3d", "topaz", "unet-3d-10a", 96, 48, "3d-topaz-whole", 1),
    ],
    "k2": [
        ("k2-cryoden", "k2", "cryoden", "unet", None, None, None, 3),
        ("k2-topaz-default", "k2", "topaz", "unet", 1024, 500, "k2-cryoden", 1),
    ],
    "real": [
        ("falcon-cryoden-whole", "falcon", "cryoden", "unet", None, None, None, 1),
        ("falcon-cryoden", "falcon", "cryoden", "unet", None, None, "falcon-cryoden-whole", 1),
        ("falcon-cryoden-8g", "falcon", "cryoden", "unet", None, None, "falcon-cryoden-whole", 1),
        ("falcon-tiles-8g", "falcon", "cryoden", "unet", None, None, "falcon-cryoden-whole", 1),
        ("falcon-topaz-default", "falcon", "topaz", "unet", 1024, 500, "falcon-cryoden", 1),
        ("k3-cryoden", "k3", "cryoden", "unet", None, None, None, 1),
        ("k3-cryoden-8g", "k3", "cryoden", "unet", None, None, "k3-cryoden", 1),
        ("k3-topaz-default", "k3", "topaz", "unet", 1024, 500, "k3-cryoden", 1),
        ("tomo200-cryoden", "tomo200", "cryoden", "unet-3d", None, None, None, 1),
        ("tomo300-cryoden", "tomo300", "cryoden", "unet-3d", None, None, None, 1),
    ],
}
# Memory budget per case (env CRYODEN_MEMORY_BUDGET); "whole" is one tile on a 24 GB machine.
CASE_ENV = {
    "falcon-cryoden-whole": {"CRYODEN_MEMORY_BUDGET": "16G"},
    "falcon-cryoden-8g": {"CRYODEN_MEMORY_BUDGET": "8G"},
    "falcon-tiles-8g": {"CRYODEN_MEMORY_BUDGET": "8G", "CRYODEN_BENCH_TILES": "1"},
    "k3-cryoden-8g": {"CRYODEN_MEMORY_BUDGET": "8G"},
}
# Cases run only on request (--measure-large); otherwise estimated from the plan (estimate()).
ESTIMATED = {"tomo300-cryoden": "tomo200-cryoden"}
SKIPPED = {  # Topaz 96 + 48: 192³ tiles, ~59 s each on 2 cores (18 in 1061 s, table above)
    "tomo200-topaz-default": "96+48 is 108 tiles of 192³, ~1.8 h",
    "tomo300-topaz-default": "96+48 is 400 tiles of 192³, ~6.5 h",
}


def estimate(case, results: dict) -> dict:
    """Seconds of ``case`` from its plan's work and the voxel rate of the measured case it
    stands for (``ESTIMATED``): rate = image voxels x work / seconds there."""
    import math

    from cryoden.inference import Denoiser

    tag, inp, _, model, patch, padding, _, _ = case
    base = results.get(ESTIMATED[tag])
    if not base:
        raise SystemExit(f"{tag}: run {ESTIMATED[tag]} first (its rate gives the estimate)")
    shape = real_shape(inp)
    facts = route_facts(Denoiser(model, ndim=len(shape)), shape, patch, padding)
    rate = math.prod(base["shape"]) * base["work"] / float(np.median(base["times"]))
    seconds = math.prod(shape) * facts["work"] / rate
    return {
        "times": [seconds],
        "estimated": f"from {ESTIMATED[tag]}'s rate",
        "maxrss": float("nan"),
        **facts,
        "shape": list(shape),
    }


def route_facts(d, shape, patch, padding) -> dict:
    """The path a Denoiser ``d`` takes for an image of ``shape`` (``Denoiser.route``, as a run
    routes it): ``path`` ('tiles', 'whole', 'levelwise' or 'spatial'), ``tiles`` (ordinary
    tiles or stage calls) and ``work`` (computed volume or FLOPs per one whole pass)."""
    net = d.nets[0]
    route = d.route(net, tuple(shape), patch, padding)
    work, tiles, path = route.work, len(route.plan.tiles), route.kind
    if route.kind == "levelwise":  # its own work factor (FLOPs / one pass)
        work, tiles = net.levelwise.work(route.levelwise), route.calls
    elif route.kind == "tiles" and tiles == 1:
        path = "whole"
    return {"path": path, "tiles": tiles, "work": work}


def run_case(case, work: Path, repeats: int) -> dict:
    tag, inp, impl, model, patch, padding, _, _ = case
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--input",
        inp,
        "--impl",
        impl,
        "--model",
        model,
        "--tag",
        tag,
        "--work",
        str(work),
        "--repeats",
        str(repeats),
    ]
    if patch is not None:
        cmd += ["--patch", str(patch), "--padding", str(padding)]
    print(f"# {tag}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    env = {**os.environ, **CASE_ENV.get(tag, {})}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode:
        raise SystemExit(f"{tag} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(work: Path) -> str:
    results = json.loads((work / "results.json").read_text())
    peak = results.get("_matmul_gflops")
    lines = [
        f"matmul peak (float32 GEMM, same machine): {peak:.1f} GFLOP/s" if peak else "",
        "useful = the literal U-net's FLOPs (what Topaz executes) / time; executed = the FLOPs "
        "this implementation runs (cryoden: polyphase decoders) / time, as % of the matmul peak",
        "",
        "work = pixels computed (tiles with their margins) / image pixels, from the plan",
        "",
        "| case | impl | tiles | median s (n) | vs cryoden | useful GFLOP/s | executed % peak "
        "| peak RSS GiB | max abs diff (vs) | diff / input std | work |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fpp = {}
    for group in CASES.values():
        for tag, inp, impl, model, patch, padding, ref, _ in group:
            r = results.get(tag)
            if not r:
                continue
            med = float(np.median(r["times"]))
            ours = results.get(f"{inp}-cryoden")
            ratio = med / float(np.median(ours["times"])) if ours else float("nan")
            if model not in fpp:
                fpp[model] = (flops_per_pixel(model, False), flops_per_pixel(model, True))
            pixels = r["flops"] / fpp[model][1]  # r["flops"] was stored with the polyphase count
            gflops = fpp[model][0] * pixels / med / 1e9
            executed = fpp[model][1 if impl == "cryoden" else 0] * pixels / med / 1e9
            diff, rel = "", ""
            if ref and ref in results:
                d = np.abs(np.load(r["out"]) - np.load(results[ref]["out"])).max()
                diff, rel = f"{d:.3g} ({ref})", f"{d / r['input_std']:.2g}"
            tiles = f"{patch}+{padding}" if patch else "auto"
            if "tiles" in r and not patch:
                tiles = "whole" if r["tiles"] == 1 else f"auto: {r['tiles']} tiles"
                names = {"levelwise": f"level-wise ({r['tiles']} stage calls)", "spatial": "split"}
                tiles = names.get(r.get("path"), tiles)
            budget = CASE_ENV.get(tag, {}).get("CRYODEN_MEMORY_BUDGET")
            tiles += f" (budget {budget})" if budget else ""
            pct = f"{100 * executed / peak:.0f}%" if peak else ""
            rss = f"{r['maxrss'] / 2**30:.2f}" if r["maxrss"] == r["maxrss"] else ""
            n = "estimated" if r.get("estimated") else len(r["times"])
            work = f"{r['work']:.2f}" if "work" in r else ""
            lines.append(
                f"| {tag} | {impl} {model} | {tiles} | {med:.2f} ({n}) | "
                f"{ratio:.2f}x | {gflops:.1f} | {pct} | {rss} | {diff} | {rel} | {work} |"
            )
    for tag, why in SKIPPED.items() if any(t in results for t, *_ in CASES["real"]) else ():
        lines.append(f"| {tag} | topaz | 96+48 | skipped: {why} | | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", choices=sorted(CASES), action="append")
    p.add_argument("--case", action="append", help="run only these case tags (e.g. 3d-cryoden)")
    p.add_argument("--repeats", type=int, help="timed runs for every case (default: per case)")
    p.add_argument("--work", default="/tmp/cryoden-bench")
    p.add_argument("--k2", metavar="MRC", help="full-size real micrograph for the k2 cases")
    p.add_argument("--table", action="store_true", help="only print the table of cached results")
    p.add_argument(
        "--small", action="store_true", help="tiny stand-ins for the real-size cases (smoke test)"
    )
    p.add_argument(
        "--measure-large",
        action="store_true",
        help="measure the 300x928x960 tomogram instead of estimating it from the plan",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input"), p.add_argument("--impl"), p.add_argument("--model")
    (
        p.add_argument("--tag"),
        p.add_argument("--patch", type=int),
        p.add_argument("--padding", type=int),
    )
    args = p.parse_args()
    if args.small:
        os.environ["CRYODEN_BENCH_SMALL"] = "1"
    if args.k2:
        os.environ["CRYODEN_BENCH_K2"] = str(Path(args.k2).resolve())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    store = work / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    if not args.table:
        results["_matmul_gflops"] = matmul_peak()
        for group in args.only or list(CASES):
            for case in CASES[group]:
                if args.case and case[0] not in args.case:
                    continue
                if case[1] == "k2" and not args.k2:
                    print(f"# {case[0]}: skipped (no --k2 micrograph given)", file=sys.stderr)
                    continue
                tag, inp, model = case[0], case[1], case[3]
                if tag in ESTIMATED and not args.measure_large:
                    r = estimate(case, results)
                    r.update(flops=flops_per_pixel(model) * float(np.prod(r["shape"])))
                else:
                    r = run_case(case, work, args.repeats or case[-1])
                    x = INPUTS[inp]()
                    r.update(flops=flops_per_pixel(model) * x.size, input_std=float(x.std()))
                    r.update(shape=list(x.shape))
                results[tag] = r
                from cryoden import atomic

                atomic.write_text(store, json.dumps(results, indent=1))
    print(table(work))


if __name__ == "__main__":
    main()
