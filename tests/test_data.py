"""Training data pipeline: pairing, validation, aligned crops, augmentation, seeds, shards, resume.

Even halves hold a strictly increasing, convex function of each pixel's flat index, so the values
of a normalised crop decode back to the pixel coordinates it came from (and a negated crop does
not decode). The odd half is ``5 - 2 * even``: after per-image normalisation ``target == -source``
exactly when both halves got the same window and transform, and a swapped pair is recognised
because only ``-source`` decodes.
"""

import itertools
import json

import mrcfile
import numpy as np
import pytest

from cryoden.train import data, pairs

# 2D pairs of distinct widths, so a crop's values identify the pair it came from.
SHAPES_2D = [(40, 44), (40, 52), (40, 60)]


def write_mrc(path, arr):
    with mrcfile.new(path, np.asarray(arr, np.float32), overwrite=True) as m:
        if arr.ndim == 3:
            m.set_volume()
    return path


def coded(shape):
    """Flat array of the pixel codes of an image of ``shape`` (float32, strictly increasing)."""
    i = np.arange(np.prod(shape), dtype=np.float64)
    return (i + i * i / i.size).astype(np.float32)


def index_pairs(root, shapes):
    """Pairs with even = coded pixels, odd = 5 - 2 * even (both MRC)."""
    (root / "even").mkdir()
    (root / "odd").mkdir()
    for j, shape in enumerate(shapes):
        even = coded(shape).reshape(shape)
        write_mrc(root / "even" / f"img{j}.mrc", even)
        write_mrc(root / "odd" / f"img{j}.mrc", 5 - 2 * even.astype(np.float64))
    return data.find_pairs(root / "even", root / "odd")


def transforms(ndim):
    """All (flips, turns) the sampler can apply, as functions of a spatial array."""
    planes = [(0, 1)] if ndim == 2 else [(1, 2), (0, 2), (0, 1)]
    for flips in itertools.product((0, 1), repeat=ndim):
        for turns in itertools.product(range(4), repeat=len(planes)):

            def f(a, flips=flips, turns=turns):
                for ax, fl in enumerate(flips):
                    a = np.flip(a, ax) if fl else a
                for k, plane in zip(turns, planes, strict=True):
                    a = np.rot90(a, k, axes=plane)
                return a

            yield (flips, turns), f


def decode(x, shapes):
    """Return (pair index, window origin, transform id) of a normalised crop, or None.

    x: (*[crop]*ndim) normalised even-half crop.
    """
    crop, ndim = x.shape[0], x.ndim
    for j, shape in enumerate(shapes):
        codes = coded(shape).astype(np.float64)
        raw = x.astype(np.float64) * codes.std() + codes.mean()
        idx = np.clip(np.searchsorted(codes, raw), 1, codes.size - 1)
        idx = np.where(raw - codes[idx - 1] < codes[idx] - raw, idx - 1, idx)
        if np.abs(codes[idx] - raw).max() > 0.05:
            continue
        coords = np.unravel_index(idx, shape)
        origin = tuple(int(c.min()) for c in coords)
        window = np.arange(np.prod(shape)).reshape(shape)
        window = window[tuple(slice(o, o + crop) for o in origin)]
        if window.shape != (crop,) * ndim:
            continue
        for tid, f in transforms(ndim):
            if np.array_equal(f(window), idx):
                return j, origin, tid
    return None


def take(it, n):
    return [next(it) for _ in range(n)]


def batches_equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.fixture
def pairs2d(tmp_path):
    return index_pairs(tmp_path, SHAPES_2D)


def stream(pairs_, **kw):
    args = dict(ndim=2, crop=16, batch_size=4, seed=0, samples_per_epoch=len(pairs_))
    args.update(kw)
    return data.train_dataset(pairs_, **args)


# ----------------------------------------------------------------------------------------------
# Crops and augmentation
# ----------------------------------------------------------------------------------------------


