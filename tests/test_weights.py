"""Model arguments and weights files: the resolution rule, checks on load, untrusted torch files.

Hostile files are made here: NaN weights, broken metadata, zip bombs, stride-0 tensors, deep
pickles. Memory is measured in a subprocess (peak RSS), so a check that allocates first fails.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest
import torch
from conftest import new_mrc

from cryoden import convert as cv
from cryoden import infer, torchpickle, weights
from cryoden.__main__ import main as cryoden_main
from cryoden.models import ModelSpec, init_params

SAV_DIR = Path(importlib.util.find_spec("topaz").origin).parent / "pretrained" / "denoise"
AFFINE_SAV = SAV_DIR / "affine_L1_v0.2.2.sav"  # Topaz's own file; shipped as `affine`
SPEC = ModelSpec("affine", 2, 3)
MAX_RSS_MB = 400  # the unguarded reader peaked near 2 GB on each hostile file below


def tiny_params(spec=SPEC, seed=0) -> dict:
    shapes = jax.eval_shape(lambda: init_params(spec, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def write_npz(path: Path, flat: dict, meta) -> Path:
    """A weights file written by hand: ``flat`` arrays plus ``__meta__`` (dict -> JSON, or text)."""
    text = meta if isinstance(meta, str) else json.dumps(meta)
    np.savez(path, **flat, __meta__=np.array(text))
    return path


def one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def run_convert(capsys, *argv) -> tuple[int, str]:
    """``cryoden convert ARGV`` in this process -> (exit status, its single stderr line)."""
    rc = cryoden_main(["convert", *map(str, argv)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) <= 1, lines
    return rc, "".join(lines)


def cli(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cryoden", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )


# ----------------------------------------------------------------------------- item 3: names


@pytest.fixture
def cwd_traps(tmp_path, monkeypatch):
    """A working directory holding a junk file `unet` and a run folder `unet-small/`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unet").write_bytes(b"junk, not weights")
    weights.save(tmp_path / "unet-small" / weights.MODEL_FILE, tiny_params(), SPEC)
    weights.save(tmp_path / "mine" / weights.MODEL_FILE, tiny_params(), SPEC)
    return tmp_path


def test_pretrained_names_ignore_files_of_that_name_in_cwd(cwd_traps):
    for name in ("unet", "unet-small"):
        path, sha = weights.resolve(name)
        assert path.parent == weights.pretrained_dir() and sha is not None, name
    _, spec, _ = weights.load("unet-small")
    assert spec == ModelSpec("unet-small", 2, 11, 5)


def test_paths_written_as_paths_are_paths(cwd_traps):
    tiny = cwd_traps / "unet-small" / weights.MODEL_FILE
    up = f"../{cwd_traps.name}/unet-small"
    for arg in ("./unet-small", str(cwd_traps / "unet-small"), "unet-small/model.npz", up):
        path, sha = weights.resolve(arg)
        assert path.resolve() == tiny and sha is None, arg
    assert weights.load("./unet-small")[1] == SPEC
    os.rename(tiny, cwd_traps / "m.npz")
    assert weights.resolve("m.npz") == (Path("m.npz"), None)  # an extension makes a path


def test_a_path_object_is_always_a_path(cwd_traps):
    assert weights.resolve(Path("mine"))[0] == Path("mine") / weights.MODEL_FILE
    with pytest.raises(weights.WeightsError, match="not a regular file|not a readable"):
        weights.resolve(Path("unet"))  # the junk file, asked for by a Path


def test_fifo_model_or_source_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "m.npz"
    os.mkfifo(fifo)
    with pytest.raises(weights.WeightsError, match="not a regular file"):
        weights.resolve(str(fifo))
    with pytest.raises(torchpickle.TorchPickleError, match="not a regular file"):
        cv.convert(fifo)


def test_tilde_is_a_path(cwd_traps, monkeypatch):
    monkeypatch.setenv("HOME", str(cwd_traps))
    assert weights.resolve("~/mine")[0] == cwd_traps / "mine" / weights.MODEL_FILE


@pytest.mark.parametrize(
    "arg, expect",
    [
        ("unet-v0.2.1", False),
        ("unet", False),
        ("run", False),
        ("./run", True),
        ("../run", True),
        ("~/m", True),
        ("/abs/m", True),
        ("runs/r1", True),
        ("m.npz", True),
        ("x.sav", True),
        ("x.pth", True),
    ],
)
def test_is_path(arg, expect):
    assert weights.is_path(arg) is expect


