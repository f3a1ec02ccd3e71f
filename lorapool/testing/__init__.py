"""Helpers for testing code built on lorapool, and for lorapool's own tests.

``make_random_adapter`` imports torch and peft when called; importing this
module imports neither. ``check_policy`` and ``policy_conformance_cases`` run
the eviction-policy conformance suite (see :mod:`lorapool.testing.conformance`).
"""

from .adapters import make_random_adapter
from .backend import MockBackend
from .clock import ManualClock
from .conformance import PolicyCase, check_policy, policy_conformance_cases, policy_factory

__all__ = [
    "ManualClock",
    "MockBackend",
    "PolicyCase",
    "check_policy",
    "make_random_adapter",
    "policy_conformance_cases",
    "policy_factory",
]
