"""cryoden's params-only weight format, and resolution of model arguments.

A weights file is an uncompressed ``.npz`` read without pickle (no code runs on load):

- one array per parameter, key ``params/<block>/<conv>/<kernel|bias>`` (channels-last kernels,
  ``(*k, I, O)``), float32;
- ``__meta__``: a 0-d unicode array holding JSON ``{"format": "cryoden-params", "version": 1,
  "spec": ModelSpec dict, ...}`` plus whatever provenance the writer adds (source file and sha256,
  resolved training config).

:func:`read` checks everything before using it, and every error names the file: the metadata
(valid JSON object, format and version, a spec with all four fields), the keys and shapes
against the spec, the dtype (floating point) and the values (all finite: NaN or Inf weights would
give all-NaN images). No member is read beyond the size its parameter needs, so a lying or
compressed member cannot make loading allocate more than the model's size.

Model arguments (``--model``, ``--init``, ``Denoiser(model)``) are resolved by one rule:

1. a pretrained name or alias (``unet``, ``unet-3d`` ...) ALWAYS means the shipped model, whatever
   files exist in the working directory;
2. otherwise the argument is a path only when written as one: it starts with ``./``, ``../`` or
   ``~``, is absolute, contains a path separator, or ends in a file extension (``.npz``, ``.sav``,
   ``.pt``, ...). A path is a weights file or a training run directory (its ``model.npz``);
3. any other bare word is an error listing the known names (and, if a file or folder of that name
   exists, saying to write ``./NAME`` to use it).

From Python, a ``pathlib.Path`` (any non-``str`` path-like object) is always a path.

A file is read by its content, not its name: a cryoden ``.npz``, or a PyTorch/Topaz checkpoint
(``.sav``/``.pt``, state dict or whole pickled model) converted on the fly by
:func:`cryoden.convert.convert` with the safe reader (no code in it runs).

Pretrained models live in ``weights/`` (shipped as the package ``cryoden.pretrained``) with
``MANIFEST.json``: ``{"models": [{"name", "aliases", "spec", "file", "sha256", "source_file",
"source_sha256"}]}``. :func:`load` verifies the sha256 of a pretrained file before reading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cryoden import atomic, torchpickle
from cryoden.models import ModelSpec
from cryoden.torchpickle import TorchPickleError, check_zip_member

FORMAT = "cryoden-params"
VERSION = 1
MODEL_FILE = "model.npz"  # name of the exported model inside a training run directory


class WeightsError(ValueError):
    """A weights file or model name that cannot be used."""


def flatten(params: dict, prefix: str = "params") -> dict[str, Any]:
    """Nested params dict -> ``{'params/enc1/conv0/kernel': leaf}`` (leaves unchanged)."""
    out = {}
    for k, v in params.items():
        key = f"{prefix}/{k}"
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(flatten(dict(v), key))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of :func:`flatten` (drops the leading ``params/``)."""
    out: dict = {}
    for key, v in flat.items():
        parts = key.split("/")[1:]
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: equal resolved paths (symlinks) or the same
    ``(st_dev, st_ino)`` (hard links)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def is_weights_file(path: str | os.PathLike) -> bool:
    """Cheap check by content: a zip holding a ``__meta__`` array (what :func:`save` writes)."""
    try:
        with zipfile.ZipFile(path) as z:
            return "__meta__.npy" in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def check_destination(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raise WeightsError unless :func:`save` may write ``path``: it is none of ``inputs`` (also
    through links), not a directory, and either absent or a cryoden weights file (so that a
    mistyped ``-o`` never replaces a checkpoint, image or other file)."""
    path = Path(path)
    for src in inputs:
        if same_file(path, src):
            raise WeightsError(f"{path}: is the input {src}; refusing to overwrite it")
    if path.is_dir():
        raise WeightsError(f"{path}: is a directory; give a file name such as model.npz")
    if path.exists() and not (path.is_file() and is_weights_file(path)):
        raise WeightsError(
            f"{path}: exists and is not a cryoden weights file; refusing to replace it"
        )


def save(
    path: str | os.PathLike,
    params: dict,
    spec: ModelSpec,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    **meta: Any,
) -> None:
    """Write ``params`` for ``spec`` atomically (:func:`cryoden.atomic.atomic`).

    Refuses (WeightsError, before writing anything) a ``path`` that :func:`check_destination`
    rejects: one of ``inputs`` (the files the params were read from), a directory, or an existing
    file that is not a cryoden weights file. OSError when the directory is not writable.
    """
    path = Path(path)
    check_destination(path, inputs)
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in flatten(params).items()}
    info = {"format": FORMAT, "version": VERSION, "spec": spec.to_dict(), **meta}
    arrays["__meta__"] = np.array(json.dumps(info, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


META_LIMIT = 1 << 20  # bytes of the __meta__ record
NPY_HEADER = 1 << 16  # bytes an .npy header may take beyond the data


def _meta(z: zipfile.ZipFile, where: str) -> tuple[dict, ModelSpec]:
    """The ``__meta__`` record of an open weights zip -> ``(meta, spec)``; errors name ``where``."""
    info = z.getinfo("__meta__.npy")
    if check_zip_member(z, info) > META_LIMIT:
        raise WeightsError(f"{where}: __meta__ record of {info.file_size:,} bytes is too large")
    with z.open(info) as f:
        text = np.lib.format.read_array(f, allow_pickle=False)
    if text.shape != () or text.dtype.kind != "U":
        raise WeightsError(f"{where}: __meta__ is not a text record")
    try:
        meta = json.loads(str(text))
    except ValueError as e:
        raise WeightsError(f"{where}: __meta__ is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise WeightsError(f"{where}: __meta__ is not a JSON object")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise WeightsError(
            f"{where}: unsupported weights format {meta.get('format')!r} "
            f"version {meta.get('version')!r} (expected {FORMAT!r} version {VERSION})"
        )
    d = meta.get("spec")
    fields = {"arch": str, "ndim": int, "base_width": int, "top_width": int}
    if not isinstance(d, dict):
        raise WeightsError(f"{where}: __meta__ has no model spec")
    for k, t in fields.items():
        if k not in d:
            raise WeightsError(f"{where}: model spec has no {k!r}")
        if type(d[k]) is not t:
            raise WeightsError(f"{where}: model spec {k} is {d[k]!r}, expected {t.__name__}")
    try:
        spec = ModelSpec.from_dict(d)
    except ValueError as e:
        raise WeightsError(f"{where}: bad model spec ({e})") from None
    return meta, spec


def _member(z: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, shape, where: str) -> np.ndarray:
    """Read parameter ``key`` (expected ``shape``) checking, before its data, the member's size,
    the .npy header's shape and dtype; then that every value is finite."""
    limit = NPY_HEADER + 8 * int(np.prod(shape))
    if check_zip_member(z, info) > limit:
        raise WeightsError(
            f"{where}: {key} takes {info.file_size:,} bytes, more than a {shape} array needs"
        )
    with z.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            got, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            got, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise WeightsError(f"{where}: {key}: unsupported .npy version {version}")
        if tuple(got) != tuple(shape):
            raise WeightsError(f"{where}: {key} has shape {tuple(got)}, expected {tuple(shape)}")
        if dtype.kind != "f" or dtype.itemsize > 8:
            raise WeightsError(f"{where}: {key} has dtype {dtype}, expected float32")
        n = int(np.prod(shape)) * dtype.itemsize
        raw = f.read(n)
    if len(raw) != n:
        raise WeightsError(f"{where}: {key} is truncated")
    a = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")
    if not np.isfinite(a).all():
        raise WeightsError(f"{where}: {key} holds NaN or Inf values; refusing these weights")
    return np.ascontiguousarray(a, dtype.newbyteorder("="))


def read(path: str | os.PathLike) -> tuple[dict, ModelSpec, dict]:
    """Read a weights file -> ``(params, spec, meta)``: metadata, every key, shape, dtype and
    value checked (see the module docstring); WeightsError naming the file otherwise."""
    path = Path(path)
    where = str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise WeightsError(f"{where}: not a regular file")
        with zipfile.ZipFile(path) as z:
            members = {i.filename: i for i in z.infolist()}
            if "__meta__.npy" not in members:
                raise WeightsError(f"{where}: not a cryoden weights file (no __meta__ record)")
            meta, spec = _meta(z, where)
            want = _expected_shapes(spec)
            keys = {n.removesuffix(".npy"): i for n, i in members.items() if n != "__meta__.npy"}
            _check_keys(set(want), set(keys), spec, where)
            flat = {k: _member(z, keys[k], k, want[k], where) for k in want}
    except (TorchPickleError, WeightsError) as e:
        raise WeightsError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        raise WeightsError(
            f"{where}: not a readable cryoden weights file ({type(e).__name__}: {e})"
        ) from None
    return unflatten(flat), spec, meta


def _expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """``{'params/enc1/conv0/kernel': shape}`` of every parameter of ``spec``."""
    import jax

    from cryoden.models import init_params

    tree = jax.eval_shape(lambda: init_params(spec, jax.random.key(0)))
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def _check_keys(want: set, got: set, spec: ModelSpec, where: str) -> None:
    missing, extra = sorted(want - got), sorted(got - want)
    if missing or extra:
        raise WeightsError(
            f"{where}: parameters do not match {spec}: "
            f"missing {missing[:4]}, unexpected {extra[:4]}"
        )


def check_params(params: dict, spec: ModelSpec, where: str = "params") -> None:
    """Raise WeightsError unless ``params`` has exactly the keys and shapes of ``spec`` and only
    finite values."""
    want = _expected_shapes(spec)
    got = flatten(params)
    _check_keys(set(want), set(got), spec, where)
    for k, shape in want.items():
        if tuple(np.shape(got[k])) != shape:
            raise WeightsError(
                f"{where}: {k} has shape {tuple(np.shape(got[k]))}, expected {shape} for {spec}"
            )
        if not np.isfinite(got[k]).all():
            raise WeightsError(f"{where}: {k} holds NaN or Inf values; refusing these weights")


# ----------------------------------------------------------------------------- pretrained


def pretrained_dir() -> Path:
    """Directory of the shipped pretrained weights: ``cryoden/pretrained`` in an installed wheel
    (where setuptools puts ``weights/``), else ``weights/`` of the source checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "pretrained"
    return installed if (installed / "MANIFEST.json").is_file() else here.parent / "weights"


def manifest() -> list[dict]:
    path = pretrained_dir() / "MANIFEST.json"
    if not path.is_file():
        raise WeightsError(f"pretrained weights manifest not found at {path}")
    return json.loads(path.read_text())["models"]


def pretrained_names() -> list[str]:
    """Every name and alias that resolves to a shipped model."""
    return [n for m in manifest() for n in (m["name"], *m.get("aliases", []))]


EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]*$")  # .npz, .sav, .pt, .pth (not the .1 of v0.2.1)


def is_path(arg: str) -> bool:
    """Whether a model argument is written as a path (rule 2 of the module docstring)."""
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    return (
        arg.startswith(("./", "../", "~"))
        or os.path.isabs(arg)
        or any(sep in arg for sep in seps)
        or bool(EXTENSION.search(arg))
    )


def locate(model: str | os.PathLike) -> tuple[Path, str | None]:
    """Model argument -> ``(file, expected sha256 or None)`` by the rule of the module docstring:
    pretrained names first, then paths written as paths; WeightsError for anything else. Only
    names are resolved here: the file is not opened."""
    s = os.fspath(model)
    if isinstance(model, str):
        for m in manifest():
            if s == m["name"] or s in m.get("aliases", []):
                return pretrained_dir() / m["file"], m["sha256"]
    known = f"known names: {', '.join(pretrained_names())}"
    if isinstance(model, str) and not is_path(s):
        hint = f"; write ./{s} to use the file or folder {s}" if os.path.lexists(s) else ""
        raise WeightsError(f"{s}: not a pretrained model name ({known}){hint}")
    path = Path(s).expanduser()
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE, None
        raise WeightsError(f"{s}: a directory without {MODEL_FILE}: not a training run")
    if path.is_file():
        return path, None
    if path.exists():
        raise WeightsError(f"{s}: not a regular file")
    raise WeightsError(f"{s}: no such model file or run directory ({known})")


def resolve(model: str | os.PathLike) -> tuple[Path, str | None]:
    """:func:`locate`, then the file is checked as :func:`load` would (sha256 of a pretrained
    file; everything :func:`read` checks for any other), so that a command refuses a bad model
    once, before any work. Returns ``(file, expected sha256 or None)``."""
    path, sha = locate(model)
    _load_file(path, sha)
    return path, sha


def load(model: str | os.PathLike) -> tuple[dict, ModelSpec, dict]:
    """Load a pretrained name, weights path or run directory -> ``(params, spec, meta)``.

    A PyTorch/Topaz checkpoint (recognised by content) is converted on the fly; its ``meta``
    records the source as :func:`cryoden.convert.convert` would write it.
    """
    return _load_file(*locate(model))


def _load_file(path: Path, sha: str | None) -> tuple[dict, ModelSpec, dict]:
    if sha is not None:
        got = sha256_file(path)
        if got != sha:
            raise WeightsError(
                f"{path}: sha256 {got} does not match the manifest ({sha}); "
                f"the pretrained weights file is corrupt"
            )
    if not torchpickle.is_torch_file(path):
        return read(path)
    from cryoden import convert  # imports this module: import here, not at the top

    try:
        params, spec = convert.convert(path)
    except TorchPickleError as e:
        raise WeightsError(str(e)) from None
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "spec": spec.to_dict(),
        "source_file": path.name,
        "source_sha256": sha256_file(path),
        "converter": "cryoden.convert (on load)",
    }
    return params, spec, meta