def test_bare_word_that_exists_says_write_dot_slash(cwd_traps):
    with pytest.raises(weights.WeightsError) as e:
        weights.resolve("mine")
    msg = str(e.value)
    assert "write ./mine" in msg and "known names: unet" in msg and "\n" not in msg
    with pytest.raises(weights.WeightsError, match="known names") as e:
        weights.resolve("nothing")
    assert "./nothing" not in str(e.value)


def test_infer_refuses_a_bare_word_model_up_front(cwd_traps, capsys):
    src = new_mrc(cwd_traps / "a.mrc", np.zeros((8, 8), np.float32))
    parser = argparse.ArgumentParser()
    infer.add_args(parser)
    args = parser.parse_args([str(src), "-o", "out", "-m", "mine", "-q"])
    assert infer.main(args) == 2
    assert "write ./mine" in capsys.readouterr().err


def test_train_init_name_ignores_a_file_of_that_name_in_cwd(cwd_traps):
    from train_subproc import write_pairs

    from cryoden.train import __main__ as train_cli
    from cryoden.train import config

    (cwd_traps / "affine").write_bytes(b"junk, not weights")
    even, odd = write_pairs(cwd_traps / "d", n=2)
    argv = ["--even", even, "--odd", odd, "--out", cwd_traps / "r", "--init", "affine"]
    cfg = config.from_args(train_cli.add_args(argparse.ArgumentParser()).parse_args(map(str, argv)))
    assert cfg.model.init == "affine" and cfg.model.base_width == 31


# ----------------------------------------------------------------------------- item 4: NaN/Inf


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_on_load(tmp_path, bad):
    params = tiny_params()
    params["filter"]["kernel"][0, 0, 0, 0] = bad
    path = tmp_path / "nan.npz"
    weights.save(path, params, SPEC)
    with pytest.raises(weights.WeightsError) as e:
        weights.load(str(path))
    msg = str(e.value)
    assert msg.startswith(str(path)) and "params/filter/kernel" in msg and "NaN" in msg


def test_non_finite_torch_weights_are_refused_by_convert(tmp_path):
    sd = torch.load(AFFINE_SAV, weights_only=True)
    sd["filter.weight"][0, 0, 3, 3] = float("nan")
    src = tmp_path / "nan.sav"
    torch.save(sd, src)
    r = cli("convert", src, "-o", tmp_path / "out.npz")
    assert r.returncode == 1 and not (tmp_path / "out.npz").exists()
    msg = one_line_error(r)
    assert str(src) in msg and "filter.weight" in msg and "NaN" in msg
    with pytest.raises(weights.WeightsError, match="filter.weight holds NaN"):
        weights.load(str(src))  # read directly as a model: refused too


def test_infer_refuses_a_nan_model_once_before_any_file(tmp_path, capsys):
    params = tiny_params()
    params["filter"]["bias"][0] = np.nan
    weights.save(tmp_path / "nan.npz", params, SPEC)
    srcs = [new_mrc(tmp_path / f"{i}.mrc", np.ones((8, 8), np.float32)) for i in range(3)]
    parser = argparse.ArgumentParser()
    infer.add_args(parser)
    out = tmp_path / "out"
    args = parser.parse_args([*map(str, srcs), "-o", str(out), "-m", str(tmp_path / "nan.npz")])
    assert infer.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "params/filter/bias holds NaN" in err[0]
    assert not list(out.glob("*.mrc"))


# ----------------------------------------------------------------------------- item 8: metadata


def _meta(spec=None, **top):
    """A metadata record: valid unless ``spec`` or top-level fields are replaced (None drops)."""
    meta = {"format": weights.FORMAT, "version": weights.VERSION, "spec": spec or SPEC.to_dict()}
    meta.update(top)
    return {k: v for k, v in meta.items() if v is not None}


def _spec(**edit):
    d = {**SPEC.to_dict(), **edit}
    return {k: v for k, v in d.items() if v is not None}


