"""RetryPolicy: capped, jittered exponential backoff, bounded attempts, used by the store's
source fetches and the remote backends. No test sleeps: waits are recorded instead."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

import lorapool.retry as retry_module
from lorapool import AdapterPool, SamplingParams, TieredStore
from lorapool.backends.openai import OpenAIServerBackend
from lorapool.backends.tgi import TGIBackend
from lorapool.errors import BackendError, BackendServerError, DiskFull, LoadError, SourceError
from lorapool.retry import RetryPolicy, resolve_retry
from lorapool.testing import MockBackend
from lorapool.types import GenerationRequest

from .test_store import FlakySource, make_adapters


class Recorder:
    """A sleep that records its delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class Failing:
    """Fails ``times`` times with ``error``, then returns "ok"."""

    def __init__(self, error: BaseException, times: int) -> None:
        self.error, self.times, self.calls = error, times, 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.times:
            raise self.error
        return "ok"


def transient(exc: BaseException) -> bool:
    return isinstance(exc, SourceError) and exc.transient


FLAKY = SourceError("s3://b/a", "503 slow down", transient=True)


def test_delays_grow_exponentially_under_a_cap_and_are_jittered_below_it() -> None:
    policy = RetryPolicy(attempts=10, initial=0.5, multiplier=2, max_delay=4, jitter=0.5)
    ceilings = [policy.ceiling(n) for n in range(policy.retries)]
    assert ceilings == [0.5, 1, 2, 4, 4, 4, 4, 4, 4]
    delays = policy.delays(random.Random(7))
    assert len(delays) == 9
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling  # never above the cap, jitter included
    assert len(set(delays[3:])) == 6  # even at the cap the waits differ
    assert RetryPolicy(attempts=5, initial=1, jitter=0).delays() == [1, 2, 4, 8]
    assert RetryPolicy(attempts=3, initial=0).delays() == [0, 0]  # retry at once


def test_two_replicas_do_not_retry_in_step() -> None:
    """Two replicas with the same policy draw different waits (the OS's random numbers), so
    a restarted engine is not hit by all of them at once; without jitter they would be."""
    policy = RetryPolicy(attempts=6, initial=1, max_delay=4)
    one, two = policy.delays(), policy.delays()
    assert all(a != b for a, b in zip(one, two, strict=True))
    plain = policy.model_copy(update={"jitter": 0.0})
    assert plain.delays() == plain.delays()
    # and seeded generators replay their draws exactly (what the tests below rely on)
    assert policy.delays(random.Random(1)) == policy.delays(random.Random(1))
    assert policy.delays(random.Random(1)) != policy.delays(random.Random(2))


async def test_transient_failures_are_retried_with_the_policys_waits() -> None:
    policy = RetryPolicy(attempts=4, initial=0.5, max_delay=1.5)
    sleep, seen = Recorder(), []
    fn = Failing(FLAKY, times=3)
    result = await policy.call(
        fn,
        transient,
        sleep=sleep,
        rng=random.Random(3),
        on_retry=lambda exc, delay: seen.append((exc, delay)),
    )
    assert result == "ok" and fn.calls == 4
    assert sleep.delays == policy.delays(random.Random(3))
    assert [d for _, d in seen] == sleep.delays and all(e is FLAKY for e, _ in seen)
    assert max(sleep.delays) <= 1.5


async def test_attempts_are_bounded_and_the_last_failure_is_raised_as_it_is() -> None:
    sleep = Recorder()
    fn = Failing(FLAKY, times=100)
    with pytest.raises(SourceError) as err:
        await RetryPolicy(attempts=3).call(fn, transient, sleep=sleep)
    assert err.value is FLAKY and fn.calls == 3 and len(sleep.delays) == 2
    once = Failing(FLAKY, times=100)
    with pytest.raises(SourceError):
        await RetryPolicy(attempts=1).call(once, transient, sleep=sleep)
    assert once.calls == 1


@pytest.mark.parametrize(
    "error",
    [SourceError("s3://b/a", "access denied", transient=False), DiskFull("no room"), KeyError("x")],
)
async def test_failures_that_are_not_transient_are_not_retried(error: BaseException) -> None:
    sleep = Recorder()
    fn = Failing(error, times=1)
    with pytest.raises(type(error)):
        await RetryPolicy(attempts=5).call(fn, transient, sleep=sleep)
    assert fn.calls == 1 and sleep.delays == []


def test_the_policy_is_validated_and_the_older_keywords_map_onto_it() -> None:
    default = RetryPolicy(initial=0.2)
    assert resolve_retry(None, None, None, default) is default
    legacy = resolve_retry(None, 2, 0.01, default)
    assert (legacy.attempts, legacy.initial, legacy.jitter) == (3, 0.01, default.jitter)
    given = RetryPolicy(attempts=7)
    assert resolve_retry(given, None, None, default) is given
    table = resolve_retry({"attempts": 6, "max_delay": 2}, None, None, default)  # TOML options
    assert table == RetryPolicy(attempts=6, max_delay=2)
    with pytest.raises(TypeError, match="not both"):
        resolve_retry(given, 3, None, default)
    with pytest.raises(ValidationError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValidationError):
        RetryPolicy(jitter=1.5)
    with pytest.raises(ValidationError):
        resolve_retry({"retries": 3}, None, None, default)  # a typo is not ignored


