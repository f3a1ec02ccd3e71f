"""TGIBackend and SGLangBackend translation, against recorded real TGI and SGLang outputs.

No engine runs here: TGI's answers are replayed through ``httpx.MockTransport``
(tests/fixtures/tgi/README.md says where each came from and how non-stream recordings
are rendered into streams), SGLang's outputs are fed to the translation functions and to
``SGLangBackend`` through a stand-in for the ``sglang.Engine`` methods it calls
(tests/fixtures/sglang/README.md).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorapool.backends.sglang import (
    SGLangBackend,
    SGLangStream,
    sglang_finish_reason,
    sglang_sampling_params,
)
from lorapool.backends.tgi import StopTrimmer, TGIBackend, generate_body, tgi_finish_reason
from lorapool.errors import (
    BackendClosed,
    BackendError,
    BackendNotStarted,
    BackendServerError,
    BackendUnavailable,
    InvalidRequest,
    LoadError,
)
from lorapool.types import (
    Chunk,
    GenerationRequest,
    LoadedAdapter,
    LoraConfig,
    SamplingParams,
    Usage,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"
TGI = FIXTURES / "tgi"
SGL = FIXTURES / "sglang"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def fixture(path: Path) -> Any:
    return json.loads(path.read_text())


def adapter(name: str, rank: int = 8) -> LoadedAdapter:
    cfg = LoraConfig(r=rank, lora_alpha=16, target_modules=("q_proj", "v_proj"))
    return LoadedAdapter(name, cfg, b"weights", "ab" * 32)


async def collect(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in stream]


# -- TGI ------------------------------------------------------------------------------


def sse(events: list[dict[str, Any]], *, done: bool = False) -> bytes:
    """Events framed as TGI's router frames them (axum ``Event::json_data``)."""
    lines = [f"data:{json.dumps(e, ensure_ascii=False)}\n\n" for e in events]
    return ("".join(lines) + ("data: [DONE]\n\n" if done else "")).encode()


def rendered_stream(snapshot: dict[str, Any]) -> bytes:
    """A recorded ``/generate`` answer as ``/generate_stream`` sends it (server.rs)."""
    details, tokens = snapshot["details"], snapshot["details"]["tokens"]
    events: list[dict[str, Any]] = []
    for i, token in enumerate(tokens, start=1):
        last = i == len(tokens)
        events.append(
            {
                "index": i,
                "token": token,
                "generated_text": snapshot["generated_text"] if last else None,
                "details": {
                    "finish_reason": details["finish_reason"],
                    "generated_tokens": details["generated_tokens"],
                    "seed": details["seed"],
                }
                if last
                else None,
            }
        )
    return sse(events)


Route = Callable[[httpx.Request], httpx.Response]


def tgi(
    stream: Route | bytes | None = None,
    *,
    adapters: dict[str, str] | list[str] | None = None,
    seen: list[httpx.Request] | None = None,
) -> TGIBackend:
    info = (TGI / "info_openapi_example.json").read_bytes()

    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        if request.url.path == "/info":
            return httpx.Response(200, content=info, headers={"content-type": "application/json"})
        if request.url.path == "/health":
            return httpx.Response(200)
        assert stream is not None, f"unexpected {request.method} {request.url.path}"
        if callable(stream):
            return stream(request)
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

    return TGIBackend(
        "http://tgi.test",
        adapters=adapters,
        transport=httpx.MockTransport(handler),
        retries=2,
        retry_backoff=0,
    )


async def test_start_reads_info_and_reports_static_adapters() -> None:
    b = tgi(adapters={"dbpedia": "predibase/dbpedia", "support": ""})
    await b.start()
    caps = b.capabilities
    assert caps.base_model == "bigscience/blomm-560m"
    assert caps.max_seq_len == 2048 and caps.max_batch == 64  # min(64, max_concurrent 128)
    assert caps.max_slots == 2 and not caps.dynamic_load and not caps.pinning
    assert b.adapters == {"dbpedia": "predibase/dbpedia", "support": "support"}
    assert await b.health()
    await b.aclose()
    assert not await b.health()
    b = tgi()
    await b.start()
    assert b.capabilities.max_slots == 1  # no adapters: the base model only
    await b.aclose()


