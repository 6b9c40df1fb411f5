"""Regenerate weights/<name>.npz and weights/MANIFEST.json from an installed topaz-em.

    pip install --no-deps topaz-em==0.3.20
    python scripts/convert_pretrained.py            # writes into weights/ of this checkout
    python scripts/convert_pretrained.py --check    # also cross-checks every tensor with torch.load

Topaz's ``.sav`` files are read with :mod:`cryoden.torchpickle` (no torch needed, no pickled code
run). The output is deterministic: running it twice gives byte-identical files and manifest.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

from cryoden import atomic, torchpickle
from cryoden.convert import convert
from cryoden.weights import sha256_file

# (name, aliases, Topaz file): Topaz's model_name_dict, one entry per weights file
MODELS = [
    ("unet", [], "unet_L2_v0.2.2.sav"),
    ("unet-small", [], "unet_small_L1_v0.2.2.sav"),
    ("fcnn", [], "fcnn_L1_v0.2.2.sav"),
    ("affine", [], "affine_L1_v0.2.2.sav"),
    ("unet-v0.2.1", [], "unet_L2_v0.2.1.sav"),
    ("unet-3d-10a", ["unet-3d"], "unet-3d-10a-v0.2.4.sav"),
    ("unet-3d-20a", [], "unet-3d-20a-v0.2.4.sav"),
]
REPO = Path(__file__).resolve().parent.parent


def topaz_pretrained_dir() -> Path:
    """``<site-packages>/topaz/pretrained/denoise`` of the installed topaz-em (not imported)."""
    spec = importlib.util.find_spec("topaz")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("topaz-em is not installed: pip install --no-deps topaz-em==0.3.20")
    return Path(next(iter(spec.submodule_search_locations))) / "pretrained" / "denoise"


def torch_check(path: Path) -> None:
    """Our reader's state dict equals ``torch.load(path, weights_only=True)`` exactly."""
    import torch

    ref = torch.load(path, weights_only=True)
    ours = torchpickle.load_state_dict(path)
    assert list(ours) == list(ref), f"{path}: keys differ"
    for k, v in ref.items():
        assert np.array_equal(ours[k], v.numpy()) and ours[k].dtype == v.numpy().dtype, k


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "weights", help="output directory")
    parser.add_argument("--check", action="store_true", help="cross-check with torch.load")
    args = parser.parse_args(argv)
    src_dir = topaz_pretrained_dir()
    entries = []
    for name, aliases, sav in MODELS:
        src = src_dir / sav
        if args.check:
            torch_check(src)
        dest = args.out / f"{name}.npz"
        _, spec = convert(src, dest)
        entries.append(
            {
                "name": name,
                "aliases": aliases,
                "spec": spec.to_dict(),
                "file": dest.name,
                "sha256": sha256_file(dest),
                "source_file": sav,
                "source_sha256": sha256_file(src),
            }
        )
        print(f"{name:12s} {spec} {dest.stat().st_size / 2**20:6.2f} MiB  <- {sav}")
    text = json.dumps({"models": entries}, indent=2) + "\n"
    atomic.write_text(args.out / "MANIFEST.json", text)
    print(f"wrote {args.out / 'MANIFEST.json'}")


if __name__ == "__main__":
    main()
