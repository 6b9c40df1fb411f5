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


def new_mrc(path, data, ispg=None, voxel_size=None, origin=None, ext=None, exttyp=b""):
    """Write ``data`` as an MRC file with the given header fields; returns ``path``."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        if ispg is not None:
            m.header.ispg = ispg
        if voxel_size is not None:
            m.voxel_size = voxel_size
        if origin is not None:
            m.header.origin = origin
        if ext is not None:
            m.set_extended_header(np.frombuffer(ext, "V1"))
            m.header.exttyp = exttyp
    return Path(path)
