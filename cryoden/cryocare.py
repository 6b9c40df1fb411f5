"""cryoCARE's three scripts, backed by cryoden: ``cryoCARE_extract_train_data.py``,
``cryoCARE_train.py`` and ``cryoCARE_predict.py``, each called as ``SCRIPT --conf FILE.json``.

RELION 5's "Denoise tomograms" job (src/tomography_python_programs/denoise/cryoCARE/) writes
the JSON files and runs these scripts from its "Directory with cryoCARE executables"; point that
at the folder holding cryoden's console scripts (the environment's ``bin``). Keys read
(everything else cryoCARE defines is accepted and reported as not used):

- extract: ``even``, ``odd`` (lists, folders of ``*.mrc`` or single files, paired in order),
  ``patch_shape`` (training crop; a cube of its smallest edge), ``num_slices`` (sub-volumes per
  tomogram per epoch), ``split`` (training fraction: ``1 - split`` of the pairs is held out for
  validation when there are two or more), ``path`` (folder for the record
  ``cryoden_train_data.json``: the halves are read directly at training time), ``overwrite``.
- train: ``train_data`` (the extract ``path``), ``epochs`` x ``steps_per_epoch`` steps of
  ``batch_size`` crops, ``learning_rate`` (Adam, as cryoCARE), ``path``, ``model_name``
  (the ``cryoden train`` run ``path/model_name``; the model archive
  ``path/model_name.tar.gz`` holds its ``model.npz`` and ``config.json``), ``overwrite``,
  ``gpu_id``. The network is cryoden's 3D U-net (Topaz's ``unet-3d``), not cryoCARE's
  ``unet_kern_size``/``unet_n_depth``/``unet_n_first`` U-net.
- predict: ``path`` (the archive, or a folder with ``model_name``), ``even``, ``odd``,
  ``output`` (folder; each result is named after its even tomogram, as cryoCARE does),
  ``overwrite``, ``gpu_id``. Each half is denoised with exact tiling and the two are
  averaged (cryoCARE's prediction); ``n_tiles`` is not needed (tiles follow device memory).

Exit status: 0 done, 1 a tomogram or the training failed, 2 bad configuration (one line naming
the file and the key).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tarfile
import tempfile
from pathlib import Path

RECORD = "cryoden_train_data.json"
KNOWN = {
    "extract": {"even", "odd", "patch_shape", "num_slices", "split", "path", "overwrite"},
    "train": {
        "train_data",
        "epochs",
        "steps_per_epoch",
        "batch_size",
        "learning_rate",
        "path",
        "model_name",
        "overwrite",
        "gpu_id",
    },
    "predict": {"path", "even", "odd", "output", "overwrite", "gpu_id", "model_name", "n_tiles"},
}


class ConfError(ValueError):
    """A configuration cryoden cannot run: the message names the file and the key."""


def _parse(prog: str, argv: list[str] | None) -> Path:
    p = argparse.ArgumentParser(
        prog=prog,
        description=f"cryoCARE's {prog}, backed by cryoden: takes the JSON configuration "
        "cryoCARE takes, as RELION 5's Denoise tomograms job writes it (docs/relion.md).",
    )
    p.add_argument("--conf", required=True, help="cryoCARE JSON configuration")
    return Path(p.parse_args(argv).conf)


class Conf:
    """A cryoCARE JSON file: typed access to its keys, errors naming the file and key."""

    def __init__(self, path: Path, kind: str):
        self.path = path
        try:
            self.d = json.loads(path.read_text())
        except OSError as e:
            raise ConfError(f"{path}: cannot read: {e.strerror or e}") from None
        except ValueError as e:
            raise ConfError(f"{path}: not JSON ({e})") from None
        if not isinstance(self.d, dict):
            raise ConfError(f"{path}: not a JSON object")
        unused = sorted(set(self.d) - KNOWN[kind])
        if unused:
            print(f"cryoden: {path}: not used by cryoden: {', '.join(unused)}", file=sys.stderr)

    def bad(self, key: str, why: str) -> ConfError:
        return ConfError(f"{self.path}: {key!r} {why}")

    def get(self, key: str, default=None, required: bool = True):
        if key not in self.d:
            if required and default is None:
                raise self.bad(key, "is missing")
            return default
        return self.d[key]

    def number(self, key: str, kind=int, default=None, low=0.0, high=math.inf):
        v = self.get(key, default)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok and kind is int:
            ok = float(v).is_integer()
        if not ok or not low < v <= high:
            raise self.bad(
                key,
                f"= {v!r}: expected {'an integer' if kind is int else 'a number'}"
                f" in ({low:g}, {high:g}]",
            )
        return kind(v)

    def flag(self, key: str, default: bool = False) -> bool:
        """cryoCARE's booleans, which RELION writes as the string "True"."""
        v = self.get(key, default, required=False)
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise self.bad(key, f"= {v!r}: expected true or false")

    def halves(self) -> tuple[list[str], list[str]]:
        """``even``/``odd`` as cryoCARE reads them: two lists, two folders (``*.mrc``, sorted)
        or two files."""
        out = []
        for key in ("even", "odd"):
            v = self.get(key)
            if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
                out.append(list(v))
            elif isinstance(v, str) and os.path.isdir(v):
                out.append(sorted(str(p) for p in Path(v).glob("*.mrc")))
            elif isinstance(v, str) and v:
                out.append([v])
            else:
                raise self.bad(key, f"= {v!r}: expected a file, a folder or a list of files")
        if len(out[0]) != len(out[1]) or not out[0]:
            raise self.bad("odd", f"lists {len(out[1])} tomograms for {len(out[0])} even ones")
        return out[0], out[1]

    def gpu(self) -> None:
        """``gpu_id`` (an index or a list of them) selects the CUDA devices, as in cryoCARE,
        unless CUDA_VISIBLE_DEVICES is already set."""
        v = self.get("gpu_id", required=False)
        if v is None or "CUDA_VISIBLE_DEVICES" in os.environ:
            return
        ids = v if isinstance(v, list) else [v]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise self.bad("gpu_id", f"= {v!r}: expected a GPU index or a list of them")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))


