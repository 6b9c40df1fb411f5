"""Tiles spread over several local devices (4 fake CPU devices, in a fresh process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from cryoden.inference import Denoiser
    assert len(jax.local_devices()) == 4, jax.local_devices()
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (150, 170)).astype(np.float32)
    one = Denoiser("unet-small", ndim=2, devices=jax.local_devices()[:1])
    four = Denoiser("unet-small", ndim=2)
    whole = one(x)
    padded, tiles, per_call = four.plan(x.shape, 24, None, batch_size=1)
    assert per_call == 4 and len(tiles) > 4, (per_call, len(tiles))
    tiled = four(x, patch_size=24)
    assert np.max(np.abs(tiled - whole)) <= 1e-5 * x.std()
    # automatic tile size: enough tiles to keep every device busy
    assert len(four.plan(x.shape, None, None)[1]) >= 4
    assert np.max(np.abs(four(x) - whole)) <= 1e-5 * x.std()
    assert four.compilations == 2
    print("OK", len(tiles), per_call)
    """
)


def test_tiles_spread_over_four_devices_equal_single_device_whole_image():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("OK")