@pytest.mark.parametrize(
    "meta, message",
    [
        ('{"format": "cryoden-params", ', "not valid JSON"),
        ('["a list"]', "not a JSON object"),
        (_meta(format="other"), "unsupported weights format 'other'"),
        (_meta(version=2), "version 2"),
        ({"format": weights.FORMAT, "version": weights.VERSION}, "no model spec"),
        (_meta(_spec(top_width=None)), "model spec has no 'top_width'"),
        (_meta(_spec(ndim="2")), "model spec ndim is '2'"),
        (_meta(_spec(arch="resnet")), "unknown architecture 'resnet'"),
        (_meta(_spec(base_width=4)), "kernel widths must be odd"),
    ],
    ids=[
        "json",
        "not-object",
        "format",
        "version",
        "no-spec",
        "missing-field",
        "type",
        "arch",
        "even-width",
    ],  # fmt: skip
)
def test_metadata_errors_are_one_line_naming_the_file(tmp_path, meta, message):
    path = write_npz(tmp_path / "m.npz", weights.flatten(tiny_params()), meta)
    with pytest.raises(weights.WeightsError) as e:
        weights.read(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and message in msg and "\n" not in msg


def test_missing_spec_field_is_not_filled_with_a_default(tmp_path):
    """unet-small without top_width once loaded with top_width=5 taken from the dataclass."""
    spec = ModelSpec("unet-small", 2, 3, 5)
    meta = _meta(_spec(arch="unet-small", top_width=None))
    path = write_npz(tmp_path / "m.npz", weights.flatten(tiny_params(spec)), meta)
    with pytest.raises(weights.WeightsError, match="no 'top_width'"):
        weights.read(path)


def test_wrong_dtype_and_shape_are_named(tmp_path):
    flat = weights.flatten(tiny_params())
    key = "params/filter/kernel"
    write_npz(tmp_path / "i.npz", {**flat, key: flat[key].astype(np.int32)}, _meta())
    with pytest.raises(weights.WeightsError, match=f"{key} has dtype int32"):
        weights.read(tmp_path / "i.npz")
    write_npz(tmp_path / "s.npz", {**flat, key: flat[key][:2]}, _meta())
    with pytest.raises(weights.WeightsError, match=f"{key} has shape"):
        weights.read(tmp_path / "s.npz")


def test_valid_file_round_trips_exactly(tmp_path):
    params = tiny_params()
    weights.save(tmp_path / "m.npz", params, SPEC, note="x")
    got, spec, meta = weights.read(tmp_path / "m.npz")
    assert spec == SPEC and meta["note"] == "x"
    jax.tree.map(np.testing.assert_array_equal, got, params)


# ----------------------------------------------------------------------------- item 18: .sav


@pytest.mark.reference
def test_denoiser_reads_a_topaz_sav_like_the_shipped_model(tmp_path):
    import cryoden

    x = np.random.default_rng(1).normal(size=(48, 40)).astype(np.float32)
    want = cryoden.Denoiser("affine")(x)
    np.testing.assert_array_equal(cryoden.Denoiser(str(AFFINE_SAV))(x), want)
    # by content, not name: a Topaz file named .npz and a cryoden file named .sav
    (tmp_path / "topaz.npz").write_bytes(AFFINE_SAV.read_bytes())
    np.testing.assert_array_equal(cryoden.Denoiser(str(tmp_path / "topaz.npz"))(x), want)
    shipped = weights.locate("affine")[0]
    (tmp_path / "ours.sav").write_bytes(shipped.read_bytes())
    np.testing.assert_array_equal(cryoden.Denoiser(str(tmp_path / "ours.sav"))(x), want)


@pytest.mark.reference
def test_whole_pickled_module_loads_as_a_model(tmp_path):
    from topaz.denoising import models as tm

    torch.manual_seed(0)
    net = tm.UDenoiseNetSmall(width=11, top_width=5)
    torch.save(net, tmp_path / "snap.sav", _use_new_zipfile_serialization=False)
    torch.save(net, tmp_path / "snap_zip.pt")
    want, spec = cv.convert(tmp_path / "snap.sav")
    for name in ("snap.sav", "snap_zip.pt"):
        params, got_spec, meta = weights.load(tmp_path / name)
        assert got_spec == spec and meta["source_file"] == name
        jax.tree.map(np.testing.assert_array_equal, params, want)


@pytest.mark.reference
def test_infer_and_train_init_accept_a_sav(tmp_path, capsys):
    src = new_mrc(
        tmp_path / "a.mrc", np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32)
    )
    parser = argparse.ArgumentParser()
    infer.add_args(parser)
    out = tmp_path / "out"
    assert infer.main(parser.parse_args([str(src), "-o", str(out), "-m", str(AFFINE_SAV)])) == 0
    assert (out / "a.mrc").is_file() and "allow_pickle" not in capsys.readouterr().err

    from train_subproc import write_pairs

    from cryoden.train import __main__ as train_cli
    from cryoden.train import config

    even, odd = write_pairs(tmp_path / "d", n=2)
    argv = ["--even", even, "--odd", odd, "--out", tmp_path / "r", "--init", AFFINE_SAV]
    args = train_cli.add_args(argparse.ArgumentParser()).parse_args(map(str, argv))
    assert config.from_args(args).model.arch == "affine"


