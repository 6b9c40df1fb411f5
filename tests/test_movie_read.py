"""Reading movies (cryoden.movie) and gain/defect handling (cryoden.gain): every format and
dtype round-trips, EER decoding matches an independent encoder, gain orientation follows
RELION, defects are filled, bad files give one-line errors, memory stays near one frame."""

from __future__ import annotations

import os
import threading
import tracemalloc

import mrcfile
import numpy as np
import pytest
import tifffile
from conftest import new_mrc
from eer_encode import random_events, render, write_eer

from cryoden import gain as gainmod
from cryoden.movie import MovieError, is_movie, open_movie

RNG = np.random.default_rng(7)


def _stack(dtype, shape=(5, 12, 20)):
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    lo, hi = (info.min, info.max) if info else (-50, 50)
    return RNG.integers(lo, hi, shape, endpoint=True).astype(dtype)


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.float32, np.uint16, np.float16])
def test_mrc_round_trip(tmp_path, dtype):
    a = _stack(dtype)
    path = new_mrc(tmp_path / "m.mrcs", a, voxel_size=1.25)
    assert is_movie(path)
    with open_movie(path) as m:
        info = m.info
        assert (info.format, info.n_frames, info.shape) == ("mrc", 5, (12, 20))
        assert info.stored_dtype == np.dtype(dtype) and info.stored_bytes == a.nbytes
        assert info.pixel_size == 1.25 and info.raw_frames_per_frame == 1
        for i in range(len(m)):
            raw, frame = m.raw(i), m.frame(i)
            assert raw.dtype == np.dtype(dtype) and np.array_equal(raw, a[i])
            assert frame.dtype == np.float32 and np.array_equal(frame, a[i].astype(np.float32))


def test_mrc_imod_unsigned_bytes_and_big_endian(tmp_path):
    """Mode 0 with IMOD's stamp and flag bit 0 clear holds uint8 (as io.read); a big-endian
    file reads the same values."""
    a = RNG.integers(0, 255, (3, 8, 10), endpoint=True).astype(np.uint8)
    path = new_mrc(tmp_path / "u8.mrc", a.view(np.int8), ispg=0)
    raw = bytearray(path.read_bytes())
    raw[152:160] = np.array([1146047817, 0], "<i4").tobytes()
    path.write_bytes(bytes(raw))
    with open_movie(path) as m:
        assert m.info.stored_dtype == np.uint8 and np.array_equal(m.raw(2), a[2])
    b = _stack(np.int16, (3, 8, 10))
    big = tmp_path / "big.mrcs"
    with mrcfile.new(big) as f:
        f.set_data(b.astype(">i2"))
    with open_movie(big) as m:
        assert m.info.stored_dtype == np.int16 and np.array_equal(m.raw(1), b[1])


