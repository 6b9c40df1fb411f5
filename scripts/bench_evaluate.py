"""Benchmark and acceptance table for ``cryoden evaluate``.

bench (default): N simulated pairs of SIZE^2 micrographs; wall time of ``cryoden evaluate`` with
two models and the baselines against ``cryoden infer`` of both halves with each model alone
(separate processes, each loading and compiling its models, compilation cache off; the target
is a ratio <= 2)::

    python scripts/bench_evaluate.py bench --pairs 2 --size 4096 -m unet -m unet-v0.2.1

acceptance: simulated halves with a known clean signal; split SNR against the true SNR for raw,
the low-pass baselines, affine, unet and a model fine-tuned on the simulated data for a few
steps (``cryoden train --arch affine --init affine``: a U-net takes many minutes to compile
for training on a CPU); prints the Markdown table of docs/evaluate.md::

    python scripts/bench_evaluate.py acceptance --size 384 --steps 60
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _run(cmd: list[str]) -> float:
    """Wall time of ``cmd``, with the persistent compilation cache off (every run compiles)."""
    env = {**os.environ, "CRYODEN_CACHE_DIR": ""}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def bench(args) -> None:
    from cryoden import simulate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        even, odd = simulate.write_halves(tmp / "data", args.pairs, (args.size,) * 2, 2, 0)
        print(f"simulated {args.pairs} pairs of {args.size}^2 in {time.perf_counter() - t0:.0f} s")
        halves = tmp / "halves"  # one folder, NAME_EVN.mrc / NAME_ODD.mrc: one infer per model
        halves.mkdir()
        for folder, token in ((even, "EVN"), (odd, "ODD")):
            for f in sorted(folder.iterdir()):
                f.rename(halves / f"{f.stem}_{token}{f.suffix}")
        py = [sys.executable, "-m", "cryoden"]
        models = [x for m in args.model for x in ("-m", m)]
        alone = 0.0
        for m in args.model:  # each model alone denoises every half
            alone += _run([*py, "infer", str(halves), "-m", m, "-o", str(tmp / m), "-q"])
        ev = _run([*py, "evaluate", "--even", str(halves), "--odd", str(halves), *models,
                   "-o", str(tmp / "eval"), "-q"])  # fmt: skip
        print(f"models alone (cryoden infer, {len(args.model)} runs): {alone:.1f} s")
        print(f"cryoden evaluate (2 models + {7} baselines, report): {ev:.1f} s")
        print(f"ratio: {ev / alone:.2f} (target <= 2)")


def acceptance(args) -> None:
    from cryoden import evaluation, metrics, simulate
    from cryoden.inference import Denoiser

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shape = (args.size,) * 2
        even, odd = simulate.write_halves(tmp / "train", 4, shape, 2, 1, snr_db=args.snr_db)
        run = tmp / "run"
        subprocess.run(
            [sys.executable, "-m", "cryoden", "train", "--even", str(even), "--odd", str(odd),
             "--out", str(run), "--arch", args.arch, "--init", args.arch, "--steps",
             str(args.steps), "--crop", str(min(128, args.size)), "--holdout", "0.25",
             "--samples-per-pair", "40", "--quiet"],
            check=True,
        )  # fmt: skip
        h = simulate.micrograph_halves(shape, seed=99, snr_db=args.snr_db)  # unseen data
        methods = [evaluation.raw_method()]
        methods += [evaluation.baseline_method(f"lowpass-{n}") for n in (2, 4, 8, 16)]
        methods += [evaluation.model_method(m, Denoiser(m)) for m in ("affine", "unet")]
        methods.append(evaluation.model_method("trained", Denoiser(str(run))))
        kept: dict = {}
        res = evaluation.evaluate_pair(
            "sim", h["even"], h["odd"], methods, view=lambda n, d: kept.setdefault(n, d)
        )
        true = {m.name: metrics.true_snr_db(kept[m.name], h["clean"]) for m in methods}
        split = {r["method"]: r["split_snr_db"] for r in res.rows}
        rank_s = {m: i + 1 for i, m in enumerate(sorted(split, key=split.get, reverse=True))}
        rank_t = {m: i + 1 for i, m in enumerate(sorted(true, key=true.get, reverse=True))}
        print(f"{args.size}^2 simulated micrograph, {args.snr_db} dB per half")
        print(f"trained: {args.arch} fine-tuned {args.steps} steps on 4 other simulated pairs")
        print("| method | split SNR (dB) | rank | true SNR (dB) | rank |")
        print("|---|---:|---:|---:|---:|")
        for m in sorted(split, key=split.get):
            print(f"| {m} | {split[m]:.2f} | {rank_s[m]} | {true[m]:.2f} | {rank_t[m]} |")
        same = all(rank_s[m] == rank_t[m] for m in split)
        print("ranks agree" if same else "RANKS DIFFER")
        spread = np.diff(sorted(true.values()))
        print(f"smallest gap between true SNRs: {spread.min():.2f} dB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what")
    b = sub.add_parser("bench")
    b.add_argument("--pairs", type=int, default=2)
    b.add_argument("--size", type=int, default=4096)
    b.add_argument("-m", "--model", action="append")
    a = sub.add_parser("acceptance")
    a.add_argument("--size", type=int, default=512)
    a.add_argument("--steps", type=int, default=60)
    a.add_argument("--arch", default="affine", help="architecture fine-tuned (from its pretrained)")
    a.add_argument("--snr-db", type=float, default=-10.0)
    args = p.parse_args()
    if args.what == "acceptance":
        acceptance(args)
    else:
        if args.what is None:
            args = b.parse_args([])
        args.model = args.model or ["unet", "unet-v0.2.1"]
        bench(args)


if __name__ == "__main__":
    main()
