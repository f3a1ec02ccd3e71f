"""FairScheduler's light rule: a tenant that used clearly less than the heaviest tenant
recently (``light_window``, ``light_ratio``) goes as if under its share of places: its burst
past an equal share starts at once, pausing the heaviest tenant's newest request when every
place is taken, and is neither paced nor kept out of the headroom."""

from __future__ import annotations

import pytest

from lorapool.scheduler import PlacesConfig
from lorapool.testing import ManualClock

from .test_fair import OUTPUT, Harness, _dispatched, _finish, fair, ticket, vtc
from .test_fair_preemption import Hook


async def _half_each(
    *, light_window: float, clock: ManualClock, quiet_output: int = 0
) -> tuple[Harness, Hook]:
    """8 places, no headroom: noisy holds 4 (and has a backlog), quiet holds 4; every noisy
    request has produced OUTPUT tokens, each quiet one ``quiet_output``."""
    hook = Hook()
    s = fair(
        clock=clock,
        fairness=vtc(max_wait=1e9),
        places=PlacesConfig(headroom=0, pace=0, light_window=light_window),
    )
    h = Harness(s, max_inflight=8)
    h.s.bind_preemption(hook)
    for _ in range(4):
        await h.submit(ticket("noisy"))
    for _ in range(4):
        await h.submit(ticket("quiet"))
    for _ in range(4):
        await h.submit(ticket("noisy"))  # the backlog: queued
    assert h.s.inflight == 8 and len(_dispatched(h, "quiet")) == 4
    for t in _dispatched(h, "noisy"):
        h.s.charge(t, output_tokens=OUTPUT)
    for t in _dispatched(h, "quiet"):
        h.s.charge(t, output_tokens=quiet_output)
    return h, hook


async def _noisy(h: Harness, n: int) -> None:
    """``n`` requests from noisy; those dispatched have produced OUTPUT tokens each."""
    for _ in range(n):
        await h.submit(ticket("noisy"))
    for t in _dispatched(h, "noisy"):
        h.s.charge(t, output_tokens=OUTPUT)


@pytest.mark.parametrize("light_window", [10.0, 0.0])
async def test_a_light_tenant_bursts_past_its_share_by_pausing_the_heaviest(
    light_window: float,
) -> None:
    clock = ManualClock()
    h, hook = await _half_each(light_window=light_window, clock=clock)
    burst = ticket("quiet")
    await h.submit(burst)
    # quiet holds its share (4 of 8) and as many as noisy: by the share rules it waits
    # for a place; having used 40 against noisy's 200 recently, it goes at once.
    light = light_window > 0
    assert burst.dispatched is light
    noisy = _dispatched(h, "noisy")
    assert hook.calls == ([noisy[-1].request_id] if light else [])
    if light:
        assert noisy[-1].preempted and h.s.inflight == 9
    await h.close()


async def test_a_tenant_that_used_about_as_much_is_not_light() -> None:
    clock = ManualClock()
    # quiet's requests produced 16 tokens each against noisy's 20: 4 * (10 + 32) = 168
    # against 200, within the light ratio of 1.25.
    h, hook = await _half_each(light_window=10.0, clock=clock, quiet_output=16)
    burst = ticket("quiet")
    await h.submit(burst)
    assert not burst.dispatched and hook.calls == []
    await _finish(h, _dispatched(h, "noisy")[0])
    assert burst.dispatched  # the next free place, by the counters (quiet's is lower)
    await h.close()


async def test_recent_service_decays_over_the_window() -> None:
    clock = ManualClock()
    h, hook = await _half_each(light_window=10.0, clock=clock)
    clock.advance(60.0)  # six windows: noisy's 200 decays to about 0.5, quiet's 40 to 0.1
    quiet = _dispatched(h, "quiet")
    for t in quiet:
        h.s.charge(t, output_tokens=1)  # quiet's recent service is now about 8
    burst = ticket("quiet")
    await h.submit(burst)
    # quiet is the heaviest now: its burst waits, and noisy, light against it, gets a
    # place for its backlog by pausing quiet's newest request.
    assert not burst.dispatched
    assert hook.calls == [quiet[-1].request_id]
    assert len(_dispatched(h, "noisy")) == 5
    await h.close()


