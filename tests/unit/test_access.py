"""SourceRules: where a caller may register adapters from, and refusals that reveal nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from lorapool import AdapterPool
from lorapool.access import SourceRules
from lorapool.errors import SourceNotAllowed
from lorapool.registry import Registry
from lorapool.testing import MockBackend

from .test_store import make_adapters


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    """``/srv/adapters/{acme,globex}`` with one adapter each, and things that are not adapters."""
    base = tmp_path / "srv"
    for tenant in ("acme", "globex"):
        (base / tenant).mkdir(parents=True)
        dirs = make_adapters(base / tenant, 1)
        (dirs["t/a0"]).rename(base / tenant / "support")
    (base / "acme" / "a-file").write_text("x")
    return base


def _refusal(rules: SourceRules, source: str, tenant: str = "acme") -> str:
    with pytest.raises(SourceNotAllowed) as refused:
        rules.check(source, tenant)
    return str(refused.value).replace(source, "<source>")


def test_nothing_is_allowed_by_default(roots: Path) -> None:
    rules = SourceRules()
    for source in (
        str(roots / "acme" / "support"),
        "https://example.com/adapters/x/",
        "s3://adapters/acme/support",
        "file:///etc",
    ):
        with pytest.raises(SourceNotAllowed, match="not allowed"):
            rules.check(source, "acme")


def test_a_tenant_reaches_its_own_root_only(roots: Path) -> None:
    rules = SourceRules(sources=(f"{roots}/{{tenant}}",))
    own = roots / "acme" / "support"
    assert rules.check(str(own), "acme") == os.path.realpath(own)
    assert rules.check(f"file://{own}", "acme") == os.path.realpath(own)
    _refusal(rules, str(roots / "globex" / "support"))
    _refusal(rules, str(roots / "acme" / ".." / "globex" / "support"))
    _refusal(rules, "relative/path")
    # globex gets the same rule with its own name.
    assert rules.check(str(roots / "globex" / "support"), "globex")


def test_refusals_are_the_same_whatever_exists_there(roots: Path) -> None:
    """No filesystem oracle: a directory, a file, and nothing all read the same."""
    rules = SourceRules(sources=(f"{roots}/{{tenant}}",))
    messages = {
        _refusal(rules, str(p), tenant="globex")
        for p in (
            roots / "acme" / "support",  # a directory (an adapter, even)
            roots / "acme" / "a-file",  # a file
            roots / "acme" / "nothing",  # nothing
            Path("/etc/passwd"),
            Path("/proc/self/environ"),
        )
    }
    assert len(messages) == 1, messages


def test_symlinks_are_resolved_before_the_check(roots: Path) -> None:
    rules = SourceRules(sources=(f"{roots}/{{tenant}}",))
    # A link in acme's root to globex's adapter directory.
    (roots / "acme" / "borrowed").symlink_to(roots / "globex" / "support")
    _refusal(rules, str(roots / "acme" / "borrowed"))
    # An adapter directory of acme's whose weights file is a link to globex's.
    sneaky = roots / "acme" / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_text(
        (roots / "acme/support/adapter_config.json").read_text()
    )
    (sneaky / "adapter_model.safetensors").symlink_to(
        roots / "globex" / "support" / "adapter_model.safetensors"
    )
    _refusal(rules, str(sneaky))


def test_private_directories_are_refused_even_unconfined(roots: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "globex").symlink_to(roots / "globex")
    rules = SourceRules.anything()
    assert rules.check(str(roots / "acme" / "support"), "acme")
    with pytest.raises(SourceNotAllowed):
        rules.check(str(roots / "globex" / "support"), "acme", private=[roots / "globex"])
    with pytest.raises(SourceNotAllowed):  # through a link into the private directory
        rules.check(str(cache / "globex" / "support"), "acme", private=[roots / "globex"])


def test_url_and_bucket_prefixes() -> None:
    rules = SourceRules(
        sources=("https://hub.example.com/adapters/{tenant}/", "s3://adapters/{tenant}/")
    )
    assert rules.check("https://hub.example.com/adapters/acme/support", "acme")
    assert rules.check("HTTPS://HUB.example.com/adapters/acme/support/", "acme")
    assert rules.check("s3://adapters/acme/support", "acme")
    for source in (
        "https://hub.example.com/adapters/acme-evil/support",
        "https://hub.example.com/adapters/globex/support",
        "https://hub.example.com/adapters/acme/../globex/support",
        "https://hub.example.com/adapters/acme/%2e%2e/globex/support",
        "https://user:pw@hub.example.com/adapters/acme/support",
        "https://hub.example.com.evil.net/adapters/acme/support",
        "http://hub.example.com/adapters/acme/support",  # another scheme is another rule
        "s3://adapters/globex/support",
        "s3://other-bucket/acme/support",
    ):
        with pytest.raises(SourceNotAllowed):
            rules.check(source, "acme")


def test_a_plugin_scheme_is_a_prefix_like_any_other() -> None:
    """A source a package registers (``vault://``) is off until a rule names its prefix."""
    rules = SourceRules(sources=("vault://{tenant}/",))
    assert rules.check("vault://acme/support", "acme") == "vault://acme/support"
    for source in ("vault://globex/support", "vault://acme/../globex/x", "other://acme/x"):
        with pytest.raises(SourceNotAllowed):
            rules.check(source, "acme")
    with pytest.raises(SourceNotAllowed):
        SourceRules().check("vault://acme/support", "acme")


@pytest.mark.parametrize(
    "rule",
    ["relative/dir", "https://hub.example.com/adapters", "https://hub/a/../b/", "https://u:p@h/x/"],
)
def test_malformed_rules_are_refused_when_configured(rule: str) -> None:
    with pytest.raises(ValidationError):
        SourceRules(sources=(rule,))


async def test_register_with_rules_changes_nothing_when_refused(roots: Path) -> None:
    rules = SourceRules(sources=(f"{roots}/{{tenant}}",))
    resolved = str((roots / "acme" / "support").resolve())
    async with AdapterPool(MockBackend(), registry=Registry()) as pool:
        info = await pool.register(
            "support", str(roots / "acme" / "support"), tenant="acme", allowed=rules
        )
        assert info.source == resolved
        with pytest.raises(SourceNotAllowed):
            await pool.register(
                "stolen", str(roots / "globex" / "support"), tenant="acme", allowed=rules
            )
        assert [a.adapter_id for a in pool.list_adapters(tenant="acme")] == ["acme/support"]
