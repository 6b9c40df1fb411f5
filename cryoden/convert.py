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
from cryoden.weights import WeightsError, check_params, flatten, save, sha256_file, unflatten

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

    The written file records ``source_file`` (the source's name) and ``source_sha256``.
    """
    where = str(src)
    sd = strip_wrappers(torchpickle.load_state_dict(src))
    spec = infer_spec(sd, where)
    params = to_params(sd, spec, where)
    if dest is not None:
        from cryoden import __version__

        save(
            dest,
            params,
            spec,
            source_file=Path(src).name,
            source_sha256=sha256_file(src),
            converter="cryoden.convert",
            cryoden_version=__version__,
        )
    return params, spec


# ----------------------------------------------------------------------------- command line


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "src",
        help="Topaz/PyTorch weights: a state dict or a whole pickled model "
        "(.sav/.pt, zip or legacy torch format)",
    )
    parser.add_argument(
        "-o", "--output", required=True, help="cryoden weights file to write (.npz)"
    )
    return parser


def main(args: argparse.Namespace | Sequence[str] | None = None) -> None:
    """Entry point; on a bad source prints one ``error:`` line and exits with status 1."""
    if not isinstance(args, argparse.Namespace):
        parser = add_args(
            argparse.ArgumentParser(
                prog="cryoden convert",
                description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
        args = parser.parse_args(args)
    try:
        params, spec = convert(args.src, args.output)
    except (WeightsError, torchpickle.TorchPickleError, OSError) as e:
        sys.exit(f"cryoden convert: error: {e}")
    n = sum(v.size for v in flatten(params).values())
    print(f"wrote {args.output}: {describe(spec)}, {n:,} parameters, from {args.src}")


if __name__ == "__main__":
    main()