@pytest.mark.parametrize("compression", [None, "lzw", "deflate"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_tiff_round_trip_flipped(tmp_path, compression, dtype):
    """Pages are frames, flipped upside down as RELION/IMOD/MotionCor2 read TIFF."""
    a = _stack(dtype)
    path = tmp_path / "m.tif"
    tifffile.imwrite(path, a, photometric="minisblack", compression=compression)
    assert is_movie(path)
    with open_movie(path) as m:
        assert (m.info.format, m.info.n_frames, m.info.shape) == ("tiff", 5, (12, 20))
        assert m.info.stored_dtype == dtype and m.info.pixel_size is None
        for i in range(5):
            assert np.array_equal(m.raw(i), a[i][::-1])
            assert np.array_equal(m.frame(i), a[i][::-1].astype(np.float32))


def test_tiff_pages_written_one_by_one_and_pixel_size(tmp_path):
    a = _stack(np.uint16, (3, 8, 6))
    path = tmp_path / "pages.tiff"
    with tifffile.TiffWriter(path) as tif:
        for page in a:
            tif.write(page, compression="lzw", photometric="minisblack")
    with open_movie(path, first=1) as m:
        assert len(m) == 2 and np.array_equal(m.raw(1), a[2][::-1])
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(ij, a, imagej=True, resolution=(10 / 1.5, 10 / 1.5), metadata={"unit": "nm"})
    with open_movie(ij) as m:
        assert m.info.pixel_size == pytest.approx(1.5)


@pytest.mark.parametrize(
    "compression, bits", [(65001, 2), (65000, 2), (65002, 1)], ids=["7bit", "8bit", "var1bit"]
)
def test_eer_decodes_encoded_events(tmp_path, compression, bits):
    """An EER file from tests/eer_encode.py decodes to the encoded events at upsampling 1 (one
    count per physical pixel) and 2 (RELION's render4K_to_8K sub-pixel positions)."""
    shape = (16, 24)
    frames = [random_events(RNG, shape, 60, bits) for _ in range(3)]
    path = tmp_path / "m.eer"
    write_eer(path, frames, shape, compression, bits=(7, bits, bits))
    assert is_movie(path)
    for up in (1, 2):
        with open_movie(path, eer_upsampling=up) as m:
            assert m.info.shape == (16 * up, 24 * up) and m.info.n_frames == 3
            for i in range(3):
                raw = m.raw(i)
                assert raw.sum() == 60
                assert np.array_equal(raw, render(frames[i : i + 1], shape, up, bits))
    # a hand-made case: events at sub-pixel corners land on the expected 2x grid pixels
    one = [[(3, 2, 0, 0), (4, 2, 3, 0), (5, 7, 0, 3), (0, 0, 2, 2)]]
    write_eer(path, one, shape, 65001)
    with open_movie(path, eer_upsampling=2) as m:
        got = sorted(zip(*np.nonzero(m.raw(0)), strict=True))
    assert [tuple(map(int, p)) for p in got] == [(1, 1), (4, 6), (4, 9), (15, 10)]


def test_eer_grouping_drops_leftover_frames(tmp_path):
    """Grouping sums raw frames [i*g, (i+1)*g); the last len % g raw frames are dropped."""
    shape = (16, 16)
    frames = [random_events(RNG, shape, 100) for _ in range(11)]
    path = tmp_path / "m.eer"
    write_eer(path, frames, shape)
    for up in (1, 2):
        with open_movie(path, eer_grouping=4, eer_upsampling=up, first=1) as m:
            assert m.info.n_frames == 1 and m.info.raw_frames_per_frame == 4
            assert m.info.stored_dtype == np.uint8
            assert np.array_equal(m.raw(0), render(frames[4:8], shape, up))
    with pytest.raises(MovieError, match="grouping 300 exceeds the 11 raw frames"):
        open_movie(path, eer_grouping=300)


def test_frame_selection(tmp_path):
    a = _stack(np.int16, (6, 4, 4))
    path = new_mrc(tmp_path / "m.mrcs", a)
    with open_movie(path, first=2, last=5) as m:
        assert len(m) == 3 and np.array_equal(m.raw(0), a[2]) and np.array_equal(m.raw(2), a[4])
        with pytest.raises(IndexError):
            m.raw(3)
    for first, last in [(5, 5), (-1, None), (0, 7)]:
        with pytest.raises(MovieError, match=f"^{path}: frame selection"):
            open_movie(path, first=first, last=last)


# ----------------------------------------------------------------------------- gain


def _relion_rotate90(src):
    """RELION ImageOp::rotate90: dest(x, ydim - 1 - y) = src(y, x)."""
    ny, nx = src.shape
    dest = np.empty((nx, ny), src.dtype)
    for y in range(ny):
        for x in range(nx):
            dest[x, ny - 1 - y] = src[y, x]
    return dest


def _relion_orient(src, rot, flip):
    """RELION's prepareGainReference: rotate90 ``rot`` times, then flipY (1) / flipX (2)."""
    for _ in range(rot):
        src = _relion_rotate90(src)
    ny, nx = src.shape
    if flip == 1:
        src = np.array([[src[ny - 1 - y, x] for x in range(nx)] for y in range(ny)])
    elif flip == 2:
        src = np.array([[src[y, nx - 1 - x] for x in range(nx)] for y in range(ny)])
    return src


@pytest.mark.parametrize("rot", [0, 1, 2, 3])
@pytest.mark.parametrize("flip", [0, 1, 2])
def test_gain_rotation_and_flip_follow_relion(tmp_path, rot, flip):
    h, w = 6, 10
    stored = RNG.uniform(0.5, 2.0, (h, w) if rot % 2 == 0 else (w, h)).astype(np.float32)
    expected = _relion_orient(stored, rot, flip)
    assert expected.shape == (h, w)
    a = _stack(np.uint16, (2, h, w))
    movie = new_mrc(tmp_path / "m.mrcs", a)
    gain = new_mrc(tmp_path / "gain.mrc", stored)
    with open_movie(movie, gain=gain, gain_rot=rot, gain_flip=flip) as m:
        np.testing.assert_allclose(m.frame(1), a[1] * expected, rtol=1e-6)
    # a TIFF gain is read upside down (as RELION reads TIFF): store it flipped to match
    tiff_gain = tmp_path / "gain.tif"
    tifffile.imwrite(tiff_gain, stored[::-1])
    np.testing.assert_array_equal(gainmod.load_gain(tiff_gain, (h, w), rot, flip), expected)


def test_gain_wrong_shape_is_one_line_error(tmp_path):
    movie = new_mrc(tmp_path / "m.mrcs", _stack(np.uint16, (2, 6, 10)))
    gain = new_mrc(tmp_path / "gain.mrc", np.ones((10, 6), np.float32))
    with pytest.raises(MovieError) as e:
        open_movie(movie, gain=gain)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{movie}: ") and str(gain) in msg
    assert "10x6 (H x W)" in msg and "6x10 (H x W)" in msg and "rotation" in msg
    with open_movie(movie, gain=gain, gain_rot=1) as m:  # rotated, it fits
        assert m.frame(0).shape == (6, 10)
    for bad in ({"gain_rot": 4}, {"gain_flip": 3}):
        with pytest.raises(MovieError, match="must be"):
            open_movie(movie, gain=gain, **bad)
    with pytest.raises(MovieError, match="without a gain reference"):
        open_movie(movie, gain_rot=1)
    with pytest.raises(MovieError, match="gain array is 10x6"):
        open_movie(movie, gain=np.ones((10, 6), np.float32))


def test_eer_gain_as_relion(tmp_path):
    """RELION's loadEERGain: a non-.gain gain is inverted (mean / gain); EPU's .gain (TIFF, file
    order) is multiplied as is; a detector-size gain is repeated for upsampling 2, a 2x gain
    summed over 2x2 for upsampling 1; zero gain pixels are defects."""
    shape = (8, 12)
    frames = [random_events(RNG, shape, 50) for _ in range(2)]
    path = tmp_path / "m.eer"
    write_eer(path, frames, shape)
    g = RNG.uniform(0.5, 2.0, shape).astype(np.float32)
    mrc_gain = new_mrc(tmp_path / "g.mrc", g)
    inv = np.float32(g.mean(dtype=np.float64)) / g
    with open_movie(path, gain=mrc_gain, eer_upsampling=2) as m:
        want = render(frames[:1], shape, 2) * np.repeat(np.repeat(inv, 2, 0), 2, 1)
        np.testing.assert_allclose(m.frame(0), want, rtol=1e-5)
    epu = tmp_path / "g.gain"
    tifffile.imwrite(epu, g)
    with open_movie(path, gain=epu) as m:
        np.testing.assert_allclose(m.frame(1), render(frames[1:], shape) * g, rtol=1e-6)
    big = RNG.uniform(0.5, 2.0, (16, 24)).astype(np.float32)
    big[3, 5] = big[2, 4] = big[3, 4] = big[2, 5] = 0  # detector pixel (1, 2) dead
    summed = big.reshape(8, 2, 12, 2).sum((1, 3))
    got = gainmod.load_gain(new_mrc(tmp_path / "big.mrc", big), shape, eer_upsampling=1)
    live = summed != 0
    np.testing.assert_allclose(got[live], summed.mean() / summed[live], rtol=1e-5)
    assert got[1, 2] == 0
    with open_movie(path, gain=tmp_path / "big.mrc") as m:
        f = m.frame(0)
        nb = [f[y, x] for y in (0, 1, 2) for x in (1, 2, 3) if (y, x) != (1, 2)]
        assert f[1, 2] == pytest.approx(np.mean(nb), rel=1e-6)


# ----------------------------------------------------------------------------- defects


def test_defects_text_boxes_and_image(tmp_path):
    """Defect pixels become the mean of their good 8-neighbours (a wide defect: layer by
    layer from the outside in)."""
    h, w = 12, 16
    a = RNG.uniform(0, 100, (2, h, w)).astype(np.float32)
    movie = new_mrc(tmp_path / "m.mrcs", a)
    boxes = tmp_path / "defects.txt"
    boxes.write_text("# x y w h\n5 3 1 1\n\n10 0 3 20  # a column, clipped\n")
    with open_movie(movie, defects=boxes, gain=np.full((h, w), 2, np.float32)) as m:
        f = m.frame(1) / 2
        # frames cached raw elsewhere are corrected the same way
        assert np.array_equal(gainmod.correct(m.raw(1), m.gain, m.fill), m.frame(1))
        assert m.defects.sum() == 1 + 3 * h
    ref = a[1]
    assert f[3, 5] == pytest.approx((ref[2:5, 4:7].sum() - ref[3, 5]) / 8, rel=1e-5)
    # column 10..12: layer 1 (x 10 and 12) from x 9 / x 13, then x 11 from the filled columns
    for y in range(h):
        ys = [v for v in (y - 1, y, y + 1) if 0 <= v < h]
        assert f[y, 10] == pytest.approx(np.mean([ref[v, 9] for v in ys]), rel=1e-5)
        assert f[y, 12] == pytest.approx(np.mean([ref[v, 13] for v in ys]), rel=1e-5)
        want = np.mean([f[v, x] for v in ys for x in (10, 12)])
        assert f[y, 11] == pytest.approx(want, rel=1e-5)
    keep = np.ones((h, w), bool)
    keep[3, 5] = False
    keep[:, 10:13] = False
    assert np.array_equal(f[keep], ref[keep])
    image = np.zeros((h, w), np.int8)
    image[3, 5] = 1
    with open_movie(movie, defects=new_mrc(tmp_path / "d.mrc", image)) as m:
        assert m.frame(1)[3, 5] == pytest.approx(f[3, 5], rel=1e-6)
    boxes.write_text("1 2 x 4\n")
    with pytest.raises(MovieError, match=f"^{movie}: {boxes}: line 1: expected 4 numbers"):
        open_movie(movie, defects=boxes)


# ----------------------------------------------------------------------------- bad input


def _one_line(excinfo, path):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    return msg


def test_truncated_movies_are_one_line_errors(tmp_path):
    a = _stack(np.int16, (4, 16, 16))
    mrc = new_mrc(tmp_path / "m.mrcs", a)
    tif = tmp_path / "m.tif"
    tifffile.imwrite(tif, a, photometric="minisblack")
    lzw = tmp_path / "lzw.tif"
    tifffile.imwrite(lzw, a, photometric="minisblack", compression="lzw")
    eer = tmp_path / "m.eer"
    write_eer(eer, [random_events(RNG, (16, 16), 80) for _ in range(4)], (16, 16))
    for path in (mrc, tif, lzw, eer):
        data = path.read_bytes()
        for fraction in (0.3, 0.7, 0.95):
            cut = path.with_name(f"cut{fraction}{path.name}")
            cut.write_bytes(data[: int(len(data) * fraction)])
            with pytest.raises(MovieError, match="truncated") as e:
                open_movie(cut)
            _one_line(e, cut)


def test_wrong_content_and_fifo(tmp_path):
    tif = tmp_path / "m.mrc"
    tifffile.imwrite(tif, _stack(np.uint8, (2, 4, 4)), photometric="minisblack")
    with pytest.raises(MovieError, match="content is TIFF") as e:
        open_movie(tif)
    _one_line(e, tif)
    assert not is_movie(tif) and not is_movie(tmp_path / "absent.mrc")
    fifo = tmp_path / "pipe.mrcs"
    os.mkfifo(fifo)
    result = []

    def attempt():
        try:
            open_movie(fifo)
        except MovieError as err:
            result.append(str(err))

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert result and result[0].startswith(f"{fifo}: ") and "FIFO" in result[0]
    assert not is_movie(fifo)


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("fmt", ["mrc", "lzw", "eer"])
def test_reading_frame_by_frame_holds_one_frame(tmp_path, fmt):
    """Peak Python/numpy allocation while reading all frames stays near one float32 frame,
    far below the stack's size (100 frames: three float32 frames are 6% of the uint16 stack;
    with 40 frames the stack bound was tighter than the frame bound and decoder buffers of
    some tifffile/imagecodecs versions crossed it)."""
    n, h, w = 100, 128, 128
    if fmt == "eer":
        path = tmp_path / "m.eer"
        write_eer(path, [random_events(RNG, (h, w), 50) for _ in range(n)], (h, w))
    else:
        a = RNG.integers(0, 1000, (n, h, w)).astype(np.uint16)
        path = tmp_path / ("m.mrcs" if fmt == "mrc" else "m.tif")
        if fmt == "mrc":
            new_mrc(path, a)
        else:
            tifffile.imwrite(path, a, photometric="minisblack", compression="lzw")
    frame_bytes = h * w * 4
    with open_movie(path) as m:
        tracemalloc.start()
        try:
            total = 0.0
            for i in range(len(m)):
                total += float(m.frame(i).sum())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert total > 0
    assert peak < 3 * frame_bytes, (peak, frame_bytes)
    assert peak < n * h * w * 2 / 10  # the stack in its stored dtype


def test_corrupt_eer_stream_is_one_line_error(tmp_path):
    """A frame whose bit stream addresses pixels beyond the frame fails on reading that frame."""
    shape = (8, 8)
    path = tmp_path / "m.eer"
    write_eer(path, [random_events(RNG, shape, 10) for _ in range(2)], shape)
    data = bytearray(path.read_bytes())
    data[16:24] = b"\x7e" * 8  # frame 0's stream (it starts after the 16-byte header): long skips
    path.write_bytes(bytes(data))
    with open_movie(path) as m:
        assert m.raw(1).sum() == 10
        with pytest.raises(MovieError, match="cannot decode frame 0: imcd_eer_decode") as e:
            m.raw(0)
    _one_line(e, path)
    write_eer(path, [random_events(RNG, shape, 10, 1)], shape, 65002, bits=(3, 1, 1))
    with pytest.raises(MovieError, match="unsupported EER code: 3 skip bits") as e:
        open_movie(path)
    _one_line(e, path)


def test_corrupt_lzw_page_is_one_line_error(tmp_path):
    a = _stack(np.uint8, (3, 32, 32))
    path = tmp_path / "m.tif"
    tifffile.imwrite(path, a, photometric="minisblack", compression="lzw")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[1].dataoffsets[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + 40] = bytes(range(1, 41))
    path.write_bytes(bytes(data))
    with open_movie(path) as m:
        assert np.array_equal(m.raw(2), a[2][::-1])
        with pytest.raises(MovieError, match="cannot decode frame 1: ") as e:
            m.raw(1)
    _one_line(e, path)


def test_io_read_refuses_a_tiff_stack_cut_short(tmp_path):
    """Sibling of the movie check, in io.read: tifffile stops at a page beyond the end of a
    truncated file with only a warning; the stack was read as one image (6 pages -> (32, 32))."""
    from cryoden import io

    a = _stack(np.uint16, (6, 32, 32))
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, a, photometric="minisblack", compression="lzw")
    assert io.read(path).data.shape == (6, 32, 32)
    data = path.read_bytes()
    for fraction in (0.5, 0.8):
        cut = tmp_path / f"cut{fraction}.tif"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(ValueError, match=f"^{cut}: file is truncated or corrupt"):
            io.read(cut)