# ----------------------------------------------------------------------------- item 2: source


@pytest.mark.parametrize("how", ["same", "dotdot", "symlink", "hardlink", "target-of-symlink"])
def test_convert_never_replaces_its_source(tmp_path, how, capsys):
    src = tmp_path / "model.sav"
    src.write_bytes(AFFINE_SAV.read_bytes())
    (tmp_path / "d").mkdir()
    dest = {
        "same": src,
        "dotdot": tmp_path / "d" / ".." / "model.sav",
        "symlink": tmp_path / "link.npz",
        "hardlink": tmp_path / "hard.npz",
        "target-of-symlink": src,
    }[how]
    if how == "symlink":
        dest.symlink_to(src)
    if how == "hardlink":
        os.link(src, dest)
    if how == "target-of-symlink":  # the source given through a link, the output the file itself
        (tmp_path / "via.sav").symlink_to(src)
        src = tmp_path / "via.sav"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, line = run_convert(capsys, src, "-o", dest)
    assert rc == 1 and "refusing to overwrite" in line
    assert (tmp_path / "model.sav").read_bytes() == AFFINE_SAV.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_save_refuses_its_inputs_and_foreign_files(tmp_path):
    params = tiny_params()
    path = tmp_path / "m.npz"
    weights.save(path, params, SPEC)
    with pytest.raises(weights.WeightsError, match="refusing to overwrite"):
        weights.save(path, params, SPEC, inputs=[path])
    image = tmp_path / "image.mrc"
    image.write_bytes(b"precious data")
    with pytest.raises(weights.WeightsError, match="not a cryoden weights file"):
        weights.save(image, params, SPEC)
    assert image.read_bytes() == b"precious data"
    os.mkfifo(tmp_path / "fifo")  # refused without opening it (which would block)
    with pytest.raises(weights.WeightsError, match="not a cryoden weights file"):
        weights.save(tmp_path / "fifo", params, SPEC)
    weights.save(path, tiny_params(seed=1), SPEC)  # an older weights file is replaced
    assert not np.array_equal(weights.read(path)[0]["filter"]["kernel"],
                              params["filter"]["kernel"])  # fmt: skip


# ----------------------------------------------------------------------------- convert CLI


def test_convert_failures_are_one_line_with_status_1(tmp_path, capsys):
    src = tmp_path / "model.sav"
    src.write_bytes(AFFINE_SAV.read_bytes())
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    other = tmp_path / "other.sav"
    other.write_bytes(b"another checkpoint")
    cases = {
        "missing source": (tmp_path / "nope.sav", tmp_path / "o1.npz", "No such file"),
        "dest is a directory": (src, tmp_path / "adir", "is a directory"),
        "dest under a file": (src, tmp_path / "afile" / "m.npz", "cannot write"),
        "dest is another file": (src, other, "not a cryoden weights file"),
        "source is a directory": (tmp_path / "adir", tmp_path / "o2.npz", "not a regular file"),
    }
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    for name, (s, d, message) in cases.items():
        rc, line = run_convert(capsys, s, "-o", d)
        assert rc == 1, name
        assert line.startswith("cryoden convert: error: ") and message in line, (name, line)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert other.read_bytes() == b"another checkpoint"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_convert_to_unwritable_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, line = run_convert(capsys, AFFINE_SAV, "-o", ro / "m.npz")
    finally:
        ro.chmod(0o700)
    assert rc == 1 and "Permission denied" in line
    assert list(ro.iterdir()) == []