@pytest.mark.parametrize("light_window", [10.0, 0.0])
async def test_a_light_tenant_over_its_share_is_not_paced(light_window: float) -> None:
    clock = ManualClock()
    h = Harness(
        fair(
            clock=clock,
            fairness=vtc(max_wait=1e9),
            places=PlacesConfig(headroom=0, pace=5.0, light_window=light_window),
        ),
        max_inflight=10,
    )
    await _noisy(h, 3)
    quiet = [ticket("quiet") for _ in range(7)]
    for t in quiet:
        await h.submit(t)
    assert all(t.dispatched for t in quiet[:6])
    # The sixth left quiet over its share (6 of 10 places, more than noisy's 3), so the
    # share rules pace the seventh (one dispatch per 5 s to tenants over their share).
    # Light, quiet goes at once.
    light = light_window > 0
    assert quiet[6].dispatched is light and h.s.inflight == 9 + light
    await h.close()


class Engine(Hook):
    """A hook that refuses, as the engine does, a request paused and not resumed."""

    def __init__(self) -> None:
        super().__init__()
        self.paused: set[str] = set()

    def __call__(self, request_id: str) -> bool:
        self.calls.append(request_id)
        if request_id in self.paused:
            return False
        self.paused.add(request_id)
        return True


def _with_engine(max_inflight: int) -> tuple[Harness, Engine]:
    s = fair(
        clock=ManualClock(),
        fairness=vtc(max_wait=1e9),
        places=PlacesConfig(headroom=0, pace=0, light_window=10.0),
    )
    h = Harness(s, max_inflight=max_inflight)
    engine = Engine()
    h.s.bind_preemption(engine)
    return h, engine


async def test_the_heaviest_pauses_again_for_light_tenants_once_resumed() -> None:
    h, engine = _with_engine(max_inflight=6)
    await _noisy(h, 3)
    for _ in range(3):
        await h.submit(ticket("mid"))
    for t in _dispatched(h, "mid"):
        h.s.charge(t, output_tokens=OUTPUT - 2)  # nearly as heavy as noisy: not light
    burst = [ticket("quiet") for _ in range(4)]
    for t in burst:
        await h.submit(t)
    # Each of noisy's three running requests pauses for one quiet request; the fourth
    # finds none of the heaviest's running and waits.
    assert [t.dispatched for t in burst] == [True] * 3 + [False]
    noisy = _dispatched(h, "noisy")
    assert engine.paused == {t.request_id for t in noisy} and h.s.inflight == 9
    engine.paused.discard(noisy[0].request_id)  # one resumes when a row frees
    h.s.kick()
    assert burst[3].dispatched and noisy[0].pauses == 2  # paused again, for a light tenant
    await h.close()


async def test_a_request_pauses_at_most_so_many_times_for_light_tenants() -> None:
    h, engine = _with_engine(max_inflight=2)
    await _noisy(h, 2)
    older, newest = _dispatched(h, "noisy")
    for _ in range(5):
        engine.paused.clear()  # resumed at once, every time
        for t in (older, newest):
            h.s.charge(t, output_tokens=OUTPUT)  # noisy stays the heaviest by far
        quiet = ticket("quiet")
        await h.submit(quiet)
        assert quiet.dispatched
        await _finish(h, quiet)
    # The newest running request pauses first (least work to redo), four times at most.
    assert (newest.pauses, older.pauses) == (4, 1)
    await h.close()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"light_window": -1.0}, "light_window must be >= 0"),
        ({"light_ratio": 0.5}, "light_ratio must be >= 1"),
    ],
)
def test_bad_light_options_are_refused(kw: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fair(places=PlacesConfig.model_validate(kw))


@pytest.mark.parametrize("kw", [{"spare_rows": -1}, {"spare_rows": 2, "interleave_prefill": False}])
def test_bad_spare_rows_are_refused(kw: dict[str, object], tmp_path: object) -> None:
    from lorapool.backends.torch import TorchBackend

    with pytest.raises(ValueError, match="spare_rows must be >= 0, and 0 without"):
        TorchBackend(str(tmp_path), **kw)  # type: ignore[arg-type]
    assert TorchBackend(str(tmp_path), max_batch=16).spare_rows == 4  # one per four
    assert TorchBackend(str(tmp_path), interleave_prefill=False).spare_rows == 0
