"""cryoden: Noise2Noise denoising of cryo-EM micrographs and cryo-ET tomograms in JAX/Flax."""

__version__ = "0.1.0"
