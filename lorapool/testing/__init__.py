"""Helpers for testing code built on lorapool, and for lorapool's own tests.

``make_random_adapter`` imports torch and peft when called; importing this
module imports neither.
"""

from .adapters import make_random_adapter
from .backend import MockBackend
from .clock import ManualClock

__all__ = ["ManualClock", "MockBackend", "make_random_adapter"]
