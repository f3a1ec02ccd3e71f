"""The backend conformance suite itself: it passes a correct backend and catches broken ones."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from lorapool.sampling import BASIC_PARAMETERS
from lorapool.testing import ALL_CHECKS, ConformanceError, MockBackend, check_backend
from lorapool.testing.backend_conformance import sampling_parameter_names
from lorapool.types import Capabilities, Chunk, GenerationRequest

from .test_store import make_adapters


@dataclasses.dataclass
class ServesWhatItCannot(MockBackend):
    """Skips ``check_request``: serves parameters it does not honour, silently."""

    def check_request(self, request: GenerationRequest) -> None:
        return None


@dataclasses.dataclass
class ClaimsTopK(MockBackend):
    """Lists top_k in Capabilities.sampling, but answers top_k requests with no finish."""

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, sampling=BASIC_PARAMETERS | {"top_k"})

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        inner = super().generate(request)

        async def stream() -> AsyncIterator[Chunk]:
            async for chunk in inner:
                if request.params.top_k is not None:
                    chunk = dataclasses.replace(chunk, finish_reason=None)
                yield chunk

        return stream()


@dataclasses.dataclass
class IgnoresAdapters(MockBackend):
    """Answers every request as the base model: adapters never applied."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        return super().generate(dataclasses.replace(request, adapter_id=None, slot=None))


@dataclasses.dataclass
class ServesAnything(MockBackend):
    """Serves a request for an adapter that is not in its slot (a silent base answer)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if (
            request.adapter_id is not None
            and self.slots.get(request.slot or 0) != request.adapter_id
        ):
            request = dataclasses.replace(request, adapter_id=None, slot=None)
        return super().generate(request)


@dataclasses.dataclass
class KeepsStreaming(MockBackend):
    """Crashes the engine on cancellation: unhealthy after a stream is closed early."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        inner = super().generate(request)

        async def stream() -> AsyncIterator[Chunk]:
            try:
                async for chunk in inner:
                    yield chunk
            except GeneratorExit:
                self.closed = True
                raise

        return stream()


class RestartsOnResume(MockBackend):
    """Claims resume but starts over: the resumed request repeats the streamed tokens."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        return super().generate(dataclasses.replace(request, resume=()))


async def test_mock_backend_passes(tmp_path: Path) -> None:
    adapters = make_adapters(tmp_path, 3)
    report = await check_backend(lambda: MockBackend(max_slots=2, token_delay=0.001), adapters)
    assert "more-adapters-than-slots" in report.checks and report.checks[-1] == "close"
    assert sorted(report.accepted) == sorted(BASIC_PARAMETERS)
    assert sorted(report.refused) == sorted(sampling_parameter_names() - BASIC_PARAMETERS)
    assert "resume" not in report.checks  # not offered
    assert report.outputs["t/a0"] != report.outputs["base"]
    resumable = await check_backend(
        lambda: MockBackend(max_slots=2, token_delay=0.001, resume=True), adapters
    )
    assert resumable.checks == list(ALL_CHECKS)


@pytest.mark.parametrize(
    ("backend", "check"),
    [
        (IgnoresAdapters, "[mixed]"),
        (ServesAnything, "[errors]"),
        (KeepsStreaming, "[cancellation]"),
        (functools.partial(RestartsOnResume, resume=True), "[resume]"),
        (ServesWhatItCannot, "[sampling/frequency_penalty]"),
        (ClaimsTopK, "[sampling/top_k]"),
    ],
)
async def test_broken_backends_fail_the_check_they_break(
    tmp_path: Path, backend: Callable[..., MockBackend], check: str
) -> None:
    adapters = make_adapters(tmp_path, 3)
    with pytest.raises(ConformanceError) as err:
        await check_backend(lambda: backend(max_slots=2, token_delay=0.001), adapters)
    assert str(err.value).startswith(check), str(err.value)