async def test_recorded_stream_becomes_one_final_chunk_with_usage() -> None:
    seen: list[httpx.Request] = []
    b = tgi((TGI / "stream_gpt2_length.sse").read_bytes(), seen=seen)
    await b.start()
    params = SamplingParams(max_tokens=1, temperature=0.0)
    chunks = await collect(b.generate(GenerationRequest("r", "test", params)))
    assert chunks == [Chunk(".", (13,), "length", Usage(1, 1), adapter_id=None, served_by="base")]
    body = json.loads(seen[-1].content)
    assert seen[-1].url.path == "/generate_stream"
    assert body == {
        "inputs": "test",
        "parameters": {"max_new_tokens": 1, "do_sample": False, "details": True},
    }  # base: no adapter_id; greedy: no temperature (TGI refuses 0)
    await b.aclose()


async def test_details_without_input_length_count_no_prompt_tokens() -> None:
    b = tgi((TGI / "stream_flan_t5_no_input_length.sse").read_bytes())
    await b.start()
    params = SamplingParams(max_tokens=1, temperature=0.0)
    [chunk] = await collect(b.generate(GenerationRequest("r", "test", params)))
    assert (chunk.text, chunk.token_ids, chunk.finish_reason) == (" ", (3,), "length")
    assert chunk.usage == Usage(0, 1)
    await b.aclose()


async def test_text_held_back_for_a_stop_string_is_released_at_the_end() -> None:
    b = tgi((TGI / "stream_gpt2_length.sse").read_bytes())
    await b.start()
    params = SamplingParams(max_tokens=1, temperature=0.0, stop=".x")  # "." may start ".x"
    [chunk] = await collect(b.generate(GenerationRequest("r", "test", params)))
    assert (chunk.text, chunk.finish_reason) == (".", "length")
    await b.aclose()


async def test_lora_stream_sends_the_adapter_and_skips_special_tokens_text() -> None:
    snapshot = fixture(TGI / "generate_lora_dbpedia_adapter.json")
    seen: list[httpx.Request] = []
    b = tgi(
        rendered_stream(snapshot), adapters={"tenant-a/dbpedia": "predibase/dbpedia"}, seen=seen
    )
    await b.start()
    await b.load(adapter("tenant-a/dbpedia"), 0)
    params = SamplingParams(max_tokens=40, temperature=0.0)
    request = GenerationRequest("r", "Article Type:", params, "tenant-a/dbpedia", 0)
    chunks = await collect(b.generate(request))
    assert json.loads(seen[-1].content)["parameters"]["adapter_id"] == "predibase/dbpedia"
    assert "".join(c.text for c in chunks) == snapshot["generated_text"] == "  11"
    assert [t for c in chunks for t in c.token_ids] == [1, 28705, 1, 28705, 28740, 28740, 2]
    assert [c.finish_reason for c in chunks] == [None] * 6 + ["stop"]  # eos_token
    assert chunks[-1].usage == Usage(0, 7)
    assert {c.served_by for c in chunks} == {"adapter"}
    assert {c.adapter_id for c in chunks} == {"tenant-a/dbpedia"}
    await b.aclose()


async def test_stop_sequence_is_removed_from_the_text() -> None:
    snapshot = fixture(TGI / "generate_phi_stop_sequence.json")
    seen: list[httpx.Request] = []
    b = tgi(rendered_stream(snapshot), seen=seen)
    await b.start()
    params = SamplingParams(max_tokens=10, temperature=0.5, top_p=0.9, seed=0, stop="network")
    chunks = await collect(b.generate(GenerationRequest("r", "Test request", params)))
    assert json.loads(seen[-1].content)["parameters"] == {
        "max_new_tokens": 10,
        "do_sample": True,
        "details": True,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 0,
        "stop": ["network"],
    }
    # TGI's own text keeps "network" (return_full_text also prepended the prompt).
    assert snapshot["generated_text"] == "Test request to send data over a network"
    assert "".join(c.text for c in chunks) == " to send data over a "
    assert len([t for c in chunks for t in c.token_ids]) == 6
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage == Usage(0, 6)
    await b.aclose()


async def test_validation_errors_are_invalid_requests() -> None:
    body = (TGI / "validation_error_422.json").read_bytes()
    as_status = tgi(lambda r: httpx.Response(422, content=body))
    as_event = tgi(sse([json.loads(body)]))  # how /generate_stream reports it: status 200
    for b in (as_status, as_event):
        await b.start()
        with pytest.raises(InvalidRequest, match=r"must be <= 1512"):
            await collect(b.generate(GenerationRequest("r", "test", SamplingParams())))
        await b.aclose()


