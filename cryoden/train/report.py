"""A training run shows itself: a preview PNG per epoch and ``RUN/report.html``.

Preview: one fixed crop of one pair, chosen once per run by content
(:func:`cryoden.pictures.choose_crops` on the even half), from a held-out (validation) pair when
there is one, else from the first training pair (the page says which). Every epoch the current
parameters denoise it and ``RUN/previews/epochNNN.png`` shows ``raw | denoised``:

- 2D: a ``PREVIEW_2D``-pixel square (smaller images: the largest stride-aligned square), run with
  up to ``CONTEXT_2D`` pixels of image context around it, so the crop's borders look as they
  will in ``cryoden infer``;
- 3D: a ``PREVIEW_3D``-voxel cube; its central XY slice is shown.

Both halves are normalised by their whole image's mean and std, as in training; each panel is
shown at its own mean -/+ 3 std.

``RUN/report.html`` (rewritten atomically after every epoch) has the training and validation
loss curves from ``RUN/log.tsv`` (``loss.png``), the table of epochs, how the run ended (early stop,
best epoch), and the previews, newest first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryoden import htmlpage, pictures
from cryoden.models import ModelSpec, build_model
from cryoden.train.pairs import image_stats, open_half

PREVIEW_2D, CONTEXT_2D, PREVIEW_3D = 256, 32, 64
PREVIEWS = "previews"
REPORT = "report.html"
LOSS_PNG = "loss.png"


def preview_name(epoch: int) -> str:
    """``previews/epoch007.png`` for epoch 7 (1-based), relative to RUN."""
    return f"{PREVIEWS}/epoch{epoch:03d}.png"


class Previewer:
    """The fixed preview crop of a run and a compiled function that denoises it.

    pair: ``(even, odd)`` paths; only the even half is shown. held_out: whether the pair is a
    validation pair (for the caption). ``corner``: the crop's first pixel, ``(y, x)`` in 2D,
    ``(z, y, x)`` in 3D.
    """

    def __init__(
        self, pair: Sequence[str | Path], spec: ModelSpec, held_out: bool, dtype: str = "float32"
    ):
        import jax

        self.path, self.held_out, self.spec = Path(pair[0]), held_out, spec
        half = open_half(self.path)
        mean, std = image_stats(self.path)
        s = spec.stride
        if spec.ndim == 2:
            h, w = half.shape
            size = min(PREVIEW_2D, h // s * s, w // s * s) or min(h, w)
            y, x = pictures.choose_crops(np.asarray(half), size, 1)[0]
            c = CONTEXT_2D
            y0, x0 = max(0, y - c), max(0, x - c)
            y1, x1 = min(h, y + size + c), min(w, x + size + c)
            window = half[y0:y1, x0:x1]
            self.keep = (slice(y - y0, y - y0 + size), slice(x - x0, x - x0 + size))
            self.corner = (y, x)
            self.where = f"{size}x{size} px at (y, x) = ({y}, {x})"
        else:
            d, h, w = half.shape
            size = min(PREVIEW_3D, d, h, w)
            mid = np.asarray(half[d // 2])
            y, x = pictures.choose_crops(mid, size, 1)[0]
            z = max(0, d // 2 - size // 2)
            window = half[z : z + size, y : y + size, x : x + size]
            self.keep = (slice(size // 2, size // 2 + 1), slice(None), slice(None))
            self.corner = (z, y, x)
            self.where = f"{size}^3 voxels at (z, y, x) = ({z}, {y}, {x}), central XY slice"
        x_norm = (np.asarray(window, np.float64) - mean) / std
        pad = [(0, -n % s) for n in x_norm.shape]  # stride-aligned: high end, reflected
        self.shape = x_norm.shape
        mode = (
            "reflect" if all(p < n for (_, p), n in zip(pad, x_norm.shape, strict=True)) else "edge"
        )
        self.input = np.pad(x_norm, pad, mode=mode).astype(np.float32)[None, ..., None]
        module = build_model(spec, dtype=dtype)
        self._apply = jax.jit(lambda p, v: module.apply({"params": p}, v))

    def raw(self) -> np.ndarray:
        """The shown raw crop, normalised: 2D ``(size, size)``."""
        x = self.input[0, ..., 0][tuple(slice(0, n) for n in self.shape)]
        return np.squeeze(x[self.keep])

    def denoise(self, params: Any) -> np.ndarray:
        """The shown crop denoised with ``params`` (host or device pytree): ``(size, size)``."""
        y = np.asarray(self._apply(params, self.input), np.float32)[0, ..., 0]
        y = y[tuple(slice(0, n) for n in self.shape)]
        return np.squeeze(y[self.keep])

    def render(self, params: Any, path: str | Path, epoch: int) -> Path:
        """Write the preview PNG ``raw | denoised`` of ``epoch`` to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return pictures.side_by_side(
            self.raw(), self.denoise(params), path, labels=("raw", f"denoised, epoch {epoch}")
        )

    def describe(self) -> str:
        which = "held-out (validation) pair" if self.held_out else "training pair (no holdout)"
        return f"Preview: {self.path.name}, a {which}; {self.where}."


def read_log(path: str | Path) -> list[dict[str, str]]:
    """Rows of ``RUN/log.tsv`` as dicts of its columns (strings); [] if absent."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, ln.split("\t"), strict=False)) for ln in lines[1:]]


def _num(v: str | None) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def write_report(run: str | Path, status: str = "", preview_note: str = "") -> Path:
    """(Re)write ``RUN/loss.png`` and ``RUN/report.html`` from ``RUN/log.tsv`` and the previews
    present; ``status`` says how the run stands (early stop...). -> the report's path."""
    run = Path(run)
    rows = read_log(run / "log.tsv")
    page = htmlpage.Page(f"cryoden train: {run.name}")
    if status:
        page.paragraph(status)
    if rows:
        epochs = np.array([_num(r.get("epoch")) for r in rows])
        curves = {"training loss": np.array([_num(r.get("train_loss")) for r in rows])}
        val = np.array([_num(r.get("val_loss")) for r in rows])
        if np.isfinite(val).any():
            curves["validation loss"] = val
        pictures.plot_curves(
            epochs,
            curves,
            run / LOSS_PNG,
            "epoch",
            "loss",
            title="Noise2Noise loss (lower is better)",
            logy=bool(np.all(np.concatenate(list(curves.values())) > 0)),
        )
        page.heading("Loss")
        page.image(LOSS_PNG, "training and validation loss per epoch")
        page.paragraph(
            "The validation loss is the Noise2Noise loss on held-out pairs: up to a constant "
            "(the noise), the error of the denoised image against the unknown signal.",
            note=True,
        )
        cols = ["epoch", "step", "train_loss", "val_loss", "best_val_loss", "seconds"]
        page.table(cols, [[r.get(c, "") for c in cols] for r in rows])
    else:
        page.paragraph("No epoch finished yet.")
    shown = [
        (r.get("epoch", ""), preview_name(int(_num(r.get("epoch")))))
        for r in rows
        if math.isfinite(_num(r.get("epoch")))
    ]
    shown = [(e, src) for e, src in shown if (run / src).is_file()]
    if shown:
        page.heading("Previews")
        if preview_note:
            page.paragraph(preview_note, note=True)
        for e, src in reversed(shown):
            page.image(src, f"raw and denoised preview, epoch {e}", caption=f"epoch {e}")
    return page.write(run / REPORT)
