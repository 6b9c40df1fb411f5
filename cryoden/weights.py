"""cryoden's params-only weight format, and resolution of pretrained model names.

A weights file is an uncompressed ``.npz`` read with ``allow_pickle=False`` (no code runs on load):

- one array per parameter, key ``params/<block>/<conv>/<kernel|bias>`` (channels-last kernels,
  ``(*k, I, O)``), float32;
- ``__meta__``: a 0-d unicode array holding JSON ``{"format": "cryoden-params", "version": 1,
  "spec": ModelSpec dict, ...}`` plus whatever provenance the writer adds (source file and sha256,
  resolved training config).

Pretrained models live in ``weights/`` (shipped as the package ``cryoden.pretrained``) with
``MANIFEST.json``: ``{"models": [{"name", "aliases", "spec", "file", "sha256", "source_file",
"source_sha256"}]}``. :func:`load` verifies the sha256 of a pretrained file before reading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cryoden.models import ModelSpec

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


def save(path: str | os.PathLike, params: dict, spec: ModelSpec, **meta: Any) -> None:
    """Write ``params`` for ``spec`` atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in flatten(params).items()}
    info = {"format": FORMAT, "version": VERSION, "spec": spec.to_dict(), **meta}
    arrays["__meta__"] = np.array(json.dumps(info, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: str | os.PathLike) -> tuple[dict, ModelSpec, dict]:
    """Read a weights file -> ``(params, spec, meta)``; checks every key and shape against spec."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/ValueError/OSError: all mean "not our format"
        raise WeightsError(f"{path}: not a cryoden weights file ({type(e).__name__}: {e})") from e
    if "__meta__" not in flat:
        raise WeightsError(f"{path}: not a cryoden weights file (no __meta__ record)")
    meta = json.loads(str(flat.pop("__meta__")))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise WeightsError(
            f"{path}: unsupported weights format {meta.get('format')!r} "
            f"version {meta.get('version')!r}"
        )
    spec = ModelSpec.from_dict(meta["spec"])
    params = unflatten(flat)
    check_params(params, spec, where=str(path))
    return params, spec, meta


def check_params(params: dict, spec: ModelSpec, where: str = "params") -> None:
    """Raise WeightsError unless ``params`` has exactly the keys and shapes of ``spec``."""
    import jax

    from cryoden.models import init_params

    want = flatten(jax.eval_shape(lambda: init_params(spec, jax.random.key(0))))
    got = flatten(params)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise WeightsError(
            f"{where}: parameters do not match {spec}: "
            f"missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for k, v in want.items():
        if tuple(np.shape(got[k])) != tuple(v.shape):
            raise WeightsError(
                f"{where}: {k} has shape {tuple(np.shape(got[k]))}, "
                f"expected {tuple(v.shape)} for {spec}"
            )


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


def resolve(model: str | os.PathLike) -> tuple[Path, str | None]:
    """Model name, weights file or training run directory -> ``(file, expected sha256 or None)``."""
    s = str(model)
    path = Path(s)
    if path.is_dir() and (path / MODEL_FILE).is_file():
        return path / MODEL_FILE, None
    if path.is_file():
        return path, None
    for m in manifest():
        if s == m["name"] or s in m.get("aliases", []):
            return pretrained_dir() / m["file"], m["sha256"]
    raise WeightsError(
        f"{s}: no such model file, run directory or pretrained model name "
        f"(known names: {', '.join(pretrained_names())})"
    )


def load(model: str | os.PathLike) -> tuple[dict, ModelSpec, dict]:
    """Load a pretrained name, weights path or run directory -> ``(params, spec, meta)``."""
    path, sha = resolve(model)
    if sha is not None:
        got = sha256_file(path)
        if got != sha:
            raise WeightsError(
                f"{path}: sha256 {got} does not match the manifest ({sha}); "
                f"the pretrained weights file is corrupt"
            )
    return read(path)
