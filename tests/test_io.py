"""cryoden.io: round trips, header preservation, kind detection, clear errors, atomic writes."""

import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
from conftest import new_mrc
from PIL import Image as PILImage

from cryoden import io

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
rng = np.random.default_rng(0)


# ----------------------------------------------------------------------------- MRC


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.float32, np.uint16, np.float16])
def test_mrc_modes_round_trip(tmp_path, dtype):
    data = (rng.normal(size=(12, 10)) * 20).astype(dtype)
    img = io.read(new_mrc(tmp_path / "a.mrc", data))
    assert img.kind == "2d" and img.data.dtype == dtype
    np.testing.assert_array_equal(img.data, data)
    io.write(tmp_path / "b.mrc", img)
    with mrcfile.open(tmp_path / "b.mrc", permissive=False) as m:
        assert m.header.mode == 2 and m.data.shape == (12, 10)
        np.testing.assert_array_equal(m.data, data.astype(np.float32))


def test_mrc_header_preserved_and_stats_recomputed(tmp_path):
    ext = bytes(range(256)) * 4
    src = new_mrc(
        tmp_path / "a.mrc",
        rng.normal(size=(3, 16, 20)).astype(np.float32),
        ispg=1,
        voxel_size=(1.5, 1.5, 2.5),
        origin=(10.0, -4.0, 3.0),
        ext=ext,
        exttyp=b"SERI",
    )
    with mrcfile.open(src, "r+") as m:
        m.header.nversion = 20140  # mrcfile writes 20141
    img = io.read(src)
    assert img.voxel_size == (1.5, 1.5, 2.5) and img.origin == (10.0, -4.0, 3.0)
    assert img.extended_header == ext and img.exttyp == b"SERI"
    img.data = img.data * 3 + 7
    io.write(tmp_path / "b.mrc", img, label="denoised by a test")
    with mrcfile.open(tmp_path / "b.mrc", permissive=False) as m:
        h, d = m.header, m.data
        assert tuple(m.voxel_size.item()) == (1.5, 1.5, 2.5)
        assert tuple(h.origin.item()) == (10.0, -4.0, 3.0)
        assert m.extended_header.tobytes() == ext and h.exttyp == b"SERI"
        assert int(h.ispg) == 1 and int(h.nversion) == 20140
        assert h.label[h.nlabl - 1].strip() == b"denoised by a test"
    # labels: the source's are kept, a new one appended, the oldest dropped when all 10 are used
    with mrcfile.open(src, "r+") as m:
        m.header.nlabl, m.header.label = 10, [f"label {i}" for i in range(10)]
    io.write(tmp_path / "c.mrc", io.read(src), label="d\u00e9noised")
    with mrcfile.open(tmp_path / "c.mrc") as m:
        assert m.header.nlabl == 10 and m.header.label[0] == b"label 1"
        assert m.header.label[9] == b"d?noised"
        np.testing.assert_allclose(
            [h.dmin, h.dmax, h.dmean, h.rms], [d.min(), d.max(), d.mean(), d.std()], rtol=1e-5
        )


def test_real_fei_micrograph_crop_keeps_extended_header(tmp_path):
    img = io.read(EXAMPLES / "k2_micrograph_crop.mrc")
    assert img.kind == "2d" and img.data.shape == (1024, 1024) and img.data.dtype == np.uint16
    assert img.exttyp == b"FEI1" and len(img.extended_header) == 786432
    img.data = img.data[:64, :64].astype(np.float32)
    io.write(tmp_path / "crop.mrc", img)
    out = io.read(tmp_path / "crop.mrc")
    assert out.extended_header == img.extended_header and out.exttyp == b"FEI1"
    assert out.voxel_size == pytest.approx(img.voxel_size)
    np.testing.assert_array_equal(out.data, img.data)