async def test_other_errors_are_backend_errors_and_overload_is_retried() -> None:
    calls: list[int] = []
    recorded = (TGI / "stream_gpt2_length.sse").read_bytes()

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        if len(calls) == 2:
            overloaded = {"error": "Model is overloaded", "error_type": "overloaded"}
            return httpx.Response(200, content=sse([overloaded]))
        return httpx.Response(200, content=recorded)

    b = tgi(flaky)
    await b.start()
    params = SamplingParams(max_tokens=1, temperature=0.0)
    [chunk] = await collect(b.generate(GenerationRequest("r", "test", params)))
    assert chunk.token_ids == (13,) and len(calls) == 3
    await b.aclose()

    failed = {"error": "Request failed during generation", "error_type": "generation"}
    b = tgi(sse([failed]))
    await b.start()
    with pytest.raises(BackendError, match="failed during generation"):
        await collect(b.generate(GenerationRequest("r", "test", params)))
    await b.aclose()

    b = tgi(b"")  # the server closed the stream before the last token
    await b.start()
    with pytest.raises(BackendError, match="before the last token"):
        await collect(b.generate(GenerationRequest("r", "test", params)))
    await b.aclose()


async def test_an_adapter_tgi_was_not_started_with_is_refused_at_load() -> None:
    seen: list[httpx.Request] = []
    b = tgi(b"", adapters=["tenant-a/known"], seen=seen)
    await b.start()
    with pytest.raises(LoadError, match="LORA_ADAPTERS") as err:
        await b.load(adapter("tenant-b/unknown"), 0)
    assert err.value.adapter_id == "tenant-b/unknown"
    # Never served from the base model in its place: generate refuses, TGI is not asked.
    request = GenerationRequest("r", "x", GREEDY, "tenant-b/unknown", 0)
    with pytest.raises(BackendError, match="not loaded"):
        await collect(b.generate(request))
    assert [r.url.path for r in seen] == ["/info"]
    with pytest.raises(LoadError, match="max_rank"):
        await b.load(adapter("tenant-a/known", rank=128), 0)
    await b.load(adapter("tenant-a/known"), 0)
    await b.unload("tenant-a/known")
    with pytest.raises(BackendError, match="not loaded"):
        await collect(b.generate(GenerationRequest("r", "x", GREEDY, "tenant-a/known", 0)))
    await b.aclose()


async def test_chat_stream_reads_deltas_and_usage() -> None:
    chunks_json = fixture(TGI / "chat_stream_usage.json")
    seen: list[httpx.Request] = []
    b = tgi(sse(chunks_json, done=True), adapters={"a": "lora-a"}, seen=seen)
    await b.start()
    messages = [{"role": "user", "content": "Say 'OK!'"}]
    params = SamplingParams(max_tokens=10, temperature=0.0, seed=42)
    chunks = await collect(b.generate(GenerationRequest("r", messages, params)))
    body = json.loads(seen[-1].content)
    assert seen[-1].url.path == "/v1/chat/completions"
    assert body["model"] == "tgi" and body["temperature"] == 0.0 and body["seed"] == 42
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == messages and body["max_tokens"] == 10
    assert "".join(c.text for c in chunks) == "OK!"
    assert [c.finish_reason for c in chunks] == [None, None, "stop"]
    assert chunks[-1].usage == Usage(39, 3)
    await b.load(adapter("a"), 0)
    await collect(b.generate(GenerationRequest("r", messages, params, "a", 0)))
    assert json.loads(seen[-1].content)["model"] == "lora-a"  # TGI reads model as adapter_id
    await b.aclose()


async def test_tgi_lifecycle_misuse_is_a_typed_error() -> None:
    b = tgi(b"", adapters=["a"])
    with pytest.raises(BackendNotStarted, match="TGIBackend"):
        await b.load(adapter("a"), 0)
    with pytest.raises(BackendNotStarted):
        await collect(b.generate(GenerationRequest("r", "x", GREEDY)))
    await b.start()
    await b.aclose()
    with pytest.raises(BackendClosed):
        await b.load(adapter("a"), 0)
    with pytest.raises(BackendClosed):
        await b.start()


