"""The audit log through a real pool and the real server (issue 29, item 4).

TorchBackend on the SmolLM2 demo model, real PEFT adapters, the registry in a SQLite
file, uvicorn on 127.0.0.1 driven with httpx: registrations, an unregistration, a
manual rollback and refused accesses (through the pool and through the server) land in
the log, ``GET /admin/audit`` returns them to the admin key and refuses a tenant key as
it refuses every admin route, and the entries and their chain survive a restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from lorapool import AdapterPool, SamplingParams  # noqa: E402
from lorapool.errors import AccessDenied, AdapterNotFound  # noqa: E402
from lorapool.registry import Registry  # noqa: E402
from lorapool.server import ApiKeys, Caller, Registration, create_app  # noqa: E402

from .serving import serve_app  # noqa: E402

KEYS = {"key-acme": "acme", "key-globex": "globex", "key-admin": Caller("platform", admin=True)}
ADMIN = {"Authorization": "Bearer key-admin"}
ACME = {"Authorization": "Bearer key-acme"}
GLOBEX = {"Authorization": "Bearer key-globex"}


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _actions(page: dict[str, object]) -> list[tuple[str, str | None, str | None]]:
    data = page["data"]
    assert isinstance(data, list)
    return [(e["action"], e["tenant"], e["adapter"]) for e in data]


async def test_the_log_of_a_real_pool_is_served_to_the_admin_only(
    tmp_path: Path, model_dir: Path, adapters: dict[str, Path]
) -> None:
    from lorapool.backends.torch import TorchBackend

    db = tmp_path / "registry.sqlite"
    backend = TorchBackend(model_dir, max_slots=2, max_rank=32, max_batch=4, max_seq_len=128)
    pool = AdapterPool(backend, registry=db)
    root = str(adapters["r8-attn"].parent)
    registration = Registration(tenant_sources=(root,), admin_sources=(root,))
    app = create_app(pool, auth=ApiKeys(KEYS), registration=registration)
    async with serve_app(app) as running, httpx.AsyncClient(base_url=running.url) as http:
        await pool.register("support", str(adapters["r8-attn"]), tenant="acme", version="v1")
        await pool.register("support", str(adapters["r16-all"]), tenant="acme", version="v2")
        await pool.register(
            "summary", str(adapters["r16-qv-rslora"]), tenant="platform", shared=True, version="v1"
        )
        out = await pool.complete(
            "Hello", adapter="support", tenant="acme", params=SamplingParams(max_tokens=2)
        )
        assert out.served_by == "adapter"
        assert pool.rollback("support", tenant="acme") == {"v1": 100.0}
        with pytest.raises(AccessDenied):  # globex may use platform's alias, not change it
            pool.rollback("platform/summary", tenant="globex")
        with pytest.raises(AdapterNotFound):  # acme's private alias: a miss, never recorded
            pool.rollback("acme/support", tenant="globex")

        # Through HTTP: a tenant registers and unregisters; refusals of the server's own.
        body = {"lora_name": "legal", "lora_path": str(adapters["r32-attn"])}
        answer = await http.post("/v1/load_lora_adapter", json=body, headers=GLOBEX)
        assert answer.status_code == 200, answer.text
        answer = await http.post(
            "/v1/load_lora_adapter", json={**body, "lora_name": "x", "shared": True}, headers=ACME
        )
        assert answer.status_code == 403
        answer = await http.post(
            "/v1/unload_lora_adapter", json={"lora_name": "platform/summary"}, headers=GLOBEX
        )
        assert answer.status_code == 403
        answer = await http.post(
            "/v1/unload_lora_adapter", json={"lora_name": "legal"}, headers=GLOBEX
        )
        assert answer.status_code == 200, answer.text

        # The admin reads it all; filters; paging.
        answer = await http.get("/admin/audit", headers=ADMIN)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        expected = [
            ("register", "acme", "acme/support@v1"),
            ("register", "acme", "acme/support@v2"),
            ("register", "platform", "platform/summary@v1"),
            ("rollback", "acme", "acme/support"),
            ("access_denied", "globex", "platform/summary"),
            ("register", "globex", "globex/legal"),
            ("access_denied", "acme", "x"),
            ("access_denied", "globex", "platform/summary"),
            ("unregister", "globex", "globex/legal"),
        ]
        assert _actions(page) == expected
        assert page["has_more"] is False and page["head"]["seq"] == len(expected)
        entries = page["data"]
        assert entries[3]["detail"] == {
            "automatic": False,
            "from": {"v2": 100.0},
            "to": {"v1": 100.0},
        }
        assert entries[5]["actor"] == "globex"  # the source as registered: symlinks resolved
        assert entries[5]["detail"]["source"] == _real(adapters["r32-attn"])
        assert entries[6]["detail"]["asked"] == "register a shared adapter"
        assert entries[7]["detail"]["asked"] == "unregister"
        assert entries[0]["prev"] == "0" * 64 and entries[1]["prev"] == entries[0]["hash"]
        answer = await http.get("/admin/audit?tenant=globex&action=access_denied", headers=ADMIN)
        assert _actions(answer.json()) == [expected[4], expected[7]]
        answer = await http.get("/admin/audit?limit=2&after=2", headers=ADMIN)
        assert _actions(answer.json()) == expected[2:4] and answer.json()["has_more"] is True
        answer = await http.get("/admin/audit?limit=0", headers=ADMIN)
        assert answer.status_code == 400 and "limit" in answer.json()["error"]["message"]

        # A tenant key: the answer every admin route gives it, and the refusal recorded.
        refused = await http.get("/admin/audit", headers=ACME)
        assert refused.status_code == 403
        assert refused.json()["error"] == {
            "message": "this route needs an admin key",
            "type": "permission_denied",
            "param": None,
            "code": 403,
        }
        filtered = await http.get("/admin/audit?tenant=globex", headers=ACME)
        assert filtered.status_code == 403 and filtered.json() == refused.json()
        assert "globex" not in filtered.text and "support" not in filtered.text
        assert (await http.get("/admin/audit")).status_code == 401
        answer = await http.get("/admin/audit?after=9", headers=ADMIN)
        assert _actions(answer.json()) == [
            ("access_denied", "acme", None),
            ("access_denied", "acme", None),
        ]
        assert answer.json()["data"][0]["detail"]["asked"] == "GET /admin/audit"

        document = (await http.get("/openapi.json")).json()
        operation = document["paths"]["/admin/audit"]["get"]
        assert {"200", "401", "403"} <= set(operation["responses"])
        assert {p["name"] for p in operation["parameters"]} == {
            "tenant",
            "adapter",
            "action",
            "after",
            "limit",
        }
        assert pool.audit.verify() == 11

    # The pool closed its registry; the file keeps the log, verifiable by the CLI.
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "lorapool", "audit", "verify", "--registry", str(db)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.startswith("OK 11 entries"), done
    reopened = Registry.open(db)
    try:
        assert [e.action for e in reopened.audit.entries(tenant="acme")][:3] == [
            "register",
            "register",
            "rollback",
        ]
        assert json.dumps(reopened.audit.entries()[-1].as_dict())
    finally:
        reopened.close()