def test_crops_aligned_and_augmented_identically_2d(pairs2d):
    it = iter(stream(pairs2d, batch_size=8))
    seen, swaps, n = set(), 0, 0
    for b in take(it, 12):
        assert b["source"].shape == (8, 16, 16, 1) and b["source"].dtype == np.float32
        np.testing.assert_allclose(b["target"], -b["source"], atol=1e-5)
        for s in b["source"][..., 0]:
            found = decode(s, SHAPES_2D)
            if found is None:  # swapped: the source is the odd half
                found, swaps = decode(-s, SHAPES_2D), swaps + 1
            assert found is not None, "crop is not a transformed window of one image"
            seen.add(found[2])
            n += 1
    assert len({(f, t) for f, t in seen}) >= 6  # most of the 8 dihedral elements used
    assert 0.25 < swaps / n < 0.75


def test_no_augment_no_swap_is_plain_window(pairs2d):
    it = iter(stream(pairs2d, augment=False, swap=False))
    for b in take(it, 5):
        for s in b["source"][..., 0]:
            _, _, (flips, turns) = decode(s, SHAPES_2D)
            assert not any(flips) and not any(turns)


def test_crops_aligned_and_augmented_identically_3d(tmp_path):
    shapes = [(12, 13, 14)]
    p = index_pairs(tmp_path, shapes)
    ds = data.train_dataset(p, ndim=3, crop=8, batch_size=4, seed=1, samples_per_epoch=20)
    seen = set()
    for b in take(iter(ds), 6):
        assert b["source"].shape == (4, 8, 8, 8, 1)
        np.testing.assert_allclose(b["target"], -b["source"], atol=1e-5)
        for s in b["source"][..., 0]:
            found = decode(s, shapes) or decode(-s, shapes)
            assert found is not None
            seen.add(found[1:])
    assert len(seen) >= 20  # windows and transforms vary


# ----------------------------------------------------------------------------------------------
# Epochs, seeds, shards, resume, workers
# ----------------------------------------------------------------------------------------------


def test_each_epoch_covers_every_pair_with_fresh_crops(pairs2d):
    it = iter(stream(pairs2d, batch_size=3, swap=False))
    epochs = []
    for b in take(it, 4):  # samples_per_epoch = 3 = batch: one batch per epoch
        found = [decode(s, SHAPES_2D) for s in b["source"][..., 0]]
        assert sorted(f[0] for f in found) == [0, 1, 2]
        epochs.append({f[0]: f[1:] for f in found})
    assert len({str(sorted(e.items())) for e in epochs}) == 4


