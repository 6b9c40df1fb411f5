"""cryoden.io against hostile or odd files: lying headers, decompression bombs, FIFOs and devices,
complex and empty data, and header statistics of extreme values."""

import json
import os
import re
import struct
import subprocess
import sys
import warnings
import zlib

import mrcfile
import numpy as np
import pytest
import tifffile
from conftest import ROOT, new_mrc
from PIL import Image as PILImage

from cryoden import io

rng = np.random.default_rng(0)
LE_HEADER = mrcfile.dtypes.HEADER_DTYPE.newbyteorder("<")


def mrc_bytes(nx, ny, nz, mode=2, nsymbt=0, ispg=0, mz=None, payload=b"", **fields) -> bytes:
    """A little-endian MRC header with the given (possibly lying) fields, then ``payload``."""
    h = np.zeros((), LE_HEADER)
    h["map"], h["machst"] = b"MAP ", [0x44, 0x44, 0, 0]
    h["nx"], h["ny"], h["nz"], h["mode"], h["nsymbt"], h["ispg"] = nx, ny, nz, mode, nsymbt, ispg
    h["mx"], h["my"], h["mz"] = nx, ny, nz if mz is None else mz
    for name, value in fields.items():
        h[name] = value
    return h.tobytes() + payload


def deflate_zeros(n: int, unit: int = 1 << 20) -> bytes:
    """A zlib stream of ``n`` zero bytes, built from one compressed unit repeated (fast)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(unit)) + c.flush(zlib.Z_FULL_FLUSH)  # history reset after each
    rest = c.compress(bytes(n % unit)) + c.flush(zlib.Z_FULL_FLUSH)
    adler = ((n % 65521) << 16) | 1  # Adler-32 of n zero bytes
    return b"\x78\xda" + block * (n // unit) + rest + c.flush() + adler.to_bytes(4, "big")


def tiff_bytes(width, height, strip: bytes, compression=1, bits=32, sample_format=3) -> bytes:
    """A little-endian one-strip grayscale TIFF whose tags claim ``width`` x ``height``."""
    tags = [
        (256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, compression),
        (262, 3, 1), (273, 4, None), (277, 3, 1), (278, 4, height), (279, 4, len(strip)),
        (339, 3, sample_format),
    ]  # fmt: skip
    start = 8 + 2 + 12 * len(tags) + 4
    out = bytearray(b"II*\0" + struct.pack("<IH", 8, len(tags)))
    for tag, kind, value in tags:
        value = start if value is None else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, 1) + packed
    return bytes(out + struct.pack("<I", 0) + strip)


def png_bytes(width, height, colour=0, channels=1) -> bytes:
    """An all-zero 8-bit PNG (a decompression bomb when large), built without decoding."""

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    idat = deflate_zeros(height * (1 + width * channels))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- bounded memory

_PEAK_SCRIPT = """
import json, resource, sys
from cryoden import io
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = []
for p in sys.argv[1:]:
    before = peak()
    try:
        io.read(p)
        msg = "read without error"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
    out.append([p, msg, peak() - before])
