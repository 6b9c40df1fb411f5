#!/usr/bin/env bash
# One prepared check of cryoden on a machine with a GPU (or TPU): environment, test suite,
# inference at real sizes, training steps -> docs/benchmarks-gpu.md (a table) plus logs.
#
# Usage (from the repository root):
#   scripts/gpu_check.sh [--k2 MICROGRAPH.mrc] [--out FILE] [--logs DIR] [--python PY]
#   scripts/gpu_check.sh --cpu-smoke        # tiny sizes on CPU: checks the script's flow only
#                                           # (table in $LOGS/benchmarks-gpu.md by default)
#
# Installing JAX with CUDA. cryoden always runs from this checkout (PYTHONPATH). When the JAX
# in $PYTHON already sees an accelerator (e.g. jax with jax-cuda12-plugin or
# jax-cuda13-plugin), it is used as is. Otherwise the script tries
# `pip install -e ".[cuda12]"` (the cuda12 extra = jax[cuda12], see pyproject.toml) with a
# time limit, which needs internet; without it the step fails and the run goes on, on CPU.
# Inference and the training step need only jax, flax, optax and numpy; the test suite and
# the K2 case also need mrcfile. Packages missing there (mrcfile, ...) can be carried as
# wheels in ./.whl (ignored by git): they are installed first with
# `pip install --no-index --no-deps --target`; `scripts/gpu_wheels.sh` fetches them (mrcfile,
# grain, array-record, portpicker; 4.4 MB) on a machine with internet. On an offline machine
# whose image has JAX with CUDA (e.g. jax 0.11 + jax-cuda13-plugin, Python 3.12), one call:
#   scripts/gpu_wheels.sh              # here, once
#   scripts/gpu_check.sh               # there, with .whl carried along (600 s limit)
#
# Robustness: every step runs under `timeout`, a failing step is recorded and the next one
# runs; all output goes to $LOGS/<step>.log and the summary table records each step's exit
# status and time. The whole run is sized for about 8 minutes on one H100 (run it with a
# 600 s limit): at most env 60 s, tests 120 s, 2D 4096² float32 + bfloat16 105 s, K2 45 s,
# tomogram 300x928x960 120 s, training 2D (800², batch 4) + 3D (96³, batch 10) 150 s; the
# install attempt (150 s) runs only when JAX sees no accelerator. Override a step's limit with
# env GPU_CHECK_T_<STEP> (seconds), e.g. GPU_CHECK_T_TESTS=300; run only some steps with
# GPU_CHECK_ONLY="mic-f32 mic-bf16" (the table keeps earlier results found in $LOGS).
set -u

PY=${PYTHON:-python3}
OUTMD=""
LOGS=${GPU_CHECK_LOGS:-/tmp/cryoden-gpu-check}
K2=""
SMOKE=0
SCALE=1  # time limits x SCALE: 4 with --cpu-smoke (compiling on a small CPU is slow)
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1; SCALE=4 ;;
        --k2) K2=$2; shift ;;
        --out) OUTMD=$2; shift ;;
        --logs) LOGS=$2; shift ;;
        --python) PY=$2; shift ;;
        -h|--help) sed -n '2,/^set -u/p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.." || exit 1
if [ -z "$OUTMD" ]; then  # a smoke run never replaces the real table
    if [ "$SMOKE" = 1 ]; then OUTMD="$LOGS/benchmarks-gpu.md"; else OUTMD=docs/benchmarks-gpu.md; fi
