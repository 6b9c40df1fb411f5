"""Noise2Noise training data: random aligned crops of even/odd halves as a grain pipeline.

Stream layout (``train_dataset``). Global sample ``g`` of the infinite stream lies in epoch
``e = g // N`` at position ``i = g % N`` (``N = samples_per_epoch``). Positions visit the elements
``0..N-1`` in an order shuffled per epoch by ``seed``; element ``k`` names pair ``k % len(pairs)``,
so every pair gets ``N / len(pairs)`` samples per epoch (rounded). Everything random about a
sample (crop window, flips, rotations, swap) comes from ``np.random.default_rng((seed, e, i))``:
each epoch is fresh, and the stream is a pure function of ``seed``, independent of workers and
processes.

Global batch ``t`` is samples ``[t*B, (t+1)*B)``. With ``P`` processes of ``b = B / P`` samples,
process ``p`` gets samples ``[t*B + p*b, t*B + (p+1)*b)``: the ``P`` local batches, concatenated
in process order, are exactly the single-process global batch. In grain terms, the per-sample map
dataset is batched in chunks of ``b`` and process ``p`` takes chunks ``p, p+P, p+2P, ...``.

Batches: ``dict(source=(b, *[crop]*ndim, 1), target=same)``, float32, each half normalised by its
whole image's mean and std (computed once per file before the stream starts). Files are read through
memory maps opened lazily in each worker process.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grain
import numpy as np

from cryoden.train.pairs import (
    Pair,
    check_crop,
    find_pairs,
    half_shape,
    image_stats,
    open_half,
    split_holdout,
)

__all__ = [
    "check_crop",
    "check_stats",
    "default_samples_per_epoch",
    "find_pairs",
    "open_half",
    "split_holdout",
    "train_dataset",
    "val_batches",
]

TILES_PER_VOLUME = 1000  # Topaz's 3D recipe: 1000 training tiles per volume per epoch


def default_samples_per_epoch(pairs: Sequence[Pair], ndim: int) -> int:
    """Topaz's epoch: one crop per micrograph pair (2D), 1000 tiles per volume pair (3D)."""
    return len(pairs) * (1 if ndim == 2 else TILES_PER_VOLUME)


def _pair_stats(pairs: Sequence[Pair]) -> list[tuple[float, float, float, float]]:
    """``(mean_even, std_even, mean_odd, std_odd)`` per pair, files read in parallel threads."""
    paths = [p for pair in pairs for p in pair]
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        stats = list(pool.map(image_stats, paths))
    return [(*stats[2 * k], *stats[2 * k + 1]) for k in range(len(pairs))]


def check_stats(pairs: Sequence[Pair]) -> None:
    """Compute every half's whole-image mean and std now (cached for the data pipelines);
    raises ``ValueError`` naming a half that is constant or holds non-finite values."""
    if pairs:
        _pair_stats(pairs)


class _Halves:
    """Picklable view of the pairs: paths, shapes, stats; memory maps opened lazily per process."""

    def __init__(self, pairs: Sequence[Pair]):
        self.pairs = [(str(e), str(o)) for e, o in pairs]
        self.shapes = [half_shape(e) for e, _ in pairs]
        self.stats = _pair_stats(pairs)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def crop(self, j: int, origin: Sequence[int], crop: int, sample=None) -> np.ndarray:
        """Normalised window of both halves of pair ``j``: ``(2, *[crop]*ndim)`` float32.
        ``sample`` (``(seed, epoch, k)``, for sources that draw halves per sample) is unused."""
        if j not in self._maps:
            self._maps[j] = tuple(open_half(p) for p in self.pairs[j])
        window = tuple(slice(o, o + crop) for o in origin)
        me, se, mo, so = self.stats[j]
        even, odd = self._maps[j]
        out = np.empty((2,) + (crop,) * len(origin), np.float32)
        out[0] = (np.asarray(even[window], np.float64) - me) / se  # float64, rounded once:
        out[1] = (np.asarray(odd[window], np.float64) - mo) / so  # see inference._affine
        return out


def _planes(ndim: int) -> list[tuple[int, int]]:
    """Rotation planes, as axes of the stacked ``(2, *spatial)`` array."""
    return [(1, 2)] if ndim == 2 else [(2, 3), (1, 3), (1, 2)]


class _Sampler:
    """``(g, element) -> dict(source, target)``: one random training sample (see module doc)."""

    def __init__(self, halves, *, ndim, crop, seed, samples_per_epoch, augment, swap):
        self.halves, self.ndim, self.crop, self.seed = halves, ndim, crop, seed
        self.n, self.augment, self.swap = samples_per_epoch, augment, swap

    def __call__(self, g: int, element: int) -> dict[str, np.ndarray]:
        epoch, pos = divmod(g, self.n)
        rng = np.random.default_rng((self.seed, epoch, pos))
        j = int(element) % len(self.halves.pairs)
        shape = self.halves.shapes[j]
        # Always draw every number, so the crop window does not depend on the flags.
        origin = [int(rng.integers(0, s - self.crop + 1)) for s in shape]
        flips = rng.integers(0, 2, size=self.ndim)
        turns = rng.integers(0, 4, size=len(_planes(self.ndim)))
        swap = bool(rng.integers(0, 2))
        # (2, *crop): same transform for both halves; a movie source draws the halves' frames
        x = self.halves.crop(j, origin, self.crop, sample=(self.seed, epoch, pos))
        if self.augment:
            for ax in np.flatnonzero(flips):
                x = np.flip(x, axis=int(ax) + 1)
            for k, plane in zip(turns, _planes(self.ndim), strict=True):
                x = np.rot90(x, k=int(k), axes=plane)
        if self.swap and swap:
            x = x[::-1]
        return {
            "source": np.ascontiguousarray(x[0, ..., None]),
            "target": np.ascontiguousarray(x[1, ..., None]),
        }


