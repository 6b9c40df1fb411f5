"""cryoden infer never loses a file and tells the user what it does (issue 8).

Outputs that would replace an input, special files, non-finite options, a bad memory budget,
interrupts, stale temporaries, the per-file kind/model/tiling line, PNG output of stacks,
progress in logs and the help text. Models are tiny random-weight files (see test_cli).
"""

import argparse
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
from conftest import new_mrc as mrc
from inferargs import affine_model
from inferargs import run_infer as run
from test_cli import random_model

import cryoden.inference
from cryoden import infer, io, memory, tiling
from cryoden.models import ModelSpec

rng = np.random.default_rng(1)
ROOT = Path(cryoden.__file__).resolve().parents[1]  # subprocesses import the same cryoden


@pytest.fixture(autouse=True)
def _compile_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CRYODEN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jax-cache"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return affine_model(tmp_path_factory.mktemp("m"))


def image(path, shape=(16, 20)):
    """A small random MRC (or TIFF, by extension) image at ``path``."""
    x = rng.normal(size=shape).astype(np.float32)
    if Path(path).suffix == ".tif":
        tifffile.imwrite(path, x)
        return Path(path)
    return mrc(path, x)


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder`` (links followed)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def assert_refused(capsys, tmp_path, before, *words):
    """Exit 2 was returned by the caller; check: one line naming the files, nothing changed."""
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("cryoden: error: "), err
    assert "would" in err and all(w in err for w in words), err
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ item 1: inputs are never lost


def test_other_format_input_not_replaced(tmp_path, model, capsys):
    """a.mrc and a.tif in one folder, -o that folder --format mrc: a.tif's output is a.mrc."""
    image(tmp_path / "a.mrc"), image(tmp_path / "a.tif")
    before = snapshot(tmp_path)
    assert run(tmp_path, "-o", tmp_path, "--format", "mrc", "-m", model) == 2
    assert_refused(capsys, tmp_path, before, str(tmp_path / "a.mrc"), str(tmp_path / "a.tif"))


def test_suffixed_output_is_another_input(tmp_path, model, capsys):
    image(tmp_path / "x.mrc"), image(tmp_path / "x_dn.mrc")
    before = snapshot(tmp_path)
    assert run(tmp_path, "-o", tmp_path, "--suffix", "_dn", "-m", model) == 2
    assert_refused(capsys, tmp_path, before, str(tmp_path / "x_dn.mrc"))


def test_output_named_as_a_later_input(tmp_path, model, capsys):
    """``cryoden infer raw/b.mrc out/b.mrc -o out``: out/b.mrc must be read, not replaced."""
    (tmp_path / "raw").mkdir(), (tmp_path / "out").mkdir()
    image(tmp_path / "raw" / "b.mrc"), image(tmp_path / "out" / "b.mrc")
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    assert run(tmp_path / "raw" / "b.mrc", out / "b.mrc", "-o", out, "-m", model) == 2
    assert_refused(capsys, tmp_path, before, str(out / "b.mrc"))


def test_png_output_is_another_input(tmp_path, model, capsys):
    image(tmp_path / "a.mrc")
    from PIL import Image as PILImage

    PILImage.fromarray(rng.integers(0, 255, (16, 20), dtype=np.uint8)).save(tmp_path / "a.png")
    before = snapshot(tmp_path)
    assert run(tmp_path, "-o", tmp_path, "--format", "png", "-m", model) == 2
    assert_refused(capsys, tmp_path, before, str(tmp_path / "a.png"))


