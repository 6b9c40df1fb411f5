"""One atomic writer (cryoden.atomic) behind every file cryoden writes.

Each former writer (io.write, weights.save, the compiled-memory cache, the training run files) must
fsync its temporary before the rename, and leave neither a temporary nor a changed target when the
write fails at the last steps (fsync, rename).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from cryoden import atomic, io, memory, weights
from cryoden.models import ModelSpec
from cryoden.train import loop
from cryoden.train.config import Config, RunConfig


def _io(folder: Path, version: int) -> Path:
    target = folder / "a.mrc"
    io.write(target, io.Image(np.full((8, 8), version, np.float32), "2d"))
    return target


def _weights(folder: Path, version: int) -> Path:
    target = folder / weights.MODEL_FILE
    weights.save(target, {"w": np.full(3, version, np.float32)}, ModelSpec("affine", 2, 3))
    return target


def _memory_cache(folder: Path, version: int) -> Path:
    memory._save_disk(f"key{version}", {"fixed": 1.0, "per_px": 2.0, "overhead_px": 0.0})
    return folder / memory.CACHE_FILE  # the test points CRYODEN_CACHE_DIR at folder


def _train_log(folder: Path, version: int) -> Path:
    target = folder / "log.tsv"
    if not target.exists():
        rows = [f"0\t{s}\t1\t1\t1\t0.9\t1" for s in (1, 2, 3)]
        target.write_text("\n".join(["\t".join(loop.TSV_COLUMNS), *rows]) + "\n")
    loop._rewrite_tsv(target, upto_step=3 - version)  # the run dir's files share this writer
    return target


WRITERS = {"io.write": _io, "weights.save": _weights, "memory": _memory_cache, "loop": _train_log}


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CRYODEN_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("name", WRITERS)
def test_writer_fsyncs_its_temporary_before_renaming(folder, monkeypatch, name):
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = WRITERS[name](folder, 1)
    assert target.is_file() and synced, f"{name} wrote {target.name} without fsync"
    assert all(atomic._TMP.match(s) and s.startswith(f".{target.name}.") for s in synced), synced
    assert sorted(p.name for p in folder.iterdir()) == [target.name]


@pytest.mark.parametrize("step", ["fsync", "replace"])
@pytest.mark.parametrize("name", WRITERS)
def test_failed_write_leaves_no_temporary_and_the_old_file(folder, monkeypatch, name, step):
    target = WRITERS[name](folder, 1)
    before = target.read_bytes()

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, step, fail)
    try:
        WRITERS[name](folder, 2)
    except (OSError, ValueError) as e:  # io.write says ValueError(path: cannot write: ...)
        assert "No space left" in str(e)
    else:
        assert name == "memory", f"{name} hid a failed write"  # the cache is optional
    assert sorted(p.name for p in folder.iterdir()) == [target.name]
    assert target.read_bytes() == before


def test_write_text_replaces_content_and_keeps_the_umask(tmp_path):
    target = tmp_path / "t.json"
    target.write_text("old")
    atomic.write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def _stale(folder: Path, name: str) -> Path:
    """A temporary of another host, a day old: abandoned."""
    stale = folder / f".{name}.cryoden-ffffffff-1-0123abcd.tmp"
    stale.write_text("{")
    os.utime(stale, (0, 0))
    return stale


def test_memory_cache_removes_killed_writers_temporaries(folder):
    stale = _stale(folder, memory.CACHE_FILE)
    _memory_cache(folder, 1)
    assert not stale.exists()


def test_run_dir_removes_killed_writers_temporaries(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = _stale(run, "config.json")
    cfg = Config(run=RunConfig(out=str(run)))
    logger = logging.getLogger("cryoden")
    try:
        loop._setup_run_dir(cfg, [], False, ["cryoden", "train"])
    finally:
        for h in [h for h in logger.handlers if isinstance(h, loop._RunLog)]:
            logger.removeHandler(h)
            h.close()
    assert not stale.exists()
    assert {"config.json", "run.json"} <= {p.name for p in run.iterdir()}
