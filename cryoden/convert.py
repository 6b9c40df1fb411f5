"""Convert Topaz-Denoise / PyTorch weights into a cryoden weights file.

    python -m cryoden.convert my_model_epoch100.sav -o my_model.npz
    cryoden convert unet_L2_v0.2.2.sav -o unet.npz

The source may be a state dict or a whole pickled model (``topaz denoise --save-prefix`` training
snapshots), in torch's zip or legacy format; it is read by :mod:`cryoden.torchpickle`, which never
executes pickled code and needs no torch. The architecture is inferred from key names and shapes:
``filter.*`` -> affine, ``net.*`` -> fcnn, ``enc1..enc6``/``dec5`` -> unet, ``enc1..enc4`` ->
unet-small; the kernel rank gives 2D or 3D, ``enc1.0.weight`` the base kernel width and
``dec1.0.weight`` the top kernel width. Every key and shape is then checked strictly:

    Topaz ``<block>.<i>.weight`` (O, I, *k)   ->   ``params[block]['conv<i>']['kernel']`` (*k, I, O)
    Topaz ``<block>.<i>.bias``   (O,)         ->   ``params[block]['conv<i>']['bias']``   (O,)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cryoden import torchpickle
from cryoden.models import ModelSpec
from cryoden.weights import (
    WeightsError,
    check_destination,
    check_params,
    flatten,
    save,
    sha256_file,
    unflatten,
)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # nn.DataParallel, torch.compile


class ConvertError(WeightsError):
    """A source file whose weights do not form a known Topaz architecture."""


def describe(spec: ModelSpec) -> str:
    if spec.arch in ("unet", "unet-small"):
        return f"{spec.arch} {spec.ndim}D (base kernel {spec.base_width}, top {spec.top_width})"
    return f"{spec.arch} (kernel {spec.base_width})"


def strip_wrappers(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop ``module.`` / ``_orig_mod.`` prefixes shared by every key."""
    while sd:
        p = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if p is None:
            break
        sd = {k[len(p) :]: v for k, v in sd.items()}
    return sd


def infer_spec(sd: dict[str, np.ndarray], where: str = "state dict") -> ModelSpec:
    """ModelSpec of a Topaz state dict ``{'enc1.0.weight': (O, I, *k), ...}``."""

    def kernel(key):
        w = sd.get(key)
        if w is None or w.ndim < 3:
            raise ConvertError(f"{where}: {key} is missing or not a convolution kernel")
        return w.shape[-1]

    try:
        if "filter.weight" in sd:
            return ModelSpec("affine", 2, kernel("filter.weight"))
        if "net.0.weight" in sd:
            return ModelSpec("fcnn", 2, kernel("net.0.weight"))
        if "enc1.0.weight" in sd:
            arch = "unet" if "enc6.0.weight" in sd or "dec5.0.weight" in sd else "unet-small"
            ndim = sd["enc1.0.weight"].ndim - 2
            return ModelSpec(arch, ndim, kernel("enc1.0.weight"), kernel("dec1.0.weight"))
    except ConvertError:
        raise
    except ValueError as e:  # ModelSpec validation: even kernels, 1D/4D convolutions
        raise ConvertError(f"{where}: not a Topaz architecture ({e})") from None
    seen = ", ".join(list(sd)[:4]) or "no keys"
    raise ConvertError(
        f"{where}: cannot infer the architecture: expected enc1.*, net.* or "
        f"filter.* keys, found {seen}"
    )


def _torch_key(flat_key: str) -> str:
    """Flat Flax key -> Topaz key: ``params/enc1/conv0/kernel`` -> ``enc1.0.weight``."""
    *mods, leaf = flat_key.split("/")[1:]
    mods = [m[4:] if m.startswith("conv") else m for m in mods]
    return ".".join([*mods, {"kernel": "weight", "bias": "bias"}[leaf]])


