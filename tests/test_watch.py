"""Collection-time mode (--watch) and many processes over one list (--shard, Slurm) (issue 12).

Models are tiny random-weight files (see test_cli); images are small MRC files.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import new_mrc as mrc
from inferargs import affine_model
from inferargs import run_infer as run

import cryoden
from cryoden import shard, watch

ROOT = Path(cryoden.__file__).resolve().parents[1]
rng = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def _compile_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CRYODEN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax-cache"))
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return affine_model(tmp_path_factory.mktemp("m"))


def images(folder: Path, n: int, shape=(16, 20)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        mrc(folder / f"mic_{i:03d}.mrc", rng.normal(size=shape).astype(np.float32))
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize(
    "env, expect",
    [
        ({}, None),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, (2, 4)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "7",
                "SLURM_ARRAY_TASK_MIN": "5",
                "SLURM_ARRAY_TASK_MAX": "14",
                "SLURM_ARRAY_TASK_COUNT": "10",
            },
            (2, 10),
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "4",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_MAX": "198",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_COUNT": "100",
            },
            (2, 100),
        ),
        (
            {
                "SLURM_ARRAY_TASK_ID": "2",
                "SLURM_ARRAY_TASK_MIN": "1",
                "SLURM_ARRAY_TASK_MAX": "3",
                "SLURM_NTASKS": "2",
                "SLURM_PROCID": "1",
            },
            (3, 6),
        ),
    ],
)
def test_shard_from_slurm_environment(env, expect):
    s = shard.from_environment(None, env)
    assert (None if s is None else (s.index, s.count)) == expect


def test_shard_option_wins_and_bad_specs_are_one_line():
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}
    assert shard.from_environment("1/3", env) == shard.Shard(0, 3, "--shard")
    for bad in ("0/3", "4/3", "3", "a/b", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            shard.parse(bad)
    lst = {
        "SLURM_ARRAY_TASK_ID": "5",
        "SLURM_ARRAY_TASK_MIN": "1",
        "SLURM_ARRAY_TASK_MAX": "9",
        "SLURM_ARRAY_TASK_COUNT": "3",
    }  # --array=1,5,9: not a range
    with pytest.raises(ValueError, match="--shard I/N"):
        shard.from_environment(None, lst)


@pytest.mark.parametrize("n_items, count", [(0, 3), (1, 3), (10, 3), (1000, 7), (5, 5)])
def test_every_item_falls_to_exactly_one_shard(n_items, count):
    items = [f"mic_{i}.mrc" for i in range(n_items)]
    takes = [shard.take(items, shard.Shard(i, count, "t")) for i in range(count)]
    assert sorted(sum(takes, [])) == sorted(items)
    assert max(map(len, takes)) - min(map(len, takes)) <= 1
    owned = [[x for x in items if shard.owns(x, shard.Shard(i, count, "t"))] for i in range(count)]
    assert sorted(sum(owned, [])) == sorted(items)


def test_infer_shards_split_a_folder_without_overlap(tmp_path, model):
    srcs = images(tmp_path / "in", 7)
    out = tmp_path / "out"
    records = []
    for i in (1, 2, 3):
        assert run(tmp_path / "in", "-o", out, "-m", model, "-q", "--shard", f"{i}/3") == 0
        rec = json.loads((out / f"cryoden-infer.shard-{i}-of-3.json").read_text())
        records.append([f["input"] for f in rec["files"] if f["status"] == "ok"])
    done = sum(records, [])
    assert sorted(done) == sorted(map(str, srcs))  # each exactly once
    assert sorted(p.name for p in out.glob("*.mrc")) == sorted(p.name for p in srcs)
    assert not (out / "cryoden-infer.json").exists()


def test_srun_environment_shards_infer(tmp_path, model, monkeypatch):
    images(tmp_path / "in", 4)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert run(tmp_path / "in", "-o", tmp_path / "out", "-m", model, "-q") == 0
    rec = json.loads((tmp_path / "out" / "cryoden-infer.shard-2-of-2.json").read_text())
    assert [Path(f["input"]).name for f in rec["files"]] == ["mic_001.mrc", "mic_003.mrc"]


def test_bad_slurm_environment_stops_before_any_file(tmp_path, model, monkeypatch, capsys):
    images(tmp_path / "in", 2)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert run(tmp_path / "in", "-o", tmp_path / "out", "-m", model) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SLURM_PROCID=5" in err[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- follower


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_follower_waits_for_a_growing_file_and_yields_it_once(tmp_path):
    clock = FakeClock()
    f = tmp_path / "a.tif"
    f.write_bytes(b"x" * 10)
    grow = iter(range(3))

    def sleep(s):
        clock.sleep(s)
        if next(grow, None) is not None:  # it grows during the first three polls
            with open(f, "ab") as h:
                h.write(b"y" * 10)
            os.utime(f, ns=(int(clock.t * 1e9) + 1, int(clock.t * 1e9) + 1))

    fol = watch.Follower(
        [str(tmp_path)], [".tif"], settle=2, poll=1, idle=5, clock=clock, sleep=sleep
    )
    got = [(p, clock.t, p.stat().st_size) for p in fol]
    assert [(g[0].name, g[2]) for g in got] == [("a.tif", 40)]
    assert got[0][1] >= 3 + 2  # not before it stopped growing plus the settle time
    assert clock.t >= got[0][1] + 5  # then idle seconds without news


def test_follower_waits_for_an_mrc_shorter_than_its_header(tmp_path):
    full = mrc(tmp_path / "full.mrc", np.ones((32, 32), np.float32)).read_bytes()
    (tmp_path / "full.mrc").unlink()
    part = tmp_path / "b.mrc"
    part.write_bytes(full[: len(full) // 2])  # a writer that paused mid-file
    assert not watch.declared_complete(part)
    clock = FakeClock()

    def sleep(s):  # after 5 s of a stable but short file, the writer finishes it
        clock.sleep(s)
        if clock.t >= 5 and part.stat().st_size < len(full):
            part.write_bytes(full)

    fol = watch.Follower(
        [str(tmp_path)], [".mrc"], settle=1, poll=1, idle=None, clock=clock, sleep=sleep
    )
    p = next(iter(fol))
    assert p == part and p.read_bytes() == full and clock.t > 5


def test_follower_skips_done_and_unowned_names(tmp_path):
    for n in ("a.mrc", "b.mrc", "c.mrc", ".hidden.mrc", "d.txt"):
        (tmp_path / n).write_bytes(b"")
    clock = FakeClock()
    fol = watch.Follower(
        [str(tmp_path)],
        [".mrc"],
        settle=0,
        poll=1,
        idle=2,
        clock=clock,
        sleep=clock.sleep,
        done={str(tmp_path / "a.mrc")},
        owns=lambda n: not n.endswith("c.mrc"),
        complete=lambda p: True,
    )
    assert [p.name for p in fol] == ["b.mrc"]


def test_manifest_survives_a_torn_line(tmp_path):
    m = watch.Manifest(tmp_path / "w.jsonl")
    m.add({"input": "a", "status": "ok"})
    with open(m.path, "a") as f:
        f.write('{"input": "b", "sta')  # killed mid-write
    m.add({"input": "c", "status": "failed"})
    assert set(m.finished()) == {"a", "c"}


# ---------------------------------------------------------------------------------- --watch


def test_watch_refuses_its_output_folder_and_plain_files(tmp_path, model, capsys):
    images(tmp_path / "in", 1)
    assert run(tmp_path / "in", "-o", tmp_path / "in", "-m", model, "--watch", "--idle", "0") == 2
    assert "watched folder" in capsys.readouterr().err
    f = tmp_path / "in" / "mic_000.mrc"
    assert run(f, "-o", tmp_path / "o", "-m", model, "--watch", "--idle", "0") == 2
    assert "not a folder" in capsys.readouterr().err
    assert run(tmp_path / "in", "-o", tmp_path / "o", "-m", model, "--idle", "3") == 2
    assert "--idle applies to --watch" in capsys.readouterr().err
    assert run(tmp_path / "in", "-o", tmp_path / "o", "-m", model, "--settle", "3") == 2
    assert "--settle applies to --watch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_watch_pattern_whose_outputs_it_would_take_is_refused_per_file(tmp_path, model, capsys):
    images(tmp_path / "in", 1)
    pattern = str(tmp_path / "**" / "*.mrc")
    code = run(
        pattern,
        "-o",
        tmp_path / "in" / "dn",
        "-m",
        model,
        "--watch",
        "--idle",
        "0.3",
        "--settle",
        "0",
    )
    assert code == 1
    assert "would be watched as a new input" in capsys.readouterr().err
    assert not (tmp_path / "in" / "dn" / "mic_000.mrc").exists()


def _slow_write(path: Path, data: np.ndarray, pieces: int, pause: float):
    """Write an MRC file the way acquisition software does: in place, in pieces."""
    tmp = path.with_name("full-" + path.name + ".bin")
    mrc(tmp, data)
    blob = tmp.read_bytes()
    tmp.unlink()
    step = -(-len(blob) // pieces)
    with open(path, "wb") as f:
        for i in range(0, len(blob), step):
            f.write(blob[i : i + step])
            f.flush()
            time.sleep(pause)


def test_watch_denoises_a_slowly_written_file_once_and_restarts_without_repeats(tmp_path, model):
    inbox, out = tmp_path / "session", tmp_path / "out"
    inbox.mkdir()
    first = images(inbox, 1)[0]
    data = rng.normal(size=(24, 28)).astype(np.float32)
    cmd = [
        sys.executable,
        "-m",
        "cryoden",
        "infer",
        str(inbox),
        "-o",
        str(out),
        "-m",
        str(model),
        "--watch",
        "--settle",
        "0.6",
        "--idle",
        "2.5",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    writer = threading.Thread(target=_slow_write, args=(inbox / "late.mrc", data, 6, 0.4))
    writer.start()
    writer.join()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "error" not in err
    with mrcfile.open(out / "late.mrc") as m:
        late = m.data.copy()
    # the same as denoising the finished file in a batch run
    assert run(inbox / "late.mrc", "-o", tmp_path / "batch", "-m", model, "-q") == 0
    with mrcfile.open(tmp_path / "batch" / "late.mrc") as m:
        np.testing.assert_array_equal(late, m.data)
    entries = [json.loads(x) for x in (out / "cryoden-watch.jsonl").read_text().splitlines()]
    assert sorted(Path(e["input"]).name for e in entries) == ["late.mrc", "mic_000.mrc"]
    assert all(e["status"] == "ok" for e in entries)

    # restart: nothing repeats; a new file is the only one done
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.mrc")}
    images(tmp_path / "more", 1)[0].rename(inbox / "third.mrc")
    proc = subprocess.run(cmd[:-1] + ["1"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 file(s) already done" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.mrc") if p.name != "third.mrc"} == before
    entries = [json.loads(x) for x in (out / "cryoden-watch.jsonl").read_text().splitlines()]
    assert [Path(e["input"]).name for e in entries].count("third.mrc") == 1
    assert len(entries) == 3 and first.exists()


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_a_tiff_or_png_cut_short_is_not_complete(tmp_path, suffix):
    """A TIFF or PNG whose writer paused mid-file is not handed over after --settle (it would
    fail as truncated and, recorded as done, never be denoised)."""
    import tifffile
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 255, size=(64, 48), dtype=np.uint8)
    full = tmp_path / f"full{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(full, img)
    else:
        Image.fromarray(img).save(full)
    data = full.read_bytes()
    assert watch.declared_complete(full)
    for cut in (len(data) // 2, len(data) - 1):
        part = tmp_path / f"part{suffix}"
        part.write_bytes(data[:cut])
        assert not watch.declared_complete(part), cut


def test_a_failed_file_is_retried_after_a_restart_only_when_it_changed(tmp_path, model):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    bad = inbox / "late.mrc"
    bad.write_bytes(b"\0" * 1500)  # not an MRC file: fails
    argv = (inbox, "-o", out, "-m", model, "-q", "--watch", "--settle", "0", "--idle", "0.3")
    assert run(*argv) == 1
    assert run(*argv) == 0  # unchanged: not tried again
    assert not (out / "late.mrc").exists()
    mrc(bad, rng.normal(size=(16, 20)).astype(np.float32))  # the file was replaced: tried again
    assert run(*argv) == 0 and (out / "late.mrc").exists()
    statuses = [
        json.loads(x)["status"] for x in (out / "cryoden-watch.jsonl").read_text().splitlines()
    ]
    assert statuses == ["failed", "ok"]


def test_shard_error_names_the_option_once(tmp_path, model, capsys):
    images(tmp_path / "in", 1)
    assert run(tmp_path / "in", "-o", tmp_path / "o", "-m", model, "--shard", "4/3") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("--shard") == 1 and "I must be between 1 and N" in err


def test_output_folder_problem_refuses_the_output_folder_and_folders_inside_it(tmp_path):
    out = tmp_path / "out"
    for d in ("in", "out/previews", "out/even", "elsewhere"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "link").symlink_to(out)
    assert watch.output_folder_problem([str(tmp_path / "in")], out) is None
    # a folder that merely contains the output folder is fine: folders are not followed down
    assert watch.output_folder_problem([str(tmp_path)], out) is None
    assert watch.output_folder_problem([str(tmp_path / "in/*.mrc")], out) is None  # per file
    for bad in ("out", "out/previews", "out/even", "link"):
        problem = watch.output_folder_problem([str(tmp_path / "in"), str(tmp_path / bad)], out)
        assert problem and "watched folder" in problem and "choose another -o" in problem, bad
    assert "not a folder" in watch.output_folder_problem([str(tmp_path / "nope")], out)