@pytest.mark.parametrize(
    "name, ispg, shape, kind",
    [
        ("a.mrc", 0, (3, 8, 9), "stack"),
        ("a.mrc", 1, (3, 8, 9), "volume"),
        ("a.mrcs", 1, (3, 8, 9), "stack"),
        ("a.st", 1, (3, 8, 9), "stack"),
        ("a.rec", 0, (3, 8, 9), "volume"),
        ("a.map", 0, (3, 8, 9), "volume"),
        ("a.mrcs", 0, (1, 8, 9), "2d"),
        ("a.mrc", 1, (8, 9), "2d"),
    ],
)
def test_mrc_kind_detection(tmp_path, name, ispg, shape, kind):
    data = rng.normal(size=shape).astype(np.float32)
    img = io.read(new_mrc(tmp_path / name, data, ispg=ispg))
    assert img.kind == kind
    assert img.data.shape == (shape[-2:] if kind == "2d" else shape)
    io.write(tmp_path / ("out" + Path(name).suffix), img)
    with mrcfile.open(tmp_path / ("out" + Path(name).suffix)) as m:
        assert m.data.shape == img.data.shape
        assert int(m.header.ispg) == (1 if kind == "volume" else 0)


def test_kind_override(tmp_path):
    src = new_mrc(tmp_path / "a.mrc", rng.normal(size=(3, 8, 9)).astype(np.float32), ispg=0)
    assert io.read(src).kind == "stack"
    assert io.read(src, kind="volume").kind == "volume"
    flat = new_mrc(tmp_path / "b.mrc", rng.normal(size=(8, 9)).astype(np.float32))
    assert io.read(flat, kind="stack").data.shape == (1, 8, 9)
    with pytest.raises(ValueError, match=r"a\.mrc: kind '2d' does not fit"):
        io.read(src, kind="2d")
    with pytest.raises(ValueError, match="unknown kind"):
        io.read(src, kind="3d")


def test_imod_unsigned_bytes(tmp_path):
    data = np.array([[0, 100], [-56, -1]], np.int8)  # as unsigned: 0 100 200 255
    path = new_mrc(tmp_path / "a.mrc", data)
    raw = bytearray(path.read_bytes())
    raw[152:160] = np.array([1146047817, 0], "<i4").tobytes()  # IMOD stamp, flags: unsigned
    path.write_bytes(bytes(raw))
    np.testing.assert_array_equal(io.read(path).data, [[0, 100], [200, 255]])


# ----------------------------------------------------------------------------- TIFF, PNG


