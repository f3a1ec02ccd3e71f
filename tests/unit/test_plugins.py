"""Backends, policies and sources are found through entry points, built-in ones included."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lorapool import plugins
from lorapool.abc import EvictionPolicy
from lorapool.errors import InvalidRequest, PluginNotFound
from lorapool.sources import LocalSource, available_schemes, make_source, register_source
from lorapool.sources import base as sources_base

BUILTIN = {
    plugins.BACKENDS: {"torch", "vllm", "openai", "sglang", "tgi"},
    plugins.POLICIES: {"lru", "lru2", "sieve", "s3fifo", "wtinylfu", "gdsf", "ttl"},
    plugins.SOURCES: {"file", "s3", "http", "https"},
}


@pytest.mark.parametrize("group", sorted(BUILTIN))
def test_every_builtin_name_is_declared_by_lorapools_own_entry_points(group: str) -> None:
    declared = plugins._entry_points(group)
    assert BUILTIN[group] <= set(plugins.available(group))
    for name in BUILTIN[group]:
        dist = declared[name].dist
        assert dist is not None and dist.name == "lorapool", (name, dist)


def test_builtin_backends_load_as_their_classes() -> None:
    from lorapool.backends.base import BaseBackend

    for name in BUILTIN[plugins.BACKENDS] - {"torch"}:  # torch's module imports torch
        cls = plugins.load_backend(name)
        assert isinstance(cls, type) and issubclass(cls, BaseBackend), name
    assert plugins.load_backend("openai").__name__ == "OpenAIServerBackend"


def test_builtin_policies_and_sources_load() -> None:
    for name in BUILTIN[plugins.POLICIES]:
        assert isinstance(plugins.load_policy(name), EvictionPolicy), name
    assert plugins.load_source("file") is LocalSource
    assert plugins.load_source("HTTPS").__name__ == "HttpSource"  # schemes are case-blind
    assert isinstance(make_source("file"), LocalSource)


@pytest.mark.parametrize(
    ("load", "group"),
    [
        (plugins.load_backend, plugins.BACKENDS),
        (plugins.load_policy, plugins.POLICIES),
        (plugins.load_source, plugins.SOURCES),
    ],
)
def test_unknown_names_raise_plugin_not_found(load: object, group: str) -> None:
    with pytest.raises(PluginNotFound) as err:
        load("no-such-plugin")  # type: ignore[operator]
    assert err.value.group == group and err.value.name == "no-such-plugin"
    assert set(err.value.available) >= BUILTIN[group]
    assert isinstance(err.value, LookupError)


def test_an_unknown_scheme_is_the_callers_mistake() -> None:
    with pytest.raises(InvalidRequest, match=r"no source handles 'gopher'.*'s3'"):
        make_source("gopher")


class _MarkedSource(LocalSource):
    pass


@pytest.fixture
def clean_overrides() -> Iterator[None]:
    before = dict(sources_base._OVERRIDES)
    yield
    sources_base._OVERRIDES.clear()
    sources_base._OVERRIDES.update(before)


@pytest.mark.usefixtures("clean_overrides")
def test_register_source_adds_a_scheme_and_overrides_an_entry_point(tmp_path: Path) -> None:
    register_source("mem", _MarkedSource)
    assert "mem" in available_schemes() and "mem" not in plugins.available(plugins.SOURCES)
    assert isinstance(make_source("mem"), _MarkedSource)
    register_source("FILE", _MarkedSource)  # over the built-in entry point, for this process
    assert isinstance(make_source("file"), _MarkedSource)
    with pytest.raises(ValueError, match="not a URI scheme"):
        register_source("no scheme", _MarkedSource)