def test_links_to_inputs_are_caught(tmp_path, model, capsys):
    """Hard links, a symlinked output folder and a symlink as output name all name the input."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir(), out.mkdir()
    image(raw / "b.mrc"), image(raw / "c.mrc")
    os.link(raw / "c.mrc", out / "b.mrc")  # b's output is a hard link to input c
    before = snapshot(tmp_path)
    assert run(raw / "b.mrc", raw / "c.mrc", "-o", out, "-m", model) == 2
    assert_refused(capsys, tmp_path, before, str(raw / "c.mrc"))
    (out / "b.mrc").unlink()
    (out / "b.mrc").symlink_to(raw / "c.mrc")  # b's output is a symlink to input c
    before = snapshot(tmp_path)
    assert run(raw / "b.mrc", raw / "c.mrc", "-o", out, "-m", model) == 2
    assert_refused(capsys, tmp_path, before, str(raw / "c.mrc"))
    (tmp_path / "link").symlink_to(raw)  # -o names the input folder through a symlink
    assert run(raw / "b.mrc", "-o", tmp_path / "link", "-m", model) == 2
    assert_refused(capsys, tmp_path, before, str(raw / "b.mrc"))


def test_two_inputs_one_output_refused(tmp_path, model, capsys):
    (tmp_path / "d1").mkdir(), (tmp_path / "d2").mkdir()
    image(tmp_path / "d1" / "a.mrc"), image(tmp_path / "d2" / "a.tif")
    before = snapshot(tmp_path)
    argv = [tmp_path / "d1", tmp_path / "d2", "-o", tmp_path / "out", "--format", "mrc"]
    assert run(*argv, "-m", model) == 2
    assert_refused(capsys, tmp_path, before, "would both be written to", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_record_never_replaces_an_input(tmp_path, model, capsys):
    (tmp_path / "out").mkdir()
    image(tmp_path / "a.mrc")
    (tmp_path / "out" / infer.RECORD).write_text("my notes")
    before = snapshot(tmp_path)
    argv = [tmp_path / "a.mrc", tmp_path / "out" / infer.RECORD, "-o", tmp_path / "out"]
    assert run(*argv, "-m", model) == 2
    assert_refused(capsys, tmp_path, before, "the run record")


def test_suffix_cannot_leave_the_output_folder(tmp_path, model, capsys):
    (tmp_path / "in").mkdir()
    src = image(tmp_path / "in" / "a.mrc")
    before = snapshot(tmp_path)
    assert run(src, "-o", tmp_path / "out", "--suffix", "/../../in/b", "-m", model) == 2
    assert capsys.readouterr().err == (
        "cryoden: error: options: --suffix goes into file names: no '/' or '\\'\n"
    )
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_skip_existing_keeps_earlier_outputs(tmp_path, model, capsys):
    """Re-running into the input folder with --skip-existing skips what exists, replaces
    nothing; the same input named twice is processed once."""
    image(tmp_path / "x.mrc"), image(tmp_path / "x_dn.mrc")
    before = snapshot(tmp_path)
    argv = [tmp_path, tmp_path / "x.mrc", "-o", tmp_path, "--suffix", "_dn", "--skip-existing"]
    assert run(*argv, "-m", model) == 0
    assert "1 written, 1 skipped, 0 failed" in capsys.readouterr().err
    after = snapshot(tmp_path)
    assert {k: after[k] for k in before} == before and "x_dn_dn.mrc" in after


def test_missing_inputs_are_no_conflict(tmp_path, model, capsys):
    """An input that does not exist protects nothing and is reported as missing."""
    image(tmp_path / "a.mrc")
    argv = [
        tmp_path / "a.mrc",
        tmp_path / "out" / "a.mrc",
        tmp_path / "nope",
        "-o",
        tmp_path / "out",
    ]
    assert run(*argv, "-m", model) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'nope'}: No such file or directory" in err
    assert f"error: {tmp_path / 'out' / 'a.mrc'}: No such file or directory" in err
    assert "unsupported extension" not in err and (tmp_path / "out" / "a.mrc").is_file()


# ------------------------------------------------------------------ item 6: special files


def test_fifo_input_does_not_hang(tmp_path, model):
    """A FIFO named on the command line fails alone; one inside a folder is not an image."""
    folder = tmp_path / "in"
    folder.mkdir()
    image(folder / "good.mrc")
    os.mkfifo(tmp_path / "pipe.mrc")
    os.mkfifo(folder / "pipe2.mrc")
    cmd = [sys.executable, "-m", "cryoden.infer", tmp_path / "pipe.mrc", folder]
    cmd += ["-o", tmp_path / "out", "-m", model, "-q"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.splitlines() == [
        f"cryoden: error: {tmp_path / 'pipe.mrc'}: not a regular file but a FIFO (named pipe)"
    ]
    assert (tmp_path / "out" / "good.mrc").is_file()
    assert not (tmp_path / "out" / "pipe2.mrc").exists()


def test_unreadable_folder_is_one_line(tmp_path, model, capsys, monkeypatch):
    (tmp_path / "locked").mkdir()
    image(tmp_path / "a.mrc")
    iterdir = Path.iterdir

    def locked(self):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied")
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", locked)  # as chmod 0 would, for a user but root
    assert run(tmp_path / "locked", tmp_path / "a.mrc", "-o", tmp_path / "o", "-m", model) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'locked'}: cannot list the folder: Permission denied\n" in err
    assert (tmp_path / "o" / "a.mrc").is_file()


# ------------------------------------------------------------------ item 8: up-front checks


@pytest.mark.parametrize(
    "flags", [("--gaussian", "inf"), ("--gaussian", "nan"), ("--lowpass", "inf")]
)
def test_non_finite_options_fail_up_front(tmp_path, model, capsys, flags):
    src = image(tmp_path / "a.mrc")
    assert run(src, "-o", tmp_path / "out", "-m", model, *flags) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "cryoden: error: options: --lowpass and --gaussian must be finite numbers"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["abc", "0", "-4G", "nan", "inf", "8GB"])
def test_bad_memory_budget_fails_up_front(tmp_path, model, capsys, monkeypatch, value):
    monkeypatch.setenv("CRYODEN_MEMORY_BUDGET", value)
    src = image(tmp_path / "a.mrc")
    assert run(src, src, "-o", tmp_path / "out", "-m", model) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"CRYODEN_MEMORY_BUDGET={value!r} is not" in err, err
    assert list((tmp_path / "out").iterdir()) == []


def test_memory_budget_parsing(monkeypatch):
    for value, expected in [("1000", 1000), ("1.5K", 1536), ("2g", 2 * 2**30), (" 3M ", 3 << 20)]:
        monkeypatch.setenv("CRYODEN_MEMORY_BUDGET", value)
        assert cryoden.inference.memory_budget(None) == expected
    monkeypatch.setenv("CRYODEN_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match="positive number of bytes"):
        cryoden.inference.memory_budget(None)


def test_out_of_memory_is_one_line(tmp_path, model, capsys, monkeypatch):
    def oom(*a, **kw):
        raise MemoryError()

    monkeypatch.setattr(infer.Runner, "__call__", oom)
    image(tmp_path / "a.mrc"), image(tmp_path / "b.mrc")
    assert run(tmp_path, "-o", tmp_path / "out", "-m", model, "-q") == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all("out of memory" in ln for ln in lines), lines
    assert "--patch-size" in lines[0] and "CRYODEN_MEMORY_BUDGET" in lines[0]


# ------------------------------------------------------------------ item 9: kills and interrupts


def test_atomic_temporary_names_its_writer(tmp_path):
    with io.atomic(tmp_path / "a.mrc") as tmp:
        names = [p.name for p in tmp_path.iterdir()]
    assert names == [tmp.name] and f"-{os.getpid()}-" in tmp.name
    assert io._TMP.match(tmp.name) and not tmp.exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_remove_stale_temporaries(tmp_path):
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
    names = {
        f".a.mrc.cryoden-{host}-{_dead_pid()}-0123abcd.tmp": True,  # writer gone
        f".b.mrc.cryoden-{host}-{os.getpid()}-0123abcd.tmp": False,  # writer alive
        ".c.mrc.cryoden-ffffffff-1-0123abcd.tmp": False,  # other host, recent
        ".d.mrc.cryoden-ffffffff-1-0123abcd.tmp": True,  # other host, old
        ".e.mrc.89abcdef.tmp": False,  # old-style name, recent
        ".f.mrc.89abcdef.tmp": True,  # old-style name, old
        ".g.mrc.89abcdef.tmp.keep": False,  # not a temporary name
        "h.mrc.89abcdef.tmp": False,  # not hidden: not ours
        ".i.mrc.89abcdef.tmp": False,  # old, but an input of the run
    }
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    old = time.time() - io.STALE_AGE - 60
    for name in (
        ".d.mrc.cryoden-ffffffff-1-0123abcd.tmp",
        ".f.mrc.89abcdef.tmp",
        ".i.mrc.89abcdef.tmp",
        ".g.mrc.89abcdef.tmp.keep",
        "h.mrc.89abcdef.tmp",
    ):
        os.utime(tmp_path / name, (old, old))
    (tmp_path / ".j.mrc.01234567.tmp").symlink_to(tmp_path / "h.mrc.89abcdef.tmp")
    os.utime(tmp_path / ".j.mrc.01234567.tmp", (old, old), follow_symlinks=False)
    removed = io.remove_stale_temporaries(tmp_path, keep=[tmp_path / ".i.mrc.89abcdef.tmp"])
    assert sorted(p.name for p in removed) == sorted(n for n, gone in names.items() if gone)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {n for n, gone in names.items() if not gone} | {".j.mrc.01234567.tmp"}


def test_infer_removes_stale_temporaries_of_its_output_folder(tmp_path, model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
    stale = out / f".a.mrc.cryoden-{host}-{_dead_pid()}-0123abcd.tmp"
    stale.write_bytes(b"half a file")
    assert run(image(tmp_path / "a.mrc"), "-o", out, "-m", model) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.mrc", infer.RECORD]
    assert f"cryoden: removed 1 stale temporary file(s): {stale.name}\n" in capsys.readouterr().err


DRIVER = """
import os, signal, sys, time
from cryoden import infer, io, tiling
# as in a terminal: a shell starts background jobs (`pytest ... &`) with SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
write, calls = io._write_mrc, []
def interrupted_write(tmp, *a):  # the second file is interrupted while it is written
    write(tmp, *a)
    calls.append(tmp)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.{sig})
        time.sleep(5)