async def test_tgi_error_statuses_keep_their_status_after_the_retries() -> None:
    b = tgi(lambda r: httpx.Response(503, json={"error": "busy", "error_type": "overloaded"}))
    await b.start()
    with pytest.raises(BackendServerError) as err:
        await collect(b.generate(GenerationRequest("r", "x", GREEDY)))
    assert err.value.status == 503 and err.value.server_message == "busy"
    await b.aclose()


def test_tgi_parameters_and_finish_reasons() -> None:
    sampled = generate_body("x", SamplingParams(temperature=0.7, top_p=1.0), "lora")
    assert sampled["parameters"]["temperature"] == 0.7
    assert "top_p" not in sampled["parameters"]  # TGI refuses top_p >= 1
    assert sampled["parameters"]["do_sample"] is True
    assert sampled["parameters"]["adapter_id"] == "lora"
    reasons = [tgi_finish_reason(r) for r in ("length", "eos_token", "stop_sequence")]
    assert reasons == ["length", "stop", "stop"]


def test_stop_trimmer_holds_back_a_possible_stop_string() -> None:
    t = StopTrimmer(["END"])
    assert [t.push("abc E"), t.push("N"), t.push("D and more")] == ["abc ", "", ""]
    assert t.matched and t.push("later") == "" and t.flush() == ""
    t = StopTrimmer(["END"])
    assert t.push("xE") == "x" and t.push("x") == "Ex" and t.push("EN") == ""
    assert t.flush() == "EN"  # no match by the end: nothing is lost
    assert StopTrimmer([]).push("anything") == "anything"


# -- SGLang ---------------------------------------------------------------------------

FINAL = fixture(SGL / "generate_length_32.json")
DELTAS: list[str] = fixture(SGL / "stream_text_deltas_length_32.json")
IDS: list[int] = FINAL["output_ids"]


def sglang_outputs(*, incremental: bool) -> Iterator[dict[str, Any]]:
    """The streamed outputs of the recorded request, as SGLang 0.5.23 builds them."""
    meta = FINAL["meta_info"]
    for k in range(1, len(DELTAS)):
        running = {"id": meta["id"], "finish_reason": None, "prompt_tokens": 5}
        running["completion_tokens"] = k
        if incremental:
            yield {"text": DELTAS[k - 1], "output_ids": [IDS[k - 1]], "meta_info": running}
        else:  # cumulative text; the ids are the engine's live list, possibly ahead already
            yield {"text": "".join(DELTAS[:k]), "output_ids": IDS, "meta_info": running}
    if incremental:
        yield {"text": DELTAS[-1], "output_ids": IDS[-1:], "meta_info": meta}
    else:
        yield FINAL


@pytest.mark.parametrize("incremental", [False, True])
def test_sglang_stream_turns_outputs_into_one_token_chunks(incremental: bool) -> None:
    stream = SGLangStream(incremental=incremental, adapter_id=None, served_by="base")
    chunks = [stream.feed(out) for out in sglang_outputs(incremental=incremental)]
    assert [c.text for c in chunks] == DELTAS
    assert [c.token_ids for c in chunks] == [(t,) for t in IDS]
    assert "".join(c.text for c in chunks) == FINAL["text"]
    assert [c.finish_reason for c in chunks] == [None] * 31 + ["length"]
    assert chunks[-1].usage == Usage(5, 32) and stream.finished


def test_sglang_final_output_at_eos_keeps_the_eos_id() -> None:
    [chunk] = [SGLangStream().feed(fixture(SGL / "generate_stop_eos.json"))]
    assert (chunk.text, chunk.token_ids) == ("France.", (50100, 13, 128009))
    assert chunk.finish_reason == "stop" and chunk.usage == Usage(41, 3)


def test_sglang_trimmed_stop_string_never_rewinds_the_text() -> None:
    stream = SGLangStream()
    meta = {"finish_reason": None, "prompt_tokens": 3, "completion_tokens": 2}
    first = stream.feed({"text": "Paris EN", "output_ids": [1, 2], "meta_info": meta})
    done = {"finish_reason": {"type": "stop", "matched": "END"}, "prompt_tokens": 3}
    last = stream.feed({"text": "Paris ", "output_ids": [1, 2, 3], "meta_info": done})
    assert (first.text, last.text, last.token_ids) == ("Paris EN", "", (3,))
    assert last.usage == Usage(3, 3)


