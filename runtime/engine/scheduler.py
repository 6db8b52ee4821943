"""Decides each step: who gets a slot, whose prefill advances and by how much, whether the running batch decodes.

It owns the waiting queue and the list of sequences holding slots; the engine carries its plan out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .sequence import Sequence, Status


@dataclass
class Plan:
    prefill: Sequence | None  # the sequence whose prompt goes into the decoder this step
    whole: bool  # its whole remaining prompt (nobody is waiting for tokens) or one chunk (streams are running)
    decode: bool  # one decode step for every running row
    wait_for: Sequence | None  # nothing else to do: block until this one's images are encoded


class Scheduler:
    def __init__(self, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []  # holding a slot (encoding, prefilling or running), in admission order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Waiting sequences that get a free slot now, first come first served."""
        admitted = []
        while self.waiting and len(self.active) < self.max_batch:
            seq = self.waiting.popleft()
            self.active.append(seq)
            admitted.append(seq)
        return admitted

    def remove(self, seq: Sequence) -> None:
        if seq in self.active:
            self.active.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def running(self) -> list[Sequence]:
        return [s for s in self.active if s.status is Status.RUNNING]

    def schedule(self, rows: list[Sequence]) -> Plan:
        """rows: the running batch as the decoder cache holds it now."""
        prefilling = next((s for s in self.active if s.status is Status.PREFILLING), None)
        encoding = next((s for s in self.active if s.status is Status.ENCODING), None)
        # A prefill runs in chunks only while someone waits for tokens: then each step is one chunk and one
        # decode step, so a long prompt delays the running streams by a chunk at a time, never by all of it.
        return Plan(prefill=prefilling, whole=not rows, decode=bool(rows),
                    wait_for=encoding if prefilling is None and not rows else None)

    @property
    def slots_free(self) -> int:
        return self.max_batch - len(self.active)
