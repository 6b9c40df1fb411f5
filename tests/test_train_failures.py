"""`cryoden train` when things break: one line on stderr and the right exit code for a full
disk, damaged checkpoints and missing checkpoint files; and resumes that do not recompile.

Every run is a `cryoden train` subprocess: stderr is what a user sees.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_subproc import write_pairs
from trainargs import affine_args

HERE = Path(__file__).resolve().parent
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d cryoden[.\w]*: ")  # cryoden's own log lines


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(data dir, compilation cache dir, a finished 2-epoch run of 4 steps, its result)."""
    root = tmp_path_factory.mktemp("failures")
    write_pairs(root / "data", n=3)
    cache = root / "cache"
    run = root / "run"
    p = train(root / "data", run, cache, "--steps", "4")
    assert p.returncode == 0, p.stderr[-3000:]
    return root / "data", cache, run, p


def train(data: Path, out: Path, cache: Path, *more: str, enospc: int | None = None):
    env = dict(os.environ, CRYODEN_CACHE_DIR=str(cache))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    args = affine_args(data / "even", data / "odd", out, *more)
    if enospc is None:
        cmd = [sys.executable, "-m", "cryoden", "train", *args]
    else:
        cmd = [sys.executable, str(HERE / "train_subproc.py"), "enospc", str(enospc), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def other_lines(stderr: str) -> list[str]:
    """stderr lines that are not cryoden's timestamped log lines."""
    return [x for x in stderr.splitlines() if not LOG_LINE.match(x)]


def steps(run: Path) -> list[int]:
    return sorted(int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit())


def test_resume_is_served_from_the_persistent_compilation_cache(setup, tmp_path):
    data, cache, run, first = setup
    assert "compiled train step" in first.stderr
    assert "from the persistent compilation cache" not in first.stderr  # compiled
    assert any(f.name.startswith("jit_train_step") for f in cache.iterdir())
    out = tmp_path / "run"
    shutil.copytree(run, out)
    p = train(data, out, cache, "--steps", "6")  # resume, longer: the same step function
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr
    hit = r"compiled train step in [\d.]+ s \(from the persistent compilation cache\)"
    assert re.search(hit, p.stderr)


def test_disk_full_while_saving_stops_at_once_with_one_line(setup, tmp_path):
    data, cache, _, _ = setup
    out = tmp_path / "run"
    p = train(data, out, cache, "--steps", "10", "--save-every", "1", enospc=4)
    assert p.returncode == 1, p.stderr[-3000:]
    assert other_lines(p.stderr) == [
        f"cryoden train: error: cannot save checkpoint step 4 in {out / 'checkpoints'}: "
        f"[Errno 28] No space left on device: '{out / 'checkpoints'}/4.orbax-checkpoint-tmp/"
        "meta.orbax-checkpoint-tmp'; the last complete checkpoint (step 3) is intact: fix the "
        "cause and run the same command to resume"
    ]
    assert steps(out) == [2, 3]
    assert len((out / "log.tsv").read_text().splitlines()) <= 4  # stopped within epoch 3
    again = train(data, out, cache, "--steps", "10", "--save-every", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "at step 3" in again.stderr
    assert steps(out)[-1] == 10 and not other_lines(again.stderr)
    assert not any("orbax-checkpoint-tmp" in d.name for d in (out / "checkpoints").iterdir())


def test_missing_manifest_gives_one_warning_line(setup, tmp_path):
    data, cache, run, _ = setup
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "checkpoints" / "4" / "state" / "manifest.ocdbt").unlink()
    p = train(data, out, cache, "--steps", "6")
    assert p.returncode == 0, p.stderr[-3000:]
    assert other_lines(p.stderr) == []  # no tracebacks, no asyncio/orbax noise
    warned = [x for x in p.stderr.splitlines() if "unusable" in x]
    assert len(warned) == 1 and "checkpoint step 4" in warned[0]
    assert "resuming from step 2" in warned[0] and "at step 2" in p.stderr
    assert (out / "checkpoints.corrupt").is_dir()


def test_every_checkpoint_damaged_is_one_line_and_exit_1(setup, tmp_path):
    data, cache, run, _ = setup
    out = tmp_path / "run"
    shutil.copytree(run, out)
    for s in steps(out):
        (out / "checkpoints" / str(s) / "state" / "manifest.ocdbt").unlink()
    p = train(data, out, cache, "--steps", "6")
    assert p.returncode == 1, p.stderr[-3000:]
    (line,) = other_lines(p.stderr)
    assert line.startswith(f"cryoden train: error: no usable checkpoint in {out / 'checkpoints'}")
    assert "step 4 is unusable" in line and "step 2 is unusable" in line
    assert "tensorstore_spec" not in line and len(line) < 1000
    assert steps(out) == [2, 4]  # nothing moved
