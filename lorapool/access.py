"""Where a caller may register adapters from: :class:`SourceRules`.

A platform that lets tenants register their own adapters must confine where
the bytes come from: otherwise a tenant can register another tenant's adapter
directory (and serve its weights under its own name), read its way around the
host's filesystem through the error messages, or make the server fetch with its
own S3 credentials. ``AdapterPool.register(..., allowed=rules)`` checks every
source against the rules before anything is read; the server does it for every
registration a key makes (``[registration]`` in its config).

Rules are prefixes, one kind per scheme:

* an absolute local directory (``/srv/adapters/{tenant}``): the path, with every
  symlink resolved, must lie under it, and so must every entry of the adapter
  directory (a symlinked ``adapter_model.safetensors`` pointing at another
  tenant's files is refused);
* an ``http://`` or ``https://`` prefix ending in ``/`` (scheme and host compared
  exactly, the path by prefix, no ``..`` segments, no credentials in the URL);
* an ``s3://bucket/prefix/`` prefix, or the prefix of any scheme a package's
  source registers (``vault://team/``), compared as written.

``{tenant}`` in a rule is replaced by the caller's tenant. A scheme without a rule
is off. Every refusal is the same :class:`~lorapool.errors.SourceNotAllowed`,
whether the path exists, is a file, or is nothing at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, field_validator

from lorapool.errors import SourceNotAllowed

__all__ = ["SourceRules"]

_WEB = ("http", "https")


def _scheme(source: str) -> str | None:
    """A URI's scheme, lower-cased (``None`` for a path or ``file://``)."""
    scheme, sep, _ = source.partition("://")
    if not sep or not scheme or scheme.lower() == "file" or "/" in scheme:
        return None
    return scheme.lower()


def _is_remote(source: str) -> bool:
    return _scheme(source) is not None


def _local_path(source: str) -> str | None:
    """The filesystem path a source names, or ``None`` for another scheme."""
    if source.startswith("file://"):
        return unquote(source[len("file://") :])
    if "://" in source:
        return None
    return source


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _has_dot_segments(path: str) -> bool:
    return any(part in ("..", ".") for part in unquote(path).split("/"))


class SourceRules(BaseModel):
    """The sources one caller may register adapters from (none by default).

    ``sources`` holds absolute local directories and URI prefixes ending in ``/``
    (``https://host/prefix/``, ``s3://bucket/prefix/``, ``vault://team/``);
    ``{tenant}`` stands for the caller's tenant. ``SourceRules()`` allows nothing;
    ``SourceRules.anything()`` is the trusted platform's (no confinement).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: tuple[str, ...] = ()
    unconfined: bool = False
    """Allow any source (the platform's own registrations); refuse only private dirs."""

    @field_validator("sources")
    @classmethod
    def _well_formed(cls, sources: tuple[str, ...]) -> tuple[str, ...]:
        for rule in sources:
            if _is_remote(rule):
                parts = urlsplit(rule)
                if not rule.endswith("/") or (_scheme(rule) in _WEB and not parts.netloc):
                    raise ValueError(
                        f"source rule {rule!r}: a URI prefix must end with '/' (so "
                        "'https://h/acme/' does not also allow 'https://h/acme-evil/'), and "
                        "an http(s) one needs a host"
                    )
                if parts.username or parts.password or parts.query or parts.fragment:
                    raise ValueError(f"source rule {rule!r}: no credentials, query or fragment")
                if _has_dot_segments(parts.path) or _has_dot_segments(parts.netloc):
                    raise ValueError(f"source rule {rule!r}: no '.' or '..' segments")
            else:
                path = _local_path(rule)
                if path is None or not os.path.isabs(os.path.expanduser(path)):
                    raise ValueError(
                        f"source rule {rule!r} must be an absolute directory or a URI prefix "
                        "(https://host/prefix/, s3://bucket/prefix/, any source scheme://...)"
                    )
        return sources

    @classmethod
    def anything(cls) -> SourceRules:
        """No confinement: any source (still never a lorapool-private directory)."""
        return cls(unconfined=True)

    def for_tenant(self, tenant: str) -> tuple[str, ...]:
        """The rules with ``{tenant}`` replaced."""
        return tuple(rule.replace("{tenant}", tenant) for rule in self.sources)

    def check(self, source: str, tenant: str, *, private: Iterable[Path] = ()) -> str:
        """The source to read, if ``tenant`` may register from ``source``; else refuse.

        Local paths come back resolved (symlinks followed), so what is read is
        what was checked. ``private`` directories (the store's own copies of every
        tenant's adapters) are refused whatever the rules say. Touches the
        filesystem: call it off the event loop.
        """
        if not isinstance(source, str) or not source or "\x00" in source:
            raise SourceNotAllowed(str(source)[:200])
        path = _local_path(source)
        if path is not None:
            return self._check_local(source, path, tenant, list(private))
        if self.unconfined:
            return source
        if _is_remote(source) and self._remote_allowed(source, tenant):
            return source
        raise SourceNotAllowed(source)

    def _check_local(self, source: str, path: str, tenant: str, private: list[Path]) -> str:
        expanded = os.path.expanduser(path)
        if not os.path.isabs(expanded) and not self.unconfined:
            raise SourceNotAllowed(source, "use an absolute path")
        real = os.path.realpath(expanded)
        denied = [os.path.realpath(p) for p in private]
        roots = (
            ["/"]
            if self.unconfined
            else [
                os.path.realpath(os.path.expanduser(_local_path(r) or ""))
                for r in self.for_tenant(tenant)
                if not _is_remote(r)
            ]
        )
        root = next((r for r in roots if _under(real, r)), None)
        if root is None or any(_under(real, d) for d in denied):
            raise SourceNotAllowed(source)
        # Inside the caller's own root, entries may not lead back out of it.
        if os.path.isdir(real):
            for entry in _entries(real):
                target = os.path.realpath(entry)
                if not _under(target, root) or any(_under(target, d) for d in denied):
                    raise SourceNotAllowed(source, "an entry of the directory leads outside it")
        return real

    def _remote_allowed(self, source: str, tenant: str) -> bool:
        scheme = _scheme(source)
        parts = urlsplit(source)
        if parts.username or parts.password or _has_dot_segments(parts.path):
            return False
        if _has_dot_segments(parts.netloc):
            return False
        for rule in self.for_tenant(tenant):
            if _scheme(rule) != scheme:
                continue
            if scheme in _WEB:
                allowed = urlsplit(rule)
                if parts.netloc.lower() != allowed.netloc.lower():
                    continue
                path, prefix = parts.path, allowed.path
            else:  # s3://bucket/key, or a source a package registers: compared as written
                path, prefix = source.partition("://")[2], rule.partition("://")[2]
            if (path if path.endswith("/") else path + "/").startswith(prefix):
                return True
        return False


_MAX_ENTRIES = 10_000
"""An adapter directory holds a handful of files; more than this is refused unread."""


def _entries(directory: str) -> Sequence[str]:
    """Every path under ``directory`` (symlinks listed, not followed)."""
    found: list[str] = []
    for base, dirs, files in os.walk(directory, followlinks=False):
        found.extend(os.path.join(base, name) for name in [*dirs, *files])
        if len(found) > _MAX_ENTRIES:
            raise SourceNotAllowed(directory, f"more than {_MAX_ENTRIES} entries")
    return found