print(json.dumps(out))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_lying_headers_and_bombs_fail_fast_in_bounded_memory(tmp_path):
    """Each file claims hundreds of MB to GB; each must be refused with peak growth < 100 MB."""
    cases = {
        "huge.mrc": (mrc_bytes(20000, 20000, 1), "file is truncated: header claims 1600001024"),
        "ext.mrc": (
            mrc_bytes(4, 4, 1, nsymbt=2**31 - 1, payload=bytes(64)),
            "file is truncated: header claims 2147484735 bytes .*file has 1088",
        ),
        "overflow.mrc": (
            mrc_bytes(2**31 - 1, 2**31 - 1, 2**31 - 1, payload=bytes(4096)),
            "file is truncated",
        ),
        "raw.tif": (tiff_bytes(20000, 20000, bytes(64)), "file is truncated: TIFF tags claim"),
        "zip.tif": (
            tiff_bytes(16384, 8192, deflate_zeros(16384 * 8192 * 4), compression=8),
            "TIFF of shape .* would decode to 512.0 MiB .*decompression bomb",
        ),
        "gray.png": (png_bytes(12000, 12000), "PNG of 12000x12000 pixels .*decompression bomb"),
        "rgba.png": (png_bytes(6000, 6000, 6, 4), "PNG of 6000x6000 pixels .*decompression bomb"),
    }
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    paths = [str(tmp_path / name) for name in cases]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, *paths],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    wrong = []  # growth of the peak during each read (a case under an earlier peak shows 0)
    for (path, msg, grown), (_, pattern) in zip(
        json.loads(run.stdout), cases.values(), strict=True
    ):
        one_line = msg.startswith(f"ValueError: {path}: ") and "\n" not in msg
        if grown > 100e6 or not one_line or not re.search(pattern, msg):
            wrong.append(f"{path}: peak memory grew by {grown / 1e6:.0f} MB ({msg})")
    assert not wrong, "\n".join(wrong)


# ----------------------------------------------------------------------------- MRC headers


@pytest.mark.parametrize(
    "fields, pattern",
    [
        (dict(nx=4, ny=4, nz=0), r"empty or invalid dimensions \(nx, ny, nz = 4, 4, 0\)"),
        (dict(nx=0, ny=4, nz=1), r"empty or invalid dimensions \(nx, ny, nz = 0, 4, 1\)"),
        (dict(nx=4, ny=-3, nz=1), r"empty or invalid dimensions"),
        (dict(nx=4, ny=4, nz=1, nsymbt=-100), r"invalid extended header size \(nsymbt = -100\)"),
        (dict(nx=4, ny=4, nz=2, ispg=401, mz=0), "invalid volume stack: nz = 2 .* mz = 0"),
        (dict(nx=4, ny=4, nz=5, ispg=401, mz=2), "invalid volume stack: nz = 5 .* mz = 2"),
        (dict(nx=4, ny=4, nz=1, mode=4), "unsupported MRC mode 4 .complex float32 data is not"),
        (dict(nx=4, ny=4, nz=1, mode=3), "unsupported MRC mode 3 .complex int16 data is not"),
        (dict(nx=4, ny=4, nz=1, mode=101), "unsupported MRC mode 101 .4-bit"),
        (dict(nx=4, ny=4, nz=1, nsymbt=1000), "file is truncated: header claims 2088 bytes"),
        (dict(nx=4, ny=4, nz=1, machst=[0, 0, 0, 0]), "Unrecognised machine stamp"),
    ],
)
def test_lying_mrc_headers_are_refused(tmp_path, fields, pattern):
    path = tmp_path / "bad.mrc"
    path.write_bytes(mrc_bytes(**fields, payload=bytes(1024)))
    with pytest.raises(ValueError, match=rf"^{path}: {pattern}") as e:
        io.read(path)
    assert "\n" not in str(e.value)


def test_mrc_layout_matches_mrcfile_and_trailing_bytes_are_ignored(tmp_path):
    data = rng.normal(size=(3, 5, 7)).astype(np.float32)
    path = new_mrc(tmp_path / "a.mrc", data, ext=bytes(200), exttyp=b"FEI1")
    lay = io.mrc_layout(path)
    assert (lay.shape, lay.dtype, lay.offset) == ((3, 5, 7), np.dtype("<f4"), 1224)
    assert lay.offset + lay.nbytes == path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"trailing junk")
    np.testing.assert_array_equal(io.read(path).data, data)


