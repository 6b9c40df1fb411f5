"""One input list split over many processes: each item done by exactly one of them.

A *shard* is ``(index, count)``, ``0 <= index < count``. It comes from, in this order:

* ``--shard I/N`` on the command line (``I`` counted from 1, as people count tasks);
* Slurm: a job array (``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_MIN``/``MAX``/``STEP``; the
  tasks of ``--array=1-100`` or ``--array=0-198:2`` are numbered in order), and/or ``srun``
  tasks (``SLURM_PROCID`` of ``SLURM_NTASKS`` > 1). Both together: ``index = array_index *
  ntasks + procid`` over ``array_count * ntasks``. A ``%`` throttle does not change the count.

Every process must see the same list (same command line, same files): a batch list is split
round-robin in its planned order (:func:`take`), so the shares differ by at most one item. A
list that grows while it is processed (``--watch``) is split by a stable hash of each file's
name (:func:`owns`), which does not depend on the order in which processes see files.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """This process's share: ``index`` of ``count`` (0-based); ``source`` says where from."""

    index: int
    count: int
    source: str

    def __str__(self) -> str:
        return f"shard {self.index + 1}/{self.count} ({self.source})"

    @property
    def tag(self) -> str:
        """For file names of per-process records: ``shard-003-of-100``."""
        width = len(str(self.count))
        return f"shard-{self.index + 1:0{width}d}-of-{self.count}"


def add_arg(group, noun: str) -> None:
    """``--shard I/N`` for a command over a list of ``noun``s."""
    group.add_argument(
        "--shard",
        metavar="I/N",
        help=f"process the I-th of N shares of the {noun}s (1 <= I <= N); default: from Slurm "
        "(array task and srun task), else all",
    )


def parse(spec: str) -> Shard:
    """``'I/N'`` (1 <= I <= N) -> Shard(I - 1, N); ValueError with a one-line reason."""
    m = _SPEC.match(spec)
    if not m:
        raise ValueError(f"--shard {spec!r}: expected I/N, e.g. 3/8 (the third of eight)")
    i, n = int(m[1]), int(m[2])
    if not 1 <= i <= n:
        raise ValueError(f"--shard {spec!r}: I must be between 1 and N")
    return Shard(i - 1, n, "--shard")


def _int(env: Mapping[str, str], name: str) -> int | None:
    v = env.get(name)
    if v is None or v.strip() == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment {name}={v!r} is not an integer") from None


def _array(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(index, count) of this Slurm array task, or None outside an array."""
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    lo, hi = _int(env, "SLURM_ARRAY_TASK_MIN"), _int(env, "SLURM_ARRAY_TASK_MAX")
    step = _int(env, "SLURM_ARRAY_TASK_STEP") or 1
    count = _int(env, "SLURM_ARRAY_TASK_COUNT")
    if lo is None or hi is None:
        raise ValueError("SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_MIN/MAX")
    if (task - lo) % step or not lo <= task <= hi:
        raise ValueError(
            f"SLURM_ARRAY_TASK_ID={task} is not in the array {lo}-{hi}:{step}; "
            "use --shard I/N for arrays that are not an evenly stepped range"
        )
    span = (hi - lo) // step + 1
    if count is not None and count != span:  # e.g. --array=1,5,9: not a range
        raise ValueError(
            f"Slurm array of {count} tasks is not the range {lo}-{hi}:{step}; "
            "use --shard I/N for such arrays"
        )
    return (task - lo) // step, span


def from_environment(spec: str | None = None, env: Mapping[str, str] | None = None) -> Shard | None:
    """The shard of this process (see the module docstring), or None for the whole list."""
    if spec is not None:
        return parse(spec)
    env = os.environ if env is None else env
    array = _array(env)
    ntasks, procid = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID")
    srun = (procid, ntasks) if ntasks and ntasks > 1 and procid is not None else None
    if srun and not 0 <= procid < ntasks:
        raise ValueError(f"SLURM_PROCID={procid} is not below SLURM_NTASKS={ntasks}")
    if array and srun:
        return Shard(array[0] * srun[1] + srun[0], array[1] * srun[1], "Slurm array x srun")
    if array:
        return None if array[1] == 1 else Shard(array[0], array[1], "Slurm array")
    if srun:
        return Shard(srun[0], srun[1], "srun")
    return None


def take(items: Sequence[T], shard: Shard | None) -> list[T]:
    """This shard's items of a fixed list: every ``count``-th, from ``index``."""
    if shard is None:
        return list(items)
    return list(items[shard.index :: shard.count])


def owns(name: str, shard: Shard | None) -> bool:
    """Whether ``name`` (a path as given) falls to this shard, by a stable hash of it."""
    if shard is None:
        return True
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")
    return h % shard.count == shard.index
