"""Bytes an XLA:CPU kernel allocates outside its memory analysis (its convolution scratch).

XLA's memory analysis (``compiled.memory_analysis()``: arguments, output, temporaries) covers
the buffers XLA assigns. On CPU, XLA hands convolutions and dots to YNNPACK (``__ynn_fusion``
fusions), which allocates its own working copy of the operand while the op runs, outside that
analysis: one 'same' convolution alone raises peak RSS by about its zero-padded input (measured,
2048x1456 px: 64 -> 32 channels 5x5, +696 MiB for a 728 MiB input; 96 -> 96 3x3 at
1024x728, +302 MiB for 273 MiB; 97 -> 64 5x5, +1302 MiB for 1104 MiB). Ops run one at a time,
so a kernel's run needs at most its analysis plus the scratch of its largest such op; the
level-wise stage kernels measured below that bound (S3 at 2048x1456: +481 MiB over the
analysis, its largest operand 728 MiB). docs/levelwise.md#memory-and-tile-choice.

Usage::

    from cryoden import xla_scratch
    extra = xla_scratch.conv_scratch_bytes(compiled)  # 0 when the kernel has no conv or dot
"""

from __future__ import annotations

import math
import re
from typing import Any

_ITEMSIZE = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2}
_ITEMSIZE.update({"s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1})
# "%name = f32[1,2048,1456,64]{3,2,1,0} opcode(%a, %b), ..." (array-shaped instructions)
_INSTR = re.compile(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\(([^)]*)\)")
_SCRATCH_OPS = ("convolution", "dot")


def conv_scratch_bytes(compiled: Any) -> int:
    """Bytes of the largest operand of any convolution or dot in ``compiled`` (a
    ``jax.stages.Compiled``; fused computations included): a bound on what its XLA:CPU run
    allocates beyond ``memory_analysis()``. Per device, like the analysis."""
    return hlo_scratch_bytes(compiled.as_text())


def hlo_scratch_bytes(text: str) -> int:
    """:func:`conv_scratch_bytes` of an HLO module's text."""
    size, largest = {}, 0
    for m in _INSTR.finditer(text):
        name, dtype, dims, op, operands = m.groups()
        shape = [int(d) for d in dims.split(",") if d]
        size[name] = _ITEMSIZE.get(dtype, 4) * math.prod(shape)
        if op in _SCRATCH_OPS:
            ops = re.findall(r"%([\w.\-]+)", operands)
            largest = max([largest, *(size.get(o, 0) for o in ops)])
    return largest
