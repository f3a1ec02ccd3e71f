"""An adapter version's life after registration: eval-gated promotion, the canary watch
that rolls a bad version back by itself, and forgetting an adapter everywhere (issue 29).

Signatures are :mod:`lorapool.signing`; the audit log is :mod:`lorapool.registry.audit`.
"""

from lorapool.lifecycle.canary import Canary, CanaryPolicy, CanaryWatch, Verdict
from lorapool.lifecycle.gate import (
    DEFAULT_THRESHOLD,
    CaseResult,
    EvalCase,
    Gate,
    GateReport,
    ScorerResult,
    UserScorer,
    load_cases,
)
from lorapool.lifecycle.promotion import Promotion

__all__ = [
    "DEFAULT_THRESHOLD",
    "Canary",
    "CanaryPolicy",
    "CanaryWatch",
    "CaseResult",
    "EvalCase",
    "Gate",
    "GateReport",
    "Promotion",
    "ScorerResult",
    "UserScorer",
    "Verdict",
    "load_cases",
]