def test_convert_help_has_text_for_every_option_and_no_markup():
    parser = cv.add_args(argparse.ArgumentParser(prog="cryoden convert"))
    for action in parser._actions:
        assert action.help, action.dest
    text = cli("convert", "-h").stdout  # as `cryoden convert -h` prints it
    for markup in (":mod:", ":func:", "``", "add_args"):
        assert markup not in text, markup
    assert "SRC" in text and "--output" in text and "exit status" in text


# ----------------------------------------------------------------------------- item 7: recursion


def _legacy(payload: bytes, storages: bytes = b"", keys=()) -> bytes:
    header = [torchpickle.MAGIC_NUMBER, torchpickle.PROTOCOL_VERSION, {"little_endian": True}]
    head = b"".join(pickle.dumps(h, protocol=2) for h in header)
    return head + payload + pickle.dumps(list(keys), protocol=2) + storages


def test_deeply_nested_pickle_is_a_one_line_error(tmp_path):
    key = pickle.dumps("state_dict", protocol=2)[2:-1]  # BINUNICODE 'state_dict'
    n = 200_000
    src = tmp_path / "deep.pt"
    src.write_bytes(_legacy(b"\x80\x02" + (b"}" + key) * n + b"}" + b"s" * n + b"."))
    r = cli("convert", src, "-o", tmp_path / "out.npz")
    assert r.returncode == 1 and not (tmp_path / "out.npz").exists()
    line = one_line_error(r)
    assert str(src) in line and "nested" in line


# ----------------------------------------------------------------------------- item 5: memory


def _peak_rss(code: str) -> tuple[str, float]:
    """Run ``code`` in a fresh interpreter; its last stdout line and its peak RSS in MB."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking (pytest) process
    peak = "[int(v.split()[1]) for v in open('/proc/self/status') if v.startswith('VmHWM')][0]"
    wrapped = f"{code}\nprint({peak})"
    r = subprocess.run(
        [sys.executable, "-c", wrapped],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    *out, rss = r.stdout.strip().splitlines()
    return "\n".join(out), int(rss) / 1024


def _torch_error_and_rss(path: Path) -> tuple[str, float]:
    return _peak_rss(
        "from cryoden import torchpickle\n"
        "try:\n"
        f"    torchpickle.load({str(path)!r})\n"
        "    print('loaded')\n"
        "except torchpickle.TorchPickleError as e:\n"
        "    print(e)\n"
    )


class _RepeatDeflate:
    """zipfile compressor that deflates each distinct chunk once: a full flush after every chunk
    makes its block independent of what came before, so a repeated chunk repeats its bytes."""

    def __init__(self, *_):
        self.z = zlib.compressobj(9, zlib.DEFLATED, -15)
        self.blocks = {}

    def compress(self, data):
        if data not in self.blocks:
            self.blocks[data] = self.z.compress(data) + self.z.flush(zlib.Z_FULL_FLUSH)
        return self.blocks[data]

    def flush(self):
        return self.z.flush()


def write_inflating(zf: zipfile.ZipFile, name: str, head: bytes, mib: int) -> None:
    """A valid deflated member ``name``: ``head`` then ``mib`` MiB of zeros, ~1 KiB per MiB."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    zero = bytes(1 << 20)
    with mock.patch.object(zipfile, "_get_compressor", _RepeatDeflate):
        with zf.open(info, "w") as f:
            f.write(head)
            for _ in range(mib):
                f.write(zero)


class _Storage:
    def __init__(self, numel):
        self.numel = numel


