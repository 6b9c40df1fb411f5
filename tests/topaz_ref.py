"""The Topaz-Denoise reference (topaz-em 0.3.20 on torch), driven around its known rough edges.

Its pretrained loader needs ``pkg_resources`` and ``Denoise(net)`` rejects module subclasses, so we
build its nets directly, load the ``.sav`` state dicts, and make ``Denoise`` objects without
``__init__``. The numbers then come from Topaz's own code paths (``denoise_image``,
``Denoise3D.denoise``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from topaz import denoise as tdn
from topaz.denoising import models as tm
from topaz.filters import AffineDenoise

SAV_DIR = Path(importlib.util.find_spec("topaz").origin).parent / "pretrained" / "denoise"

NETS = {
    "unet": (lambda: tm.UDenoiseNet(base_width=11, top_width=5), "unet_L2_v0.2.2.sav", 2),
    "unet-small": (
        lambda: tm.UDenoiseNetSmall(width=11, top_width=5),
        "unet_small_L1_v0.2.2.sav",
        2,
    ),
    "fcnn": (lambda: tm.DenoiseNet2(64, width=11), "fcnn_L1_v0.2.2.sav", 2),
    "affine": (lambda: AffineDenoise(max_size=31), "affine_L1_v0.2.2.sav", 2),
    "unet-v0.2.1": (lambda: tm.UDenoiseNet(base_width=7, top_width=3), "unet_L2_v0.2.1.sav", 2),
    "unet-3d-10a": (lambda: tm.UDenoiseNet3D(base_width=7), "unet-3d-10a-v0.2.4.sav", 3),
    "unet-3d-20a": (lambda: tm.UDenoiseNet3D(base_width=7), "unet-3d-20a-v0.2.4.sav", 3),
}


def net(name: str) -> torch.nn.Module:
    make, sav, _ = NETS[name]
    model = make()
    model.load_state_dict(torch.load(SAV_DIR / sav, weights_only=True))
    return model.eval()


def denoiser(name: str):
    """A Topaz ``Denoise``/``Denoise3D`` object around pretrained ``name`` (CPU)."""
    ndim = NETS[name][2]
    obj = (tdn.Denoise3D if ndim == 3 else tdn.Denoise).__new__(
        tdn.Denoise3D if ndim == 3 else tdn.Denoise
    )
    obj.model, obj.device, obj.dims, obj.use_cuda = net(name), torch.device("cpu"), ndim, False
    return obj


def topaz_denoise_2d(x: np.ndarray, name: str, patch_size: int = -1, padding: int = 0):
    """Topaz's ``denoise_image`` (whole image by default). x: (H, W) float32 -> (H, W)."""
    with torch.no_grad():
        return tdn.denoise_image(x, [denoiser(name)], patch_size=patch_size, padding=padding)


def topaz_denoise_3d(x: np.ndarray, name: str, patch_size: int = 0, padding: int = 48):
    """Topaz's ``Denoise3D.denoise`` (whole volume when patch_size < 1). x: (D, H, W)."""
    with torch.no_grad():
        return denoiser(name).denoise(x, patch_size=patch_size, padding=padding, verbose=False)
