"""Weight import: the torch-free checkpoint reader, the converter, and the shipped pretrained files.

Compared against the reference: torch 2.13.0 (``torch.load``) and topaz-em 0.3.20's own nets.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from topaz.denoising import models as tm
from topaz.filters import AffineDenoise

from cryoden import convert as cv
from cryoden import torchpickle, weights
from cryoden.models import ModelSpec, build_model

SAV_DIR = Path(importlib.util.find_spec("topaz").origin).parent / "pretrained" / "denoise"
EXPECTED = {
    "unet_L2_v0.2.2.sav": ModelSpec("unet", 2, 11, 5),
    "unet_small_L1_v0.2.2.sav": ModelSpec("unet-small", 2, 11, 5),
    "fcnn_L1_v0.2.2.sav": ModelSpec("fcnn", 2, 11),
    "affine_L1_v0.2.2.sav": ModelSpec("affine", 2, 31),
    "unet_L2_v0.2.1.sav": ModelSpec("unet", 2, 7, 3),
    "unet-3d-10a-v0.2.4.sav": ModelSpec("unet", 3, 7, 3),
    "unet-3d-20a-v0.2.4.sav": ModelSpec("unet", 3, 7, 3),
}
NAMES = {
    "unet",
    "unet-small",
    "fcnn",
    "affine",
    "unet-v0.2.1",
    "unet-3d-10a",
    "unet-3d",
    "unet-3d-20a",
}


def assert_same_state_dict(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for k, v in ref.items():
        v = v.detach().numpy()
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert np.array_equal(ours[k], v), k


# ----------------------------------------------------------------------------- Topaz's .sav files


@pytest.mark.reference
@pytest.mark.parametrize("sav", EXPECTED)
def test_pretrained_sav_reads_like_torch_load(sav):
    """Legacy (non-zip) state dicts: identical keys, order, dtypes and values; spec inferred."""
    ref = torch.load(SAV_DIR / sav, weights_only=True)
    assert_same_state_dict(torchpickle.load(SAV_DIR / sav), ref)
    params, spec = cv.convert(SAV_DIR / sav)
    assert spec == EXPECTED[sav]
    for k, v in ref.items():  # <block>.<i>.weight (O, I, *k) -> [block][conv<i>][kernel] (*k, I, O)
        *mods, kind = k.split(".")
        leaf = params[mods[0]][f"conv{mods[1]}"] if len(mods) == 2 else params[mods[0]]
        want = v.numpy() if kind == "bias" else np.moveaxis(v.numpy(), (0, 1), (-1, -2))
        np.testing.assert_array_equal(leaf["kernel" if kind == "weight" else "bias"], want)


# ----------------------------------------------------------------------------- round trips


def _torch_nets():
    torch.manual_seed(0)
    affine = AffineDenoise(max_size=7)
    torch.nn.init.normal_(affine.filter.weight)  # Topaz initialises it to zero
    return {
        "unet": (tm.UDenoiseNet(base_width=7, top_width=3), (45, 37)),
        "unet-small": (tm.UDenoiseNetSmall(width=11, top_width=5), (45, 37)),
        "unet-3d": (tm.UDenoiseNet3D(base_width=7), (32, 33, 35)),
        "fcnn": (tm.DenoiseNet2(64, width=5), (45, 37)),
        "affine": (affine, (45, 37)),
    }


def _save_all_ways(net, d: Path) -> dict[str, Path]:
    """State dict (zip, legacy) and whole module (zip, legacy, DataParallel): Topaz snapshots."""
    ways = {
        "state_dict_zip": (net.state_dict(), {}),
        "state_dict_legacy": (net.state_dict(), {"_use_new_zipfile_serialization": False}),
        "module_zip": (net, {}),
        "module_legacy": (net, {"_use_new_zipfile_serialization": False}),
        "data_parallel": (torch.nn.DataParallel(net), {}),
    }
    for name, (obj, kw) in ways.items():
        torch.save(obj, d / f"{name}.pt", **kw)
    return {name: d / f"{name}.pt" for name in ways}


@pytest.mark.reference
@pytest.mark.parametrize("name", ["unet", "unet-small", "unet-3d", "fcnn", "affine"])
def test_round_trip_matches_torch_forward(name, tmp_path):
    net, size = _torch_nets()[name]
    net.eval()
    files = _save_all_ways(net, tmp_path)
    assert_same_state_dict(torchpickle.load_state_dict(files["module_legacy"]), net.state_dict())
    converted = [cv.convert(p) for p in files.values()]
    params, spec = converted[0]
    for p, s in converted[1:]:
        assert s == spec
        jax.tree.map(np.testing.assert_array_equal, p, params)

    x = np.random.default_rng(0).normal(size=size).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)[None, None]).numpy()[0, 0]
    y = jax.jit(build_model(spec).apply)({"params": params}, x[None, ..., None])
    err = np.abs(np.asarray(y)[0, ..., 0] - ref).max()
    assert err <= 1e-5 and err <= 1e-3 * ref.std(), (err, ref.std())


# ----------------------------------------------------------------------------- malicious pickles


class Evil:
    """Pickles as a call: ``func(*args)`` runs in any unpickler that resolves ``func``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path):
    return {
        "os.system": Evil(__import__("os").system, f"touch {marker}"),
        "builtins.exec": Evil(exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.eval": Evil(eval, f"open({str(marker)!r}, 'w')"),
    }


def _legacy_bytes(payload: bytes) -> bytes:
    header = [torchpickle.MAGIC_NUMBER, torchpickle.PROTOCOL_VERSION, {"little_endian": True}]
    return b"".join(pickle.dumps(h, protocol=2) for h in header) + payload + pickle.dumps([])


def _zip_bytes(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
    return buf.getvalue()


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "builtins.eval"])
@pytest.mark.parametrize("layout", ["torch_zip", "torch_legacy", "pickle_in_zip", "pickle_legacy"])
def test_malicious_pickle_is_rejected_and_nothing_runs(payload, layout, tmp_path):
    marker = tmp_path / "pwned"
    evil = _payloads(marker)[payload]
    obj = {"enc1.0.weight": torch.zeros(2, 1, 3, 3), "x": evil}
    path = tmp_path / "evil.pt"
    if layout.startswith("torch"):
        torch.save(obj, path, _use_new_zipfile_serialization=layout == "torch_zip")
    else:
        data = pickle.dumps({"x": evil}, protocol=2)
        path.write_bytes(_zip_bytes(data) if layout == "pickle_in_zip" else _legacy_bytes(data))
    with pytest.raises(torchpickle.UnsafePickleError, match="refusing to load global") as e:
        torchpickle.load_state_dict(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(torchpickle.UnsafePickleError):  # the converter refuses it too
        cv.convert(path, tmp_path / "out.npz")
    assert not marker.exists() and not (tmp_path / "out.npz").exists()


def test_payload_is_live_so_the_rejection_test_means_something(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_payloads(marker)["builtins.exec"]))  # plain pickle runs it
    assert marker.exists()