class _Tensor:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, 0, size, stride, ...)``."""

    def __init__(self, storage, size, stride):
        self.args = (storage, 0, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def _zip_pickle(obj) -> bytes:
    class P(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                return ("storage", torch.FloatStorage, "0", "cpu", o.numel)
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(obj)
    return buf.getvalue()


def test_zip_storage_inflating_to_1gib_is_refused_in_bounded_memory(tmp_path):
    n = 1 << 28  # float32 elements: 1 GiB
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _zip_pickle({"w": _Tensor(_Storage(n), (n,), (1,))}))
        zf.writestr("archive/byteorder", "little")
        write_inflating(zf, "archive/data/0", b"", 1024)
    assert path.stat().st_size < 2 << 20
    msg, rss = _torch_error_and_rss(path)
    assert rss < MAX_RSS_MB, rss
    assert str(path) in msg and "zip bomb" in msg


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_stride0_tensor_is_refused_in_bounded_memory(tmp_path, zip_format):
    path = tmp_path / "expand.pt"
    torch.save(
        {"w": torch.zeros(1).expand(40000, 10000)}, path, _use_new_zipfile_serialization=zip_format
    )
    assert path.stat().st_size < 4096
    msg, rss = _torch_error_and_rss(path)
    assert rss < MAX_RSS_MB, rss
    assert str(path) in msg and "(40000, 10000)" in msg and "refusing" in msg


def test_many_references_to_one_storage_are_bounded(tmp_path):
    """The same 4 MiB storage rebuilt 200 times (the memo makes each reference ~20 bytes)."""
    n = 1 << 20
    s = _Storage(n)
    obj = {f"w{i}": _Tensor(s, (n,), (1,)) for i in range(200)}  # 800 MiB unguarded
    path = tmp_path / "refs.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _zip_pickle(obj))
        zf.writestr("archive/data/0", bytes(4 * n))
    msg, rss = _torch_error_and_rss(path)
    assert rss < MAX_RSS_MB, rss
    assert "refusing to allocate" in msg


def _claim_sizes(path: Path, name: str, size: int) -> None:
    """Rewrite the central-directory sizes of member ``name`` (compressed and not) to ``size``."""
    data = bytearray(path.read_bytes())
    at = 0
    while True:
        at = data.index(b"PK\x01\x02", at)
        n = int.from_bytes(data[at + 28 : at + 30], "little")
        if data[at + 46 : at + 46 + n] == name.encode():
            break
        at += 4
    data[at + 20 : at + 28] = size.to_bytes(4, "little") * 2
    path.write_bytes(bytes(data))


def test_zip_sizes_claimed_beyond_the_file_are_refused(tmp_path):
    n = 16
    path = tmp_path / "lying.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _zip_pickle({"w": _Tensor(_Storage(n), (n,), (1,))}))
        zf.writestr("archive/data/0", bytes(4 * n))
    assert torchpickle.load(path)["w"].shape == (n,)  # the honest file loads
    _claim_sizes(path, "archive/data/0", 0xFFFFFFF0)
    with pytest.raises(torchpickle.TorchPickleError, match="claims 4,294,967,280 bytes in a file"):
        torchpickle.load(path)


def test_legacy_storage_larger_than_the_file_is_refused_before_reading(tmp_path):
    n = 1 << 30  # float32 elements: 4 GiB declared, 64 bytes present

    class P(pickle.Pickler):
        def persistent_id(self, o):  # legacy ids carry a sixth field: the view (None)
            if isinstance(o, _Storage):
                return ("storage", torch.FloatStorage, "0", "cpu", o.numel, None)
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"w": _Tensor(_Storage(n), (n,), (1,))})
    path = tmp_path / "short.pt"
    path.write_bytes(_legacy(buf.getvalue(), n.to_bytes(8, "little") + bytes(64), keys=["0"]))
    with pytest.raises(torchpickle.TorchPickleError, match="storages declare 4,294,967,296 bytes"):
        torchpickle.load(path)


def test_npz_member_inflating_past_its_parameter_is_refused_in_bounded_memory(tmp_path):
    params = weights.flatten(tiny_params())
    path = tmp_path / "bomb.npz"
    key = "params/filter/kernel"
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in params.items():
            if k != key:
                with zf.open(k + ".npy", "w") as f:
                    np.lib.format.write_array(f, v)
        with zf.open("__meta__.npy", "w") as f:
            np.lib.format.write_array(f, np.array(json.dumps(_meta())))
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            head, {"descr": "<f4", "fortran_order": False, "shape": (1 << 28,)}
        )
        write_inflating(zf, key + ".npy", head.getvalue(), 1024)
    msg, rss = _peak_rss(
        "from cryoden import weights\n"
        "try:\n"
        f"    weights.read({str(path)!r})\n"
        "except weights.WeightsError as e:\n"
        "    print(e)\n"
    )
    assert rss < MAX_RSS_MB, rss
    assert msg.startswith(str(path)) and key in msg
