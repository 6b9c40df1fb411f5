"""Command-line arguments of the small `cryoden train` runs that the training tests start.

Not a test module (no ``test_`` prefix); imported by test_train_failures and test_train_inputs.
"""

from __future__ import annotations

from pathlib import Path


def affine_args(
    even: Path, odd: Path, out: Path, *more: str, steps: int | None = None
) -> list[str]:
    """``cryoden train`` arguments: an affine model, preset train-2d-test, 32x32 crops, quiet;
    ``steps`` (if given) and then ``more`` follow, so ``more`` can override any of them."""
    args = ["--even", str(even), "--odd", str(odd), "--out", str(out)]
    args += ["--config", "train-2d-test", "--arch", "affine", "--crop", "32"]
    if steps is not None:
        args += ["--steps", str(steps)]
    return [*args, "-q", *more]
