"""The scheduler wing: whose request runs next.

* :mod:`~lorapool.scheduler.base`: the :class:`Scheduler` seam, the :class:`Ticket`
  a request holds while it waits and runs, and :class:`DispatchState` (places in
  flight, distinct adapters per slot) that every scheduler shares.
* :mod:`~lorapool.scheduler.fcfs`: :class:`FCFSScheduler`, the baseline.
* :mod:`~lorapool.scheduler.fair`: :class:`FairScheduler`, weighted virtual token
  counters with admission, rate limits, preemption and slot hand-off.
* :mod:`~lorapool.scheduler.handoff`: the hand-off decision.
"""

from lorapool.scheduler.base import (
    ColdStart,
    DispatchCheck,
    DispatchState,
    HandoffHook,
    PreemptHook,
    ResidencyCheck,
    Scheduler,
    Ticket,
)
from lorapool.scheduler.fair import FairScheduler, TierPolicy
from lorapool.scheduler.fcfs import FCFSScheduler
from lorapool.scheduler.handoff import Handoff, choose_handoff

__all__ = [
    "ColdStart",
    "DispatchCheck",
    "DispatchState",
    "FCFSScheduler",
    "FairScheduler",
    "Handoff",
    "HandoffHook",
    "PreemptHook",
    "ResidencyCheck",
    "Scheduler",
    "Ticket",
    "TierPolicy",
    "choose_handoff",
]
