"""The scheduler wing: whose request runs next.

* :mod:`~lorapool.scheduler.base`: the :class:`Scheduler` seam, the :class:`Ticket`
  a request holds while it waits and runs, and :class:`DispatchState` (places in
  flight, distinct adapters per slot) that every scheduler shares.
* :mod:`~lorapool.scheduler.fcfs`: :class:`FCFSScheduler`, the baseline.
* :mod:`~lorapool.scheduler.fair`: :class:`FairScheduler`, which composes:

  * :mod:`~lorapool.scheduler.config`: its settings (:class:`TenantConfig`,
    :class:`TierPolicy`, :class:`AdmissionConfig`, :class:`FairnessConfig`,
    :class:`PlacesConfig`, :class:`HandoffConfig`);
  * :mod:`~lorapool.scheduler.vtc`: the weighted virtual token counters and the queue
    they order;
  * :mod:`~lorapool.scheduler.pick` and :mod:`~lorapool.scheduler.rules`: the pick, a
    composition of rule parts;
  * :mod:`~lorapool.scheduler.admission`: tiers, rate limits, queue caps, shedding;
  * :mod:`~lorapool.scheduler.places` and :mod:`~lorapool.scheduler.preemption`: the
    engine's places, shares, headroom, pacing, light tenants, and preemption;
  * :mod:`~lorapool.scheduler.handoff`: slot hand-off.
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
from lorapool.scheduler.config import (
    AdmissionConfig,
    FairnessConfig,
    HandoffConfig,
    PlacesConfig,
    TenantConfig,
    TierPolicy,
)
from lorapool.scheduler.fair import FairScheduler
from lorapool.scheduler.fcfs import FCFSScheduler
from lorapool.scheduler.handoff import Handoff, choose_handoff

__all__ = [
    "AdmissionConfig",
    "ColdStart",
    "DispatchCheck",
    "DispatchState",
    "FCFSScheduler",
    "FairScheduler",
    "FairnessConfig",
    "Handoff",
    "HandoffConfig",
    "HandoffHook",
    "PlacesConfig",
    "PreemptHook",
    "ResidencyCheck",
    "Scheduler",
    "TenantConfig",
    "Ticket",
    "TierPolicy",
    "choose_handoff",
]
