"""Pictures (cryoden.pictures), self-contained pages (cryoden.htmlpage) and infer --preview.

Numbers are checked against NumPy references and invariants (a planted texture is found, a
cosine's spectrum peaks at its frequency, a montage shows each pixel once at the exact grey of
the contrast mapping); writes are atomic; pages and previews never replace inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import new_mrc
from inferargs import affine_model, run_infer
from PIL import Image

from cryoden import htmlpage, pictures, preview

rng = np.random.default_rng(7)


def grey(path) -> np.ndarray:
    """A PNG as (H, W) uint8 (its red channel; our pictures are grey)."""
    a = np.asarray(Image.open(path).convert("RGB"))
    return a[..., 0]


def no_temporaries(folder: Path) -> bool:
    return not [p for p in Path(folder).rglob(".*.tmp")]


# ----------------------------------------------------------------------------- numbers


def test_contrast_is_pooled_mean_and_std():
    a, b = rng.normal(2, 3, (30, 40)), rng.normal(-1, 0.5, (10, 10))
    pooled = np.concatenate([a.ravel(), b.ravel()])
    lo, hi = pictures.contrast([a, b], clip=2.5)
    np.testing.assert_allclose(
        [lo, hi],
        [pooled.mean() - 2.5 * pooled.std(), pooled.mean() + 2.5 * pooled.std()],
        rtol=1e-12,
    )
    c = np.full((4, 4), 7.0)
    c[0, 0] = np.nan  # ignored
    assert pictures.contrast(c) == (6.5, 7.5)  # constant: a unit window around it


def test_to_uint8_maps_limits_and_clips():
    x = np.array([[-1.0, 0.0, 0.5], [1.0, 2.0, np.nan]])
    np.testing.assert_array_equal(pictures.to_uint8(x, 0.0, 1.0), [[0, 0, 128], [255, 255, 0]])


def test_bin_image_is_block_mean_and_drops_remainder():
    x = rng.normal(size=(2, 11, 14))
    ref = x[:, :9, :12].reshape(2, 3, 3, 4, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(pictures.bin_image(x, 3), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(pictures.bin_image(x[0], 1), x[0].astype(np.float32))
    with pytest.raises(ValueError, match="bin factor"):
        pictures.bin_image(x, 0)


def test_choose_crops_finds_the_textured_region_not_corners():
    img = rng.normal(0, 0.1, (256, 256))
    yy, xx = np.mgrid[0:48, 0:48]
    img[150:198, 90:138] += 2 * np.sin(2 * np.pi * yy / 16) * np.sin(2 * np.pi * xx / 16)
    crops = pictures.choose_crops(img, 64, 3)
    assert len(crops) == 3
    y, x = crops[0]
    assert y <= 150 and 198 <= y + 64 and x <= 90 and 138 <= x + 64  # the whole texture
    for i, (a, b) in enumerate(crops):
        assert 0 <= a <= 256 - 64 and 0 <= b <= 256 - 64
        for c, d in crops[i + 1 :]:
            assert abs(a - c) >= 64 or abs(b - d) >= 64  # no two crops overlap
    assert pictures.choose_crops(img, 64, 3) == crops  # deterministic
    assert pictures.choose_crops(img[:50, :50], 64, 2) == [(0, 0)]  # too small: the image


def test_power_spectrum_peaks_at_the_cosine_frequency():
    h, w, ky, kx = 64, 96, 5, 12
    yy, xx = np.mgrid[0:h, 0:w]
    x = 3 + np.cos(2 * np.pi * (ky * yy / h + kx * xx / w)) + rng.normal(0, 0.01, (h, w))
    p = pictures.power_spectrum(x)
    assert p.shape == (h, w) and p.dtype == np.float32
    peaks = {tuple(int(v) for v in np.unravel_index(k, p.shape)) for k in np.argsort(p, None)[-2:]}
    assert peaks == {(h // 2 + ky, w // 2 + kx), (h // 2 - ky, w // 2 - kx)}


def test_central_slices_are_the_middle_planes():
    v = rng.normal(size=(5, 6, 7))
    s = pictures.central_slices(v)
    np.testing.assert_array_equal(s["XY"], v[2])
    np.testing.assert_array_equal(s["XZ"], v[:, 3, :])
    np.testing.assert_array_equal(s["YZ"], v[:, :, 3])
    with pytest.raises(ValueError, match="volume"):
        pictures.central_slices(v[0])


# ----------------------------------------------------------------------------- pictures


def _find(big: np.ndarray, small: np.ndarray) -> list[tuple[int, int]]:
    h, w = small.shape
    return [
        (y, x)
        for y in range(big.shape[0] - h + 1)
        for x in range(big.shape[1] - w + 1)
        if np.array_equal(big[y : y + h, x : x + w], small)
    ]


def test_montage_shows_each_pixel_once_with_matched_contrast(tmp_path):
    a, b = rng.normal(size=(40, 60)), rng.normal(2, 5, (40, 60))
    lim = pictures.contrast([a, b])
    path = pictures.montage([[a, b]], ["raw", "model"], tmp_path / "m.png", limits=lim)
    png = grey(path)
    for panel in (a, b):  # pixel for pixel the shared mapping: full resolution, no smoothing
        assert len(_find(png, pictures.to_uint8(panel, *lim))) == 1
    own = pictures.montage([[a, b]], ["raw", "model"], tmp_path / "o.png")  # each its own
    assert len(_find(grey(own), pictures.to_uint8(b, *pictures.contrast(b)))) == 1
    assert no_temporaries(tmp_path)


def test_pictures_are_written_atomically(tmp_path):
    with pytest.raises(FileNotFoundError):
        pictures.montage([[np.ones((8, 8))]], ["x"], tmp_path / "missing" / "m.png")
    (tmp_path / "c.png").write_bytes(b"old")
    with pytest.raises(ValueError, match="shape"):
        pictures.plot_curves([1, 2, 3], {"a": [1, 2]}, tmp_path / "c.png", "x", "y")
    assert (tmp_path / "c.png").read_bytes() == b"old" and no_temporaries(tmp_path)
    p = pictures.plot_curves([1, 2, 3], {"a": [1.0, np.nan, 2]}, tmp_path / "c.png", "x", "y")
    assert Image.open(p).size == (600, 400)
    q = pictures.plot_curves([1, 2], {"a": [0.9, 5.0]}, tmp_path / "l.png", "x", "y", logy=True)
    assert Image.open(q).size == (600, 400) and no_temporaries(tmp_path)


def test_side_by_side_bins_both_panels(tmp_path):
    raw = rng.normal(size=(64, 96))
    path = pictures.side_by_side(raw, raw * 0.1, tmp_path / "s.png", bin=4)
    png = grey(path)
    binned = pictures.bin_image(raw, 4)
    assert len(_find(png, pictures.to_uint8(binned, *pictures.contrast(binned)))) >= 1
    assert png.shape[1] < 2 * 96  # binned, not full size


# ----------------------------------------------------------------------------- pages


def test_page_is_self_contained_escaped_and_checked(tmp_path):
    pictures.plot_curves([0, 1], {"a": [0, 1]}, tmp_path / "f.png", "x", "y")
    (tmp_path / "sub").mkdir()
    pictures.montage([[np.eye(8)]], ["e"], tmp_path / "sub" / "g.png")
    page = htmlpage.Page("<b>run</b>")
    page.paragraph("a < b & c").table(["method", "snr"], [["raw", -12.345678], ["x", None]])
    page.image("f.png", "curve", caption="FRC").image("sub/g.png", "montage")
    text = page.write(tmp_path / "r.html").read_text()
    assert "&lt;b&gt;run&lt;/b&gt;" in text and "a &lt; b &amp; c" in text
    assert "<td>-12.35</td>" in text and "<td></td>" in text
    assert "http" not in text and "<style>" in text  # no external URL, inline CSS
    for bad in ("../f.png", "/tmp/f.png", "http://x/f.png", "data:image/png;base64,AA"):
        with pytest.raises(ValueError, match="relative"):
            htmlpage.Page("t").image(bad, "x")
    missing = htmlpage.Page("t").image("nope.png", "x")
    with pytest.raises(ValueError, match="nope.png is missing"):
        missing.write(tmp_path / "n.html")
    assert not (tmp_path / "n.html").exists() and no_temporaries(tmp_path)
    with pytest.raises(ValueError, match="cells"):
        htmlpage.Page("t").table(["a", "b"], [[1]])


# ----------------------------------------------------------------------------- infer --preview


def test_preview_of_image_stack_and_volume(tmp_path):
    img = rng.normal(size=(40, 2100))
    p = preview.write(img, img, "2d", tmp_path / "a.png")
    assert preview.auto_bin(img.shape) == 3 and grey(p).shape[1] < 2 * 2100 // 3 + 80
    stack = rng.normal(size=(5, 32, 48))
    s = grey(preview.write(stack, stack + 1, "stack", tmp_path / "s.png"))
    mid = pictures.to_uint8(stack[2], *pictures.contrast(stack[2]))
    assert len(_find(s, mid)) == 2  # the central slice, raw and denoised (same contrast rule)
    vol = rng.normal(size=(12, 20, 24))
    v = grey(preview.write(vol, vol, "volume", tmp_path / "v.png"))
    for plane in pictures.central_slices(vol).values():  # XY, XZ and YZ rows
        assert len(_find(v, pictures.to_uint8(plane, *pictures.contrast(plane)))) == 2
    with pytest.raises(ValueError, match="shape"):
        preview.write(img, img[:10], "2d", tmp_path / "x.png")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return affine_model(tmp_path_factory.mktemp("m"))


def test_infer_preview_writes_one_png_per_file(tmp_path, model):
    a = new_mrc(tmp_path / "a.mrc", rng.normal(size=(48, 64)).astype(np.float32))
    s = new_mrc(tmp_path / "s.mrcs", rng.normal(size=(3, 32, 32)).astype(np.float32))
    out = tmp_path / "out"
    assert run_infer(a, s, "-o", out, "-m", model, "--preview", "-q") == 0
    shots = sorted(p.name for p in (out / "previews").iterdir())
    assert shots == ["a.mrc.png", "s.mrcs.png"]
    rec = json.loads((out / "cryoden-infer.json").read_text())
    assert [Path(f["preview"]).name for f in rec["files"]] == shots
    data = mrcfile.read(a)
    raw = pictures.to_uint8(data, *pictures.contrast(data))
    assert len(_find(grey(out / "previews" / "a.mrc.png"), raw)) == 1  # the raw panel
    plain = tmp_path / "plain"
    assert run_infer(a, "-o", plain, "-m", model, "-q") == 0
    assert not (plain / "previews").exists()  # off by default


def test_infer_preview_never_replaces_an_input(tmp_path, model, capsys):
    out = tmp_path / "out"
    (out / "previews").mkdir(parents=True)
    victim = new_mrc(out / "previews" / "a.mrc", rng.normal(size=(16, 16)).astype(np.float32))
    precious = out / "previews" / "a.mrc.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(precious)  # an input of the run
    before = precious.read_bytes()
    assert run_infer(victim, precious, "-o", out, "-m", model, "--preview") == 2
    assert "would replace the input" in capsys.readouterr().err
    assert precious.read_bytes() == before and not (out / "a.mrc").exists()


def test_watch_never_takes_its_own_previews_as_inputs(tmp_path, model, capsys):
    out = tmp_path / "out"
    (out / "previews").mkdir(parents=True)
    args = ("-m", model, "--watch", "--preview", "--idle", "0.3", "--settle", "0")
    assert run_infer(out / "previews", "-o", out, *args) == 2  # the previews folder itself
    err = capsys.readouterr().err
    assert "contains the watched folder" in err and f"{out / 'previews'}:" in err
    (tmp_path / "in").mkdir()
    new_mrc(tmp_path / "in" / "a.mrc", rng.normal(size=(16, 16)).astype(np.float32))
    pattern = str(tmp_path / "**" / "*.png")  # would take out/previews/a.mrc.png ...
    assert run_infer(tmp_path / "in", pattern, "-o", out, "--format", "mrc", *args) == 1
    assert "its --preview would be watched as a new input" in capsys.readouterr().err
    assert not (out / "a.mrc").exists() and not list((out / "previews").iterdir())


@pytest.mark.parametrize("epochs", [[1], [1, 2], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]])
def test_integer_x_gets_only_integer_ticks(tmp_path, monkeypatch, epochs):
    """A loss curve over epochs has ticks at whole epochs, also after a single epoch (a run of
    one epoch was labelled 0.945 ... 1.05)."""
    from cryoden import pictures

    figs = []
    monkeypatch.setattr(pictures, "_save", lambda fig, path: figs.append(fig) or Path(path))
    y = np.linspace(2.0, 1.0, len(epochs))
    pictures.plot_curves(np.array(epochs), {"loss": y}, tmp_path / "l.png", "epoch", "loss")
    ax = figs[0].axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo - 1e-9 <= t <= hi + 1e-9]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert min(epochs) in ticks or len(epochs) > 2
