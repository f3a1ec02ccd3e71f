"""``GET /admin/audit``'s logic (MockBackend, the app in process): the admin reads the log
with filters and pages, bad parameters are 400s, and every other caller gets the one
answer every admin route gives it, recorded. Real HTTP and TorchBackend:
tests/integration/test_audit_log.py."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient

from lorapool import AdapterPool
from lorapool.registry import Registry
from lorapool.server import ApiKeys, Caller, create_app
from lorapool.server.admin import ADMIN_ONLY
from lorapool.server.openapi import openapi_document
from lorapool.testing import MockBackend

KEYS = {"k-acme": "acme", "k-admin": Caller("platform", admin=True)}


def _client(pool: AdapterPool) -> TestClient:
    return TestClient(create_app(pool, auth=ApiKeys(KEYS)))


def test_the_admin_reads_pages_and_filters(tmp_path: Path) -> None:
    pool = AdapterPool(MockBackend(), registry=Registry.open(tmp_path / "r.sqlite"))
    for i in range(5):
        pool.audit.record("register", tenant="acme" if i % 2 else "globex", adapter=f"a/{i}")
    admin = {"Authorization": "Bearer k-admin"}
    with _client(pool) as http:
        page = http.get("/admin/audit", headers=admin).json()
        assert [e["seq"] for e in page["data"]] == [1, 2, 3, 4, 5]
        assert page["head"] == {"seq": 5, "hash": page["data"][-1]["hash"]}
        assert page["has_more"] is False
        page = http.get("/admin/audit?tenant=acme", headers=admin).json()
        assert [e["adapter"] for e in page["data"]] == ["a/1", "a/3"]
        page = http.get("/admin/audit?after=1&limit=2", headers=admin).json()
        assert [e["seq"] for e in page["data"]] == [2, 3] and page["has_more"] is True
        for bad in (
            "limit=0",
            "limit=1001",
            "limit=x",
            "after=-1",
            "after=99999999999999999999",
            "tenant=",
        ):
            answer = http.get(f"/admin/audit?{bad}", headers=admin)
            assert answer.status_code == 400, (bad, answer.text)
            assert answer.json()["error"]["type"] == "invalid_request_error"
    pool.registry.close()


def test_a_tenant_key_is_refused_and_the_refusal_recorded() -> None:
    pool = AdapterPool(MockBackend())
    pool.audit.record("register", tenant="globex", adapter="globex/secret")
    with _client(pool) as http:
        first = http.get("/admin/audit", headers={"Authorization": "Bearer k-acme"})
        second = http.get(
            "/admin/audit?tenant=globex&limit=0", headers={"Authorization": "Bearer k-acme"}
        )
        assert http.get("/admin/audit").status_code == 401
    assert first.status_code == second.status_code == 403
    assert first.json() == second.json()
    assert first.json()["error"]["message"] == ADMIN_ONLY and "globex" not in first.text
    denied = pool.audit.entries(action="access_denied")
    assert [(e.tenant, e.detail["asked"]) for e in denied] == [
        ("acme", "GET /admin/audit"),
        ("acme", "GET /admin/audit"),
    ]
    assert pool.audit.verify() == 3


def test_the_route_is_in_the_openapi_document() -> None:
    operation = openapi_document()["paths"]["/admin/audit"]["get"]
    assert {"200", "400", "401", "403"} <= set(operation["responses"])
    assert "AuditEntry" in openapi_document()["components"]["schemas"]
