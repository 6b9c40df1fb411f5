"""One image split spatially over several devices (cryoden/spatial.py): on 4 fake CPU devices
the split whole pass equals the one-device whole pass for a 2D and a 3D U-net at odd sizes (in
3D the split axis extended and masked), it is what the router picks when the image fits the
devices together but not one, and each device's kernel needs less memory than the unsplit one."""

from __future__ import annotations

import os
import subprocess
import sys

from cryoden import spatial

FOUR_DEVICES = """
import os, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from cryoden import memory, spatial
from cryoden.inference import Denoiser, memory_budget
from cryoden.models import ModelSpec, build_model, init_params
assert len(jax.local_devices()) == 4
rng = np.random.default_rng(5)

# 2D, pretrained unet-small, through the router: a budget that the whole padded image (208x160)
# exceeds on one device, but its split (along the width, 4 x 40) fits
x = rng.normal(3.0, 2.0, (203, 157)).astype(np.float32)
whole = Denoiser("unet-small", ndim=2, devices=jax.local_devices()[:1])(x, normalize=True)
os.environ["CRYODEN_MEMORY_BUDGET"] = "14M"
four = Denoiser("unet-small", ndim=2)
net = four.nets[0]
r = four.route(net, x.shape)
assert len(r.plan.tiles) > 1, "the budget must not hold the whole image on one device"
assert r.kind == "spatial" and r.spatial.plan.axis == 1 and r.work == 1.0, (r.kind, r.work)
unsplit = memory.kernel_bytes(net.spec, four.dtype, (1, *r.plan.padded))
assert r.spatial.bytes < unsplit and r.spatial.bytes <= memory_budget(four.devices[0])
y = four(x, normalize=True)
assert np.abs(y - whole).max() <= 1e-5 * x.std(), np.abs(y - whole).max()

# 3D, a small random U-net, the split kernel itself against the one-device whole kernel
spec = ModelSpec("unet-small", 3, 3, 3)
params = jax.tree.map(
    lambda a: rng.normal(scale=np.prod(a.shape[:-1]) ** -0.5, size=a.shape).astype(np.float32),
    init_params(spec, jax.random.key(0)),
)
module = build_model(spec)
apply = lambda p, v: module.apply({"params": p}, v)
v = np.zeros((1, 24, 40, 24, 1), np.float32)  # 19x37x21 zero-padded to the stride (8)
v[0, :19, :37, :21, 0] = rng.standard_normal((19, 37, 21))
one = jax.jit(apply).lower(params, v).compile()
whole = np.asarray(one(params, v))[0, ..., 0]
mesh = Mesh(np.array(jax.local_devices()), ("tiles",))
plan = spatial.plan((24, 40, 24), spec.stride, 4)
assert plan.extended == (32, 40, 24)  # extended and masked along the depth
k = spatial.SpatialKernel(apply, jax.device_put(params, NamedSharding(mesh, P())), mesh, plan)
assert k.bytes < memory.compiled_bytes(one), (k.bytes, memory.compiled_bytes(one))
y = k(v[0, ..., 0])
assert np.abs(y - whole).max() <= 1e-5 * v.std(), np.abs(y - whole).max()
print("OK")
"""


def test_split_over_four_devices_equals_one_device_whole():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    res = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES], capture_output=True, text=True, env=env, timeout=1800
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
