#!/usr/bin/env python
"""Quality of training from movies, scored against the known clean signal of simulated movies.

Simulated counting-mode movies (:mod:`cryoden.simulate_movie`: CTF-filtered synthetic particles,
Poisson counts, beam-induced drift; not the real micrographs the general model was trained on)
are written as MRC stacks. Held-out test movies are summed with their true shifts, and each
method denoises that full sum:

- ``unet``: the general pretrained model;
- ``low-pass (best)``: the best of hard low-pass and Gaussian filters of several strengths,
  picked with the clean signal (an oracle choice, the classical method at its best);
- ``unet + movies, random``: ``unet`` fine-tuned with ``cryoden train --movies --split random``;
- ``unet + movies, even-odd``: the same number of steps with ``--split even-odd``.

Score: ``SNR_dB = 10 log10(var(a c) / var(d - a c - b))`` of the denoised image ``d`` against
the clean signal ``c`` of the sum, with ``a, b`` the least-squares fit (denoisers change the
scale), inside a border of the drift's size. Results: OUT/quality.json and a Markdown table
on stdout (docs/quality-movies.md).

Usage::

    python scripts/quality_movies.py --out /tmp/quality-movies            # ~10 min on 2 cores
    python scripts/quality_movies.py --out /tmp/q --steps 4 --train 3      # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="working folder (created)")
    p.add_argument("--size", type=int, default=256, help="movie edge, pixels")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--dose", type=float, default=1.0, help="e/px/frame")
    p.add_argument("--snr-db", type=float, default=-6.0, help="SNR of the full sum")
    p.add_argument("--drift", type=float, default=10.0, help="drift path length, pixels")
    p.add_argument("--train", type=int, default=5, help="training movies (one is held out)")
    p.add_argument("--test", type=int, default=2, help="test movies")
    p.add_argument("--steps", type=int, default=120, help="fine-tuning steps of each split")
    p.add_argument("--crop", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", type=Path, help="also draw the first test movie's results (PNG)")
    return p.parse_args()


def simulate(args, seed: int):
    from cryoden.simulate_movie import simulate_movie

    return simulate_movie(
        (args.size, args.size),
        args.frames,
        seed=seed,
        dose_per_frame=args.dose,
        drift=args.drift,
        snr_db=args.snr_db,
        gain_sigma=0.0,  # one detector for all movies: no gain reference needed
        pixel_size=1.0,
        margin=int(args.drift) + 12,
    )


def write_movie(sim, path: Path) -> None:
    import mrcfile

    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(sim.frames)  # uint8 counts
        m.voxel_size = sim.pixel_size


def snr_db(denoised: np.ndarray, clean: np.ndarray, border: int) -> float:
    """SNR of ``denoised`` against ``clean`` (module docstring), inside ``border`` pixels."""
    d = np.asarray(denoised, np.float64)[border:-border, border:-border].ravel()
    c = np.asarray(clean, np.float64)[border:-border, border:-border].ravel()
    a, b = np.linalg.lstsq(np.stack([c, np.ones_like(c)], 1), d, rcond=None)[0]
    return 10 * math.log10(np.var(a * c) / np.var(d - a * c - b))


def train(args, movies: Path, run: Path, split: str) -> Path:
    from cryoden.train import config as C
    from cryoden.train import loop

    cfg = C.merge(C.Config(), C.load_preset("train-2d"))
    cfg = C.merge(
        cfg,
        {
            "model": {"init": "unet"},
            "data": {
                "movies": str(movies),
                "split": split,
                "crop": args.crop,
                "batch_size": args.batch_size,
                "holdout": 1 / args.train,
                "samples_per_pair": 2 * args.batch_size,
            },
            "run": {"out": str(run), "steps": args.steps, "seed": args.seed, "progress": False},
        },
    )
    from cryoden import weights

    _, spec, _ = weights.load("unet")
    cfg = C.with_init_spec(cfg, spec, arch_given=False)
    t0 = time.time()
    result = loop.train(cfg.validate())
    print(f"trained {split}: {result['step']} steps in {time.time() - t0:.0f} s", flush=True)
    return Path(result["model"])


def main() -> None:
    args = parse()
    from cryoden import align, filters
    from cryoden.inference import Denoiser

    t0 = time.time()
    movies = args.out / "movies"
    movies.mkdir(parents=True, exist_ok=True)
    for k in range(args.train):  # kept from an earlier run: its training runs are then reused
        path = movies / f"train{k:02d}.mrc"
        if not path.exists():
            write_movie(simulate(args, args.seed + k), path)
    tests = []
    for k in range(args.test):
        sim = simulate(args, args.seed + 1000 + k)
        frames = [sim.frame(i).astype(np.float32) for i in range(args.frames)]
        full = align.aligned_sum(frames, align.Alignment(sim.shifts))
        border = int(np.ceil(np.abs(sim.shifts).max())) + 8
        tests.append((full, args.frames * sim.clean, border))
    print(f"simulated {args.train} + {args.test} movies in {time.time() - t0:.0f} s", flush=True)

    scores: dict[str, list[float]] = {}
    shown: dict[str, np.ndarray] = {"clean signal": tests[0][1]}  # first test movie's results

    def score(name: str, outputs: list[np.ndarray]) -> None:
        scores[name] = [snr_db(d, c, b) for d, (_, c, b) in zip(outputs, tests, strict=True)]
        shown[name] = outputs[0]

    score("raw sum", [x for x, _, _ in tests])
    best = ("", -math.inf, [])
    for name, fn, values in (
        ("low-pass", filters.lowpass, (1.5, 2, 3, 4, 6, 8)),
        ("gaussian", filters.gaussian, (0.75, 1, 1.5, 2, 3, 4)),
    ):
        for v in values:
            out = [fn(x, v) for x, _, _ in tests]
            s = [snr_db(d, c, b) for d, (_, c, b) in zip(out, tests, strict=True)]
            if np.mean(s) > best[1]:
                best = (f"{name} {v}", float(np.mean(s)), out)
    score(f"low-pass (best: {best[0]})", best[2])
    general = Denoiser("unet")
    score("unet (general)", [general(x) for x, _, _ in tests])
    for split in ("random", "even-odd"):
        model = train(args, movies, args.out / f"run-{split}", split)
        net = Denoiser(str(model))
        score(f"unet + movies, {split}", [net(x) for x, _, _ in tests])
    if args.figure:
        figure(args.figure, shown, scores, tests[0][2])

    lines = [
        "| method | SNR (dB) vs clean, per test movie | mean |",
        "|---|---|---|",
    ]
    for name, s in scores.items():
        lines.append(f"| {name} | {', '.join(f'{v:.2f}' for v in s)} | {np.mean(s):.2f} |")
    table = "\n".join(lines)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = dict(settings=settings, scores=scores, seconds=round(time.time() - t0, 1))
    from cryoden import atomic

    atomic.write_text(args.out / "quality.json", json.dumps(record, indent=1) + "\n")
    print(table)
    print(f"total {time.time() - t0:.0f} s; {args.out / 'quality.json'}")


def figure(path: Path, shown: dict[str, np.ndarray], scores: dict, border: int) -> None:
    """Central crops of the first test movie's results, each titled with its SNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(shown)
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.9))
    for ax, (name, img) in zip(axes, shown.items(), strict=True):
        crop = np.asarray(img, np.float64)[border:-border, border:-border]
        lo, hi = np.percentile(crop, [1, 99])
        ax.imshow(crop, cmap="gray", vmin=lo, vmax=hi)
        title = name.replace(" (best: ", "\n(").replace("unet + movies, ", "fine-tuned, ")
        if name in scores:
            title += f"\n{scores[name][0]:.1f} dB"
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    from PIL import Image

    Image.open(path).convert("L").save(path, optimize=True)  # grey levels only: a third the size
    print(f"figure {path}")


if __name__ == "__main__":
    main()
