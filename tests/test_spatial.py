"""One image split spatially over several devices (cryoden/spatial.py): on 4 fake CPU devices
the split whole pass equals the one-device whole pass for a 2D and a 3D U-net at odd sizes (the
split axis extended and masked), it is what the router picks when the image fits the devices
together but not one, and each device's kernel needs less memory than the unsplit kernel."""

from __future__ import annotations

import os
import subprocess
import sys

from cryoden import spatial

FOUR_DEVICES = """
import os, jax, numpy as np
from cryoden import memory, weights
from cryoden.inference import Denoiser, memory_budget
from cryoden.models import ModelSpec, init_params
assert len(jax.local_devices()) == 4
tmp = os.environ["SPATIAL_TMP"]
spec3 = ModelSpec("unet-small", 3, 3, 3)
params = jax.tree.map(
    lambda a: np.random.default_rng(1).normal(scale=np.prod(a.shape[:-1]) ** -0.5, size=a.shape),
    init_params(spec3, jax.random.key(0)),
)
weights.save(f"{tmp}/u3.npz", params, spec3)
cases = [("unet-small", (203, 171), "14M"), (f"{tmp}/u3.npz", (19, 37, 21), "3M")]
for model, shape, budget in cases:
    x = np.random.default_rng(5).normal(3.0, 2.0, shape).astype(np.float32)
    os.environ.pop("CRYODEN_MEMORY_BUDGET", None)
    one = Denoiser(model, ndim=len(shape), devices=jax.local_devices()[:1])
    whole = one(x, normalize=True)
    assert one.route(one.nets[0], shape).plan.tiles.__len__() == 1  # truly the whole image
    os.environ["CRYODEN_MEMORY_BUDGET"] = budget
    four = Denoiser(model, ndim=len(shape))
    net = four.nets[0]
    r = four.route(net, shape)
    assert len(r.plan.tiles) > 1, "the budget must not hold the whole image on one device"
    assert r.kind == "spatial" and r.work > 1.0, (r.kind, r.work)  # extended, masked
    unsplit = memory.kernel_bytes(net.spec, four.dtype, (1, *r.plan.padded))
    assert r.spatial.bytes < unsplit and r.spatial.bytes <= memory_budget(four.devices[0])
    y = four(x, normalize=True)
    err = np.abs(y - whole).max()
    assert err <= 1e-5 * x.std(), (model, err)
    print(model, r.spatial.plan, r.spatial.bytes, unsplit, err)
print("OK")
"""


def test_split_over_four_devices_equals_one_device_whole(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        SPATIAL_TMP=str(tmp_path),
    )
    res = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.rstrip().endswith("OK"), res.stdout


def test_split_axis_is_the_least_extension():
    # 4 devices x stride 32: 160 -> 256 (+60%), 224 -> 256 (+14%), 256 stays
    p = spatial.plan((160, 224), 32, 4)
    assert (p.axis, p.extended, p.split.local, p.split.valid) == (1, (160, 256), 64, 224)
    assert abs(p.work - 256 / 224) < 1e-12
    p = spatial.plan((64, 256, 256), 32, 4)  # no extension; ties go to the first longest axis
    assert (p.axis, p.extended, p.work) == (1, (64, 256, 256), 1.0)