def test_whitelisted_objects_cannot_be_modified_by_build(tmp_path):
    # GLOBAL torch._utils._rebuild_tensor_v2, {'__defaults__': None}, BUILD
    data = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00}X\x0c\x00\x00\x00__defaults__Nsb."
    path = tmp_path / "build.pt"
    path.write_bytes(_legacy_bytes(data))
    with pytest.raises(torchpickle.UnsafePickleError):
        torchpickle.load(path)


def test_reader_needs_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from cryoden import torchpickle\n"
        f"sd = torchpickle.load_state_dict({str(SAV_DIR / 'affine_L1_v0.2.2.sav')!r})\n"
        "assert sd['filter.weight'].shape == (1, 1, 31, 31)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- strict checks


@pytest.fixture(scope="module")
def small_sd():
    torch.manual_seed(0)
    return tm.UDenoiseNetSmall(width=11, top_width=5).state_dict()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("dec1.4.bias"), "missing key dec1.4.bias"),
        (lambda sd: sd.update({"enc9.0.weight": torch.zeros(1)}), "unexpected key enc9.0.weight"),
        (
            lambda sd: sd.update({"dec2.2.weight": torch.zeros(96, 96, 5, 5)}),
            "dec2.2.weight has shape",
        ),
        (
            lambda sd: sd.update({"enc1.0.weight": torch.zeros(48, 1, 4, 4)}),
            "kernel widths must be odd",
        ),
        (lambda sd: [sd.clear(), sd.update({"conv.weight": torch.zeros(1)})], "cannot infer"),
    ],
    ids=["missing", "unexpected", "shape", "even-kernel", "unknown-arch"],
)
def test_bad_state_dict_gives_one_line_error_naming_file_and_key(small_sd, edit, message, tmp_path):
    sd = dict(small_sd)
    edit(sd)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(cv.ConvertError, match=message) as e:
        cv.convert(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_cli_writes_a_readable_weights_file(tmp_path, capsys):
    torch.manual_seed(0)
    net = tm.UDenoiseNetSmall(width=11, top_width=5)
    src, out = tmp_path / "snapshot_epoch010.sav", tmp_path / "model.npz"
    torch.save(net, src)  # what `topaz denoise --save-prefix` writes
    import argparse

    cv.main(cv.add_args(argparse.ArgumentParser()).parse_args([str(src), "-o", str(out)]))
    assert "unet-small" in capsys.readouterr().out
    params, spec, meta = weights.read(out)
    assert spec == ModelSpec("unet-small", 2, 11, 5)
    assert meta["source_file"] == src.name and meta["source_sha256"] == weights.sha256_file(src)
    np.testing.assert_array_equal(
        params["enc1"]["conv0"]["kernel"], net.enc1[0].weight.detach().numpy().transpose(2, 3, 1, 0)
    )


def test_cli_rejects_a_non_torch_file(tmp_path):
    src = tmp_path / "notes.txt"
    src.write_text("not a checkpoint\n")
    r = subprocess.run(
        [sys.executable, "-m", "cryoden.convert", str(src), "-o", str(tmp_path / "x.npz")],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and not (tmp_path / "x.npz").exists()
    last = r.stderr.strip().splitlines()[-1]  # the error is one line (tolerates library warnings)
    assert last.startswith(f"cryoden convert: error: {src}: not a PyTorch checkpoint")


# ----------------------------------------------------------------------------- shipped weights


def test_manifest_files_names_and_sources():
    entries = weights.manifest()
    assert set(weights.pretrained_names()) == NAMES
    for m in entries:
        path = weights.pretrained_dir() / m["file"]
        assert weights.sha256_file(path) == m["sha256"], m["name"]
        assert weights.sha256_file(SAV_DIR / m["source_file"]) == m["source_sha256"], m["name"]
        assert ModelSpec.from_dict(m["spec"]) == EXPECTED[m["source_file"]]
    for name in NAMES:
        params, spec, meta = weights.load(name)
        src = next(m for m in entries if name == m["name"] or name in m["aliases"])
        assert spec.to_dict() == src["spec"] and meta["source_sha256"] == src["source_sha256"]


@pytest.mark.reference
def test_shipped_files_equal_a_fresh_conversion():
    for m in weights.manifest():
        shipped, _, _ = weights.load(m["name"])
        fresh, _ = cv.convert(SAV_DIR / m["source_file"])
        jax.tree.map(np.testing.assert_array_equal, shipped, fresh)


def test_corrupted_pretrained_file_is_detected(tmp_path, monkeypatch):
    d = tmp_path / "weights"
    shutil.copytree(weights.pretrained_dir(), d)
    monkeypatch.setattr(weights, "pretrained_dir", lambda: d)
    entry = next(m for m in weights.manifest() if m["name"] == "unet-small")
    weights.load("unet-small")  # the intact copy loads
    data = bytearray((d / entry["file"]).read_bytes())
    data[len(data) // 2] ^= 1
    (d / entry["file"]).write_bytes(bytes(data))
    with pytest.raises(weights.WeightsError, match="sha256"):
        weights.load("unet-small")
