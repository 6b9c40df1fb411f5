"""cryoden: Noise2Noise denoising of cryo-EM micrographs and cryo-ET tomograms in JAX/Flax.

``cryoden.denoise(x, model=None, ...)`` denoises a micrograph or volume (see
:mod:`cryoden.inference`); imported lazily so ``import cryoden`` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["denoise", "Denoiser", "__version__"]


def __getattr__(name):
    if name in ("denoise", "Denoiser"):
        from cryoden import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'cryoden' has no attribute {name!r}")
