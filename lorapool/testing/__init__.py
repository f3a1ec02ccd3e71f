"""Helpers for testing code built on lorapool, and for lorapool's own tests.

``make_random_adapter`` imports torch and peft when called; importing this
module imports neither. ``check_policy`` and ``policy_conformance_cases`` run
the eviction-policy conformance suite (see :mod:`lorapool.testing.conformance`);
``check_backend`` the backend one (:mod:`lorapool.testing.backend_conformance`).
"""

from .adapters import make_random_adapter
from .backend import MockBackend
from .backend_conformance import ALL_CHECKS, BackendReport, ConformanceError, check_backend
from .clock import ManualClock
from .conformance import PolicyCase, check_policy, policy_conformance_cases, policy_factory

__all__ = [
    "ALL_CHECKS",
    "BackendReport",
    "ConformanceError",
    "ManualClock",
    "MockBackend",
    "PolicyCase",
    "check_backend",
    "check_policy",
    "make_random_adapter",
    "policy_conformance_cases",
    "policy_factory",
]
