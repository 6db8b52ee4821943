"""The continuous-batching engine: request state, content-keyed caches, a scheduler, a runner and the step loop."""

from .engine import Engine
from .sequence import Sequence, Status

__all__ = ["Engine", "Sequence", "Status"]
