"""A clock tests move by hand."""

from __future__ import annotations

__all__ = ["ManualClock"]


class ManualClock:
    """Callable like ``time.monotonic``; time passes only through :meth:`advance`."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self.now += seconds
