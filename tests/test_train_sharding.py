"""Data-parallel training: 4 fake CPU devices, and two jax.distributed processes on localhost.

Both run in subprocesses so this pytest process keeps its single default CPU device.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from train_subproc import write_pairs

from cryoden import weights

HERE = Path(__file__).resolve().parent


def _env(cache: Path, devices: int = 1) -> dict:
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)  # compile once across the subprocesses
    env["CRYODEN_CACHE_DIR"] = str(cache)  # the same for `cryoden train` (runtime.setup)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


def test_sharded_step_equals_single_device_step(tmp_path):
    out = tmp_path / "sharded.npz"
    subprocess.run(
        [sys.executable, str(HERE / "train_subproc.py"), "sharded", str(out)],
        check=True,
        env=_env(tmp_path / "cache", 4),
        timeout=300,
    )
    z = np.load(out)
    keys = [k[1:] for k in z.files if k.startswith("1")]
    assert len(keys) > 10
    for k in keys:
        np.testing.assert_allclose(z["4" + k], z["1" + k], atol=1e-6, rtol=0, err_msg=k)
    assert "multiple of the number of devices (4" in str(z["error"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    """2 processes x 2 devices, global batch 4, equal one process with batch 4 (same seed)."""
    even, odd = write_pairs(tmp_path / "data", n=5)
    common = [
        sys.executable,
        "-m",
        "cryoden.train",
        "--even",
        str(even),
        "--odd",
        str(odd),
        "--config",
        "train-2d-test",
        "--arch",
        "affine",
        "--crop",
        "32",
        "--batch-size",
        "4",
        "--samples-per-pair",
        "4",
        "--epochs",
        "2",
        "--holdout",
        "0.2",
        "-q",
    ]
    cache = tmp_path / "cache"
    one = subprocess.run(
        common + ["--out", str(tmp_path / "one")],
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = [
        subprocess.Popen(
            common
            + [
                "--out",
                str(tmp_path / "two"),
                "--coordinator",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=_env(cache, devices=2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    assert "4 cpu device(s) (cpu) over 2 process(es)" in logs[0]

    p1, spec1, meta1 = weights.load(tmp_path / "one")
    p2, spec2, meta2 = weights.load(tmp_path / "two")
    assert spec1 == spec2 and meta1["step"] == meta2["step"]
    for k, v in weights.flatten(p1).items():
        np.testing.assert_allclose(weights.flatten(p2)[k], v, atol=1e-6, rtol=0, err_msg=k)
    rows = [(tmp_path / r / "log.tsv").read_text().splitlines() for r in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(rows[0][1:], rows[1][1:], strict=True):
        np.testing.assert_allclose(
            [float(x) for x in a.split("\t")[2:5]],
            [float(x) for x in b.split("\t")[2:5]],
            rtol=1e-5,
        )
    # every process saved its own grain iterator state beside the shared checkpoint
    step_dirs = sorted((tmp_path / "two" / "checkpoints").iterdir())
    assert {f.name for f in (step_dirs[-1] / "data").iterdir()} >= {
        "process_0-of-2.json",
        "process_1-of-2.json",
    }