def test_mrc_layout_for_memory_mapped_readers(tmp_path):
    """What a memory-mapping reader (training halves) needs: the header checked, no data read,
    IMOD's unsigned bytes recognised, non-regular files refused before opening."""
    path = tmp_path / "imod.mrc"
    for flags, unsigned in ((0, True), (1, False)):
        raw = bytearray(mrc_bytes(3, 2, 1, mode=0, payload=bytes(6)))
        raw[152:160] = np.array([1146047817, flags], "<i4").tobytes()  # IMOD stamp and flags
        path.write_bytes(bytes(raw))
        assert io.mrc_layout(path).imod_unsigned is unsigned
    (tmp_path / "t.mrc").write_bytes(mrc_bytes(300, 200, 10))
    with pytest.raises(ValueError, match="^file is truncated: header claims 2401024 bytes"):
        io.mrc_layout(tmp_path / "t.mrc")
    os.mkfifo(tmp_path / "p.mrc")
    with pytest.raises(ValueError, match="^not a regular file but a FIFO"):
        io.mrc_layout(tmp_path / "p.mrc")  # would block in open() if it got that far


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.float32, np.uint16, np.float16])
def test_big_endian_mrc_reads_like_mrcfile(tmp_path, dtype):
    """A big-endian file (machine stamp 0x11 0x11) is read with native byte order and the same
    values, header fields and voxel size that mrcfile reports."""
    data = (rng.normal(size=(2, 6, 5)) * 30).astype(dtype)
    le = new_mrc(tmp_path / "le.mrc", data, voxel_size=(1.25, 1.5, 2.0), ext=bytes(range(96)))
    raw = le.read_bytes()
    h = np.frombuffer(raw[:1024], LE_HEADER).astype(LE_HEADER.newbyteorder(">"))
    h["machst"] = [0x11, 0x11, 0, 0]
    payload = raw[1024 : 1024 + 96] + data.astype(np.dtype(dtype).newbyteorder(">")).tobytes()
    be = tmp_path / "be.mrc"
    be.write_bytes(h.tobytes() + payload)
    with warnings.catch_warnings():  # numpy >= 2.5 deprecates setting an array's dtype
        warnings.simplefilter("error")
        img = io.read(be)
    assert img.data.dtype == np.dtype(dtype) and img.data.dtype.isnative
    np.testing.assert_array_equal(img.data, data)
    with mrcfile.open(be, permissive=False) as m:
        np.testing.assert_array_equal(m.data, img.data)
        assert img.voxel_size == tuple(float(v) for v in m.voxel_size.item())
        assert img.extended_header == m.extended_header.tobytes() == bytes(range(96))
        assert int(img.header.ispg) == int(m.header.ispg)


def test_zero_sampling_gives_unknown_voxel_size_not_nan(tmp_path):
    path = tmp_path / "a.mrc"
    path.write_bytes(mrc_bytes(4, 4, 2, mz=0, cella=(4.0, 4.0, 2.0), payload=bytes(128)))
    assert io.read(path).voxel_size == (1.0, 1.0, 0.0)


# ----------------------------------------------------------------------------- TIFF, PNG


def test_complex_and_empty_tiff_are_refused(tmp_path):
    c = (rng.normal(size=(6, 5)) + 1j * rng.normal(size=(6, 5))).astype(np.complex64)
    tifffile.imwrite(tmp_path / "c.tif", c)
    with pytest.raises(ValueError, match=r"c\.tif: complex data of type complex64 are not an"):
        io.read(tmp_path / "c.tif")
    (tmp_path / "e.tif").write_bytes(tiff_bytes(0, 4, b""))
    with pytest.raises(ValueError, match=r"e\.tif: "):
        io.read(tmp_path / "e.tif")


@pytest.mark.parametrize("compression", [5, 7, 50000])  # LZW, JPEG, zstd
def test_tiff_with_garbage_strip_or_missing_codec_is_a_one_line_error(tmp_path, compression):
    path = tmp_path / "c.tif"
    path.write_bytes(tiff_bytes(16, 16, bytes(range(100)), compression, bits=8, sample_format=1))
    with pytest.raises(ValueError, match=rf"^{path}: ") as e:
        io.read(path)
    assert "\n" not in str(e.value)


