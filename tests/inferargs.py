"""The tiny model and the in-process `cryoden infer` call that the infer-level tests share.

Not a test module (no ``test_`` prefix); imported by test_infer_safety, test_watch and
test_pictures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from test_cli import random_model

from cryoden import infer
from cryoden.models import ModelSpec


def affine_model(folder: Path) -> Path:
    """A tiny random-weight 2D model (3x3 affine filter) saved as ``folder/2d.npz``."""
    return random_model(Path(folder) / "2d.npz", ModelSpec("affine", 2, 3, 5))


def run_infer(*argv) -> int:
    """``cryoden infer ARGV...`` in this process (arguments as str); -> its exit status."""
    parser = argparse.ArgumentParser()
    infer.add_args(parser)
    return infer.main(parser.parse_args([str(a) for a in argv]))