io._write_mrc = interrupted_write
sys.exit(infer.main(infer.parse_args()))
"""


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_writes_record_and_leaves_no_temporary(tmp_path, model, sig, code):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("a.mrc", "b.mrc", "c.mrc"):
        image(folder / name)
    cmd = [sys.executable, "-c", DRIVER.replace("{sig}", sig), folder, "-o", out, "-m", model, "-q"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == code, p.stderr
    assert len(p.stderr.splitlines()) == 1, p.stderr
    assert re.fullmatch(
        re.escape(f"cryoden: interrupted by {sig} during {folder / 'b.mrc'}: 1 written, ")
        + r"0 skipped, 0 failed in [0-9.]+ s -> "
        + re.escape(f"{out}; see {out / infer.RECORD}\n"),
        p.stderr,
    ), p.stderr
    assert sorted(q.name for q in out.iterdir()) == ["a.mrc", infer.RECORD]
    record = json.loads((out / infer.RECORD).read_text())
    assert [(Path(f["input"]).name, f["status"]) for f in record["files"]] == [
        ("a.mrc", "ok"),
        ("b.mrc", "interrupted"),
    ]
    assert record["interrupted"] == sig


# ------------------------------------------------------------------ item 16: per-file line


def info_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("cryoden: [")]


def test_one_line_per_file_with_kind_shape_model_tiling(tmp_path, model, capsys):
    image(tmp_path / "a.mrc", (50, 60))
    with mrcfile.new(tmp_path / "s.mrc") as m:  # mrcfile's stack convention: strong cue
        m.set_data(rng.normal(size=(2, 24, 24)).astype(np.float32))
        m.set_image_stack()
    assert run(tmp_path, "-o", tmp_path / "o1", "-m", model) == 0
    lines = info_lines(capsys.readouterr().err)
    assert lines[0] == (
        f"cryoden: [1/2] {tmp_path / 'a.mrc'}: 2d 50x60 (one section), model {model}, whole image"
    )
    assert lines[1].startswith(f"cryoden: [1/2] {tmp_path / 'a.mrc'} -> {tmp_path / 'o1'}")
    assert lines[2] == (
        f"cryoden: [2/2] {tmp_path / 's.mrc'}: stack 2x24x24 (MRC space group 0, mz 1), "
        f"model {model}, whole image per slice"
    )
    assert run(tmp_path / "a.mrc", "-o", tmp_path / "o2", "-m", model, "--patch-size", 16) == 0
    _, tiles, _ = cryoden.inference.Denoiser(model).plan((50, 60), 16, None)
    size = "x".join(map(str, tiling.tile_shape(tiles)))
    assert len(tiles) > 1 and size == "18x18"  # core 16 + the 3x3 filter's margin of 1
    assert f"model {model}, {len(tiles)} tiles of 18x18" in info_lines(capsys.readouterr().err)[0]


def test_weak_kind_cue_is_said(tmp_path, model, capsys, monkeypatch):
    """mrcfile labels any 3D array a volume (space group 1): the line says the cue is weak."""
    monkeypatch.setattr(infer.Runner, "__call__", lambda self, x, *a: np.zeros(x.shape, "f4"))
    # no measured memory model (compiling a 3D U-net twice): the line is the subject, and the
    # plan for a 3x16x16 volume is the whole image under any model of a few MB
    model_bytes = {"fixed": 4e6, "per_px": 1e3, "overhead_px": 0.0}
    monkeypatch.setattr(memory, "_measure", lambda *a: model_bytes)
    with mrcfile.new(tmp_path / "v.mrc") as m:
        m.set_data(rng.normal(size=(3, 16, 16)).astype(np.float32))
    m3d = random_model(tmp_path / "3d.npz", ModelSpec("unet-small", 3, 3, 3))
    assert run(tmp_path / "v.mrc", "-o", tmp_path / "out", "-m", m3d) == 0
    assert info_lines(capsys.readouterr().err)[0] == (
        f"cryoden: [1/1] {tmp_path / 'v.mrc'}: volume 3x16x16 (weak cue: MRC space group 1, "
        f"mrcfile's default for any 3D array; use --kind to override), model {m3d}, whole image"
    )
    assert run(tmp_path / "v.mrc", "-o", tmp_path / "o2", "--kind", "stack", "-m", model) == 0
    assert "v.mrc: stack 3x16x16 (--kind), model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name,ispg,mz,kind,cue,weak",
    [
        ("v.rec", 0, None, "volume", "extension .rec", False),
        ("s.st", 1, None, "stack", "extension .st", False),
        ("s.mrc", 0, 1, "stack", "MRC space group 0, mz 1", False),
        ("t.mrc", 0, 4, "stack", "MRC space group 0 (a stack) but mz 4 (a stack has mz 1)", True),
        ("v.mrc", 1, 4, "volume", "MRC space group 1, mz 4", False),
        ("w.mrc", 1, 1, "volume", "MRC space group 1 (a volume) but mz 1 (not 4)", True),
        ("x.mrc", 401, 4, "volume", "MRC space group 401 (volume stack)", False),
        ("y.mrc", 300, 4, "volume", "MRC space group 300 (neither stack nor volume)", True),
    ],
)
def test_mrc_kind_cues(tmp_path, name, ispg, mz, kind, cue, weak):
    with mrcfile.new(tmp_path / name) as m:
        m.set_data(np.zeros((4, 8, 8), np.float32))
        m.header.ispg = ispg
        if mz is not None:
            m.header.mz = mz
        m.header.label[0] = b"written by a tomography program"
    img = io.read(tmp_path / name)
    assert (img.kind, img.kind_cue, img.kind_weak) == (kind, cue, weak)


def test_tiff_kind_cues(tmp_path):
    x = np.zeros((3, 8, 8), np.float32)
    tifffile.imwrite(tmp_path / "z.tif", x, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "t.tif", x, imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(tmp_path / "p.tif", x, photometric="minisblack")
    got = {n: io.read(tmp_path / n) for n in ("z.tif", "t.tif", "p.tif")}
    assert {n: (i.kind, i.kind_cue, i.kind_weak) for n, i in got.items()} == {
        "z.tif": ("volume", "ImageJ Z axis", False),
        "t.tif": ("stack", "ImageJ T axis", False),
        "p.tif": ("stack", "pages without a Z axis", True),
    }
    assert io.read(tmp_path / "p.tif", kind="volume").kind_cue == "requested kind"


def test_kind_volume_on_a_2d_image_is_refused_before_work(tmp_path, model, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(infer.Runner, "__call__", lambda *a, **kw: calls.append(a))
    src = image(tmp_path / "a.mrc")
    assert run(src, "-o", tmp_path / "out", "-m", model, "--kind", "volume", "-q") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cryoden: error: {src}: one 2D section cannot be denoised as a volume")
    assert calls == [] and not (tmp_path / "out" / "a.mrc").exists()


# ------------------------------------------------------------------ item 17: PNG of a stack


def test_png_of_stack_or_volume_refused_before_work(tmp_path, model, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(infer.Runner, "__call__", lambda *a, **kw: calls.append(a))
    mrc(tmp_path / "s.mrcs", np.ones((2, 8, 8), np.float32))
    v = np.ones((3, 8, 8), np.float32)
    tifffile.imwrite(tmp_path / "v.tif", v, imagej=True, metadata={"axes": "ZYX"})
    assert run(tmp_path, "-o", tmp_path / "out", "-m", model, "--format", "png", "-q") == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"cryoden: error: {tmp_path / 's.mrcs'}: PNG output holds one 2D image, not 2 "
        f"sections; use --format mrc or tiff",
        f"cryoden: error: {tmp_path / 'v.tif'}: PNG output holds one 2D image, not a volume "
        f"of shape (3, 8, 8); use --format mrc or tiff",
    ]
    assert calls == []


# ------------------------------------------------------------------ item 19: progress


def test_log_progress_has_no_carriage_returns(tmp_path, model, capsys, monkeypatch):
    """Off a terminal: whole lines only, one per file start and end, with seconds."""
    denoise = infer.Runner.__call__

    def slow(self, *a, **kw):
        time.sleep(0.6)  # two files take more than tqdm's 1 s delay
        return denoise(self, *a, **kw)

    monkeypatch.setattr(infer.Runner, "__call__", slow)
    monkeypatch.setattr("cryoden.progress.PLAIN_EVERY", 0.0)
    image(tmp_path / "a.mrc", (40, 40)), image(tmp_path / "b.mrc", (40, 40))
    assert run(tmp_path, "-o", tmp_path / "out", "-m", model, "--patch-size", 8) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err and "file/s" not in err  # no tqdm bar
    lines = err.splitlines()
    assert sum(" -> " in ln and ln.endswith(" s") for ln in lines) == 2, err
    assert any(ln.startswith(f"cryoden: [1/2] {tmp_path / 'a.mrc'}: ") for ln in lines), err
    assert any(ln.endswith(" s") and "/25 tiles, " in ln for ln in lines), err
    assert lines[-1].startswith("cryoden: 2 written, 0 skipped, 0 failed in ")


def test_terminal_progress_counts_tiles():
    from cryoden.progress import Progress

    class Tty:
        text = ""

        def write(self, s):
            Tty.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    show = Progress(1, quiet=False, stream=Tty())
    assert show.steps("a.mrc", 1, "tile")(1) is None and Tty.text == ""  # whole image: no bar
    update = show.steps("a.mrc", 12, "tile")
    time.sleep(0.2)  # tqdm redraws at most every 0.1 s
    update(5)
    show.close()
    assert "a.mrc" in Tty.text and "5/12" in Tty.text
    quiet = Progress(3, quiet=True, stream=Tty())
    Tty.text = ""
    quiet.steps("b.mrc", 12, "tile")(5), quiet.say("hello"), quiet.close()
    assert Tty.text == ""


# ------------------------------------------------------------------ item 20: help


def test_help_is_plain_text_with_defaults(capsys):
    parser = argparse.ArgumentParser(description=infer.__doc__)
    infer.add_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for markup in (":mod:", ":func:", ":class:", "``", "add_args", "::"):
        assert markup not in text
    for action in parser._actions:
        if action.option_strings and action.dest != "help" and action.dest != "output":
            assert "default" in action.help, action.dest


def test_levelwise_run_is_named_and_equals_the_whole_image(tmp_path, capsys, monkeypatch):
    """A U-net image over the budget runs level by level: the line says so (not an ordinary
    tile count), and the output equals the whole-image output."""
    m = random_model(tmp_path / "small.npz", ModelSpec("unet-small", 2, 3, 3))
    x = image(tmp_path / "a.mrc", (203, 157))
    monkeypatch.setenv("CRYODEN_MEMORY_BUDGET", "12M")
    den = cryoden.inference.Denoiser(m)
    plan = den.plan((208, 160), None, None)
    assert den.uses_levelwise(den.nets[0].spec, len(plan.tiles), None, None)
    assert run(x, "-o", tmp_path / "out", "-m", m) == 0
    line = info_lines(capsys.readouterr().err)[0]
    want = f"model {m}, level by level (exact; stages planned from the memory budget)"
    assert line.endswith(want)
    monkeypatch.delenv("CRYODEN_MEMORY_BUDGET")
    whole = cryoden.denoise(mrcfile.read(x), m)
    with mrcfile.open(tmp_path / "out" / "a.mrc") as f:
        np.testing.assert_allclose(f.data, whole, atol=1e-5 * float(np.std(mrcfile.read(x))))