# -- the store ------------------------------------------------------------------------------


async def test_the_store_waits_the_policys_jittered_delays_between_source_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleep = Recorder()
    monkeypatch.setattr(retry_module, "_sleep", sleep)
    monkeypatch.setattr(retry_module, "_SYSTEM_RANDOM", random.Random(11))
    dirs = make_adapters(tmp_path, 1)
    source = FlakySource()
    policy = RetryPolicy(attempts=3, initial=0.4, max_delay=0.5)
    store = TieredStore(disk_dir=tmp_path / "disk", sources={"flaky": source}, retry=policy)
    assert store.retry is policy and store.retries == 2 and store.retry_backoff == 0.4
    async with AdapterPool(MockBackend(), store=store) as pool:
        source.transient_failures["adapter_model.safetensors"] = 2
        await pool.register("t/a0", f"flaky://{dirs['t/a0']}", tenant="t")
        assert store.stats.fetch_retries == 2
        assert sleep.delays == policy.delays(random.Random(11))

        source.transient_failures["adapter_config.json"] = 3  # one more than the policy tries
        await store.unload("t/a0", tiers=("device", "host", "disk"))
        with pytest.raises(LoadError, match="connection reset"):
            await pool.complete("x", adapter="t/a0", tenant="t", params=SamplingParams())
        assert source.calls["adapter_config.json"] == 1 + 3  # registration, then 3 attempts

    store.retries = 5  # the older attribute still sets the policy
    assert store.retry.attempts == 6 and store.retry.initial == 0.4


# -- the remote backends --------------------------------------------------------------------


def _request() -> GenerationRequest:
    return GenerationRequest("r", "x", SamplingParams(max_tokens=2), None)


async def test_a_remote_backend_retries_a_restarting_engine_under_its_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleep = Recorder()
    monkeypatch.setattr(retry_module, "_sleep", sleep)
    monkeypatch.setattr(retry_module, "_SYSTEM_RANDOM", random.Random(5))
    calls: list[str] = []

    def down(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(503, json={"error": {"message": "restarting"}})

    policy = RetryPolicy(attempts=4, initial=1, max_delay=2.5)
    backend = OpenAIServerBackend(
        "http://vllm.test", transport=httpx.MockTransport(down), retry=policy
    )
    assert backend.retry is policy
    with pytest.raises(BackendServerError) as err:
        await backend.start()
    assert err.value.status == 503 and len(calls) == 4
    assert sleep.delays == policy.delays(random.Random(5))
    assert all(d <= 2.5 for d in sleep.delays)
    await backend.aclose()


async def test_a_remote_backend_does_not_retry_what_is_not_transient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleep = Recorder()
    monkeypatch.setattr(retry_module, "_sleep", sleep)
    calls: list[str] = []

    def broken(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(500, json={"error": "bug"})

    backend = TGIBackend("http://tgi.test", transport=httpx.MockTransport(broken))
    with pytest.raises(BackendServerError) as err:
        await backend.start()
    assert err.value.status == 500 and len(calls) == 1 and sleep.delays == []
    await backend.aclose()


async def test_an_unreachable_stream_is_retried_until_the_policy_gives_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleep = Recorder()
    monkeypatch.setattr(retry_module, "_sleep", sleep)
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/info":
            return httpx.Response(200, json={"model_id": "m"})
        raise httpx.ConnectError("connection refused", request=request)

    backend = TGIBackend(
        "http://tgi.test", transport=httpx.MockTransport(handler), retries=2, retry_backoff=0.1
    )
    assert backend.retry == RetryPolicy(attempts=3, initial=0.1)
    await backend.start()
    with pytest.raises(BackendError, match="connection refused"):
        await anext(backend.generate(_request()))
    assert calls.count("/generate_stream") == 3 and len(sleep.delays) == 2
    assert 0.05 <= sleep.delays[0] <= 0.1 and 0.1 <= sleep.delays[1] <= 0.2
    await backend.aclose()


async def test_a_stream_reopened_after_a_reload_is_not_counted_as_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 404 for a loaded adapter (the server restarted) reloads it and reopens the stream at
    once: no wait, no attempt used, even with a policy of one attempt."""
    from .test_openai_backend import MODELS, adapter, recorded

    sleep = Recorder()
    monkeypatch.setattr(retry_module, "_sleep", sleep)
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(200, content=MODELS.encode())
        if request.url.path == "/v1/load_lora_adapter":
            return recorded("load_ok_r8.txt")
        if request.url.path == "/v1/completions" and calls.count("/v1/completions") == 1:
            return httpx.Response(404, json={"error": {"message": "model does not exist"}})
        return recorded("completions_stream_lora_usage.txt")

    backend = OpenAIServerBackend(
        "http://vllm.test", transport=httpx.MockTransport(handler), retry={"attempts": 1}
    )
    await backend.start()
    loaded = adapter(tmp_path)
    await backend.load(loaded, 0)
    request = GenerationRequest("r", "x", SamplingParams(max_tokens=8), loaded.adapter_id, slot=0)
    chunks = [c async for c in backend.generate(request)]
    assert chunks[-1].usage is not None and backend.reloads == 1
    assert calls.count("/v1/completions") == 2 and calls.count("/v1/load_lora_adapter") == 2
    assert sleep.delays == []
    await backend.aclose()