fi
mkdir -p "$LOGS" || exit 1
if [ -z "${GPU_CHECK_ONLY:-}" ]; then
    rm -f "$LOGS"/*.json "$LOGS"/steps.tsv
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CRYODEN_CACHE_DIR="$LOGS/cache"
export GPU_CHECK_LOGS="$LOGS" GPU_CHECK_SMOKE=$SMOKE GPU_CHECK_K2="$K2"
if [ "$SMOKE" = 1 ]; then
    export JAX_PLATFORMS=cpu
fi
START=$(date +%s)

# step NAME LIMIT_S CMD...: run with a time limit, log, record "name rc seconds"
step() {
    local name=$1 limit=$2 var t0 rc
    shift 2
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then
        return 0
    fi
    var="GPU_CHECK_T_$(echo "$name" | tr 'a-z-' 'A-Z_')"
    limit=${!var:-$(( limit * SCALE ))}
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    [ $rc = 124 ] && echo "   ... timed out after ${limit}s" >>"$LOGS/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >>"$LOGS/steps.tsv"
    echo "   rc=$rc in $(( $(date +%s) - t0 ))s; last lines:"
    tail -n 3 "$LOGS/$name.log" | sed 's/^/   | /'
}

# ------------------------------------------------------------------ measurement code
cat >"$LOGS/measure.py" <<'PY'
"""One measurement per process: python measure.py CASE -> $LOGS/CASE.json."""
import json, os, resource, sys, time
from pathlib import Path

import numpy as np

LOGS = Path(os.environ["GPU_CHECK_LOGS"])
SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"
case = sys.argv[1]
sys.path.insert(0, "scripts")


def device_info():
    import jax
    d = jax.devices()[0]
    stats = d.memory_stats() if d.platform != "cpu" else None
    peak = (stats or {}).get("peak_bytes_in_use")
    return {"device": f"{d.platform} {d.device_kind}", "n_devices": len(jax.devices()),
            "jax": jax.__version__, "peak_device_bytes": peak,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def infer(x, model, dtype, repeats):
    from cryoden.inference import Denoiser
    d = Denoiser(model, ndim=x.ndim, dtype=dtype)
    plan = d.plan(x.shape, None, None)
    t = time.perf_counter()
    y = d(x)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        y = d(x)
        times.append(time.perf_counter() - t)
    return y, {"model": model, "dtype": dtype, "shape": list(x.shape), "first_s": first,
               "times": times, "tiles": len(plan.tiles), "tile": list(plan.tile),
               "work": plan.work, "input_std": float(x.std())}


def main():
    import bench_infer
    res = {}
    if case in ("mic-f32", "mic-bf16"):
        n = 256 if SMOKE else 4096
        x = bench_infer.synthetic_micrograph((n, n))
        dtype = "float32" if case == "mic-f32" else "bfloat16"
        y, res = infer(x, "unet", dtype, 1 if SMOKE else 3)
        ref = LOGS / "mic-f32.npy"
        if case == "mic-f32":
            np.save(ref, y)
        elif ref.exists():
            res["max_diff_vs_f32_over_std"] = float(np.abs(y - np.load(ref)).max() / x.std())
    elif case == "k2":
        try:
            import mrcfile
        except ImportError:
            raise SystemExit("mrcfile is not installed: carry its wheel in .whl") from None
        path = os.environ.get("GPU_CHECK_K2") or ("examples/k2_micrograph_crop.mrc" if SMOKE
                                                 else "")
        if not path:
            res = {"skipped": "no --k2 micrograph given"}
        else:
            with mrcfile.open(path, permissive=True) as m:
                x = np.asarray(m.data, np.float32)
            _, res = infer(x, "unet", "float32", 1 if SMOKE else 3)
    elif case == "tomo":
        shape = (32, 64, 64) if SMOKE else (300, 928, 960)
        x = bench_infer.synthetic_volume(shape)
        _, res = infer(x, "unet-3d", "float32", 1)
    elif case in ("train-2d", "train-3d"):
        import bench_train
        ndim = 2 if case == "train-2d" else 3
        crop, batch = {2: (64, 2), 3: (32, 1)}[ndim] if SMOKE else {2: (800, 4), 3: (96, 10)}[ndim]
        run, info = bench_train.setup_cryoden(ndim, crop, batch)
        for _ in range(2):
            run()
        times = []
        for _ in range(3 if SMOKE else 10):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        res = {"ndim": ndim, "crop": crop, "batch": batch, "times": times, **info}
    else:
        raise SystemExit(f"unknown case {case}")
    res.update(device_info())
    (LOGS / f"{case}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


main()
PY

cat >"$LOGS/report.py" <<'PY'
"""Assemble the markdown table from $LOGS/*.json and steps.tsv -> stdout."""
import json, os, statistics, subprocess
from pathlib import Path

LOGS = Path(os.environ["GPU_CHECK_LOGS"])
SMOKE = os.environ.get("GPU_CHECK_SMOKE") == "1"


def load(name):
    p = LOGS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def gib(b):
    return f"{b / 2**30:.2f}" if b else ""


rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
anyres = next((r for r in map(load, ["mic-f32", "tomo", "train-2d", "k2"]) if r), {})
lines = ["# GPU benchmarks", "",
         "Written by `scripts/gpu_check.sh`" + (" (--cpu-smoke: tiny sizes on CPU, "
                                                "flow check only)" if SMOKE else "") + ".",
         f"Commit {rev.stdout.strip() or '?'}; device {anyres.get('device', '?')} "
         f"(x{anyres.get('n_devices', '?')}); jax {anyres.get('jax', '?')}.", "",
         "## Inference", "",
         "| case | model | dtype | shape | tiles (work) | first call s | median s (n) "
         "| bf16 max diff / input std | peak device GiB | peak RSS GiB |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for case, label in [("mic-f32", "micrograph"), ("mic-bf16", "micrograph"),
                    ("k2", "K2 micrograph (real)"), ("tomo", "tomogram")]:
    r = load(case)
    if r is None:
        lines.append(f"| {label} | | | | failed or timed out: see {case}.log | | | | | |")
        continue
    if "skipped" in r:
        lines.append(f"| {label} | | | | skipped: {r['skipped']} | | | | | |")
        continue
    med = statistics.median(r["times"]) if r["times"] else float("nan")
    tiles = "x".join(map(str, r["tile"]))
    diff = r.get("max_diff_vs_f32_over_std")
    lines.append(
        f"| {label} | {r['model']} | {r['dtype']} | {'x'.join(map(str, r['shape']))} | "
        f"{r['tiles']} of {tiles} (x{r['work']:.2f}) | {r['first_s']:.2f} | "
        f"{med:.3f} ({len(r['times'])}) | {'' if diff is None else f'{diff:.2g}'} | "
        f"{gib(r.get('peak_device_bytes'))} | {gib(r.get('peak_rss'))} |")
lines += ["", "## Training step (forward, loss, backward, Adagrad)", "",
          "| model | crop | batch | steps/s (median of n) | TFLOP/s | compile s |",
          "|---|---|---|---|---|---|"]
for case in ("train-2d", "train-3d"):
    r = load(case)
    if r is None:
        lines.append(f"| {case} | | | failed or timed out: see {case}.log | | |")
        continue
    med = statistics.median(r["times"])
    lines.append(f"| U-net {r['ndim']}D | {r['crop']} | {r['batch']} | {1 / med:.2f} "
                 f"({len(r['times'])}) | {r['flops'] / med / 1e12:.2f} | {r['compile_s']:.1f} |")
lines += ["", "## Steps", "", "| step | exit status | seconds |", "|---|---|---|"]
for row in (LOGS / "steps.tsv").read_text().splitlines():
    name, rc, sec = row.split("\t")
    rc = {"0": "ok", "124": "timed out"}.get(rc, rc)
    lines.append(f"| {name} | {rc} | {sec} |")
tests = LOGS / "tests.log"
if tests.exists():
    summary = [t for t in tests.read_text().splitlines() if " passed" in t or " failed" in t]
    lines += ["", f"Tests: {summary[-1].strip('= ') if summary else 'no summary (see tests.log)'}"]
print("\n".join(lines))
PY

# ------------------------------------------------------------------ steps
step env 60 bash -c "date -u; uname -a; nvidia-smi || true; $PY --version; \
    $PY -c 'import jax; print(jax.__version__, jax.devices())'"

if [ "$SMOKE" = 1 ]; then
    echo "== install: skipped (--cpu-smoke)"
else
    if [ -d .whl ]; then
        step wheels 90 "$PY" -m pip install -q --no-index --no-deps --no-compile \
            --target "$LOGS/site" .whl/*.whl
        export PYTHONPATH="$PYTHONPATH:$LOGS/site"
    fi
    JAXGPU="import jax; d = jax.devices(); print(d); assert d[0].platform != 'cpu', 'no GPU'"
    step jax-gpu 60 "$PY" -c "$JAXGPU"
    if [ "$(tail -n 1 "$LOGS/steps.tsv" | cut -f2)" != 0 ]; then  # no accelerator yet
        step install 150 "$PY" -m pip install -q --no-build-isolation -e ".[cuda12]"
        step jax-gpu-2 60 "$PY" -c "$JAXGPU"
    fi
fi

if [ "$SMOKE" = 1 ]; then
    TESTS=(tests/test_planning.py -k "several_devices")
else
    TESTS=(tests/test_planning.py tests/test_tiling.py tests/test_conv.py
           tests/test_train_step.py tests/test_runtime.py)
fi
step tests 120 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"

step mic-f32 60 "$PY" "$LOGS/measure.py" mic-f32
step mic-bf16 45 "$PY" "$LOGS/measure.py" mic-bf16
step k2 45 "$PY" "$LOGS/measure.py" k2
step tomo 120 "$PY" "$LOGS/measure.py" tomo
step train-2d 70 "$PY" "$LOGS/measure.py" train-2d
step train-3d 80 "$PY" "$LOGS/measure.py" train-3d

mkdir -p "$(dirname "$OUTMD")"
if "$PY" "$LOGS/report.py" >"$OUTMD.tmp"; then
    mv "$OUTMD.tmp" "$OUTMD"
    echo "== wrote $OUTMD in $(( $(date +%s) - START ))s"
    cat "$OUTMD"
else
    echo "== report failed; logs in $LOGS" >&2
    exit 1
fi
