"""FairScheduler preemption: a tenant under its share gets a place at once when a tenant over
its share holds them all, by pausing that tenant's newest request; the places over-committed
by at most the headroom (one without).

These tests turn the light rule off (``light_window=0``) to test the share rules alone;
tests/unit/test_fair_light.py tests the light rule."""

from __future__ import annotations

import pytest

from lorapool.scheduler import PlacesConfig

from .test_fair import OUTPUT, Harness, _dispatched, _finish, fair, ticket, vtc


class Hook:
    """Stands in for the backend's ``preempt``: records the calls, answers as told."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.calls: list[str] = []

    def __call__(self, request_id: str) -> bool:
        self.calls.append(request_id)
        return self.answer


def harness(
    hook: Hook | None, *, max_inflight: int = 4, headroom: int = 0, preemption: bool = True
) -> Harness:
    places = PlacesConfig(headroom=headroom, pace=0, light_window=0, preemption=preemption)
    h = Harness(fair(fairness=vtc(max_wait=1e9), places=places), max_inflight=max_inflight)
    if hook is not None:
        h.s.bind_preemption(hook)
    return h


async def test_a_tenant_under_its_share_preempts_the_newest_request_of_the_busiest() -> None:
    hook = Hook()
    h = harness(hook)
    for _ in range(6):
        await h.submit(ticket("noisy"))
    noisy = _dispatched(h, "noisy")
    assert len(noisy) == 4  # every place taken
    quiet = ticket("quiet")
    await h.submit(quiet)
    assert quiet.dispatched, "the quiet request should start at once"
    assert hook.calls == [noisy[-1].request_id]  # the newest: least work to redo
    assert noisy[-1].preempted and h.s.preemptions == 1
    assert h.s.inflight == 5  # one over the limit, never more
    second = ticket("quiet")
    await h.submit(second)
    assert not second.dispatched and hook.calls == [noisy[-1].request_id]
    # One release brings the count back to the limit; quiet, still under its share (1 of 2
    # places), preempts again: another request, as each is preempted at most once.
    await _finish(h, noisy[0])
    assert second.dispatched and h.s.inflight == 5
    assert len(hook.calls) == 2 and hook.calls[1] != noisy[-1].request_id
    third = ticket("quiet")
    await h.submit(third)  # quiet now holds its share (2 of 4): it waits like anyone
    assert not third.dispatched and len(hook.calls) == 2
    await h.close()


async def _full(*tenants: str) -> tuple[Harness, Hook]:
    """A harness with preemption bound and its 4 places taken by these tenants' requests."""
    hook = Hook()
    h = harness(hook)
    for tenant in tenants:
        await h.submit(ticket(tenant))
    assert h.s.inflight == 4
    return h, hook


async def test_no_preemption_for_a_tenant_at_its_share() -> None:
    h, hook = await _full("a", "a", "b", "b")
    late = ticket("b")
    await h.submit(late)  # two tenants, 2 places each: b already holds its share
    assert not late.dispatched and hook.calls == []
    await h.close()


async def test_no_preemption_when_the_victim_would_not_be_over_the_newcomer() -> None:
    h, hook = await _full("a", "a", "a", "b")
    c = ticket("c")
    await h.submit(c)  # three tenants: share 4/3; a holds 3 > (0 + 1): preempt
    assert c.dispatched and len(hook.calls) == 1
    await h.close()
    h, hook = await _full("a", "a", "b", "b")
    await h.submit(ticket("c"))  # a and b hold 2 each, over a share of 4/3: preempt one
    assert len(hook.calls) == 1
    await h.submit(ticket("c"))  # c now holds 1; nobody is further over than 2 > 1 + 1
    assert len(hook.calls) == 1
    await h.close()


@pytest.mark.parametrize("case", ["refused", "not bound", "turned off"])
async def test_nothing_starts_over_the_limit_without_a_preemption(case: str) -> None:
    hook = Hook(answer=case != "refused")
    h = harness(None if case == "not bound" else hook, preemption=case != "turned off")
    for _ in range(4):
        await h.submit(ticket("noisy"))
    quiet = ticket("quiet")
    await h.submit(quiet)
    assert not quiet.dispatched and h.s.inflight == 4 and h.s.preemptions == 0
    if case == "refused":
        assert hook.calls, "the hook was asked and said no"
    else:
        assert hook.calls == []
    await _finish(h, _dispatched(h, "noisy")[0])
    assert quiet.dispatched  # the ordinary way: the next free place
    await h.close()