def test_compressed_tiff_decode_limit(tmp_path, monkeypatch):
    """Noisy compressed data passes however large it is; near-constant data far beyond the
    ratio is refused (the floor lowered so that a small file shows the rule)."""
    monkeypatch.setattr(io, "DECODE_FLOOR", 1000)
    noisy = rng.normal(size=(64, 64)).astype(np.float32)
    tifffile.imwrite(tmp_path / "n.tif", noisy, compression="zlib")
    np.testing.assert_array_equal(io.read(tmp_path / "n.tif").data, noisy)
    tifffile.imwrite(tmp_path / "z.tif", np.zeros((256, 256), np.float32), compression="zlib")
    with pytest.raises(ValueError, match=r"z\.tif: TIFF of shape \(256, 256\) would decode"):
        io.read(tmp_path / "z.tif")


def test_png_over_pils_own_limit_is_a_one_line_error(tmp_path, monkeypatch):
    PILImage.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 4096 > 2x: PIL refuses
    with pytest.raises(ValueError, match=r"a\.png: PNG too large to decode: .*4096 pixels"):
        io.read(tmp_path / "a.png")


def test_png_bomb_below_pils_limit_is_refused(tmp_path):
    (tmp_path / "b.png").write_bytes(png_bytes(9000, 9000))  # 81 Mpx: PIL only warns at 89
    with pytest.raises(ValueError, match=r"b\.png: PNG of 9000x9000 pixels would decode to 77"):
        io.read(tmp_path / "b.png")


# ----------------------------------------------------------------------------- non-regular files

_FIFO_SCRIPT = """
import sys
from cryoden import io
try:
    io.read(sys.argv[1])
except ValueError as e:
    print(e)
"""


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.mrc"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:  # the child would block for ever in open() if the FIFO were opened
        run = subprocess.run(
            [sys.executable, "-c", _FIFO_SCRIPT, str(fifo)],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("io.read blocked on a FIFO")
    assert run.stdout.strip() == f"{fifo}: not a regular file but a FIFO (named pipe)", run.stderr


def test_devices_and_directories_are_refused(tmp_path):
    (tmp_path / "zero.mrc").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"zero\.mrc: not a regular file but a character device"):
        io.read(tmp_path / "zero.mrc")
    (tmp_path / "dir.tif").mkdir()
    with pytest.raises(ValueError, match=r"dir\.tif: not a regular file but a directory$"):
        io.read(tmp_path / "dir.tif")


# ----------------------------------------------------------------------------- written statistics


@pytest.mark.parametrize(
    "data",
    [
        rng.normal(size=(2, 16, 16)).astype(np.float32) * 1e30 + 1e30,  # float32 rms overflows
        np.tile(np.float32([3e38, -3e38]), (4, 8, 4)),  # float32 mean: inf - inf = NaN
        rng.normal(size=(3, 9, 11)).astype(np.float32) + 5,
    ],
)
def test_written_mrc_statistics_are_finite_and_exact(tmp_path, data):
    io.write(tmp_path / "a.mrc", io.Image(data, "volume"))
    ref = data.astype(np.float64)
    with mrcfile.open(tmp_path / "a.mrc", permissive=False) as m:
        h = m.header
        stats = [float(h.dmin), float(h.dmax), float(h.dmean), float(h.rms)]
    assert np.all(np.isfinite(stats)), stats
    np.testing.assert_allclose(stats, [ref.min(), ref.max(), ref.mean(), ref.std()], rtol=1e-6)


def test_header_stats_chunks_agree_with_float64():
    data = rng.normal(size=(5, 13, 17)).astype(np.float32) * 100 + 3
    ref = data.astype(np.float64)
    np.testing.assert_allclose(
        io.header_stats(data, chunk=7), [ref.min(), ref.max(), ref.mean(), ref.std()], rtol=1e-12
    )


def test_empty_data_is_not_written(tmp_path):
    with pytest.raises(ValueError, match=r"e\.mrc: no data to write \(shape \(0, 4\)\)"):
        io.write(tmp_path / "e.mrc", io.Image(np.zeros((0, 4), np.float32), "2d"))
    assert list(tmp_path.iterdir()) == []
