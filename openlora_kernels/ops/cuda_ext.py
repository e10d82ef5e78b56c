"""Bridge to the hand-written CUDA kernels in csrc/ (backend="cuda").

Not built yet: the CUDA backend is its own piece of work. Until it lands this module only
reports why the backend is unavailable, so ``available_backends()`` can say so.
"""
from __future__ import annotations

from typing import Optional


def unavailable_reason() -> Optional[str]:
    return "the CUDA extension (csrc/) is not part of this build yet"
