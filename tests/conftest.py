"""Shared test fixtures: real sample data shipped in examples/ and a synthetic volume."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def micrograph() -> np.ndarray:
    """Real K2 micrograph crop, (1024, 1024) float32 (counts, mean ~3500, std ~600)."""
    with mrcfile.open(EXAMPLES / "k2_micrograph_crop.mrc", permissive=True) as m:
        return np.asarray(m.data, dtype=np.float32)


def blob_volume(shape, seed=0) -> np.ndarray:
    """Smooth random blobs plus Gaussian noise: (D, H, W) float32, std ~1.5."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    clean = np.zeros(shape, np.float32)
    for _ in range(12):
        c = rng.uniform(0, shape)
        r = rng.uniform(3, 8)
        clean += np.exp(-0.5 * np.sum((grid - c) ** 2, -1) / r**2).astype(np.float32)
    return clean + rng.normal(0, 1.5, shape).astype(np.float32)
