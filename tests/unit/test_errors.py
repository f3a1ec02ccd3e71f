"""Errors keep their type, message and fields across pickling (process boundaries)."""

from __future__ import annotations

import pickle

import pytest

from lorapool import errors as e

SAMPLES: list[e.LorapoolError] = [
    e.AdapterNotFound("acme/a"),
    e.AccessDenied("acme/a", "globex"),
    e.AdapterExists("acme/a"),
    e.AdapterInUse("acme/a@v1 carries traffic"),
    e.SourceNotFound("/nope", "no such directory"),
    e.SourceError("s3://b/k", "503", transient=True),
    e.ContentMismatch("s3://b/k", "sha256 differs"),
    e.ExtraNotInstalled("lorapool.server", "server", "no starlette"),
    e.AdapterValidationError("rank_too_large", "r=64 > 16"),
    e.NotAPeftAdapter("/tmp/x", "no adapter_config.json"),
    e.InvalidRequest("max_tokens must be > 0"),
    e.RateLimited("acme is over 5 req/s", retry_after=0.2),
    e.Overloaded("queue full", retry_after=1.5),
    e.ColdStartRejected("adapter cold", retry_after=3.0),
    e.DeadlineExceeded("waited 2 s"),
    e.PinLimitExceeded("4 pinned"),
    e.LoadError("acme/a", "device", "boom"),
    e.BackendError("engine died"),
    e.BackendUnavailable("vllm", "vllm", "no module"),
    e.BackendNotStarted("TorchBackend"),
    e.BackendClosed("TorchBackend"),
    e.BackendServerError(503, "overloaded", what="load the adapter"),
    e.PoolClosed(),
    e.DiskFull("no room for 3 MiB"),
    e.PluginNotFound("lorapool.backends", "nope", ["torch", "vllm"]),
    e.RegistryUnavailable("record adapter 'acme/a'", "OperationalError: database or disk is full"),
    e.SourceNotAllowed("/etc", "outside the caller's roots"),
    e.UnsupportedParameter("TGIBackend", ["n", "top_logprobs"]),
    e.AdapterForgotten("acme/a", 12),
    e.SourceNotDeletable("https://h/a", "its source cannot delete adapters"),
    e.AuditChainBroken(3, "its content does not match its hash"),
    e.SignatureError("acme/a", "revoked_key", "key id 'platform-2025' is revoked"),
    e.PromotionRefused("acme/a@v2", "exact_match fell 0.50 (threshold 0.005)", {"scores": {}}),
]


@pytest.mark.parametrize("error", SAMPLES, ids=lambda x: type(x).__name__)
def test_error_survives_pickling(error: e.LorapoolError) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert again.__dict__ == error.__dict__


def test_every_error_class_is_sampled() -> None:
    classes = {getattr(e, n) for n in e.__all__}
    assert classes - {type(x) for x in SAMPLES} == {e.LorapoolError}


def test_every_error_is_importable_from_lorapool() -> None:
    """``lorapool`` is the documented place: every public error class is exported there."""
    import lorapool

    for name in e.__all__:
        assert getattr(lorapool, name) is getattr(e, name), name
        assert name in lorapool.__all__, name


def test_the_error_tree_in_the_docstring_names_every_error() -> None:
    import lorapool

    assert lorapool.__doc__ is not None
    for name in e.__all__:
        assert name in lorapool.__doc__, name
