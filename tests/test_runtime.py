"""cryoden.runtime.keep_host_memory: freed host memory is reused, not page-faulted in again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="glibc's allocator policy"
)

# Allocate and free a 512 MiB block twice; report the page faults of the second time.
PROBE = """
import json, resource, sys
import numpy as np
from cryoden import runtime
applied = runtime.keep_host_memory(default=sys.argv[1] == "keep")
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(128 * 2**20, np.float32)
    del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(json.dumps({"applied": applied, "faults": faults()}))
"""


def _probe(mode: str, env: str | None = None) -> dict:
    """Run PROBE with ``keep_host_memory(default=mode == 'keep')`` and env override ``env``."""
    env = {} if env is None else {"CRYODEN_KEEP_HOST_MEMORY": env}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**{k: v for k, v in os.environ.items() if k != "CRYODEN_KEEP_HOST_MEMORY"}, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    kept, default = _probe("keep"), _probe("default")
    assert kept["applied"] is True
    # 512 MiB is 131072 pages of 4 KiB (256 of 2 MiB if numpy asks for huge pages): glibc's
    # default returns the block to the OS and faults it in again; kept, it is reused as is.
    assert kept["faults"] < 20
    assert default["faults"] > kept["faults"] + 100


def test_environment_overrides_the_default():
    assert _probe("keep", env="0")["applied"] is False
    forced = _probe("default", env="1")
    assert forced["applied"] is True and forced["faults"] < 20