def to_params(sd: dict[str, np.ndarray], spec: ModelSpec, where: str = "state dict") -> dict:
    """Nested Flax params for ``spec`` from a Topaz state dict (strict: every key, every shape)."""
    import jax

    from cryoden.models import init_params

    want = flatten(jax.eval_shape(lambda: init_params(spec, jax.random.key(0))))
    by_torch = {_torch_key(k): k for k in want}
    missing = [k for k in by_torch if k not in sd]
    extra = [k for k in sd if k not in by_torch]
    if missing or extra:
        what = [f"missing key {k}" for k in missing[:3]] + [
            f"unexpected key {k}" for k in extra[:3]
        ]
        n = len(missing) + len(extra)
        more = f" (+{n - len(what)} more)" if n > len(what) else ""
        raise ConvertError(f"{where}: {', '.join(what)}{more} for {describe(spec)}")
    flat = {}
    for tk, fk in by_torch.items():
        v = np.asarray(sd[tk])
        if not np.issubdtype(v.dtype, np.floating):
            raise ConvertError(f"{where}: {tk} has dtype {v.dtype}, expected floating point")
        if not np.isfinite(v).all():
            raise ConvertError(f"{where}: {tk} holds NaN or Inf values; refusing these weights")
        if v.ndim > 1:  # (O, I, *k) -> (*k, I, O)
            v = v.transpose(*range(2, v.ndim), 1, 0)
        if v.shape != want[fk].shape:
            expected = want[fk].shape
            if len(expected) > 1:
                expected = (expected[-1], expected[-2], *expected[:-2])
            raise ConvertError(
                f"{where}: {tk} has shape {tuple(sd[tk].shape)}, expected "
                f"{tuple(expected)} for {describe(spec)}"
            )
        flat[fk] = np.ascontiguousarray(v, dtype=np.float32)
    params = unflatten(flat)
    check_params(params, spec, where=where)
    return params


def convert(
    src: str | os.PathLike, dest: str | os.PathLike | None = None
) -> tuple[dict, ModelSpec]:
    """Topaz/PyTorch weights file ``src`` -> ``(params, spec)``; also written to ``dest`` if given.

    The written file records ``source_file`` (the source's name) and ``source_sha256``. ``dest``
    is checked before ``src`` is read: it may not be ``src`` (also through a symlink or hard
    link), a directory, or an existing file other than a cryoden weights file (WeightsError).
    """
    where = str(src)
    if dest is not None:
        check_destination(dest, inputs=[src])
    sd = strip_wrappers(torchpickle.load_state_dict(src))
    spec = infer_spec(sd, where)
    params = to_params(sd, spec, where)
    if dest is not None:
        from cryoden import __version__

        save(
            dest,
            params,
            spec,
            inputs=[src],
            source_file=Path(src).name,
            source_sha256=sha256_file(src),
            converter="cryoden.convert",
            cryoden_version=__version__,
        )
    return params, spec


# ----------------------------------------------------------------------------- command line

DESCRIPTION = """\
Convert Topaz-Denoise / PyTorch weights into a cryoden weights file (.npz).

The source may be a state dict or a whole pickled model (what `topaz denoise --save-prefix`
writes), in torch's zip or legacy format. It is read without torch and without running any code
stored in it; the architecture (unet, unet-small, fcnn, affine; 2D or 3D; kernel widths) is
inferred from its keys and shapes and checked strictly. Weights with NaN or Inf are refused.

Conversion is optional: --model and --init also read .sav/.pt files directly.

examples:
  cryoden convert unet_L2_v0.2.2.sav -o unet.npz
  cryoden convert snapshot_epoch100.sav -o my_model.npz
"""

EPILOG = """\
exit status: 0 written; 1 the source cannot be converted or the output cannot be written
(one error line, nothing written; the source is never modified); 2 bad command-line usage.
"""


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "src",
        metavar="SRC",
        help="Topaz/PyTorch weights file: a state dict or a whole pickled model "
        "(.sav/.pt, zip or legacy torch format); never modified",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT.npz",
        help="cryoden weights file to write (written atomically; may not be the source, a "
        "folder, or an existing file other than a cryoden weights file)",
    )
    return parser


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point: 0 when written; on any failure one ``error:`` line on stderr and status 1."""
    if not isinstance(args, argparse.Namespace):
        args = add_args(argparse.ArgumentParser(prog="cryoden convert")).parse_args(args)
    try:
        params, spec = convert(args.src, args.output)
    except (WeightsError, torchpickle.TorchPickleError) as e:
        print(f"cryoden convert: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the output directory: missing permission, full disk, read-only
        msg = f"{args.output}: cannot write ({e.strerror or e})"
        print(f"cryoden convert: error: {msg}", file=sys.stderr)
        return 1
    n = sum(v.size for v in flatten(params).values())
    print(f"wrote {args.output}: {describe(spec)}, {n:,} parameters, from {args.src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