def test_reproducible_by_seed(pairs2d):
    a = take(iter(stream(pairs2d, seed=7)), 4)
    b = take(iter(stream(pairs2d, seed=7)), 4)
    c = take(iter(stream(pairs2d, seed=8)), 4)
    assert batches_equal(a, b)
    assert not batches_equal(a, c)


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_concatenate_to_global_batch(pairs2d, count):
    glob = take(iter(stream(pairs2d, batch_size=8, samples_per_epoch=5)), 5)
    local = [
        take(iter(stream(pairs2d, batch_size=8, samples_per_epoch=5, process_index=p,
                         process_count=count)), 5)
        for p in range(count)
    ]  # fmt: skip
    for t in range(5):
        for key in ("source", "target"):
            parts = [local[p][t][key] for p in range(count)]
            assert all(x.shape[0] == 8 // count for x in parts)
            np.testing.assert_array_equal(np.concatenate(parts), glob[t][key])
        # Disjoint: no crop appears in two processes' batches.
        crops = [x.tobytes() for p in range(count) for x in local[p][t]["source"]]
        assert len(set(crops)) == len(crops)


def test_batch_must_divide_among_processes(pairs2d):
    with pytest.raises(ValueError, match="multiple"):
        stream(pairs2d, batch_size=6, process_count=4)


def test_get_state_set_state_resumes_exact_stream(pairs2d):
    ds = stream(pairs2d, samples_per_epoch=5)
    it = iter(ds)
    take(it, 3)
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON (grain's orbax handler)
    expected = take(it, 3)
    it2 = iter(stream(pairs2d, samples_per_epoch=5))
    it2.set_state(state)
    assert batches_equal(take(it2, 3), expected)


def test_worker_processes_give_same_stream_and_resume(pairs2d):
    ref = take(iter(stream(pairs2d, samples_per_epoch=5)), 5)
    it = iter(stream(pairs2d, samples_per_epoch=5, num_workers=2))
    try:
        assert batches_equal(take(it, 2), ref[:2])
        state = it.get_state()
        assert batches_equal(take(it, 3), ref[2:])
        it.set_state(state)  # rewind the running workers
        assert batches_equal(take(it, 3), ref[2:])
    finally:
        it.close()


# ----------------------------------------------------------------------------------------------
# Validation batches and holdout
# ----------------------------------------------------------------------------------------------


def test_val_batches_cover_split_with_weights(pairs2d):
    crop, bs = 16, 5
    windows = sum(len(data.val_windows(s, crop)) for s in SHAPES_2D)
    covered = [np.zeros(s, bool) for s in SHAPES_2D]
    batches = list(data.val_batches(pairs2d, ndim=2, crop=crop, batch_size=bs))
    assert len(batches) == -(-windows // bs)
    weights = np.concatenate([b["weight"] for b in batches])
    assert weights.sum() == windows and np.all(weights[:windows] == 1)
    for b in batches:
        assert b["source"].shape == (bs, crop, crop, 1) and b["weight"].shape == (bs,)
        np.testing.assert_allclose(b["target"], -b["source"], atol=1e-5)
        for s, w in zip(b["source"][..., 0], b["weight"], strict=True):
            if w == 0:
                assert not s.any()
                continue
            j, origin, (flips, turns) = decode(s, SHAPES_2D)
            assert not any(flips) and not any(turns)
            covered[j][origin[0] : origin[0] + crop, origin[1] : origin[1] + crop] = True
    assert all(c.all() for c in covered)
    again = list(data.val_batches(pairs2d, ndim=2, crop=crop, batch_size=bs))
    assert batches_equal(batches, again)


def test_val_windows_shift_last_inward():
    assert data.val_windows((40, 44), 16) == [
        (y, x) for y in (0, 16, 24) for x in (0, 16, 28)
    ]  # fmt: skip
    assert data.val_windows((32,), 16) == [(0,), (16,)]


def test_split_holdout(tmp_path):
    ps = [(tmp_path / f"e{k}", tmp_path / f"o{k}") for k in range(10)]
    train, val = data.split_holdout(ps, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == sorted(ps)
    assert data.split_holdout(ps, 0.2, seed=3) == (train, val)
    assert len(data.split_holdout(ps[:2], 0.01, seed=0)[1]) == 1
    assert data.split_holdout(ps[:1], 0.5, seed=0) == (ps[:1], [])
    assert data.split_holdout(ps, 0.0, seed=0) == (ps, [])
    with pytest.raises(ValueError):
        data.split_holdout(ps, 1.0, seed=0)


# ----------------------------------------------------------------------------------------------
# Files: pairing, memory maps, statistics, errors
# ----------------------------------------------------------------------------------------------


def test_open_half_is_memory_mapped(tmp_path):
    img = np.random.default_rng(0).normal(size=(20, 30)).astype(np.float32)
    vol = np.random.default_rng(1).normal(size=(4, 20, 30)).astype(np.float32)
    m2 = data.open_half(write_mrc(tmp_path / "a.mrc", img))
    m3 = data.open_half(write_mrc(tmp_path / "b.mrc", vol))
    np.save(tmp_path / "c.npy", vol)
    mn = data.open_half(tmp_path / "c.npy")
    for m, ref in ((m2, img), (m3, vol), (mn, vol)):
        assert isinstance(m, np.memmap)
        np.testing.assert_array_equal(m, ref)


def test_image_stats_chunked(tmp_path, monkeypatch):
    vol = np.random.default_rng(2).normal(3.0, 2.0, size=(7, 9, 11)).astype(np.float32)
    path = write_mrc(tmp_path / "v.mrc", vol)
    monkeypatch.setattr(pairs, "STATS_CHUNK", 2 * 99)  # 2 of 7 slices per chunk
    mean, std = pairs.image_stats(path)
    assert mean == pytest.approx(vol.astype(np.float64).mean(), rel=1e-9)
    assert std == pytest.approx(vol.astype(np.float64).std(), rel=1e-9)


@pytest.mark.parametrize(
    ("even", "odd"),
    [
        (["mic_001_EVN.mrc", "mic_002_EVN.mrc"], ["mic_001_ODD.mrc", "mic_002_ODD.mrc"]),
        (["a_half1.mrc"], ["a_half2.mrc"]),
        (["even_x.mrc"], ["odd_x.mrc"]),
    ],
)
def test_find_pairs_by_token_in_one_directory(tmp_path, even, odd):
    img = np.arange(64.0).reshape(8, 8)
    for i, name in enumerate(even + odd + ["unrelated.mrc", "notes.txt"]):  # distinct halves
        write_mrc(tmp_path / name, img + i) if name.endswith(".mrc") else (tmp_path / name).touch()
    found = data.find_pairs(tmp_path, tmp_path)
    assert [(e.name, o.name) for e, o in found] == list(zip(even, odd, strict=True))


def test_find_pairs_same_basename_and_lists(tmp_path, pairs2d):
    assert [(e.name, o.name) for e, o in pairs2d] == [(f"img{j}.mrc",) * 2 for j in range(3)]
    files = [list(map(str, side)) for side in zip(*pairs2d, strict=True)]
    assert data.find_pairs(*files) == pairs2d
    assert data.find_pairs(*pairs2d[0]) == pairs2d[:1]


def test_errors_before_training(tmp_path, pairs2d):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no input"):
        data.find_pairs(empty, empty)
    with pytest.raises(ValueError, match="no input"):
        data.find_pairs([], [])
    with pytest.raises(ValueError, match="img2.mrc"):  # 41 > 40 rows
        data.check_crop(pairs2d[2:], 41, ndim=2)
    with pytest.raises(ValueError, match="larger than"):
        stream(pairs2d, crop=41)  # raised at construction, not at iteration
    with pytest.raises(ValueError, match="larger than"):
        data.val_batches(pairs2d, ndim=2, crop=41, batch_size=2)
    with pytest.raises(ValueError, match="expected a 3D"):
        stream(pairs2d, ndim=3, crop=8)

    # Unmatched names.
    (tmp_path / "odd" / "img1.mrc").rename(tmp_path / "odd" / "other.mrc")
    with pytest.raises(ValueError, match="img1.mrc"):
        data.find_pairs(tmp_path / "even", tmp_path / "odd")

    # Shape mismatch.
    write_mrc(tmp_path / "odd" / "img1.mrc", np.zeros((40, 45)))
    (tmp_path / "odd" / "other.mrc").unlink()
    with pytest.raises(ValueError, match="shape mismatch.*img1.mrc"):
        data.find_pairs(tmp_path / "even", tmp_path / "odd")

    # Unreadable file and list length mismatch.
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"not an mrc file")
    with pytest.raises(ValueError, match="bad.mrc"):
        data.find_pairs([bad], [pairs2d[0][1]])
    with pytest.raises(ValueError, match="2 even files but 1"):
        data.find_pairs([pairs2d[0][0]] * 2, [pairs2d[0][1]])

    # Constant image: cannot be normalised.
    flat = write_mrc(tmp_path / "flat.mrc", np.ones((40, 44)))
    with pytest.raises(ValueError, match="constant"):
        stream([(flat, pairs2d[0][1])])
