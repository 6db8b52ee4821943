"""Counted progress for long build steps: a tqdm bar (count, rate, estimate) on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Collection, Iterator
from typing import TypeVar

from .files import Progress, stderr_progress

T = TypeVar("T")
PLAIN_EVERY_S = 10.0  # plain lines at most this often (plus the last), so a log stays readable


def counted(items: Collection[T], progress: Progress, what: str, unit: str) -> Iterator[T]:
    """Yield `items`, showing how many are done and an estimate of the time left."""
    total = len(items)
    if progress is stderr_progress and sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=f"[vl-export] {what}", unit=f" {unit}", file=sys.stderr,
                        dynamic_ncols=True, leave=False)
        return
    start = last = time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if done == total or now - last >= PLAIN_EVERY_S:
            last = now
            progress(f"{what}: {done}/{total} {unit}, {now - start:.0f} s{eta(now - start, done, total)}")


def eta(elapsed_s: float, done: int, total: int) -> str:
    if done >= total or done == 0:
        return ""
    return f", about {elapsed_s / done * (total - done):.0f} s left"
