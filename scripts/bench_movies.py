"""Benchmark motion correction: cryoden.align against a per-frame scikit-image aligner.

For a simulated counting-mode movie (``--size`` square frames, ``--frames`` frames, int8 MRC on
disk, gain reference beside it) each aligner runs in its own process, reading frames from the
memory-mapped file: alignment plus the full, even and odd aligned sums. Reported: seconds, CPU
seconds (robust to a shared machine's load), peak RSS (VmHWM) and the rms shift error against the
simulated truth; then the same error on ``--extra`` smaller movies. The baseline registers each
frame to the first with
``skimage.registration.phase_cross_correlation(upsample_factor=20, normalization=None)`` (plain
cross-correlation: phase normalisation fails on low-dose frames) on precomputed FFTs, and sums
with ``scipy.ndimage.fourier_shift`` (one FFT per frame for all three sums).

    python scripts/bench_movies.py                    # 4096 x 4096 x 40 (minutes, ~1 GB disk)
    python scripts/bench_movies.py --size 1024 --frames 20 --extra 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


class MappedFrames:
    """Frames of an MRC stack, memory-mapped, times the gain reference: ``frame(i)`` (H, W)."""

    def __init__(self, path: Path, gain: np.ndarray):
        import mrcfile

        self._mrc = mrcfile.mmap(path, mode="r")
        self.data = self._mrc.data
        self.gain = gain

    def __len__(self) -> int:
        return self.data.shape[0]

    def frame(self, i: int) -> np.ndarray:
        return self.data[i].astype(np.float32) * self.gain


def rms(err) -> float:
    return float(np.sqrt((np.asarray(err) ** 2).sum(axis=1).mean()))


def run_ours(frames, marks):
    from cryoden import align

    a = align.estimate_shifts(frames)
    marks.append(time.perf_counter())
    n = len(frames)
    sums = align.aligned_sums(frames, a, [None, range(0, n, 2), range(1, n, 2)])
    return a.shifts, sums


def run_baseline(frames, marks=None, upsample=20):
    from scipy import ndimage
    from skimage.registration import phase_cross_correlation

    n = len(frames)
    ref = np.fft.fft2(frames.frame(0))
    shifts = np.zeros((n, 2))
    for i in range(1, n):
        dy_dx = phase_cross_correlation(
            ref,
            np.fft.fft2(frames.frame(i)),
            upsample_factor=upsample,
            space="fourier",
            normalization=None,
        )[0]
        shifts[i] = dy_dx[1], dy_dx[0]  # skimage: (row, col) to register the moving image
    if marks is not None:
        marks.append(time.perf_counter())
    sums = [np.zeros(ref.shape) for _ in range(3)]
    for i in range(n):
        f = ndimage.fourier_shift(np.fft.fft2(frames.frame(i)), (shifts[i, 1], shifts[i, 0]))
        f = np.fft.ifft2(f).real
        sums[0] += f
        sums[1 + i % 2] += f
    return shifts, [s.astype(np.float32) for s in sums]


def child(args) -> None:
    """Run one aligner on the stored movie; print a JSON line."""
    import mrcfile

    folder = Path(args.child_dir)
    with mrcfile.open(folder / "gain.mrc") as m:
        gain = np.asarray(m.data, np.float32)
    truth = np.load(folder / "shifts.npy")
    frames = MappedFrames(folder / "movie.mrc", gain)
    marks = []
    t0, c0 = time.perf_counter(), time.process_time()
    shifts, sums = (run_ours if args.child == "ours" else run_baseline)(frames, marks)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert np.allclose(sums[1] + sums[2], sums[0], atol=1e-3 * np.abs(sums[0]).max())
    out = {"seconds": seconds, "cpu": cpu, "rss": peak_rss_gib(), "err": rms(shifts - truth),
           "align_s": marks[0] - t0, "sums_s": t0 + seconds - marks[0]}  # fmt: skip
    print(json.dumps(out))


def write_movie(folder: Path, size: int, n: int, seed: int):
    """Simulate and store ``movie.mrc`` (int8), ``gain.mrc``, ``shifts.npy``; -> stored bytes."""
    import mrcfile

    from cryoden.simulate_movie import simulate_movie

    movie = simulate_movie((size, size), n, seed=seed, dose_per_frame=1.5, drift=15.0)
    with mrcfile.new_mmap(folder / "movie.mrc", (n, size, size), mrc_mode=0, overwrite=True) as m:
        for i in range(n):
            m.data[i] = movie.frame(i).astype(np.int8)
    with mrcfile.new(folder / "gain.mrc", movie.gain, overwrite=True):
        pass
    np.save(folder / "shifts.npy", movie.shifts)
    return (folder / "movie.mrc").stat().st_size


def in_process_errors(size: int, n: int, seed: int) -> tuple[float, float]:
    """Shift errors (ours, baseline) on a small simulated movie held in memory."""
    from cryoden import align
    from cryoden.simulate_movie import simulate_movie

    movie = simulate_movie((size, size), n, seed=seed, dose_per_frame=1.5, drift=15.0)

    class Frames(list):
        def frame(self, i):
            return self[i]

    frames = Frames(movie.corrected(i) for i in range(n))
    ours = align.estimate_shifts(frames).shifts
    base = run_baseline(frames)[0]
    return rms(ours - movie.shifts), rms(base - movie.shifts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--extra", type=int, default=3, help="smaller movies for shift accuracy")
    p.add_argument("--extra-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    import jax

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_movies_") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        stored = write_movie(folder, args.size, args.frames, args.seed)
        took = time.perf_counter() - t0
        print(f"simulated {args.size}x{args.size}x{args.frames} int8 movie "
              f"({stored / 2**30:.2f} GiB) in {took:.0f} s", flush=True)  # fmt: skip
        res = {}
        for who in ("ours", "baseline"):
            cmd = [sys.executable, __file__, "--child", who, "--child-dir", tmp]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:])
                return 1
            res[who] = json.loads(out.stdout.strip().splitlines()[-1])
            print(who, res[who], flush=True)
    errs = [in_process_errors(args.extra_size, 20, args.seed + 1 + k) for k in range(args.extra)]
    o, b = res["ours"], res["baseline"]
    print(f"\nmovie {args.size}x{args.size}x{args.frames} (alignment + full/even/odd sums), "
          f"stored {stored / 2**30:.2f} GiB")  # fmt: skip
    print(f"{'':28}{'cryoden':>10}{'baseline':>10}{'ratio':>8}")
    speed = b["seconds"] / o["seconds"]
    print(f"{'seconds':28}{o['seconds']:10.1f}{b['seconds']:10.1f}{speed:8.1f}")
    for key, label in (("align_s", "  alignment (s)"), ("sums_s", "  three sums (s)")):
        print(f"{label:28}{o[key]:10.1f}{b[key]:10.1f}{b[key] / o[key]:8.1f}")
    print(f"{'CPU seconds':28}{o['cpu']:10.1f}{b['cpu']:10.1f}{b['cpu'] / o['cpu']:8.1f}")
    print(f"{'peak RSS (GiB)':28}{o['rss']:10.2f}{b['rss']:10.2f}{b['rss'] / o['rss']:8.2f}")
    print(f"{'shift error, this movie (px)':28}{o['err']:10.3f}{b['err']:10.3f}"
          f"{b['err'] / o['err']:8.1f}")  # fmt: skip
    if errs:
        eo, eb = np.mean(errs, axis=0)
        label = f"shift error, {args.extra}x{args.extra_size}^2"
        print(f"{label:28}{eo:10.3f}{eb:10.3f}{eb / eo:8.1f}")
    print(f"RSS budget (stored + 2 GiB): {stored / 2**30 + 2:.2f} GiB")
    print(f"load average (1, 5, 15 min) before: {load0}, after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