@pytest.mark.parametrize("preemption", [True, False])
async def test_with_preemption_the_headroom_also_takes_tenants_under_their_share(
    preemption: bool,
) -> None:
    hook = Hook()
    h = Harness(
        fair(
            fairness=vtc(max_wait=1e9),
            places=PlacesConfig(headroom=2, pace=0, preemption=preemption, light_window=0),
        ),
        max_inflight=8,
    )
    h.s.bind_preemption(hook)
    await h.submit(ticket("quiet"))
    for _ in range(10):
        await h.submit(ticket("noisy"))
    assert len(_dispatched(h, "noisy")) == 5  # up to the headroom (8 - 2 places in all)
    second = ticket("quiet")
    await h.submit(second)  # quiet has one running and holds 1 of its 3-place share
    assert second.dispatched is preemption
    assert hook.calls == []  # a free place, no preemption needed
    await h.close()


async def test_an_over_share_tenant_at_the_head_does_not_keep_one_under_it_waiting() -> None:
    hook = Hook()
    h = harness(hook)
    earlier = ticket("c", prompt_tokens=1000)  # c has had much more service than a
    await h.submit(earlier)
    await _finish(h, earlier)
    for _ in range(6):
        await h.submit(ticket("a"))
    a = _dispatched(h, "a")
    assert len(a) == 4 and h.s.counter("a") < h.s.counter("c")
    late = ticket("c")
    await h.submit(late)  # a has the lowest counter but holds every place; c holds none
    assert late.dispatched and hook.calls == [a[-1].request_id]
    await h.close()


@pytest.mark.parametrize("owed", [True, False])
async def test_a_tenant_over_its_share_never_preempts_whatever_its_counter(owed: bool) -> None:
    hook = Hook()
    h = harness(hook)
    for tenant in ("a", "a", "q", "q"):
        await h.submit(ticket(tenant))
    assert h.s.inflight == 4  # two tenants, 2 places each: both at their share
    heavy = "a" if owed else "q"
    for t in _dispatched(h, heavy):  # tokens produced so far, charged as they come
        h.s.charge(t, output_tokens=OUTPUT)
    assert (h.s.counter("q") < h.s.counter("a")) is owed
    burst = ticket("q")
    await h.submit(burst)  # with 3 places q would hold more than a: it waits for a place
    assert not burst.dispatched and hook.calls == []
    await _finish(h, _dispatched(h, "a")[0])
    assert burst.dispatched
    await h.close()


async def test_a_tenant_at_its_share_gets_a_place_while_another_holds_more() -> None:
    hook = Hook()
    h = harness(hook, max_inflight=8, headroom=2)
    for _ in range(5):
        await h.submit(ticket("noisy"))
    quiet = [ticket("quiet") for _ in range(4)]
    for t in quiet[:3]:
        await h.submit(t)
    assert all(t.dispatched for t in quiet[:3]) and h.s.inflight == 8 and hook.calls == []
    # quiet holds its share (6 places beyond the headroom / 2 tenants = 3) but noisy holds 5
    await h.submit(quiet[3])
    assert quiet[3].dispatched and hook.calls == [_dispatched(h, "noisy")[-1].request_id]
    await h.close()


async def test_the_places_are_over_committed_by_at_most_the_headroom() -> None:
    hook = Hook()
    h = harness(hook, max_inflight=8, headroom=2)
    for _ in range(10):
        await h.submit(ticket("noisy"))
    for tenant in ("q1", "q2"):
        await h.submit(ticket(tenant))  # the two headroom places
    assert h.s.inflight == 8 and len(_dispatched(h, "noisy")) == 6
    late = {tenant: ticket(tenant) for tenant in ("q1", "q2", "q3")}
    for t in late.values():
        await h.submit(t)
    assert late["q1"].dispatched and late["q2"].dispatched and not late["q3"].dispatched
    assert h.s.inflight == 10 and len(hook.calls) == 2
    await _finish(h, _dispatched(h, "noisy")[0])  # back to 9: room for one more pause
    assert late["q3"].dispatched and h.s.inflight == 10 and len(hook.calls) == 3
    await h.close()