def _entry(prog: str, run, argv: list[str] | None) -> int:
    conf = _parse(prog, argv)
    try:
        return run(conf)
    except ValueError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _write_json(path: Path, obj) -> None:
    from cryoden import io

    with io.atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------- extract


def extract_train_data(argv: list[str] | None = None) -> int:
    """``cryoCARE_extract_train_data.py --conf FILE``: check the halves and settings, record
    them in ``path/cryoden_train_data.json``."""
    return _entry("cryoCARE_extract_train_data.py", _extract, argv)


def _extract(conf_path: Path) -> int:
    from cryoden.train import config, pairs

    c = Conf(conf_path, "extract")
    evens, odds = c.halves()
    shape = c.get("patch_shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise c.bad("patch_shape", f"= {shape!r}: expected three positive integers")
    num = c.number("num_slices")
    split = c.number("split", float, high=1.0)
    out = Path(c.get("path"))
    found = pairs.find_pairs([Path(e) for e in evens], [Path(o) for o in odds])
    crop = min(shape)
    stride = config.ModelConfig(**config.arch_fields("unet-3d")).spec.stride
    if crop < stride:
        raise c.bad(
            "patch_shape", f"= {shape!r}: the 3D U-net needs sub-volumes of {stride} or more"
        )
    pairs.check_crop(found, crop, 3)
    record = out / RECORD
    if record.exists() and not c.flag("overwrite"):
        raise c.bad("overwrite", f"is false and {record} exists")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(
        record,
        {
            "even": [os.path.abspath(e) for e in evens],
            "odd": [os.path.abspath(o) for o in odds],
            "crop": crop,
            "num_slices": num,
            "split": split,
            "conf": os.path.abspath(conf_path),
        },
    )
    print(f"cryoden: {len(evens)} tomogram pair(s), crops of {crop}^3 -> {record}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- train


def train(argv: list[str] | None = None) -> int:
    """``cryoCARE_train.py --conf FILE``: train on the recorded halves; write
    ``path/model_name.tar.gz``."""
    return _entry("cryoCARE_train.py", _train, argv)


def _train(conf_path: Path) -> int:
    from cryoden import relionjob

    c = Conf(conf_path, "train")
    data_dir = Path(c.get("train_data"))
    try:
        rec = json.loads((data_dir / RECORD).read_text())
    except (OSError, ValueError) as e:
        raise c.bad(
            "train_data",
            f"= {str(data_dir)!r}: no usable {RECORD} ({e}); run "
            "cryoCARE_extract_train_data.py first",
        ) from None
    epochs, per_epoch = c.number("epochs"), c.number("steps_per_epoch")
    batch, lr = c.number("batch_size"), c.number("learning_rate", float)
    name = c.get("model_name")
    if not isinstance(name, str) or not name or os.sep in name or name in (".", ".."):
        raise c.bad("model_name", f"= {name!r}: expected a file name")
    out = Path(c.get("path"))
    archive = out / f"{name}.tar.gz"
    if archive.exists() and not c.flag("overwrite"):
        raise c.bad("overwrite", f"is false and {archive} exists")
    c.gpu()
    n = len(rec["even"])
    holdout = round(1.0 - rec["split"], 6) if n >= 2 else 0.0
    n_train = n - (min(max(round(holdout * n), 1), n - 1) if holdout > 0 else 0)
    flags = [
        "--config", "train-3d", "--optim", "adam", "--lr", repr(lr),
        "--crop", str(rec["crop"]), "--batch-size", str(batch),
        "--steps", str(epochs * per_epoch), "--holdout", repr(holdout),
        "--samples-per-pair", str(max(1, math.ceil(per_epoch * batch / n_train))),
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    run = out / name
    rc = relionjob.train_halves(rec["even"], rec["odd"], run, out / f"{name}_halves", flags)
    if rc != 0:
        return rc
    _pack(run, archive, name)
    print(f"cryoden: model archive {archive}", file=sys.stderr)
    return 0


def _pack(run: Path, archive: Path, name: str) -> None:
    """``archive`` (.tar.gz, atomic) holding ``name/model.npz`` and ``name/config.json``."""
    from cryoden import io, weights

    with io.atomic(archive) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            for f in (weights.MODEL_FILE, "config.json"):
                tar.add(run / f, arcname=f"{name}/{f}")


# ----------------------------------------------------------------------------- predict


def predict(argv: list[str] | None = None) -> int:
    """``cryoCARE_predict.py --conf FILE``: denoise each even/odd pair into ``output``."""
    return _entry("cryoCARE_predict.py", _predict, argv)


def _model_file(c: Conf, tmp: Path) -> Path:
    """The model.npz of ``path``: extracted from the archive (only that member, never
    anything outside ``tmp``), or ``path/model_name/model.npz``."""
    from cryoden import weights

    path = Path(c.get("path"))
    if path.is_dir():
        name = c.get("model_name")
        return path / str(name) / weights.MODEL_FILE
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.isfile() and Path(m.name).name == weights.MODEL_FILE
            ]
            if not members:
                raise c.bad(
                    "path",
                    f"= {str(path)!r}: no {weights.MODEL_FILE} in the archive "
                    "(a cryoCARE/TensorFlow model? train it with cryoden's "
                    "cryoCARE_train.py)",
                )
            src = tar.extractfile(members[0])
            dst = tmp / weights.MODEL_FILE
            dst.write_bytes(src.read())
            return dst
    except (OSError, tarfile.TarError) as e:
        raise c.bad("path", f"= {str(path)!r}: not a readable model archive ({e})") from None


def _predict(conf_path: Path) -> int:
    from cryoden import io, outputs, weights

    c = Conf(conf_path, "predict")
    evens, odds = c.halves()
    out_dir = Path(c.get("output"))
    overwrite = c.flag("overwrite")
    c.gpu()
    from cryoden import runtime

    runtime.setup(cache=True)  # after gpu_id: JAX starts here
    with tempfile.TemporaryDirectory(prefix="cryoden-cryocare-") as tmp:
        model = _model_file(c, Path(tmp))
        try:
            weights.resolve(model)
        except ValueError as e:
            raise c.bad("path", f"holds no usable cryoden model ({e})") from None
        from cryoden.inference import Denoiser

        den = Denoiser(model, ndim=3)
        out_dir.mkdir(parents=True, exist_ok=True)
        inputs = set().union(
            *(outputs.identity(Path(p)) for p in evens + odds if os.path.lexists(p))
        )
        failed = 0
        for even, odd in zip(evens, odds, strict=True):
            out = out_dir / Path(even).name
            try:
                if outputs.identity(out) & inputs:
                    raise ValueError(f"its output {out} is an input; not replaced")
                if out.exists() and not overwrite:
                    raise ValueError(f"{out} exists and 'overwrite' is false")
                halves = [io.read(even), io.read(odd)]
                for p, img in zip((even, odd), halves, strict=True):
                    if img.kind != "volume":
                        raise ValueError(
                            f"{p}: a {img.kind} of shape {img.data.shape}, not a tomogram"
                        )
                if halves[0].data.shape != halves[1].data.shape:
                    raise ValueError(
                        f"{odd} has shape {halves[1].data.shape}, its even half "
                        f"{halves[0].data.shape}"
                    )
                y = den(halves[0].data.astype("float32")) + den(halves[1].data.astype("float32"))
                io.write(
                    out,
                    dataclasses.replace(halves[0], data=y / 2),
                    label="cryoden (cryoCARE_predict.py)",
                )
                print(f"cryoden: {even} + {odd} -> {out}", file=sys.stderr)
            except Exception as e:  # one bad pair must not stop the others
                text = " ".join(str(e).split()).removeprefix(f"{even}: ")
                print(f"cryoCARE_predict.py: error: {even}: {text}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0
