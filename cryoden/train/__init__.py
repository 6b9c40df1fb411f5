"""Noise2Noise training (see cryoden.train.__main__)."""
