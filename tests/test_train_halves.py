"""Training halves are memory-mapped from headers checked against the file (cryoden.train.pairs):
lying headers fail fast without allocating, FIFOs never block, IMOD's unsigned bytes stay
unsigned."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import new_mrc
from test_io_hardening import mrc_bytes

from cryoden.train import pairs


def test_lying_extended_header_fails_in_bounded_memory(tmp_path):
    path = tmp_path / "half.mrc"
    path.write_bytes(mrc_bytes(4, 4, 1, nsymbt=2**31 - 1, payload=bytes(64)))
    code = (
        "import resource, sys\n"
        "from cryoden.train import pairs\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    pairs.open_half(sys.argv[1])\nexcept ValueError as e:\n    print(e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    message, grown_kib = r.stdout.strip().splitlines()
    assert "truncated" in message and str(path) in message
    assert int(grown_kib) < 100 * 1024  # the old header read allocated nsymbt bytes (2 GB)


@pytest.mark.parametrize("suffix", [".mrc", ".npy"])
def test_fifo_half_is_refused_without_blocking(tmp_path, suffix):
    fifo = tmp_path / f"half{suffix}"
    os.mkfifo(fifo)
    code = "import sys\nfrom cryoden.train import pairs\npairs.open_half(sys.argv[1])\n"
    r = subprocess.run(
        [sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0 and "FIFO" in r.stderr.strip().splitlines()[-1]


def test_imod_unsigned_bytes_are_unsigned(tmp_path):
    data = np.arange(-128, 128, dtype=np.int8).reshape(16, 16)
    path = new_mrc(tmp_path / "imod.mrc", data)
    raw = bytearray(path.read_bytes())
    raw[152:160] = np.array([1146047817, 0], "<i4").tobytes()  # IMOD stamp, flags: unsigned
    path.write_bytes(bytes(raw))
    half = pairs.open_half(path)
    assert half.dtype == np.uint8
    np.testing.assert_array_equal(half, data.view(np.uint8))


def test_file_without_map_stamp_is_refused(tmp_path):
    path = new_mrc(tmp_path / "a.mrc", np.zeros((8, 8), np.float32))
    raw = bytearray(path.read_bytes())
    raw[208:212] = b"\0\0\0\0"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="MAP"):
        pairs.open_half(path)


def test_single_section_and_volume_shapes(tmp_path):
    img = new_mrc(tmp_path / "i.mrc", np.ones((6, 7), np.float32))
    vol = new_mrc(tmp_path / "v.mrc", np.ones((3, 6, 7), np.float32), ispg=1)
    assert pairs.open_half(img).shape == (6, 7)
    assert pairs.open_half(vol).shape == (3, 6, 7)
