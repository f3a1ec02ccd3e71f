"""An adapter version's life after registration: eval-gated promotion, the canary watch
that rolls a bad version back by itself, and forgetting an adapter everywhere (issue 29).

Signatures are :mod:`lorapool.signing`; the audit log is :mod:`lorapool.registry.audit`.
"""