def test_sglang_finish_reasons() -> None:
    assert sglang_finish_reason(None) is None
    assert sglang_finish_reason(FINAL["meta_info"]["finish_reason"]) == "length"
    assert sglang_finish_reason({"type": "stop", "matched": 128009}) == "stop"
    assert sglang_finish_reason({"type": "abort", "message": None, "status_code": None}) == (
        "cancelled"
    )
    # FINISH_ABORT reasons from SGLang 0.5.23 (managers/schedule_batch.py).
    bad = {"type": "abort", "message": "invalid stop_regex '(': x", "status_code": 400}
    with pytest.raises(InvalidRequest, match="invalid stop_regex"):
        sglang_finish_reason(bad)
    busy = {
        "type": "abort",
        "message": "Retracted under decode memory pressure",
        "status_code": 503,
    }
    with pytest.raises(BackendError, match="memory pressure"):
        sglang_finish_reason(busy)


def test_sglang_sampling_params_use_sglangs_field_names() -> None:
    # Fields of sglang.srt.sampling.sampling_params.SamplingParams (0.5.23).
    fields = {"max_new_tokens", "stop", "temperature", "top_p", "ignore_eos", "sampling_seed"}
    greedy = sglang_sampling_params(SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert greedy == {"max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0, "ignore_eos": True}
    full = sglang_sampling_params(SamplingParams(temperature=0.7, top_p=0.9, seed=3, stop=["x"]))
    assert set(full) <= fields and full["sampling_seed"] == 3 and full["stop"] == ["x"]


class _Tokenizer:
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class _Manager:
    def __init__(self, incremental: bool) -> None:
        self.tokenizer = _Tokenizer()
        self.context_len = 8192
        self.model_path = "/models/qwen2.5-0.5b-instruct"
        self.served_model_name = None
        self.incremental_streaming_output = incremental
        self.aborted: list[str] = []

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.aborted.append(rid)


class _Args:
    enable_lora = True
    max_loras_per_batch = 3
    max_lora_rank = 32
    max_running_requests = 16


class FakeEngine:
    """The ``sglang.Engine`` methods SGLangBackend calls, answering with recorded outputs."""

    def __init__(self, *, incremental: bool = False, load_result: Any = None) -> None:
        self.server_args = _Args()
        self.tokenizer_manager = _Manager(incremental)
        self.incremental = incremental
        self.load_result = load_result or fixture(SGL / "load_lora_adapter_ok.json")
        self.calls: list[tuple[Any, ...]] = []

    async def async_load_lora_adapter(self, name: str, path: str, pinned: bool = False) -> Any:
        self.calls.append(("load", name, path, pinned))
        return self.load_result

    async def async_unload_lora_adapter(self, name: str) -> Any:
        self.calls.append(("unload", name))
        return {"success": True, "error_message": ""}

    async def async_generate(self, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(("generate", kwargs))

        async def outputs() -> AsyncIterator[dict[str, Any]]:
            for out in sglang_outputs(incremental=self.incremental):
                yield out

        return outputs()


@pytest.mark.parametrize("incremental", [False, True])
async def test_sglang_backend_loads_pinned_and_streams(incremental: bool) -> None:
    engine = FakeEngine(incremental=incremental)
    b = SGLangBackend(engine=engine, max_slots=2, max_rank=16)
    await b.start()
    caps = b.capabilities
    assert (caps.max_rank, caps.max_batch, caps.max_seq_len) == (32, 16, 8192)
    assert caps.base_model == "qwen2.5-0.5b-instruct" and caps.dynamic_load and caps.pinning
    await b.load(adapter("tenant/a"), 1)
    _, name, path, pinned = engine.calls[-1]
    assert name == "tenant/a" and path.endswith("ab" * 32) and pinned is True
    request = GenerationRequest("rid-1", "The capital of France is", GREEDY, "tenant/a", 1)
    chunks = await collect(b.generate(request))
    _, kwargs = engine.calls[-1]
    assert kwargs["lora_path"] == "tenant/a" and kwargs["rid"] == "rid-1" and kwargs["stream"]
    assert kwargs["input_ids"] == [ord(c) for c in "The capital of France is"]
    assert kwargs["sampling_params"]["temperature"] == 0.0
    assert "".join(c.text for c in chunks) == FINAL["text"]
    assert chunks[-1].usage == Usage(5, 32) and chunks[-1].finish_reason == "length"
    assert engine.tokenizer_manager.aborted == []  # finished: nothing to abort
    await b.load(adapter("tenant/b"), 1)  # same slot: the occupant leaves first
    assert ("unload", "tenant/a") in engine.calls
    await b.aclose()
    assert engine.calls[-1] == ("unload", "tenant/b")  # an adopted engine keeps running
    assert not await b.health()


async def test_sglang_backend_aborts_a_closed_stream_and_types_failures() -> None:
    engine = FakeEngine()
    b = SGLangBackend(engine=engine, max_slots=2)
    await b.start()
    stream = b.generate(GenerationRequest("rid-2", "x", GREEDY))
    first = await stream.__anext__()
    assert first.text == " Paris" and first.served_by == "base"
    await stream.aclose()  # type: ignore[attr-defined]
    assert engine.tokenizer_manager.aborted == ["rid-2"]
    assert engine.calls[-1][1]["lora_path"] is None  # base request
    with pytest.raises(BackendError, match="not loaded"):
        await collect(b.generate(GenerationRequest("r", "x", GREEDY, "never-loaded", 0)))
    failing = FakeEngine(load_result={"success": False, "error_message": "rank 64 > 32"})
    b2 = SGLangBackend(engine=failing, max_slots=2)
    await b2.start()
    with pytest.raises(LoadError, match="rank 64 > 32"):
        await b2.load(adapter("tenant/a"), 0)
    with pytest.raises(LoadError, match="max_lora_rank"):
        await b2.load(adapter("tenant/big", rank=64), 0)
    await b2.aclose()
    await b.aclose()


class _ChatTokenizer(_Tokenizer):
    chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> Any:
        assert kw == {"add_generation_prompt": True, "tokenize": True}
        return {"input_ids": [len(m["content"]) for m in messages]}  # a BatchEncoding's shape


async def test_sglang_encodes_chat_through_the_template_and_refuses_bad_messages() -> None:
    engine = FakeEngine()
    b = SGLangBackend(engine=engine, max_slots=2)
    with pytest.raises(BackendNotStarted):
        b.encode("x")
    await b.start()
    assert b.encode("ab") == [97, 98]
    chat = [{"role": "user", "content": "hello"}]
    with pytest.raises(InvalidRequest, match="no chat template"):
        b.encode(chat)
    engine.tokenizer_manager.tokenizer = _ChatTokenizer()
    assert b.encode(chat) == [5]
    with pytest.raises(InvalidRequest, match="message 0 must be a mapping"):
        b.encode([{"role": "user", "content": 3}])  # type: ignore[dict-item]
    with pytest.raises(InvalidRequest, match="empty"):
        b.encode([])
    engine.tokenizer_manager.tokenizer = None
    with pytest.raises(InvalidRequest, match="skip_tokenizer_init"):
        b.encode("x")
    await b.aclose()
    with pytest.raises(BackendClosed):
        b.engine  # noqa: B018


async def test_sglang_backend_refuses_an_engine_with_too_few_lora_slots() -> None:
    engine = FakeEngine()
    engine.server_args.max_loras_per_batch = 2
    with pytest.raises(BackendError, match="max_loras_per_batch=2"):
        await SGLangBackend(engine=engine, max_slots=2).start()


async def test_missing_sglang_package_names_the_extra() -> None:
    try:
        import sglang  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("sglang is installed here")
    with pytest.raises(BackendUnavailable, match=r"pip install 'lorapool\[sglang\]'"):
        await SGLangBackend("any-model").start()


# -- the sampling set (issue 26) ------------------------------------------------------


def test_sglang_sampling_params_carry_the_sampling_set_in_sglangs_names() -> None:
    from lorapool.types import StructuredOutput

    # Fields of sglang.srt.sampling.sampling_params.SamplingParams (0.5).
    fields = {
        "max_new_tokens", "stop", "temperature", "top_p", "ignore_eos", "sampling_seed",
        "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
        "logit_bias", "stop_token_ids", "min_new_tokens", "json_schema", "regex",
    }  # fmt: skip
    params = SamplingParams(
        top_k=4,
        min_p=0.1,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=1.3,
        logit_bias={11: -100.0},
        stop_token_ids=[2],
        min_tokens=3,
        structured=StructuredOutput.json_schema({"type": "object"}),
    )
    out = sglang_sampling_params(params)
    assert set(out) <= fields
    assert (out["top_k"], out["min_p"], out["min_new_tokens"]) == (4, 0.1, 3)
    assert out["logit_bias"] == {"11": -100.0} and out["stop_token_ids"] == [2]
    assert out["repetition_penalty"] == 1.3 and out["json_schema"] == '{"type": "object"}'
    choice = sglang_sampling_params(
        SamplingParams(structured=StructuredOutput.choice(["a+b", "c"]))
    )
    assert choice["regex"] == r"(a\+b|c)"
    obj = sglang_sampling_params(SamplingParams(structured=StructuredOutput.json_object()))
    assert json.loads(obj["json_schema"]) == {"type": "object"}


async def test_sglang_refuses_what_it_does_not_serve_and_drops_a_matched_stop_token() -> None:
    from lorapool.backends.sglang import SGLANG_SAMPLING
    from lorapool.errors import UnsupportedParameter
    from lorapool.types import StructuredOutput

    engine = FakeEngine()
    b = SGLangBackend(engine=engine, max_slots=2)
    await b.start()
    assert b.capabilities.sampling == SGLANG_SAMPLING
    for params in (
        SamplingParams(n=2),
        SamplingParams(logprobs=True),
        SamplingParams(structured=StructuredOutput.grammar('start: "a"')),
    ):
        with pytest.raises(UnsupportedParameter, match="SGLangBackend"):
            await collect(b.generate(GenerationRequest("r", "x", params)))
    assert not [c for c in engine.calls if c[0] == "generate"]  # nothing reached the engine
    await b.aclose()
    stream = SGLangStream(incremental=True, stop_token_ids=frozenset({7}))
    stream.feed({"text": "a", "output_ids": [5], "meta_info": {"finish_reason": None}})
    meta = {"finish_reason": {"type": "stop", "matched": 7}, "prompt_tokens": 3}
    last = stream.feed(
        {"text": "", "output_ids": [7], "meta_info": {**meta, "completion_tokens": 2}}
    )
    assert last.token_ids == () and last.finish_reason == "stop"
    assert last.usage == Usage(3, 2)  # the stop token counts


def test_tgi_parameters_carry_top_k_repetition_penalty_and_the_grammar() -> None:
    from lorapool.backends.tgi import chat_body
    from lorapool.types import StructuredOutput

    params = SamplingParams(
        top_k=5, repetition_penalty=1.2, structured=StructuredOutput.json_schema({"type": "object"})
    )
    body = generate_body("x", params, None)["parameters"]
    assert body["top_k"] == 5 and body["repetition_penalty"] == 1.2
    assert body["grammar"] == {"type": "json", "value": {"type": "object"}}
    regex = generate_body("x", SamplingParams(structured=StructuredOutput.regex("[0-9]+")), None)
    assert regex["parameters"]["grammar"] == {"type": "regex", "value": "[0-9]+"}
    choice = SamplingParams(structured=StructuredOutput.choice(["yes", "n.o"]))
    chat = chat_body([{"role": "user", "content": "hi"}], choice, None)
    assert chat["response_format"] == {"type": "regex", "value": r"(yes|n\.o)"}
    assert "grammar" not in chat


async def test_tgi_refuses_what_it_does_not_serve_before_sending_anything() -> None:
    from lorapool.backends.tgi import TGI_SAMPLING
    from lorapool.errors import UnsupportedParameter

    seen: list[httpx.Request] = []
    b = tgi(b"", seen=seen)
    await b.start()
    assert b.capabilities.sampling == TGI_SAMPLING
    for params in (
        SamplingParams(n=2),
        SamplingParams(logprobs=True),
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(min_tokens=1),
    ):
        with pytest.raises(UnsupportedParameter, match="TGIBackend"):
            await collect(b.generate(GenerationRequest("r", "x", params)))
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(UnsupportedParameter, match="top_k") as err:
        await collect(b.generate(GenerationRequest("r", chat, SamplingParams(top_k=3))))
    assert err.value.backend == "TGIBackend"
    assert [r.url.path for r in seen] == ["/info"]
    await b.aclose()