def test_tiff_kinds_and_round_trip(tmp_path):
    d2 = rng.normal(size=(8, 9)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", d2)
    assert io.read(tmp_path / "a.tif").kind == "2d"
    with tifffile.TiffWriter(tmp_path / "pages.tif") as w:  # plain multi-page: a stack
        for _ in range(3):
            w.write(d2, photometric="minisblack")
    assert io.read(tmp_path / "pages.tif").kind == "stack"
    vol = rng.normal(size=(4, 8, 9)).astype(np.float32)
    tifffile.imwrite(
        tmp_path / "v.tif",
        vol,
        imagej=True,
        resolution=(1 / 1.25, 1 / 1.25),
        metadata={"axes": "ZYX", "unit": "nm", "spacing": 2.0},
    )
    img = io.read(tmp_path / "v.tif")
    assert img.kind == "volume" and img.voxel_size == pytest.approx((12.5, 12.5, 20.0))
    for kind in ("volume", "stack"):
        img.kind = kind
        io.write(tmp_path / "o.tiff", img)
        out = io.read(tmp_path / "o.tiff")
        assert out.kind == kind and out.data.dtype == np.float32
        assert out.voxel_size == pytest.approx((12.5, 12.5, 20.0 if kind == "volume" else 0))
        np.testing.assert_array_equal(out.data, vol)


def test_real_imagej_tomogram():
    img = io.read(EXAMPLES / "cylindra_13pf_MT.tif")
    assert img.kind == "volume" and img.data.shape == (36, 206, 94)
    assert img.voxel_size == pytest.approx((10.52, 10.52, 10.52), rel=1e-6)


def test_png_read_modes(tmp_path):
    gray = rng.integers(0, 256, size=(6, 7)).astype(np.uint8)
    PILImage.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(io.read(tmp_path / "g.png").data, gray)
    g16 = rng.integers(0, 65536, size=(6, 7)).astype(np.uint16)
    PILImage.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(io.read(tmp_path / "g16.png").data, g16)
    rgb = rng.integers(0, 256, size=(6, 7, 3)).astype(np.uint8)
    PILImage.fromarray(rgb).save(tmp_path / "c.png")
    lum = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(io.read(tmp_path / "c.png").data, lum, rtol=1e-6)


def test_png_write_scaling(tmp_path):
    x = rng.normal(size=(64, 64)) * 5 + 100
    x[0, 0], x[0, 1] = x.mean() + 10 * x.std(), x.mean() - 10 * x.std()  # clipped
    io.write(tmp_path / "a.png", io.Image(x, "2d"))
    q = np.asarray(PILImage.open(tmp_path / "a.png"))
    assert q.dtype == np.uint8 and q.shape == (64, 64)
    z = (x - x.mean()) / x.std()
    np.testing.assert_array_equal(q, np.clip(np.round((z + 3) * 255 / 6), 0, 255))
    assert q[0, 0] == 255 and q[0, 1] == 0
    with pytest.raises(ValueError, match="PNG output holds one 2D image"):
        io.write(tmp_path / "s.png", io.Image(np.zeros((2, 4, 4)), "stack"))
    assert not (tmp_path / "s.png").exists()


# ----------------------------------------------------------------------------- errors


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path):
    good = new_mrc(tmp_path / "good.mrc", rng.normal(size=(4, 16, 16)).astype(np.float32))
    raw = good.read_bytes()
    cases = {
        "truncated.mrc": (raw[:-100], "file is truncated: header claims 5120 bytes"),
        "garbage.mrc": (os.urandom(3000), "not an MRC file"),
        "empty.mrc": (b"", "enough bytes for MRC header"),
        "png.mrc": ((tmp_path / "x.png", None), "file content is PNG, but the extension says MRC"),
        "mrc.tif": (raw, "file content is MRC, but the extension says TIFF"),
        "mrc.png": (raw, "file content is MRC, but the extension says PNG"),
        "garbage.tif": (os.urandom(3000), ""),
        "image.jpg": (raw, "unsupported extension '.jpg'"),
    }
    PILImage.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.png")
    complex_mode = bytearray(raw)
    complex_mode[12:16] = np.int32(4).tobytes()
    cases["complex.mrc"] = (bytes(complex_mode), "unsupported MRC mode 4")
    for name, (content, pattern) in cases.items():
        path = tmp_path / name
        path.write_bytes(content[0].read_bytes() if isinstance(content, tuple) else content)
        with pytest.raises(ValueError, match=rf"^{path}: .*{pattern}") as e:
            io.read(path)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'missing.mrc'}: No such file"):
        io.read(tmp_path / "missing.mrc")


def test_volume_stack_rejected(tmp_path):
    path = new_mrc(tmp_path / "vs.mrc", np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="volume stacks"):
        io.read(path)


# ----------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("name, writer", [("a.mrc", "_write_mrc"), ("a.tif", "_write_tiff")])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, name, writer):
    target = tmp_path / name
    img = io.Image(np.ones((8, 8), np.float32), "2d")

    def half_then_fail(tmp, *args):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(io, writer, half_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        io.write(target, img)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"previous")  # an existing output survives a failed overwrite
    with pytest.raises(RuntimeError):
        io.write(target, img)
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"previous"


def test_write_into_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"nope/a\.mrc: cannot write: No such file"):
        io.write(tmp_path / "nope" / "a.mrc", io.Image(np.ones((4, 4)), "2d"))


def test_written_file_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        io.write(tmp_path / "a.mrc", io.Image(np.ones((4, 4), np.float32), "2d"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.mrc").stat().st_mode & 0o777 == 0o644