def train_dataset(
    pairs: Sequence[Pair],
    *,
    ndim: int,
    crop: int,
    batch_size: int,
    seed: int,
    samples_per_epoch: int,
    augment: bool = True,
    swap: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
) -> grain.IterDataset:
    """Infinite stream of this process's training batches (see the module docstring).

    pairs: ``(even, odd)`` paths, or a prepared source of halves such as
    :class:`cryoden.train.moviedata.MovieSource`; ndim: 2 or 3; crop: cube edge in pixels;
    batch_size: the GLOBAL batch ``B`` (this process yields ``B / process_count``); seed: in
    ``[0, 2**32)``;
    samples_per_epoch: ``N`` (see :func:`default_samples_per_epoch`); augment: random flips and
    90° rotations; swap: random swap of source and target; num_workers: grain worker processes
    (0: threads in this process). The stream does not depend on ``num_workers``.

    Yields ``dict(source=(b, *[crop]*ndim, 1), target=same)`` float32. Iterators support grain's
    ``get_state()``/``set_state()``. All input errors raise ``ValueError`` here, before iteration.
    """
    if not pairs:
        raise ValueError("no training pairs")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if samples_per_epoch < 1:
        raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"global batch size {batch_size} must be a positive multiple of the "
            f"{process_count} processes"
        )
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    halves = _source(pairs, crop, ndim)
    local = batch_size // process_count
    sampler = _Sampler(
        halves,
        ndim=ndim,
        crop=crop,
        seed=seed,
        samples_per_epoch=samples_per_epoch,
        augment=augment,
        swap=swap,
    )
    # grain reseeds the shuffle per epoch with seed + epoch: hash the seed first so that
    # (seed, epoch + 1) and (seed + 1, epoch) do not share an order.
    order_seed = int(np.random.SeedSequence((seed, 0x5EED)).generate_state(1)[0])
    ds = (
        grain.MapDataset.range(samples_per_epoch)
        .shuffle(seed=order_seed)
        .repeat()
        .map_with_index(sampler)
        .batch(local, drop_remainder=True)
    )[process_index::process_count]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if num_workers > 0:
        _allow_unparsed_grain_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def _allow_unparsed_grain_flags() -> None:
    """Work around google/grain#1355 (fixed after 0.2.18): with jax installed, ``mp_prefetch``
    reads an absl flag that is unparsed outside ``absl.app``. Marking that one flag present makes
    it read its default (False); parsed flags are left alone."""
    from absl import flags

    name = "grain_enable_multiprocess_worker_profiling"
    if not flags.FLAGS.is_parsed() and name in flags.FLAGS:
        flags.FLAGS[name].present = True


def _starts(size: int, crop: int) -> list[int]:
    """Window origins tiling ``[0, size)`` with width ``crop``; the last one shifted inward."""
    starts = list(range(0, size - crop + 1, crop))
    if starts[-1] + crop < size:
        starts.append(size - crop)
    return starts


def val_windows(shape: Sequence[int], crop: int) -> list[tuple[int, ...]]:
    """Origins of the fixed validation grid over an image of ``shape`` (row-major order)."""
    return list(itertools.product(*(_starts(s, crop) for s in shape)))


def val_batches(
    pairs: Sequence[Pair], *, ndim: int, crop: int, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Deterministic validation batches covering every pair with :func:`val_windows`.

    Yields ``dict(source=(batch_size, *[crop]*ndim, 1) even half, target=same odd half,
    weight=(batch_size,))`` float32, normalised like training, no augmentation. The last batch is
    padded with zeros and weight 0, so ``sum(weight * loss) / sum(weight)`` is the split's mean.
    Errors raise here, before the first batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    halves = _source(pairs, crop, ndim) if len(pairs) else None
    return _val_iter(halves, crop, batch_size)


def _source(pairs, crop: int, ndim: int):
    """Half-file pairs -> a checked :class:`_Halves`; a prepared source (has ``crop``) as is,
    its windows checked against ``crop``."""
    if hasattr(pairs, "crop"):
        small = [(p, s) for p, s in zip(pairs.pairs, pairs.shapes, strict=True) if min(s) < crop]
        if small:
            raise ValueError(f"crop {crop} is larger than {small[0][0]} of shape {small[0][1]}")
        return pairs
    check_crop(pairs, crop, ndim)
    return _Halves(pairs)


def _val_iter(halves: _Halves | None, crop: int, batch_size: int) -> Iterator[dict]:
    if halves is None:
        return
    items = ((j, o) for j, shape in enumerate(halves.shapes) for o in val_windows(shape, crop))
    while chunk := list(itertools.islice(items, batch_size)):
        x = np.zeros((batch_size, 2) + (crop,) * len(chunk[0][1]), np.float32)
        for k, (j, origin) in enumerate(chunk):
            x[k] = halves.crop(j, origin, crop)
        weight = (np.arange(batch_size) < len(chunk)).astype(np.float32)
        source, target = (np.ascontiguousarray(x[:, h, ..., None]) for h in (0, 1))
        yield {"source": source, "target": target, "weight": weight}
